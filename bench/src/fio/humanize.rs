//! fio's number and date formatting for text output: `num2str` (e.g. "97.5k",
//! "381MiB/s") ported from fio's lib/num2str.c, and a ctime(3)-style timestamp.

const SI_PREFIXES: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];
const IEC_PREFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];

/// fio's `num2str(num, maxlen, 1, pow2, unit)`: scales `num` by 1000 (or 1024 when
/// `pow2`) until it has at most `max_digits` digits, keeping as many decimals as fit,
/// then appends the prefix and `unit` ("", "B" or "B/s").
pub fn num2str(num: u64, max_digits: usize, pow2: bool, unit: &str) -> String {
    let (thousand, prefixes) = if pow2 { (1024, &IEC_PREFIXES) } else { (1000, &SI_PREFIXES) };
    let mut value = num;
    let mut prefix_index = 0;
    let mut remainder = None;
    while prefix_index < prefixes.len() - 1 && digit_count(value) > max_digits {
        remainder = Some(value % thousand);
        value /= thousand;
        prefix_index += 1;
    }
    let prefix = prefixes[prefix_index];
    let Some(remainder) = remainder else {
        return format!("{value}{prefix}{unit}");
    };
    let digits = digit_count(value);
    if max_digits <= digits + 1 {
        // No room for decimals: round half up, like fio's carry.
        let rounded = value + u64::from(remainder >= thousand / 2);
        return format!("{rounded}{prefix}{unit}");
    }
    let decimals = max_digits - digits - 1;
    let fraction = format!("{:.*}", decimals, remainder as f64 / thousand as f64);
    // The fraction rounds up to "1.00..." when the remainder is nearly a whole unit.
    let (whole, fraction_digits) = match fraction.split_once('.') {
        Some(("1", rest)) => (value + 1, rest.to_string()),
        Some((_, rest)) => (value, rest.to_string()),
        None => (value, String::new()),
    };
    format!("{whole}.{fraction_digits}{prefix}{unit}")
}

fn digit_count(value: u64) -> usize {
    value.checked_ilog10().map_or(1, |log| log as usize + 1)
}

const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// `timestamp_s` in ctime(3) layout, e.g. "Tue Nov 24 23:52:12 2026". fio prints local
/// time; we print UTC so output does not depend on the machine's zone files.
pub fn ctime_utc(timestamp_s: u64) -> String {
    let days = timestamp_s / 86_400;
    let second_of_day = timestamp_s % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{} {} {:>2} {:02}:{:02}:{:02} {}",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        day,
        second_of_day / 3_600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        year
    )
}

/// (year, month 1..=12, day 1..=31) of a count of days since 1970-01-01, by Howard
/// Hinnant's `civil_from_days` algorithm.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn num2str_matches_fio_samples() {
        // Values from real fio 3.33 output lines.
        assert_eq!(num2str(97_523, 4, false, ""), "97.5k");
        assert_eq!(num2str(2_262_687, 4, false, ""), "2263k");
        assert_eq!(num2str(8_388_608, 4, true, "B"), "8192KiB");
        assert_eq!(num2str(8_388_608, 4, false, "B"), "8389kB");
        assert_eq!(num2str(399_457_523, 4, true, "B/s"), "381MiB/s");
        assert_eq!(num2str(399_457_523, 4, false, "B/s"), "399MB/s");
        assert_eq!(num2str(56_434, 6, false, ""), "56434");
        assert_eq!(num2str(0, 4, false, ""), "0");
    }

    #[test]
    fn num2str_carries_fraction_into_whole_part() {
        // 19.999k with one decimal rounds to "20.0k": the carry reaches the integer part.
        assert_eq!(num2str(19_999, 4, false, ""), "20.0k");
        assert_eq!(num2str(19_999, 3, false, ""), "20k");
        assert_eq!(num2str(u64::MAX, 4, false, ""), "18.4E");
    }

    #[test]
    fn ctime_formats_utc() {
        assert_eq!(ctime_utc(0), "Thu Jan  1 00:00:00 1970");
        assert_eq!(ctime_utc(1_795_564_332), "Tue Nov 24 23:52:12 2026");
        assert_eq!(ctime_utc(951_782_400), "Tue Feb 29 00:00:00 2000");
    }
}

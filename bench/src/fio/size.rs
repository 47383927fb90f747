//! fio-style value parsing: byte sizes with unit suffixes, time values, booleans and
//! plain integers. Parsers return `InvalidValue` with an empty option name; the caller
//! names the option with `OptionError::for_option`.

use std::time::Duration;

use super::error::OptionError;

/// Size suffixes (lower-cased) and their multipliers under fio's default `kb_base=1024`.
///
/// fio's compatibility mode is deliberately inverted: `k`/`kb` mean 1024 while the IEC
/// spellings `kib`/`mib`/... mean powers of 1000 (`fio --size=1MiB` moves 1,000,000 bytes).
/// We mirror fio so a command line means the same thing under both tools.
const SIZE_SUFFIXES: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", 1 << 10),
    ("kb", 1 << 10),
    ("kib", 1_000),
    ("m", 1 << 20),
    ("mb", 1 << 20),
    ("mib", 1_000_000),
    ("g", 1 << 30),
    ("gb", 1 << 30),
    ("gib", 1_000_000_000),
    ("t", 1 << 40),
    ("tb", 1 << 40),
    ("tib", 1_000_000_000_000),
    ("p", 1 << 50),
    ("pb", 1 << 50),
    ("pib", 1_000_000_000_000_000),
];

/// Time suffixes (lower-cased) and their length in microseconds, fio's time resolution.
/// A bare number is seconds, as for fio's `runtime` and `ramp_time`.
const TIME_SUFFIXES: &[(&str, u64)] = &[
    ("", 1_000_000),
    ("us", 1),
    ("usec", 1),
    ("ms", 1_000),
    ("msec", 1_000),
    ("s", 1_000_000),
    ("m", 60 * 1_000_000),
    ("h", 3_600 * 1_000_000),
    ("d", 86_400 * 1_000_000),
];

/// Splits `text` into its leading number and the unit suffix after it.
/// Accepts decimal or `0x` hexadecimal digits, as fio does.
fn split_number(text: &str) -> Result<(u64, &str), OptionError> {
    let trimmed = text.trim();
    let (digits_and_rest, radix) = match trimmed.strip_prefix("0x").or_else(|| trimmed.strip_prefix("0X")) {
        Some(rest) => (rest, 16),
        None => (trimmed, 10),
    };
    let digit_len = digits_and_rest.find(|c: char| !c.is_digit(radix)).unwrap_or(digits_and_rest.len());
    if digit_len == 0 {
        return Err(OptionError::bad_value(text, "expected a non-negative integer"));
    }
    let (digits, suffix) = digits_and_rest.split_at(digit_len);
    let number = u64::from_str_radix(digits, radix).map_err(|_| OptionError::bad_value(text, "number too large"))?;
    Ok((number, suffix))
}

/// Looks up `suffix` case-insensitively in `table`.
fn suffix_multiplier(table: &[(&str, u64)], suffix: &str) -> Option<u64> {
    let lower = suffix.to_ascii_lowercase();
    table.iter().find(|(name, _)| *name == lower).map(|(_, mult)| *mult)
}

/// Parses a fio size: `512`, `4k`, `1M`, `2GB`, `0x1000`. `k` is 1024 (fio's default
/// `kb_base=1024`); `KiB` is 1000, exactly as fio 3.x treats it. Percentages, fractions
/// and trailing garbage are rejected rather than silently truncated.
pub fn parse_size(text: &str) -> Result<u64, OptionError> {
    let (number, suffix) = split_number(text)?;
    let multiplier = suffix_multiplier(SIZE_SUFFIXES, suffix)
        .ok_or_else(|| OptionError::bad_value(text, format!("unknown size suffix '{suffix}' (use k, m, g, t or p)")))?;
    number.checked_mul(multiplier).ok_or_else(|| OptionError::bad_value(text, "size overflows 64 bits"))
}

/// Parses a fio time value: a bare number is seconds; suffixes `us`/`usec`, `ms`/`msec`,
/// `s`, `m` (minutes), `h`, `d`, case-insensitive. Resolution is one microsecond.
pub fn parse_duration(text: &str) -> Result<Duration, OptionError> {
    let (number, suffix) = split_number(text)?;
    let micros_per_unit = suffix_multiplier(TIME_SUFFIXES, suffix).ok_or_else(|| {
        OptionError::bad_value(text, format!("unknown time suffix '{suffix}' (use us, ms, s, m, h or d)"))
    })?;
    let micros = number
        .checked_mul(micros_per_unit)
        .ok_or_else(|| OptionError::bad_value(text, "duration overflows 64-bit microseconds"))?;
    Ok(Duration::from_micros(micros))
}

/// Parses a flag value: `1`/`0`/`true`/`false` (case-insensitive). A bare flag with no
/// value is handled by the caller; fio itself only takes integers, `true`/`false` are extra.
pub fn parse_bool(text: &str) -> Result<bool, OptionError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(OptionError::bad_value(text, "expected 1, 0, true or false")),
    }
}

/// Parses a plain non-negative integer (decimal or `0x` hex) with no unit suffix.
pub fn parse_uint(text: &str) -> Result<u64, OptionError> {
    let (number, suffix) = split_number(text)?;
    if !suffix.is_empty() {
        return Err(OptionError::bad_value(text, format!("unexpected '{suffix}' after the number")));
    }
    Ok(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_k_m_g_t_like_fio() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4kb"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1_048_576));
        assert_eq!(parse_size("1MB"), Ok(1_048_576));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert_eq!(parse_size("7b"), Ok(7));
        assert_eq!(parse_size("0x1000"), Ok(4096));
    }

    #[test]
    fn iec_suffixes_are_decimal_under_fio_compat_kb_base() {
        // Verified against fio 3.33: --size=1MiB moves 1,000,000 bytes, --size=4kib 4000.
        assert_eq!(parse_size("1MiB"), Ok(1_000_000));
        assert_eq!(parse_size("4kib"), Ok(4_000));
    }

    #[test]
    fn bad_sizes_name_the_value() {
        for bad in ["", "abc", "4x", "1.5M", "-1", "4k2", "k"] {
            match parse_size(bad) {
                Err(OptionError::InvalidValue { value, .. }) => assert_eq!(value, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        let overflow = parse_size("20000000p");
        assert!(matches!(overflow, Err(OptionError::InvalidValue { ref reason, .. }) if reason.contains("overflows")));
    }

    #[test]
    fn durations_default_to_seconds() {
        assert_eq!(parse_duration("20"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("3MS"), Ok(Duration::from_millis(3)));
    }

    #[test]
    fn bad_durations_are_rejected() {
        for bad in ["", "abc", "5 minutes", "1.5s", "10sec", "-3"] {
            assert!(
                matches!(parse_duration(bad), Err(OptionError::InvalidValue { ref value, .. }) if value == bad),
                "{bad:?} should be rejected"
            );
        }
        assert!(parse_duration("99999999999999999d").is_err());
    }

    #[test]
    fn bools_accept_digits_and_words() {
        assert_eq!(parse_bool("1"), Ok(true));
        assert_eq!(parse_bool("TRUE"), Ok(true));
        assert_eq!(parse_bool("0"), Ok(false));
        assert_eq!(parse_bool("false"), Ok(false));
        assert!(parse_bool("2").is_err());
        assert!(parse_bool("yes").is_err());
    }

    #[test]
    fn uints_reject_suffixes() {
        assert_eq!(parse_uint("32"), Ok(32));
        assert_eq!(parse_uint("0x10"), Ok(16));
        assert!(parse_uint("32k").is_err());
        assert!(parse_uint("").is_err());
    }
}

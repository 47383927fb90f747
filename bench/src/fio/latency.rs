//! Latency summaries computed from histograms the way fio computes them: min/max/
//! mean/sample-stddev, percentiles by fio's rule, and fio's nsec/usec/msec buckets.
//! Histogram values are exact below 2048 ns and within 0.1% above.

use hdrhistogram::Histogram;

/// fio's default `percentile_list`.
pub const FIO_PERCENTILES: [f64; 17] =
    [1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99];

/// min/max/mean/stddev/N of one latency histogram, all in ns; zeros when empty.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LatStats {
    /// Smallest sample.
    pub min_ns: u64,
    /// Largest sample (upper edge of its bucket).
    pub max_ns: u64,
    /// Mean sample.
    pub mean_ns: f64,
    /// Sample standard deviation (n - 1 denominator, as fio).
    pub stddev_ns: f64,
    /// Number of samples.
    pub samples: u64,
}

/// Summarises `histogram` like fio's `calc_lat`.
pub fn lat_stats(histogram: &Histogram<u64>) -> LatStats {
    let samples = histogram.len();
    if samples == 0 {
        return LatStats::default();
    }
    // hdrhistogram gives the population deviation; fio reports the sample deviation.
    let stddev_ns = match samples {
        1 => 0.0,
        n => histogram.stdev() * (n as f64 / (n - 1) as f64).sqrt(),
    };
    LatStats { min_ns: histogram.min(), max_ns: histogram.max(), mean_ns: histogram.mean(), stddev_ns, samples }
}

/// The value at each percentile in `list` (ascending), by fio's rule: the first bucket
/// whose cumulative count reaches `p / 100 * N`. Empty when there are no samples.
pub fn percentiles_ns(histogram: &Histogram<u64>, list: &[f64]) -> Vec<u64> {
    let total = histogram.len() as f64;
    let mut values = Vec::with_capacity(list.len());
    if histogram.is_empty() {
        return values;
    }
    let mut cumulative = 0u64;
    for bucket in histogram.iter_recorded() {
        cumulative += bucket.count_at_value();
        while let Some(&pct) = list.get(values.len()) {
            if (cumulative as f64) < pct / 100.0 * total {
                break;
            }
            values.push(bucket.value_iterated_to());
        }
        if values.len() == list.len() {
            break;
        }
    }
    values
}

/// Bucket upper bounds shared by fio's nsec and usec latency tables.
pub const LAT_BOUNDS: [u64; 10] = [2, 4, 10, 20, 50, 100, 250, 500, 750, 1000];
/// fio's msec latency table; the last entry is ">=2000".
pub const LAT_MSEC_BOUNDS: [u64; 11] = [2, 4, 10, 20, 50, 100, 250, 500, 750, 1000, 2000];

/// Share (%) of I/Os in each of fio's latency buckets (`latency_ns`, `latency_us`,
/// `latency_ms`). Bucket i of a table holds values in [bound[i-1], bound[i]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LatencyBuckets {
    /// Under 1 µs, by ns bound.
    pub nsec: [f64; 10],
    /// 1 µs .. 1 ms, by µs bound.
    pub usec: [f64; 10],
    /// 1 ms and up, by ms bound; the 12th bucket is ">=2000" ms.
    pub msec: [f64; 12],
}

/// fio's bucket index for `value`: how many bounds are <= it.
fn bucket_index(value: u64, bounds: &[u64]) -> usize {
    bounds.iter().take_while(|&&bound| bound <= value).count()
}

/// fio's latency distribution over the samples of all `histograms` (fio buckets
/// completion latency of reads and writes together). A non-empty bucket below 0.01%
/// shows as 0.01%, as in fio.
pub fn latency_buckets(histograms: &[&Histogram<u64>]) -> LatencyBuckets {
    let mut counts = ([0u64; 10], [0u64; 10], [0u64; 12]);
    let mut total = 0u64;
    for histogram in histograms {
        for bucket in histogram.iter_recorded() {
            let ns = histogram.median_equivalent(bucket.value_iterated_to());
            let count = bucket.count_at_value();
            total += count;
            match ns {
                0..=999 => counts.0[bucket_index(ns, &LAT_BOUNDS)] += count,
                1_000..=999_999 => counts.1[bucket_index(ns / 1_000, &LAT_BOUNDS)] += count,
                _ => counts.2[bucket_index(ns / 1_000_000, &LAT_MSEC_BOUNDS)] += count,
            }
        }
    }
    LatencyBuckets { nsec: shares(&counts.0, total), usec: shares(&counts.1, total), msec: shares(&counts.2, total) }
}

fn shares<const N: usize>(counts: &[u64; N], total: u64) -> [f64; N] {
    counts.map(|count| match (count, total) {
        (0, _) | (_, 0) => 0.0,
        _ => (count as f64 * 100.0 / total as f64).max(0.01),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fio::report::new_latency_histogram;

    fn one_to(n: u64) -> Histogram<u64> {
        let mut histogram = new_latency_histogram();
        for value in 1..=n {
            histogram.record(value).expect("in range");
        }
        histogram
    }

    #[test]
    fn stats_use_sample_stddev() {
        let stats = lat_stats(&one_to(1000));
        assert_eq!((stats.min_ns, stats.max_ns, stats.samples), (1, 1000, 1000));
        assert!((stats.mean_ns - 500.5).abs() < 1e-9, "{}", stats.mean_ns);
        // sqrt(n (n^2 - 1) / 12 / (n - 1)) for 1..=n.
        let expected = (1000.0f64 * (1000.0 * 1000.0 - 1.0) / 12.0 / 999.0).sqrt();
        assert!((stats.stddev_ns - expected).abs() < 1e-6, "{} vs {expected}", stats.stddev_ns);
        assert_eq!(lat_stats(&new_latency_histogram()), LatStats::default());
    }

    #[test]
    fn percentiles_follow_fios_rule() {
        let values = percentiles_ns(&one_to(1000), &FIO_PERCENTILES);
        // 99.9 is 99.900000000000006 in binary, so its threshold is just above 999 samples
        // and the answer is 1000, in fio (long double) as here.
        assert_eq!(values, [10, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 950, 990, 995, 1000, 1000, 1000]);
        assert!(percentiles_ns(&new_latency_histogram(), &FIO_PERCENTILES).is_empty());
    }

    #[test]
    fn percentiles_of_a_single_value() {
        let mut histogram = new_latency_histogram();
        histogram.record_n(1500, 7).expect("in range");
        assert_eq!(percentiles_ns(&histogram, &[1.0, 50.0, 99.99]), [1500, 1500, 1500]);
    }

    #[test]
    fn buckets_match_fios_boundaries() {
        let buckets = latency_buckets(&[&one_to(1000)]);
        assert_eq!(buckets.nsec, [0.1, 0.2, 0.6, 1.0, 3.0, 5.0, 15.0, 25.0, 25.0, 25.0]);
        assert_eq!(buckets.usec[0], 0.1); // the 1000 ns sample is 1 us
        assert!(buckets.msec.iter().all(|&share| share == 0.0));
    }

    #[test]
    fn tiny_shares_round_up_to_a_hundredth_and_long_tails_land_in_msec() {
        let mut histogram = new_latency_histogram();
        histogram.record_n(100, 1_000_000).expect("in range");
        histogram.record(5_000_000_000).expect("auto-resizes");
        let buckets = latency_buckets(&[&histogram]);
        assert_eq!(buckets.msec[11], 0.01); // one in a million, shown as fio's floor
        assert!((buckets.nsec[6] - 100.0).abs() < 1e-3);
    }
}

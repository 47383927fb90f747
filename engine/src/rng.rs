//! splitmix64: the project's one seeded random generator (bench offsets, fault injection,
//! test data). Seeded so a run or a failure repeats exactly; a few instructions per draw.

/// Next value of the sequence; advances `state`.
pub fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A value in `0..bound` (bound > 0), by multiply-shift: no division on the hot path.
pub fn below(state: &mut u64, bound: u64) -> u64 {
    assert!(bound > 0);
    ((u128::from(next(state)) * u128::from(bound)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_bounds_and_spreads() {
        let mut state = 1;
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let v = below(&mut state, 10);
            assert!(v < 10);
            seen[v as usize] += 1;
        }
        assert!(seen.iter().all(|count| *count > 800), "{seen:?}");
    }
}

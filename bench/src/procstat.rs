//! What /proc says about another process: its CPU time, for the side-by-side figures that
//! charge a server (qemu-storage-daemon, qemu-nbd, tandemd) with the CPU it used.

/// CPU seconds (user + system) process `pid` has used so far; 0 if it is gone.
pub fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / per_s
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_used_some_cpu_and_a_missing_one_none() {
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(30) {}
        assert!(super::cpu_s(std::process::id()) > 0.0);
        assert_eq!(super::cpu_s(u32::MAX), 0.0);
    }
}

//! `--pidfile`: checked before anything starts (a live daemon's pidfile is never taken over),
//! written once the daemon serves, removed at exit by the guard that wrote it.

use std::path::{Path, PathBuf};

/// A pidfile path that is free to write.
pub(crate) struct Planned(PathBuf);

/// The written pidfile; dropping it removes the file.
pub(crate) struct Written(PathBuf);

/// Refuse a pidfile that names a live process: another daemon owns it.
pub(crate) fn check(path: &Path) -> Result<Planned, String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        if let Ok(pid) = text.trim().parse::<libc::pid_t>() {
            // SAFETY: kill with signal 0 only checks that the process exists.
            let alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
            if alive {
                return Err(format!("--pidfile {}: process {pid} is running and owns it", path.display()));
            }
        }
    }
    Ok(Planned(path.to_path_buf()))
}

impl Planned {
    pub(crate) fn write(self) -> Result<Written, String> {
        std::fs::write(&self.0, format!("{}\n", std::process::id()))
            .map_err(|e| format!("--pidfile {}: {e}", self.0.display()))?;
        Ok(Written(self.0))
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

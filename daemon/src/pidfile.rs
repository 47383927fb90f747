//! `--pidfile`: checked before anything starts (a live daemon's pidfile, or a file that is not
//! a pidfile, is never taken over),
//! written once the daemon serves, removed at exit by the guard that wrote it.

use std::path::{Path, PathBuf};

/// A pidfile path that is free to write.
pub(crate) struct Planned(PathBuf);

/// The written pidfile; dropping it removes the file.
pub(crate) struct Written(PathBuf);

/// Refuse a pidfile that names a live process (another daemon owns it) and any existing file
/// that is not a pidfile at all (a mistyped path must not overwrite someone's data). A stale
/// pidfile, naming a process that is gone, is taken over.
pub(crate) fn check(path: &Path) -> Result<Planned, String> {
    let text = match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Planned(path.to_path_buf())),
        Err(e) => return Err(format!("--pidfile {}: {e}", path.display())),
        Ok(bytes) => String::from_utf8(bytes).unwrap_or_default(),
    };
    let Ok(pid) = text.trim().parse::<libc::pid_t>() else {
        return Err(format!("--pidfile {}: the file exists and is not a pidfile; not overwriting it", path.display()));
    };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
    if alive {
        return Err(format!("--pidfile {}: process {pid} is running and owns it", path.display()));
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

//! `--pidfile`: checked before anything starts (a live daemon's pidfile, or a file that is not
//! a pidfile, is never taken over),
//! written once the daemon serves, removed at exit by the guard that wrote it.

use std::path::{Path, PathBuf};

/// A pidfile path that is free to write, and the stale pidfile found there, if any.
pub(crate) struct Planned(PathBuf, Option<String>);

/// The written pidfile; dropping it removes the file.
pub(crate) struct Written(PathBuf);

/// Refuse a pidfile that names a live process (another daemon owns it) and any existing file
/// that is not a pidfile at all (a mistyped path must not overwrite someone's data). A stale
/// pidfile, naming a process that is gone, is taken over.
pub(crate) fn check(path: &Path) -> Result<Planned, String> {
    let text = match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Planned(path.to_path_buf(), None)),
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
    Ok(Planned(path.to_path_buf(), Some(text)))
}

impl Planned {
    /// Write our pid. The file is created fresh (never through a symlink): a stale pidfile is
    /// removed first only if it still holds what `check` saw, and a file that appeared since is
    /// left alone and refused.
    pub(crate) fn write(self) -> Result<Written, String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let error = |e: std::io::Error| format!("--pidfile {}: {e}", self.0.display());
        if let Some(stale) = &self.1 {
            if std::fs::read_to_string(&self.0).ok().as_ref() != Some(stale) {
                return Err(format!(
                    "--pidfile {}: it changed while the daemon started; not overwriting it",
                    self.0.display()
                ));
            }
            std::fs::remove_file(&self.0).map_err(error)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.0)
            .map_err(error)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(error)?;
        Ok(Written(self.0))
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

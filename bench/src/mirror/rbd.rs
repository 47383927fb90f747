//! `tandem-bench mirror --target rbd:POOL/IMAGE[:conf=...]`: a Ceph RBD image as the mirror's
//! target (created when missing; an existing one only with --overwrite-target, and never
//! removed), checked with `rbd export` plus `qemu-img compare`, and (with `--compare-qemu`, only
//! into an image the run created) measured against the peers a Ceph user would reach for to
//! move a local disk into the cluster: `rbd import`, and `qemu-img convert -n -W -m 16` where
//! QEMU's rbd module (qemu-block-extra) is installed. Each peer reads the source from the disk,
//! as Tandem does: its pages are dropped from the cache first.

use super::{qemu_img_identical, ratio};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;
use tandem::block::BlockDriver;
use tandem_drivers::rbd::{create_image, remove_image, RbdDriver, RbdError, RbdOptions, RbdSpec};

/// The spec if `target` names an rbd image.
pub(crate) fn spec(target: &Path) -> Result<Option<RbdSpec>, String> {
    match target.to_str().filter(|text| text.starts_with("rbd:")) {
        Some(text) => RbdSpec::parse(text).map(Some).map_err(|e| e.to_string()),
        None => Ok(None),
    }
}

/// A new, empty image of `size_bytes` in place of one this run created (removed first), as a
/// new file is for a file target. Never called on an image the bench found (see images.rs).
pub(crate) fn fresh_image(spec: &RbdSpec, size_bytes: u64) -> Result<(), String> {
    remove(spec)?;
    create_image(spec, size_bytes).map_err(|e| e.to_string())
}

/// Remove the image if it exists.
pub(crate) fn remove(spec: &RbdSpec) -> Result<(), String> {
    match remove_image(spec) {
        Ok(()) | Err(RbdError::Image { errno: libc::ENOENT, .. }) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

pub(crate) fn open(spec: &RbdSpec) -> Result<Arc<dyn BlockDriver>, String> {
    Ok(Arc::new(RbdDriver::open(spec, &RbdOptions::default()).map_err(|e| e.to_string())?))
}

/// `rbd` with the spec's conf and user.
fn rbd_command(spec: &RbdSpec) -> Command {
    let mut command = Command::new("rbd");
    if let Some(conf) = &spec.conf_path {
        command.arg("-c").arg(conf);
    }
    if let Some(user) = &spec.user {
        command.arg("--id").arg(user);
    }
    command
}

fn run(mut command: Command, what: &str) -> Result<(), String> {
    let output = command.output().map_err(|e| format!("cannot run {what} (install ceph-common): {e}"))?;
    match output.status.success() {
        true => Ok(()),
        false => Err(format!("{what} failed: {}", String::from_utf8_lossy(&output.stderr).trim())),
    }
}

/// Whether the image's first `size_bytes` equal the source: exported next to it, compared,
/// the export removed.
pub(crate) fn identical(source: &Path, spec: &RbdSpec, size_bytes: u64) -> Result<bool, String> {
    let exported = export_path(source);
    let _ = std::fs::remove_file(&exported);
    let mut command = rbd_command(spec);
    command.arg("export").arg("--no-progress").arg(spec.image_path()).arg(&exported);
    run(command, "rbd export")?;
    let result = qemu_img_identical(source, &exported, size_bytes);
    let _ = std::fs::remove_file(&exported);
    result
}

fn export_path(source: &Path) -> PathBuf {
    let mut name = source.file_name().unwrap_or_default().to_os_string();
    name.push(".rbd-export");
    source.with_file_name(name)
}

/// One peer's copy of the source into the image.
#[derive(Debug, Clone)]
pub struct PeerFigures {
    pub seconds: f64,
    pub mib_per_s: f64,
}

/// The peers' figures, each `None` with the reason it could not run.
#[derive(Debug, Clone)]
pub struct RbdPeers {
    pub rbd_import: PeerFigures,
    pub qemu_img_convert: Result<PeerFigures, String>,
}

impl RbdPeers {
    fn faster_mib_per_s(&self) -> f64 {
        let convert = self.qemu_img_convert.as_ref().map_or(0.0, |c| c.mib_per_s);
        self.rbd_import.mib_per_s.max(convert)
    }

    pub fn to_json(&self, mirror_mib_per_s: f64) -> serde_json::Value {
        let figures = |f: &PeerFigures| json!({ "seconds": f.seconds, "mib_per_s": f.mib_per_s });
        json!({
            "rbd_import": figures(&self.rbd_import),
            "qemu_img_convert": match &self.qemu_img_convert {
                Ok(f) => figures(f),
                Err(reason) => json!({ "skipped": reason }),
            },
            "faster_mib_per_s": self.faster_mib_per_s(),
            "mib_per_s_ratio": ratio(mirror_mib_per_s, self.faster_mib_per_s()),
        })
    }

    pub fn to_text(&self, mirror_mib_per_s: f64) -> String {
        let mut text =
            format!("rbd import:        {:.2} s, {:.0} MiB/s\n", self.rbd_import.seconds, self.rbd_import.mib_per_s);
        text += &match &self.qemu_img_convert {
            Ok(f) => format!("qemu-img convert:  {:.2} s, {:.0} MiB/s\n", f.seconds, f.mib_per_s),
            Err(reason) => format!("qemu-img convert:  skipped ({reason})\n"),
        };
        text += &format!(
            "tandem/faster peer: {:.2}x MiB/s (mirror to READY against the faster whole copy)\n",
            ratio(mirror_mib_per_s, self.faster_mib_per_s())
        );
        text
    }
}

/// Copy `source` into the image with each peer, unloaded, timing each.
pub(crate) fn run_peers(
    source: &Path,
    spec: &RbdSpec,
    size_bytes: u64,
    note: &dyn Fn(String),
) -> Result<RbdPeers, String> {
    let mib = size_bytes as f64 / (1 << 20) as f64;
    let timed = |seconds: f64| PeerFigures { seconds, mib_per_s: mib / seconds.max(1e-9) };
    // rbd import creates the image itself.
    remove(spec)?;
    drop_cached(source)?;
    note(format!("peer: rbd import of {} into {}", source.display(), spec.image_path()));
    let mut command = rbd_command(spec);
    command.arg("import").arg("--no-progress").arg(source).arg(spec.image_path());
    let started = Instant::now();
    run(command, "rbd import")?;
    let rbd_import = timed(started.elapsed().as_secs_f64());
    // QEMU's convert writes into the existing image (-n), 16 requests in flight, unordered.
    let qemu_img_convert = match qemu_has_rbd() {
        false => Err("QEMU's rbd module is not installed (Debian: qemu-block-extra)".to_string()),
        true => {
            fresh_image(spec, size_bytes)?;
            drop_cached(source)?;
            note(format!("peer: qemu-img convert -n -W -m 16 into {}", spec.image_path()));
            let mut command = Command::new("qemu-img");
            command.args(["convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw"]).arg(source);
            command.arg(spec.to_qemu_string());
            let started = Instant::now();
            run(command, "qemu-img convert").map(|()| timed(started.elapsed().as_secs_f64()))
        }
    };
    Ok(RbdPeers { rbd_import, qemu_img_convert })
}

/// Whether `qemu-img` lists rbd among its formats.
fn qemu_has_rbd() -> bool {
    let output = Command::new("qemu-img").arg("--help").output();
    output.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().any(|word| word == "rbd"))
}

/// Drop the source's pages from the page cache: the peers read it buffered, and the check
/// that just compared it left it all in memory, where Tandem's O_DIRECT reads found the disk.
fn drop_cached(source: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(source).map_err(|e| format!("cannot open {}: {e}", source.display()))?;
    // SAFETY: fadvise on an fd we own; it only drops clean cached pages.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    match rc {
        0 => Ok(()),
        errno => Err(format!("cannot drop {} from the page cache: errno {errno}", source.display())),
    }
}

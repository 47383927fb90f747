//! Options mirror and backup share: what a job copies (`sync`), who goes first on a shared
//! device (`copy-priority`) and how it checks its copy (`verify`).

use super::JobError;
use crate::priority::IoPriority;

/// What a job copies: for mirror, before it is READY; for backup, at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncMode {
    /// The whole disk.
    Full,
    /// Only what the source has allocated (by block status), when the target reads as zeros
    /// (a new sparse file; the mirror's `target_is_zero`, given or detected): it stays sparse
    /// where the source has holes. When the target may hold data, the holes are written as
    /// zeros too. A backup's target is new, so its holes stay holes.
    Top,
    /// Only what the guest writes from now on.
    None,
    /// Only what the named bitmap marks, plus new writes (QEMU refuses this for mirror).
    Bitmap,
}

impl SyncMode {
    pub fn parse(text: &str) -> Result<SyncMode, JobError> {
        match text {
            "full" => Ok(SyncMode::Full),
            "top" => Ok(SyncMode::Top),
            "none" => Ok(SyncMode::None),
            "bitmap" => Ok(SyncMode::Bitmap),
            _ => Err(JobError::Config { name: "sync", value: text.to_string(), reason: "full, top, none or bitmap" }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SyncMode::Full => "full",
            SyncMode::Top => "top",
            SyncMode::None => "none",
            SyncMode::Bitmap => "bitmap",
        }
    }
}

/// Who goes first when the guest and the copier compete for the device (`copy-priority`).
/// Beside it, `speed_bytes_per_s` is a hard limit whatever the priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CopyPriority {
    /// The copier keeps the guest's mean latency within 1.5x of what it is without copies
    /// (measured in probe windows): while the guest makes requests, copies are pipelined in
    /// 64 KiB requests and their number halves when the guest's latency rises, grows
    /// otherwise; while it is idle, copies are large (the rule is in `pace.rs`). Copies go at
    /// `IoPriority::BACKGROUND`.
    Guest,
    /// As `Guest`, with 3x the guest's latency without copies allowed, and copies never
    /// pipelined: each is half the budget (at least 256 KiB), one read then one write.
    Balanced,
    /// QEMU's way: every copy at the largest size and depth allowed, at the guest's I/O
    /// class, whatever the guest sees.
    Job,
}

impl CopyPriority {
    pub fn parse(text: &str) -> Result<CopyPriority, JobError> {
        match text {
            "guest" => Ok(CopyPriority::Guest),
            "balanced" => Ok(CopyPriority::Balanced),
            "job" => Ok(CopyPriority::Job),
            _ => Err(JobError::Config {
                name: "copy-priority",
                value: text.to_string(),
                reason: "guest, balanced or job",
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CopyPriority::Guest => "guest",
            CopyPriority::Balanced => "balanced",
            CopyPriority::Job => "job",
        }
    }

    /// The I/O priority of the copier's requests.
    pub fn io_priority(self) -> IoPriority {
        match self {
            CopyPriority::Job => IoPriority::GUEST,
            CopyPriority::Guest | CopyPriority::Balanced => IoPriority::BACKGROUND,
        }
    }
}

/// Whether a job compares its target with what it copied before it declares success (ours:
/// QEMU has only the offline `qemu-img compare`). The rules are in `verify.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum VerifyMode {
    #[default]
    Off,
    /// A pseudo-random sample of the disk's regions (about 1/32 of it, at least one region).
    Sample,
    /// Every byte.
    Full,
}

impl VerifyMode {
    pub fn parse(text: &str) -> Result<VerifyMode, JobError> {
        match text {
            "off" => Ok(VerifyMode::Off),
            "sample" => Ok(VerifyMode::Sample),
            "full" => Ok(VerifyMode::Full),
            _ => Err(JobError::Config { name: "verify", value: text.to_string(), reason: "off, sample or full" }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            VerifyMode::Off => "off",
            VerifyMode::Sample => "sample",
            VerifyMode::Full => "full",
        }
    }
}

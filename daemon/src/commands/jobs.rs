//! Job commands: `blockdev-mirror`, `blockdev-backup`, the job verbs under both of QEMU's names
//! (`job-*` and the older `block-job-*`), `block-job-set-speed`, `block-job-change`,
//! `query-block-jobs`, `query-jobs`; and the thread per job that turns its events into QMP
//! events (JOB_STATUS_CHANGE, BLOCK_JOB_READY, _PENDING, _COMPLETED, _CANCELLED, _ERROR, and
//! our MIRROR_COPY_MODE_CHANGE) and forgets the job once it is dismissed.
//!
//! Our extensions, documented as such: `copy-mode` also takes write-behind and auto,
//! `block-job-change` goes in any direction, `copy-priority`, `verify`, mirror `sync=bitmap`
//! with `bitmap`, backup `on-inconsistent-bitmap`.

use super::{Arguments, Daemon, State};
use crate::qmp::{ErrorClass, QmpError};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use tandem::job::backup::{BackupConfig, BitmapMode, OnInconsistentBitmap};
use tandem::job::copy_before_write::OnCbwError;
use tandem::job::mirror::{CopyMode, MirrorConfig};
use tandem::job::{CopyPriority, ErrorPolicy, Job, JobChange, JobEvent, JobKind, JobStatus, SyncMode, VerifyMode};

/// A job by id, and the nodes it uses (a node in use cannot be deleted).
pub(crate) struct JobRecord {
    pub(crate) job: Job,
    pub(crate) device: String,
    pub(crate) target: String,
}

/// Who else writes node `name` (a job's target, an export, a fleecing filter), if anyone.
fn target_user(state: &State, name: &str) -> Option<String> {
    if let Some((id, _)) = state.jobs.iter().find(|(_, record)| record.target == name) {
        return Some(format!("block job '{id}'"));
    }
    if let Some((id, _)) =
        state.exports.iter().find(|(_, export)| export.node_name == name && export.export.options.writable)
    {
        return Some(format!("export '{id}'"));
    }
    let filter = state.catalog.iter().find(|(_, node)| node.fleecing.as_ref().is_some_and(|f| f.target == name));
    filter.map(|(filter, _)| format!("copy-before-write node '{filter}'"))
}

/// The id of a job that uses node `name`, if any.
pub(super) fn job_using(state: &State, name: &str) -> Option<String> {
    state.jobs.iter().find(|(_, record)| record.device == name || record.target == name).map(|(id, _)| id.clone())
}

const SYNC_MIRROR: &[&str] = &["full", "top", "none", "bitmap"];
const SYNC_BACKUP: &[&str] = &["full", "top", "none", "bitmap", "incremental"];
const ON_ERROR: &[&str] = &["report", "ignore", "enospc", "stop", "auto"];
const COPY_MODES: &[&str] = &["background", "write-blocking", "write-behind", "auto"];
const PRIORITIES: &[&str] = &["guest", "balanced", "job"];
const VERIFY: &[&str] = &["off", "sample", "full"];

fn job_error(error: impl std::fmt::Display) -> QmpError {
    QmpError::generic(error.to_string())
}

fn on_error(args: &mut Arguments, key: &str) -> Result<ErrorPolicy, QmpError> {
    match args.choice(key, ON_ERROR)? {
        // QEMU's `auto` follows the guest device's own policy; a daemon has none: report.
        None | Some("auto") => Ok(ErrorPolicy::Report),
        Some(text) => ErrorPolicy::parse(text).map_err(job_error),
    }
}

/// The common part of both jobs' arguments: ids, nodes, and the source and target drivers.
pub(super) struct Common {
    pub(super) id: String,
    pub(super) device: String,
    pub(super) target: String,
}

fn common(args: &mut Arguments) -> Result<Common, QmpError> {
    let device = args.required("device")?;
    let target = args.required("target")?;
    let id = args.string("job-id")?.unwrap_or_else(|| device.clone());
    Ok(Common { id, device, target })
}

/// Resolve both nodes and start `start` under the lock; record the job and its forwarder.
fn launch(
    daemon: &Daemon,
    common: Common,
    start: impl FnOnce(&tandem::block::Disk, Arc<dyn tandem::block::BlockDriver>) -> Result<Job, tandem::job::JobError>,
) -> Result<Value, QmpError> {
    let mut state = daemon.state();
    if state.jobs.contains_key(&common.id) {
        return Err(QmpError::generic(format!("Job ID '{}' already in use", common.id)));
    }
    let source = state.catalog.get(&common.device).map_err(|_| super::nodes::not_found(&common.device))?;
    let target = state.catalog.get(&common.target).map_err(|_| super::nodes::not_found(&common.target))?;
    if target.read_only {
        return Err(QmpError::generic(format!("Node '{}' is read-only", common.target)));
    }
    if let Some(user) = target_user(&state, &common.target) {
        // QEMU's permission conflict: two writers of one target would interleave.
        return Err(QmpError::generic(format!("Conflicts with use by {user} as 'write' (node '{}')", common.target)));
    }
    let job = start(&source.disk, target.disk.driver()).map_err(job_error)?;
    // QEMU's job is running when the command returns (its created and running events go
    // before the return): wait for the task's first step.
    announce_start(daemon, &job);
    forward_events(daemon, &job);
    let record = JobRecord { job, device: common.device, target: common.target };
    state.jobs.insert(common.id, record);
    Ok(json!({}))
}

pub(super) fn blockdev_mirror(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    let common = common(&mut args)?;
    let defaults = MirrorConfig::default();
    let sync = args.choice("sync", SYNC_MIRROR)?.ok_or_else(|| QmpError::generic("Parameter 'sync' is missing"))?;
    if args.string("replaces")?.is_some() {
        return Err(QmpError::generic("Parameter 'replaces' is not supported: the source's users move to the target"));
    }
    let _filter = args.string("filter-node-name")?; // no filter node in Tandem's graph
    let config = MirrorConfig {
        id: common.id.clone(),
        sync: SyncMode::parse(sync).map_err(job_error)?,
        copy_mode: CopyMode::parse(args.choice("copy-mode", COPY_MODES)?.unwrap_or("background")).map_err(job_error)?,
        bitmap: args.string("bitmap")?,
        granularity_bytes: args.u64("granularity")?.unwrap_or(defaults.granularity_bytes),
        buf_size_bytes: args.u64("buf-size")?.unwrap_or(defaults.buf_size_bytes),
        speed_bytes_per_s: args.u64("speed")?.unwrap_or(0),
        on_source_error: on_error(&mut args, "on-source-error")?,
        on_target_error: on_error(&mut args, "on-target-error")?,
        unmap: args.bool("unmap")?.unwrap_or(true),
        auto_finalize: args.bool("auto-finalize")?.unwrap_or(true),
        auto_dismiss: args.bool("auto-dismiss")?.unwrap_or(true),
        target_is_zero: args.bool("target-is-zero")?,
        copy_priority: priority(&mut args)?,
        verify: verify(&mut args)?,
        ..defaults
    };
    args.finish()?;
    config.validate().map_err(job_error)?;
    let handle = daemon.runtime().clone();
    launch(daemon, common, move |disk, target| tandem::job::mirror::start(&handle, disk, target, config))
}

fn priority(args: &mut Arguments) -> Result<CopyPriority, QmpError> {
    CopyPriority::parse(args.choice("copy-priority", PRIORITIES)?.unwrap_or("guest")).map_err(job_error)
}

fn verify(args: &mut Arguments) -> Result<VerifyMode, QmpError> {
    VerifyMode::parse(args.choice("verify", VERIFY)?.unwrap_or("off")).map_err(job_error)
}

pub(super) fn blockdev_backup(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    let (common, config) = backup_plan(args)?;
    start_backup(daemon, common, config)
}

/// As `start_backup`, under the caller's drain of the source (a transaction's instant).
pub(super) fn start_backup_drained(
    daemon: &Daemon,
    common: Common,
    config: BackupConfig,
    drained: &tandem::block::DrainGuard,
) -> Result<Value, QmpError> {
    let handle = daemon.runtime().clone();
    launch(daemon, common, move |disk, target| {
        tandem::job::backup::start_drained(&handle, disk, target, config, drained)
    })
}

/// A backup whose arguments were read (and checked) by `backup_plan`.
pub(super) fn start_backup(daemon: &Daemon, common: Common, config: BackupConfig) -> Result<Value, QmpError> {
    let handle = daemon.runtime().clone();
    launch(daemon, common, move |disk, target| tandem::job::backup::start(&handle, disk, target, config))
}

/// `blockdev-backup`'s arguments as the job's options, checked; nothing started.
pub(super) fn backup_plan(mut args: Arguments) -> Result<(Common, BackupConfig), QmpError> {
    let common = common(&mut args)?;
    let defaults = BackupConfig::default();
    let sync = args.choice("sync", SYNC_BACKUP)?.ok_or_else(|| QmpError::generic("Parameter 'sync' is missing"))?;
    // QEMU's `incremental` is sync=bitmap with bitmap-mode on-success.
    let (sync, incremental) = match sync {
        "incremental" => ("bitmap", true),
        other => (other, false),
    };
    if args.bool("compress")? == Some(true) {
        return Err(QmpError::generic("Parameter 'compress' is not supported: a raw target has no compression"));
    }
    let _filter = args.string("filter-node-name")?;
    let mode = args.choice("bitmap-mode", &["on-success", "never", "always"])?;
    let bitmap_given = args.map_has("bitmap");
    // QEMU's rules for the bitmap and its mode.
    match (sync, incremental, mode, bitmap_given) {
        (_, true, Some(mode), _) if mode != "on-success" => {
            return Err(QmpError::generic("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"));
        }
        ("bitmap", false, None, true) => {
            return Err(QmpError::generic("Bitmap sync mode must be given when providing a bitmap"));
        }
        (_, _, Some(_), false) => return Err(QmpError::generic("Cannot specify bitmap sync mode without a bitmap")),
        _ => {}
    }
    let bitmap_mode = match mode {
        Some(mode) => Some(BitmapMode::parse(mode).map_err(job_error)?),
        None if incremental => Some(BitmapMode::OnSuccess),
        None => None,
    };
    let mut config = BackupConfig {
        id: common.id.clone(),
        sync: SyncMode::parse(sync).map_err(job_error)?,
        bitmap: args.string("bitmap")?,
        bitmap_mode,
        speed_bytes_per_s: args.u64("speed")?.unwrap_or(0),
        on_source_error: on_error(&mut args, "on-source-error")?,
        on_target_error: on_error(&mut args, "on-target-error")?,
        on_cbw_error: match args.choice("on-cbw-error", &["break-guest-write", "break-snapshot"])? {
            Some(text) => OnCbwError::parse(text).map_err(job_error)?,
            None => defaults.on_cbw_error,
        },
        auto_finalize: args.bool("auto-finalize")?.unwrap_or(true),
        auto_dismiss: args.bool("auto-dismiss")?.unwrap_or(true),
        discard_source: args.bool("discard-source")?.unwrap_or(false),
        on_inconsistent_bitmap: match args.choice("on-inconsistent-bitmap", &["fail", "full"])? {
            Some(text) => OnInconsistentBitmap::parse(text).map_err(job_error)?,
            None => OnInconsistentBitmap::Fail,
        },
        copy_priority: priority(&mut args)?,
        verify: verify(&mut args)?,
        ..defaults
    };
    if let Some(mut perf) = args.object("x-perf")? {
        let _copy_range = perf.bool("use-copy-range")?; // reads and writes are always ours
        config.workers_max = perf.u64("max-workers")?.map_or(config.workers_max, |n| n as usize);
        config.chunk_bytes_max = perf.u64("max-chunk")?.filter(|n| *n > 0).unwrap_or(config.chunk_bytes_max);
        config.min_cluster_bytes = perf.u64("min-cluster-size")?;
        perf.finish()?;
    }
    args.finish()?;
    config.validate().map_err(job_error)?;
    Ok((common, config))
}

/// Each job's events as QMP events, on a thread of its own; the job is forgotten once null.
/// QEMU's job is running when the command returns, and its created and running events went
/// out before the return: send them from here, up to the first state after created.
fn announce_start(daemon: &Daemon, job: &Job) {
    let (senders, receiver) = (daemon.event_senders(), job.events());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while let Ok(event) = receiver.recv_deadline(deadline) {
        let started = matches!(&event, JobEvent::StatusChange { status, .. } if *status != JobStatus::Created);
        send(&senders, job, &event);
        if started {
            return;
        }
    }
}

fn send(senders: &[crate::qmp::EventSender], job: &Job, event: &JobEvent) {
    for (name, data) in qmp_events(job, event) {
        for events in senders {
            events.emit(name, data.clone());
        }
    }
}

fn forward_events(daemon: &Daemon, job: &Job) {
    let (senders, state) = (daemon.event_senders(), daemon.state.clone());
    let (receiver, id) = (job.events(), job.id().to_string());
    let job = job.clone();
    let spawned = std::thread::Builder::new().name(format!("job-events-{}", job.id())).spawn(move || {
        for event in receiver.iter() {
            let null = matches!(&event, JobEvent::StatusChange { status: JobStatus::Null, .. });
            if null {
                // Gone before anyone hears it is: a query after the event never finds it.
                forget(&state, job.id());
            }
            send(&senders, &job, &event);
            if null {
                return;
            }
        }
    });
    if let Err(error) = spawned {
        tandem::log::line(&format!("job {id}: cannot start its event thread ({error}): no QMP events"));
    }
}

fn forget(state: &Arc<Mutex<State>>, id: &str) {
    let mut state = state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    state.jobs.remove(id);
}

/// What QEMU sends for `event` (QEMU's `type`: the job kind's name; `device`: the job id).
fn qmp_events(job: &Job, event: &JobEvent) -> Vec<(&'static str, Value)> {
    let kind = job.kind().name();
    let figures = |f: &tandem::job::JobFigures, id: &str| json!({"type": kind, "device": id, "len": f.len, "offset": f.offset, "speed": f.speed});
    match event {
        JobEvent::StatusChange { id, status } => {
            let mut events = vec![("JOB_STATUS_CHANGE", json!({"id": id, "status": status.name()}))];
            // QEMU says PENDING only to a user who has to finalize (auto-finalize off).
            if *status == JobStatus::Pending && !job.auto_finalize() {
                events.push(("BLOCK_JOB_PENDING", json!({"type": kind, "id": id})));
            }
            events
        }
        JobEvent::Ready { id, figures: f, .. } => vec![("BLOCK_JOB_READY", figures(f, id))],
        JobEvent::Completed { id, figures: f, error, fallback, .. } => {
            let mut data = figures(f, id);
            if let Some(error) = error {
                data["error"] = json!(error);
            }
            if let Some(fallback) = fallback {
                data["fallback"] = json!(fallback); // ours
            }
            vec![("BLOCK_JOB_COMPLETED", data)]
        }
        JobEvent::Cancelled { id, figures: f, .. } => vec![("BLOCK_JOB_CANCELLED", figures(f, id))],
        JobEvent::Error { id, operation, action, .. } => {
            vec![("BLOCK_JOB_ERROR", json!({"device": id, "operation": operation.name(), "action": action.name()}))]
        }
        JobEvent::CopyModeChange { id, requested, in_force, actively_synced } => vec![(
            "MIRROR_COPY_MODE_CHANGE",
            json!({"id": id, "requested": requested, "in-force": in_force, "actively-synced": actively_synced}),
        )],
    }
}

/// The job `id` for the `job-*` verbs (QEMU: "Job not found").
fn find_job(daemon: &Daemon, id: &str) -> Result<Job, QmpError> {
    let state = daemon.state();
    state
        .jobs
        .get(id)
        .map(|record| record.job.clone())
        .ok_or_else(|| QmpError::generic(format!("Job '{id}' not found")))
}

/// The job on `device` for the `block-job-*` verbs (QEMU: DeviceNotActive).
fn find_block_job(daemon: &Daemon, device: &str) -> Result<Job, QmpError> {
    let state = daemon.state();
    match state.jobs.get(device) {
        Some(record) => Ok(record.job.clone()),
        None => Err(QmpError { class: ErrorClass::DeviceNotActive, desc: format!("Block job '{device}' not found") }),
    }
}

/// A verb on the job named by argument `key`: the `job-*` commands find it as QEMU's job layer
/// does, the `block-job-*` ones (`block` true) as its block-job layer does (DeviceNotActive).
fn verb(
    daemon: &Daemon,
    mut args: Arguments,
    (key, block): (&str, bool),
    act: impl FnOnce(&Job) -> Result<(), tandem::job::JobError>,
) -> Result<Value, QmpError> {
    let id = args.required(key)?;
    args.finish()?;
    let job = match block {
        true => find_block_job(daemon, &id)?,
        false => find_job(daemon, &id)?,
    };
    act(&job).map_err(job_error)?;
    Ok(json!({}))
}

pub(super) fn job_pause(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    verb(daemon, args, ("id", false), Job::pause)
}

pub(super) fn job_resume(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    verb(daemon, args, ("id", false), Job::resume)
}

pub(super) fn job_cancel(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    // job-cancel is the hard cancel; a ready mirror's soft one is block-job-cancel's.
    verb(daemon, args, ("id", false), |job| job.cancel(true))
}

pub(super) fn job_complete(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    verb(daemon, args, ("id", false), Job::complete)
}

pub(super) fn job_finalize(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    verb(daemon, args, ("id", false), Job::finalize)
}

pub(super) fn job_dismiss(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    verb(daemon, args, ("id", false), Job::dismiss)
}

pub(super) fn block_job_finalize(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    verb(daemon, args, ("id", true), Job::finalize)
}

pub(super) fn block_job_dismiss(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    verb(daemon, args, ("id", true), Job::dismiss)
}

pub(super) fn block_job_pause(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    verb(daemon, args, ("device", true), Job::pause)
}

pub(super) fn block_job_resume(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    verb(daemon, args, ("device", true), Job::resume)
}

pub(super) fn block_job_complete(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    verb(daemon, args, ("device", true), Job::complete)
}

pub(super) fn block_job_cancel(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    // QEMU's default: a ready mirror finishes consistent without switching (force=false).
    let force = args.bool("force")?.unwrap_or(false);
    verb(daemon, args, ("device", true), move |job| job.cancel(force))
}

pub(super) fn block_job_set_speed(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    let speed = args.u64("speed")?.ok_or_else(|| QmpError::generic("Parameter 'speed' is missing"))?;
    verb(daemon, args, ("device", true), move |job| job.set_speed(speed))
}

pub(super) fn block_job_change(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    let kind = args.choice("type", &["mirror"])?.ok_or_else(|| QmpError::generic("Parameter 'type' is missing"))?;
    let mode = args.choice("copy-mode", COPY_MODES)?;
    let job = find_block_job(daemon, &args.required("id")?)?;
    args.finish()?;
    if job.kind().name() != kind {
        return Err(QmpError::generic(format!("Job type does not match specified type '{kind}'")));
    }
    if let Some(mode) = mode {
        job.change(JobChange::CopyMode(CopyMode::parse(mode).map_err(job_error)?)).map_err(job_error)?;
    }
    Ok(json!({}))
}

pub(super) fn query_block_jobs(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    args.finish()?;
    let state = daemon.state();
    let jobs = state.jobs.iter().map(|(id, record)| block_job_json(id, &record.job)).collect();
    Ok(Value::Array(jobs))
}

/// QEMU's BlockJobInfo.
fn block_job_json(id: &str, job: &Job) -> Value {
    let (status, progress) = (job.status(), job.progress());
    let mut info = json!({
        "type": job.kind().name(),
        "device": id,
        "len": progress.total_bytes,
        "offset": progress.done_bytes,
        "busy": matches!(status, JobStatus::Running | JobStatus::Ready),
        "paused": matches!(status, JobStatus::Paused | JobStatus::Standby),
        "speed": job.speed_bytes_per_s(),
        "io-status": "ok",
        "ready": matches!(status, JobStatus::Ready | JobStatus::Standby),
        "status": status.name(),
        "auto-finalize": job.auto_finalize(),
        "auto-dismiss": job.auto_dismiss(),
    });
    if let Some(error) = job.error() {
        info["error"] = json!(error);
    }
    if job.kind() == JobKind::Mirror {
        info["actively-synced"] = json!(job.actively_synced());
    }
    info
}

pub(super) fn query_jobs(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    args.finish()?;
    let state = daemon.state();
    let jobs = state
        .jobs
        .iter()
        .map(|(id, record)| {
            let (job, progress) = (&record.job, record.job.progress());
            let mut info = json!({
                "id": id,
                "type": job.kind().name(),
                "status": job.status().name(),
                "current-progress": progress.done_bytes,
                "total-progress": progress.total_bytes,
            });
            if let Some(error) = job.error() {
                info["error"] = json!(error);
            }
            info
        })
        .collect();
    Ok(Value::Array(jobs))
}

/// SIGTERM: every job ends by its rules (a ready mirror completes consistent without the
/// switch-over; anything else is cancelled), and the daemon waits for them to conclude.
pub(super) fn cancel_all(daemon: &Daemon) {
    let jobs: Vec<Job> = daemon.state().jobs.values().map(|record| record.job.clone()).collect();
    for job in &jobs {
        let _ = job.cancel(false);
    }
    for job in &jobs {
        job.wait_for(|s| s.is_finished(), std::time::Duration::from_secs(600));
    }
}

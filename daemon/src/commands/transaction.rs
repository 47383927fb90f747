//! `transaction`: several actions, all or nothing, as incremental-backup scripts use it
//! (qapi/transaction.json): `block-dirty-bitmap-add`, `-clear`, `-merge`, `-enable`,
//! `-disable`, `-remove`, `blockdev-backup` and `abort`.
//!
//! How "all or nothing" and "at the same instant" hold:
//! - Every action's arguments are read and checked first; a bad one (or `abort`) fails the
//!   transaction before anything changes.
//! - The disk of every backup in the transaction is drained (no guest write in progress, new
//!   ones held) before the first action and stays so until the last: the bitmap actions and
//!   the backups' points in time (`backup::start_drained`) all fall between the same two guest
//!   writes, which is what incremental-backup scripts rely on (a bitmap added, cleared or
//!   merged "at" the backup).
//! - Actions run in order, backups last; if one fails, the bitmap actions done are undone,
//!   newest first, still under the drains (a removed bitmap comes back, a cleared one gets its
//!   marks back, enable and disable go back to the state before; a merge is kept, as extra
//!   marks only cost copying), then the drains end and the backups started are cancelled
//!   (their filters come off only once the disk is not drained).

use super::jobs::{backup_plan, start_backup_drained, Common};
use super::{Arguments, Daemon};
use crate::qmp::QmpError;
use serde_json::{json, Value};
use std::sync::Arc;
use tandem::bitmap::{BitmapRegistry, DirtyBitmap};
use tandem::job::backup::BackupConfig;

/// Actions in one transaction at most.
const ACTIONS_MAX: usize = 256;

/// One checked action.
enum Action {
    BitmapAdd { node: String, name: String, granularity_bytes: Option<u64>, disabled: bool, persistent: bool },
    BitmapClear { node: String, name: String },
    BitmapOther { kind: &'static str, arguments: serde_json::Map<String, Value> },
    Backup { common: Common, config: Box<BackupConfig> },
}

/// How to take back what an action did.
enum Undo {
    Remove { node: String, name: String },
    Restore { registry: BitmapRegistry, name: String, bits: Box<DirtyBitmap> },
    Readd { registry: BitmapRegistry, name: String, bitmap: Arc<DirtyBitmap> },
    Enabled { registry: BitmapRegistry, name: String, enabled: bool },
    CancelJob { id: String },
}

pub(super) fn transaction(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    let actions = args.array("actions")?.ok_or_else(|| QmpError::generic("Parameter 'actions' is missing"))?;
    if let Some(mut properties) = args.object("properties")? {
        if properties.choice("completion-mode", &["individual", "grouped"])? == Some("grouped") {
            return Err(QmpError::generic("completion-mode 'grouped' is not supported: jobs complete individually"));
        }
        properties.finish()?;
    }
    args.finish()?;
    if actions.len() > ACTIONS_MAX {
        return Err(QmpError::generic(format!(
            "a transaction takes at most {ACTIONS_MAX} actions, not {}",
            actions.len()
        )));
    }
    let checked = actions.into_iter().map(parse_action).collect::<Result<Vec<_>, _>>()?;
    let drains = drain_backed_up_disks(daemon, &checked)?;
    let mut undo = Vec::new();
    let result = run(daemon, checked, &drains, &mut undo);
    let (jobs, bitmaps): (Vec<Undo>, Vec<Undo>) =
        undo.into_iter().partition(|step| matches!(step, Undo::CancelJob { .. }));
    if result.is_err() {
        for step in bitmaps.into_iter().rev() {
            take_back(daemon, step);
        }
    }
    drop(drains);
    if result.is_err() {
        for step in jobs.into_iter().rev() {
            take_back(daemon, step);
        }
    }
    result.map(|()| json!({}))
}

/// A drain of each disk a backup of the transaction reads, keyed by the disk's root node.
type Drains = Vec<(String, tandem::block::DrainGuard)>;

fn drain_backed_up_disks(daemon: &Daemon, actions: &[Action]) -> Result<Drains, QmpError> {
    let mut drains: Drains = Vec::new();
    for action in actions {
        let Action::Backup { common, .. } = action else { continue };
        let root = disk_root(daemon, &common.device);
        if drains.iter().any(|(drained, _)| *drained == root) {
            continue;
        }
        let disk = {
            let state = daemon.state();
            state.catalog.get(&common.device).map_err(|_| super::nodes::not_found(&common.device))?.disk.clone()
        };
        // Never waits on another drainer: a disk already drained (a job's point in time, another
        // transaction) fails this one instead.
        let Some(drain) = disk.drain() else {
            return Err(QmpError::generic(format!(
                "Node '{}' is busy: another operation holds its writes",
                common.device
            )));
        };
        drains.push((root, tandem::reactor::block_on(drain)));
    }
    Ok(drains)
}

fn parse_action(action: Value) -> Result<Action, QmpError> {
    let Value::Object(map) = action else {
        return Err(QmpError::generic("Invalid parameter type for 'actions', expected: array of objects"));
    };
    let mut action = Arguments::new(map);
    let kind = action.required("type")?;
    let data = action.object("data")?.unwrap_or_else(|| Arguments::new(serde_json::Map::new()));
    action.finish()?;
    match kind.as_str() {
        "abort" => Err(QmpError::generic("Transaction aborted using Abort action")),
        "block-dirty-bitmap-add" => bitmap_add(data),
        "block-dirty-bitmap-clear" => {
            let mut data = data;
            let (node, name) = (data.required("node")?, data.required("name")?);
            data.finish()?;
            Ok(Action::BitmapClear { node, name })
        }
        "block-dirty-bitmap-merge"
        | "block-dirty-bitmap-enable"
        | "block-dirty-bitmap-disable"
        | "block-dirty-bitmap-remove" => {
            let kind = [
                "block-dirty-bitmap-merge",
                "block-dirty-bitmap-enable",
                "block-dirty-bitmap-disable",
                "block-dirty-bitmap-remove",
            ]
            .into_iter()
            .find(|k| *k == kind)
            .expect("matched above");
            Ok(Action::BitmapOther { kind, arguments: data.into_map() })
        }
        "blockdev-backup" => {
            let (common, config) = backup_plan(data)?;
            Ok(Action::Backup { common, config: Box::new(config) })
        }
        other => Err(QmpError::generic(format!("Parameter 'type' does not accept value '{other}'"))),
    }
}

fn bitmap_add(mut data: Arguments) -> Result<Action, QmpError> {
    let (node, name) = (data.required("node")?, data.required("name")?);
    let granularity_bytes = data.u64("granularity")?;
    let persistent = data.bool("persistent")?.unwrap_or(false);
    let disabled = data.bool("disabled")?.unwrap_or(false);
    data.finish()?;
    Ok(Action::BitmapAdd { node, name, granularity_bytes, disabled, persistent })
}

/// The node whose disk `node` reads and writes: below raw and copy-before-write nodes, which
/// share their file's disk (and its bitmaps).
fn disk_root(daemon: &Daemon, node: &str) -> String {
    daemon.state().catalog.disk_root(node)
}

fn registry(daemon: &Daemon, node: &str) -> Result<BitmapRegistry, QmpError> {
    let state = daemon.state();
    Ok(state.catalog.get(node).map_err(|_| super::nodes::not_found(node))?.disk.bitmaps().clone())
}

/// Bitmap actions in order, then the backups, each under its disk's drain.
fn run(daemon: &Daemon, actions: Vec<Action>, drains: &Drains, undo: &mut Vec<Undo>) -> Result<(), QmpError> {
    let (bitmap_actions, backups): (Vec<Action>, Vec<Action>) =
        actions.into_iter().partition(|action| !matches!(action, Action::Backup { .. }));
    for action in bitmap_actions.into_iter().chain(backups) {
        run_one(daemon, action, drains, undo)?;
    }
    Ok(())
}

fn run_one(daemon: &Daemon, action: Action, drains: &Drains, undo: &mut Vec<Undo>) -> Result<(), QmpError> {
    let text = |e: tandem::bitmap::BitmapError| QmpError::generic(e.to_string());
    match action {
        Action::BitmapAdd { node, name, granularity_bytes, disabled, persistent } => {
            let mut arguments = json!({"node": node, "name": name, "disabled": disabled, "persistent": persistent});
            if let Some(granularity) = granularity_bytes {
                arguments["granularity"] = json!(granularity);
            }
            super::bitmaps::add(daemon, Arguments::new(arguments.as_object().cloned().unwrap_or_default()))?;
            undo.push(Undo::Remove { node, name });
        }
        Action::BitmapClear { node, name } => {
            let registry = registry(daemon, &node)?;
            let bits = registry.get(&name).map_err(text)?.copy();
            registry.clear(&name).map_err(text)?;
            undo.push(Undo::Restore { registry, name, bits: Box::new(bits) });
        }
        Action::BitmapOther { kind, arguments } => run_other(daemon, kind, arguments, undo)?,
        Action::Backup { common, config } => {
            let (id, root) = (common.id.clone(), disk_root(daemon, &common.device));
            let (_, drained) = drains.iter().find(|(disk, _)| *disk == root).expect("each backup's disk was drained");
            start_backup_drained(daemon, common, *config, drained)?;
            undo.push(Undo::CancelJob { id });
        }
    }
    Ok(())
}

fn run_other(
    daemon: &Daemon,
    kind: &'static str,
    arguments: serde_json::Map<String, Value>,
    undo: &mut Vec<Undo>,
) -> Result<(), QmpError> {
    let node = arguments.get("node").and_then(Value::as_str).unwrap_or_default().to_string();
    let name_key = if kind == "block-dirty-bitmap-merge" { "target" } else { "name" };
    let name = arguments.get(name_key).and_then(Value::as_str).unwrap_or_default().to_string();
    let registry = registry(daemon, &node)?;
    // What to restore, read before the action runs.
    let before = registry.get(&name).ok();
    let was_enabled = before.as_ref().map(|bitmap| bitmap.is_enabled());
    if kind == "block-dirty-bitmap-remove" && is_persistent(daemon, &node, &name) {
        // Its sidecar would be gone for good if a later action failed.
        return Err(QmpError::generic(format!(
            "transaction: removing persistent bitmap '{name}' is not undoable; remove it outside a transaction"
        )));
    }
    let args = Arguments::new(arguments);
    match kind {
        "block-dirty-bitmap-merge" => super::bitmaps::merge(daemon, args)?,
        "block-dirty-bitmap-enable" => super::bitmaps::enable(daemon, args)?,
        "block-dirty-bitmap-disable" => super::bitmaps::disable(daemon, args)?,
        _ => super::bitmaps::remove(daemon, args)?,
    };
    match (kind, before, was_enabled) {
        // A merge is kept even on a failure: extra marks only cost copying, and taking them
        // back could drop the marks of guest writes that came meanwhile.
        ("block-dirty-bitmap-merge", ..) => {}
        ("block-dirty-bitmap-remove", Some(bitmap), _) => undo.push(Undo::Readd { registry, name, bitmap }),
        (_, Some(_), Some(enabled)) => undo.push(Undo::Enabled { registry, name, enabled }),
        _ => {}
    }
    Ok(())
}

fn is_persistent(daemon: &Daemon, node: &str, name: &str) -> bool {
    let mut state = daemon.state();
    state.catalog.file_node_mut(node).is_ok_and(|(_, file)| file.recordings.iter().any(|r| r.name() == name))
}

/// Take one action back; a failure here is logged (the transaction's error is already set).
fn take_back(daemon: &Daemon, step: Undo) {
    let text = |e: tandem::bitmap::BitmapError| e.to_string();
    let result: Result<(), String> = match step {
        Undo::Remove { node, name } => {
            // Through the command, so a persistent bitmap's new sidecar goes too.
            let arguments = json!({"node": node, "name": name}).as_object().cloned().unwrap_or_default();
            super::bitmaps::remove(daemon, Arguments::new(arguments)).map(drop).map_err(|e| e.desc)
        }
        // The cleared marks come back; marks of writes since the clear stay.
        Undo::Restore { registry, name, bits } => registry.merge_into(&name, &bits).map_err(text),
        Undo::Readd { registry, name, bitmap } => registry.add_shared(&name, bitmap).map(drop).map_err(text),
        Undo::Enabled { registry, name, enabled } => registry.set_enabled(&name, enabled).map_err(text),
        Undo::CancelJob { id } => {
            let job = daemon.state().jobs.get(&id).map(|record| record.job.clone());
            if let Some(job) = job {
                let _ = job.cancel(true);
                // Ended before the older steps run: its new bitmap is gone, so a bitmap of
                // that name can come back.
                job.wait_for(|s| s.is_finished(), std::time::Duration::from_secs(600));
            }
            Ok(())
        }
    };
    if let Err(error) = result {
        tandem::log::line(&format!("transaction: undoing an action failed: {error}"));
    }
}

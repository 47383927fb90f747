//! `transaction`: several actions, all or nothing, as incremental-backup scripts use it
//! (qapi/transaction.json): `block-dirty-bitmap-add`, `-clear`, `-merge`, `-enable`,
//! `-disable`, `-remove`, `blockdev-backup` and `abort`.
//!
//! How "all or nothing" and "at the same instant" hold:
//! - Every action's arguments are read and checked first; a bad one (or `abort`) fails the
//!   transaction before anything changes.
//! - What the scripts rely on is that a bitmap starts (or restarts) at exactly the backup's
//!   point in time. A bitmap added on a backup's device, or cleared there, becomes the
//!   backup's `new_bitmap`: the engine creates it under the drain that takes the point in
//!   time (a clear is the old bitmap removed and a new one of the same name and granularity
//!   created there). Other bitmap actions run before the backups.
//! - Actions run in order; if one fails, those done are undone, newest first (a removed
//!   bitmap comes back, a cleared or merged one gets its bits back, an added one goes), and
//!   the failure is the transaction's error. A backup that started is the last thing to
//!   fail: backups start after every bitmap action, and a later backup's failure cancels the
//!   earlier ones.

use super::jobs::{backup_plan, start_backup, Common};
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
    BitmapAdd {
        node: String,
        name: String,
        granularity_bytes: Option<u64>,
        disabled: bool,
        persistent: bool,
    },
    BitmapClear {
        node: String,
        name: String,
    },
    BitmapOther {
        kind: &'static str,
        arguments: serde_json::Map<String, Value>,
    },
    /// A cleared bitmap, removed just before the backup that makes it anew at its point in time.
    Replace {
        node: String,
        name: String,
    },
    Backup {
        common: Common,
        config: Box<BackupConfig>,
    },
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
    let mut checked = actions.into_iter().map(parse_action).collect::<Result<Vec<_>, _>>()?;
    fold_into_backups(daemon, &mut checked)?;
    let mut undo = Vec::new();
    match run(daemon, checked, &mut undo) {
        Ok(()) => Ok(json!({})),
        Err(error) => {
            for step in undo.into_iter().rev() {
                take_back(daemon, step);
            }
            Err(error)
        }
    }
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

/// A bitmap added or cleared on a backup's device becomes that backup's `new_bitmap`, made
/// at its point in time (see the module doc). One per backup; the rest run as they are.
fn fold_into_backups(daemon: &Daemon, actions: &mut Vec<Action>) -> Result<(), QmpError> {
    let mut index = 0;
    while index < actions.len() {
        let (node, name, granularity_bytes, clear) = match &actions[index] {
            // A persistent bitmap gets its sidecar by itself, before the backup.
            Action::BitmapAdd { node, name, granularity_bytes, disabled: false, persistent: false } => {
                (node, name, *granularity_bytes, false)
            }
            Action::BitmapClear { node, name } => (node, name, None, true),
            _ => {
                index += 1;
                continue;
            }
        };
        let root = disk_root(daemon, node);
        let backup = actions.iter().position(|action| match action {
            Action::Backup { common, config } => {
                disk_root(daemon, &common.device) == root
                    && config.new_bitmap.is_none()
                    && granularity_bytes.is_none_or(|g| g == config.cluster_bytes)
            }
            _ => false,
        });
        let Some(backup) = backup else {
            index += 1;
            continue;
        };
        if clear && !clearable_at_point(daemon, node, name, backup_cluster(&actions[backup]))? {
            index += 1;
            continue;
        }
        let name = name.clone();
        let action = actions.remove(index);
        let backup = if backup > index { backup - 1 } else { backup };
        if let Action::Backup { config, .. } = &mut actions[backup] {
            config.new_bitmap = Some(name);
        }
        if let Action::BitmapClear { node, name } = action {
            // The old bitmap goes just before the backup; the backup makes the new one.
            actions.insert(backup, Action::Replace { node, name });
        }
    }
    refuse_unfolded(daemon, actions)
}

/// The node whose disk `node` reads and writes: below raw and copy-before-write nodes, which
/// share their file's disk (and its bitmaps).
fn disk_root(daemon: &Daemon, node: &str) -> String {
    let state = daemon.state();
    let mut at = node.to_string();
    for _ in 0..64 {
        match state.catalog.get(&at) {
            Ok(found) if ["raw", "copy-before-write"].contains(&found.driver) => {
                at = found.file.clone().expect("a raw or filter node names its file")
            }
            _ => break,
        }
    }
    at
}

/// Any other bitmap action on a backup's disk would run before the backup's point in time,
/// not at it: a guest write between the two would be in no bitmap and no backup. Until the
/// engine can run them under the backup's drain, such a mix is refused (see the module doc).
fn refuse_unfolded(daemon: &Daemon, actions: &[Action]) -> Result<(), QmpError> {
    let backed_up: Vec<String> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Backup { common, .. } => Some(disk_root(daemon, &common.device)),
            _ => None,
        })
        .collect();
    for action in actions {
        let (kind, node) = match action {
            Action::BitmapAdd { node, .. } => ("block-dirty-bitmap-add", node.as_str()),
            Action::BitmapClear { node, .. } => ("block-dirty-bitmap-clear", node.as_str()),
            Action::BitmapOther { kind, arguments } => {
                (*kind, arguments.get("node").and_then(Value::as_str).unwrap_or(""))
            }
            Action::Replace { .. } | Action::Backup { .. } => continue,
        };
        if backed_up.contains(&disk_root(daemon, node)) {
            return Err(QmpError::generic(format!(
                "transaction: {kind} on node '{node}' cannot happen at the point in time of a backup of the same disk \
                 (only adding a new recording bitmap or clearing one is); run it in a transaction of its own first"
            )));
        }
    }
    Ok(())
}

fn backup_cluster(action: &Action) -> u64 {
    match action {
        Action::Backup { config, .. } => config.cluster_bytes,
        _ => unreachable!("called on a backup"),
    }
}

/// A clear can become remove-and-recreate at the point in time only if the bitmap has the
/// backup's granularity and is an ordinary, recording one (nothing else would be lost).
fn clearable_at_point(daemon: &Daemon, node: &str, name: &str, cluster_bytes: u64) -> Result<bool, QmpError> {
    let mut state = daemon.state();
    // A persistent bitmap's sidecar would go with the old bitmap, and the new one has none.
    let persistent =
        state.catalog.file_node_mut(node).is_ok_and(|(_, file)| file.recordings.iter().any(|r| r.name() == name));
    if persistent {
        return Ok(false);
    }
    let node = state.catalog.get(node).map_err(|_| super::nodes::not_found(node))?;
    let bitmap = node.disk.bitmaps().get(name).map_err(|e| QmpError::generic(e.to_string()))?;
    Ok(bitmap.granularity_bytes() == cluster_bytes && bitmap.is_enabled() && !bitmap.is_inconsistent())
}

fn registry(daemon: &Daemon, node: &str) -> Result<BitmapRegistry, QmpError> {
    let state = daemon.state();
    Ok(state.catalog.get(node).map_err(|_| super::nodes::not_found(node))?.disk.bitmaps().clone())
}

fn run(daemon: &Daemon, actions: Vec<Action>, undo: &mut Vec<Undo>) -> Result<(), QmpError> {
    let (bitmap_actions, backups): (Vec<Action>, Vec<Action>) =
        actions.into_iter().partition(|action| !matches!(action, Action::Backup { .. }));
    for action in bitmap_actions.into_iter().chain(backups) {
        run_one(daemon, action, undo)?;
    }
    Ok(())
}

fn run_one(daemon: &Daemon, action: Action, undo: &mut Vec<Undo>) -> Result<(), QmpError> {
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
        Action::Replace { node, name } => {
            let registry = registry(daemon, &node)?;
            let bitmap = registry.remove(&name).map_err(text)?;
            undo.push(Undo::Readd { registry, name, bitmap });
        }
        Action::BitmapOther { kind, arguments } => run_other(daemon, kind, arguments, undo)?,
        Action::Backup { common, config } => {
            let id = common.id.clone();
            start_backup(daemon, common, *config)?;
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

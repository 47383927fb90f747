//! Dirty-bitmap commands: `block-dirty-bitmap-add`, `-remove`, `-clear`, `-enable`,
//! `-disable`, `-merge`, on a node's bitmap registry (a bitmap a job holds is busy, an
//! inconsistent one only removable: the registry's rules, with its typed errors as texts).

use super::{Arguments, Daemon};
use crate::qmp::QmpError;
use serde_json::{json, Value};
use std::sync::Arc;
use tandem::bitmap::{BitmapRegistry, DirtyBitmap};

/// QEMU's default granularity for a raw image: 64 KiB.
const GRANULARITY_BYTES_DEFAULT: u64 = 64 << 10;

fn registry(daemon: &Daemon, node: &str) -> Result<BitmapRegistry, QmpError> {
    let state = daemon.state();
    let node = state.catalog.get(node).map_err(|_| super::nodes::not_found(node))?;
    Ok(node.disk.bitmaps().clone())
}

fn bitmap_error(error: tandem::bitmap::BitmapError) -> QmpError {
    QmpError::generic(error.to_string())
}

/// `node` and `name`, the arguments every bitmap command has.
fn target(args: &mut Arguments) -> Result<(String, String), QmpError> {
    Ok((args.required("node")?, args.required("name")?))
}

pub(super) fn add(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    let (node, name) = target(&mut args)?;
    let granularity_bytes = args.u64("granularity")?.unwrap_or(GRANULARITY_BYTES_DEFAULT);
    let persistent = args.bool("persistent")?.unwrap_or(false);
    let _autoload = args.bool("x-autoload")?; // QEMU's old flag: persistent bitmaps always load
    let disabled = args.bool("disabled")?.unwrap_or(false);
    args.finish()?;
    if persistent {
        return add_persistent(daemon, (&node, &name), granularity_bytes, disabled);
    }
    let registry = registry(daemon, &node)?;
    let size_bytes = {
        let state = daemon.state();
        state.catalog.get(&node).map_err(|_| super::nodes::not_found(&node))?.disk.size_bytes()
    };
    let bitmap = DirtyBitmap::new(granularity_bytes, size_bytes).map_err(bitmap_error)?;
    bitmap.set_enabled(!disabled);
    registry.add(&name, bitmap).map_err(bitmap_error)?;
    Ok(json!({}))
}

/// A bitmap saved in a sidecar beside the node's image (see `nodes.rs`), recording from now.
fn add_persistent(
    daemon: &Daemon,
    (node, name): (&str, &str),
    granularity_bytes: u64,
    disabled: bool,
) -> Result<Value, QmpError> {
    let mut state = daemon.state();
    if state.catalog.get(node).is_err() {
        return Err(super::nodes::not_found(node));
    }
    let (_, file) = state.catalog.file_node_mut(node).map_err(|e| QmpError::generic(e.to_string()))?;
    if !crate::nodes::sidecar_name_ok(name) {
        return Err(QmpError::generic(format!(
            "Bitmap name '{name}' cannot be persistent: it names a file beside the image"
        )));
    }
    let image = std::path::PathBuf::from(file.file.clone().expect("a file node has its path"));
    let path = crate::nodes::sidecar_path(&image, name);
    if path.exists() {
        return Err(QmpError::generic(format!("Bitmap '{name}': {} exists already and is kept", path.display())));
    }
    if file.disk.bitmaps().get(name).is_ok() {
        return Err(bitmap_error(tandem::bitmap::BitmapError::Exists { name: name.to_string() }));
    }
    let bitmap = Arc::new(DirtyBitmap::new(granularity_bytes, file.disk.size_bytes()).map_err(bitmap_error)?);
    bitmap.set_enabled(!disabled);
    let recording =
        tandem::bitmap::record(&path, name, bitmap.clone()).map_err(|e| QmpError::generic(e.to_string()))?;
    if let Err(error) = file.disk.bitmaps().add_shared(name, bitmap) {
        drop(recording);
        let _ = std::fs::remove_file(&path); // ours: made just above
        return Err(bitmap_error(error));
    }
    file.recordings.push(recording);
    Ok(json!({}))
}

pub(super) fn remove(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    let (node, name) = target(&mut args)?;
    args.finish()?;
    registry(daemon, &node)?.remove(&name).map_err(bitmap_error)?;
    // A persistent one's sidecar goes too: the user asked for the bitmap to be gone.
    let mut state = daemon.state();
    if let Ok((_, file)) = state.catalog.file_node_mut(&node) {
        if let Some(index) = file.recordings.iter().position(|r| r.name() == name) {
            let recording = file.recordings.remove(index);
            let path = recording.path().to_path_buf();
            drop(recording);
            if let Err(error) = std::fs::remove_file(&path) {
                tandem::log::line(&format!("removing the sidecar {} failed: {error}", path.display()));
            }
        }
    }
    Ok(json!({}))
}

pub(super) fn clear(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    let (node, name) = target(&mut args)?;
    args.finish()?;
    registry(daemon, &node)?.clear(&name).map_err(bitmap_error)?;
    Ok(json!({}))
}

pub(super) fn enable(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    let (node, name) = target(&mut args)?;
    args.finish()?;
    registry(daemon, &node)?.set_enabled(&name, true).map_err(bitmap_error)?;
    Ok(json!({}))
}

pub(super) fn disable(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    let (node, name) = target(&mut args)?;
    args.finish()?;
    registry(daemon, &node)?.set_enabled(&name, false).map_err(bitmap_error)?;
    Ok(json!({}))
}

/// `bitmaps`: names on `node`, or `{"node": N, "name": B}` objects on any node.
pub(super) fn merge(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    let node = args.required("node")?;
    let target = args.required("target")?;
    let sources = args.array("bitmaps")?.ok_or_else(|| QmpError::generic("Parameter 'bitmaps' is missing"))?;
    args.finish()?;
    let registry = registry(daemon, &node)?;
    let mut union: Option<DirtyBitmap> = None;
    for source in sources {
        let bitmap = source_bitmap(daemon, &node, source)?;
        match &union {
            None => union = Some(bitmap.copy()),
            Some(union) => union.merge(&bitmap).map_err(bitmap_error)?,
        }
    }
    // All sources read first: a bad one changes nothing.
    if let Some(union) = union {
        registry.merge_into(&target, &union).map_err(bitmap_error)?;
    }
    Ok(json!({}))
}

fn source_bitmap(daemon: &Daemon, node: &str, source: Value) -> Result<Arc<DirtyBitmap>, QmpError> {
    let (node, name) = match source {
        Value::String(name) => (node.to_string(), name),
        Value::Object(map) => {
            let mut args = Arguments::new(map);
            let pair = (args.required("node")?, args.required("name")?);
            args.finish()?;
            pair
        }
        _ => {
            return Err(QmpError::generic("Invalid parameter type for 'bitmaps', expected: array of names or objects"))
        }
    };
    let bitmap = registry(daemon, &node)?.get(&name).map_err(bitmap_error)?;
    if bitmap.is_inconsistent() {
        return Err(QmpError::generic(format!("Bitmap '{name}' is inconsistent and cannot be used")));
    }
    Ok(bitmap)
}

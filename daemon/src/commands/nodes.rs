//! Node and export commands: `blockdev-add`/`-del`, `query-named-block-nodes`,
//! `nbd-server-start`/`-stop`, `block-export-add`/`-del`, `query-block-exports`,
//! `query-version`. The options are `--blockdev`/`--nbd-server`/`--export`'s, read by the same
//! parsers, so the command line and QMP accept exactly the same things.

use super::{Arguments, Daemon};
use crate::nodes::{Catalog, Node};
use crate::options::{self, ExportSpec, OptionError};
use crate::qmp::{ErrorClass, QmpError};
use serde_json::{json, Value};
use tandem_nbd::{ExportOptions, Server, ServerConfig};

/// The running NBD server.
pub(crate) struct ServerRecord {
    pub(crate) server: Server,
}

/// An export by id.
pub(crate) struct ExportRecord {
    pub(crate) node_name: String,
    pub(crate) name: String,
    /// The server's export: its table and each connection serving it hold it too, so more
    /// holders than the table and this record means a client uses it.
    pub(crate) export: std::sync::Arc<tandem_nbd::Export>,
}

impl ExportRecord {
    /// Holders of an export nobody uses: the server's table and this record.
    const IDLE_HOLDERS: usize = 2;

    fn in_use_out_of_table(&self) -> bool {
        // Out of the table, one holder fewer is idle.
        std::sync::Arc::strong_count(&self.export) > Self::IDLE_HOLDERS - 1
    }
}

/// An option parser's error as QEMU words it over QMP (without the command line's `--x: `).
fn option_error(error: OptionError) -> QmpError {
    let text = error.to_string();
    let desc = match text.split_once(": ") {
        Some((option, rest)) if option.starts_with("--") => rest.to_string(),
        _ => text,
    };
    let mut chars = desc.chars();
    let desc = chars.next().map_or(String::new(), |first| first.to_uppercase().collect::<String>() + chars.as_str());
    QmpError::generic(desc)
}

pub(super) fn not_found(name: &str) -> QmpError {
    QmpError { class: ErrorClass::GenericError, desc: format!("Cannot find device='{name}' nor node-name='{name}'") }
}

pub(super) fn query_version(_daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(crate::qmp::version_json())
}

/// QEMU's `quit`: the same clean stop as SIGTERM (the main thread waits for that signal).
pub(super) fn quit(_daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    args.finish()?;
    // SAFETY: kill on our own pid with a signal every thread blocks and the main thread
    // waits for; no memory is involved.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    Ok(json!({}))
}

pub(super) fn blockdev_add(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    let spec = options::blockdev_from_map(args.into_map()).map_err(option_error)?;
    let mut state = daemon.state();
    state.catalog.add(daemon.runtime(), &spec).map_err(|e| QmpError::generic(node_error_text(e)))?;
    Ok(json!({}))
}

/// A catalog error without the command line's option prefix.
fn node_error_text(error: crate::nodes::NodeError) -> String {
    let text = error.to_string();
    text.strip_prefix("--blockdev ").map(str::to_string).unwrap_or(text)
}

pub(super) fn blockdev_del(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    let name = args.required("node-name")?;
    args.finish()?;
    let mut state = daemon.state();
    if state.catalog.get(&name).is_err() {
        return Err(QmpError::generic(format!("Failed to find node with node-name='{name}'")));
    }
    if let Some((id, _)) = state.exports.iter().find(|(_, export)| export.node_name == name) {
        return Err(QmpError::generic(format!("Node '{name}' is busy: export '{id}' uses it")));
    }
    if let Some(id) = super::jobs::job_using(&state, &name) {
        return Err(QmpError::generic(format!("Node '{name}' is busy: block job '{id}' uses it")));
    }
    let node = state.catalog.remove(&name).map_err(|e| QmpError::generic(format!("Node {}", e)))?;
    if !node.read_only {
        // What guests wrote through it is durable before the node goes.
        if let Err(error) = node.disk.flush_blocking(tandem::IoPriority::GUEST) {
            tandem::log::line(&format!("flush of node {name} on blockdev-del failed: {error}"));
        }
    }
    Ok(json!({}))
}

pub(super) fn query_named_block_nodes(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    let _flat = args.bool("flat")?;
    args.finish()?;
    let state = daemon.state();
    let nodes: Vec<Value> =
        state.catalog.iter().map(|(name, node)| node_json(name, node, &state.catalog.persistent_names(name))).collect();
    Ok(Value::Array(nodes))
}

/// QEMU's BlockDeviceInfo, for what a Tandem node has.
fn node_json(name: &str, node: &Node, persistent: &[String]) -> Value {
    let size_bytes = node.disk.size_bytes();
    let file = node.file.clone().unwrap_or_default();
    json!({
        "node-name": name,
        "drv": node.driver,
        "ro": node.read_only,
        "file": file,
        "encrypted": false,
        "detect_zeroes": "off",
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {"writeback": true, "direct": node.direct, "no-flush": false},
        "image": {"filename": file, "format": node.driver, "virtual-size": size_bytes, "dirty-flag": false},
        "dirty-bitmaps": bitmaps_json(node, persistent),
    })
}

/// The node's dirty bitmaps as QEMU's BlockDirtyInfo; `persistent` names those with a
/// sidecar (kept by the file node below).
fn bitmaps_json(node: &Node, persistent: &[String]) -> Value {
    let registry = node.disk.bitmaps();
    let bitmaps: Vec<Value> = registry
        .names()
        .into_iter()
        .filter_map(|name| registry.get(&name).ok().map(|bitmap| (name, bitmap)))
        .map(|(name, bitmap)| {
            json!({
                "name": name,
                "count": bitmap.dirty_bytes(),
                "granularity": bitmap.granularity_bytes(),
                "recording": bitmap.is_enabled(),
                "busy": registry.is_leased(&name),
                "persistent": persistent.contains(&name),
                "inconsistent": bitmap.is_inconsistent(),
            })
        })
        .collect();
    Value::Array(bitmaps)
}

pub(super) fn nbd_server_start(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    let spec = options::nbd_server_from_map(args.into_map()).map_err(option_error)?;
    let mut state = daemon.state();
    if state.server.is_some() {
        return Err(QmpError::generic("NBD server already running"));
    }
    let mut config = ServerConfig::new(spec.listen.clone());
    if let Some(max) = spec.connections_max {
        config.connections_max = max;
    }
    if let Some(timeout) = spec.handshake_timeout {
        config.handshake_timeout = timeout;
    }
    let server = Server::start(daemon.runtime().clone(), config).map_err(|e| QmpError::generic(e.to_string()))?;
    tandem::log::line(&format!("NBD server listening on {}", spec.listen));
    state.server = Some(ServerRecord { server });
    Ok(json!({}))
}

pub(super) fn nbd_server_stop(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    args.finish()?;
    let mut state = daemon.state();
    let Some(record) = state.server.take() else {
        return Err(QmpError::generic("NBD server not running"));
    };
    record.server.shutdown();
    let ids: Vec<String> = std::mem::take(&mut state.exports).into_keys().collect();
    drop(state);
    for id in ids {
        daemon.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
    }
    Ok(json!({}))
}

/// The export's options from its spec and node, checked (shared with `--export`).
pub(crate) fn export_options(
    spec: &ExportSpec,
    catalog: &Catalog,
) -> Result<(tandem::block::Disk, ExportOptions), String> {
    let node = catalog.get(&spec.node_name).map_err(|e| e.to_string())?;
    if spec.writable && node.read_only {
        return Err(format!("writable=on, but node '{}' is read-only", spec.node_name));
    }
    for (bitmap, owner) in spec.bitmaps.iter().zip(&spec.bitmap_nodes) {
        let found = match owner {
            None => node.disk.bitmaps().get(bitmap).ok(),
            // QEMU takes a bitmap of the exported node or of a node below it, nothing else.
            Some(owner) if below(catalog, &spec.node_name, owner) => {
                catalog.get(owner).ok().and_then(|o| o.disk.bitmaps().get(bitmap).ok())
            }
            Some(owner) => {
                return Err(format!("Bitmap '{bitmap}': node '{owner}' is not below export node '{}'", spec.node_name))
            }
        };
        let Some(found) = found else {
            let on = owner.as_deref().unwrap_or(&spec.node_name);
            return Err(format!("Bitmap '{bitmap}' is not found on node '{on}'"));
        };
        if found.is_enabled() && !spec.writable {
            // QEMU's rule: a bitmap that still records cannot describe a fixed image.
            return Err(format!("Enabled bitmap '{bitmap}' incompatible with readonly export"));
        }
        if node.disk.bitmaps().get(bitmap).is_err() {
            // A snapshot-access export shows the disk's bitmap: shared, the same one.
            let _ = node.disk.bitmaps().add_shared(bitmap, found);
        }
    }
    let mut options = ExportOptions::new(&spec.name);
    options.description = spec.description.clone();
    options.writable = spec.writable;
    options.bitmaps = spec.bitmaps.clone();
    options.writethrough = spec.writethrough;
    options.unmap = node.unmap;
    if let Some(multi_conn) = spec.multi_conn {
        options.multi_conn = multi_conn;
    }
    tandem_nbd::Export::new(node.disk.clone(), options.clone()).map_err(|e| e.to_string())?;
    Ok((node.disk.clone(), options))
}

/// Whether `lower` is `upper` or a node below it (through `file` links).
fn below(catalog: &Catalog, upper: &str, lower: &str) -> bool {
    let mut at = upper.to_string();
    for _ in 0..64 {
        if at == lower {
            return true;
        }
        match catalog.get(&at).ok().and_then(|node| node.file.clone()) {
            Some(file) if catalog.get(&file).is_ok() => at = file,
            _ => return false,
        }
    }
    false
}

pub(super) fn block_export_add(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    let spec = options::export_from_map(args.into_map()).map_err(option_error)?;
    let mut state = daemon.state();
    if state.exports.contains_key(&spec.id) {
        return Err(QmpError::generic(format!("Block export id '{}' is already in use", spec.id)));
    }
    if state.catalog.get(&spec.node_name).is_err() {
        return Err(not_found(&spec.node_name));
    }
    let Some(server) = &state.server else {
        return Err(QmpError::generic("NBD server not running"));
    };
    let (disk, options) = export_options(&spec, &state.catalog).map_err(QmpError::generic)?;
    let export = server.server.add_export(disk, options).map_err(|e| QmpError::generic(e.to_string()))?;
    state.exports.insert(spec.id.clone(), ExportRecord { node_name: spec.node_name, name: spec.name, export });
    Ok(json!({}))
}

/// QEMU's `block-export-del`: `mode=safe` (the default) refuses while a client uses the export;
/// the export leaves the server's table first, so no client can connect while it is checked.
/// `mode=hard` (cutting the clients off) is refused: the server cannot yet end one export's
/// connections alone.
pub(super) fn block_export_del(daemon: &Daemon, mut args: Arguments) -> Result<Value, QmpError> {
    let id = args.required("id")?;
    let mode = args.choice("mode", &["safe", "hard"])?.unwrap_or("safe");
    args.finish()?;
    if mode == "hard" {
        return Err(QmpError::generic(
            "mode 'hard' is not supported yet: disconnect the clients, then use mode 'safe'",
        ));
    }
    let mut state = daemon.state();
    let Some(record) = state.exports.get(&id) else {
        return Err(QmpError::generic(format!("Export '{id}' is not found")));
    };
    let server = &state.server.as_ref().expect("an export lives on the running server").server;
    server.remove_export(&record.name).map_err(|e| QmpError::generic(e.to_string()))?;
    if record.in_use_out_of_table() {
        // Back as it was: a client is still writing through it.
        let (disk, options) = (record.export.disk.clone(), record.export.options.clone());
        let export = server.add_export(disk, options).map_err(|e| QmpError::generic(e.to_string()))?;
        state.exports.get_mut(&id).expect("looked up above").export = export;
        return Err(QmpError::generic(format!("export '{id}' still in use")));
    }
    state.exports.remove(&id);
    drop(state);
    daemon.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
    Ok(json!({}))
}

pub(super) fn query_block_exports(daemon: &Daemon, args: Arguments) -> Result<Value, QmpError> {
    args.finish()?;
    let state = daemon.state();
    let exports: Vec<Value> = state
        .exports
        .iter()
        .map(|(id, export)| json!({"id": id, "type": "nbd", "node-name": export.node_name, "shutting-down": false}))
        .collect();
    Ok(Value::Array(exports))
}

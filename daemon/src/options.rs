//! The daemon's structured options with qemu-storage-daemon's names: `--blockdev`,
//! `--nbd-server` and `--export`, read from the tree [`keyval`](crate::keyval) builds. Every
//! option is checked here, before anything is opened or created, and an unknown or bad one is
//! an error that names it. QEMU options that only tune QEMU's own I/O paths (`aio`,
//! `cache.no-flush`, `locking`...) are accepted where Tandem's behaviour already matches
//! what they ask for, and refused where it would not.

use crate::keyval::{self, KeyvalError};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Duration;
use tandem_nbd::Listen;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("--{option}: {source}")]
    Syntax { option: &'static str, source: KeyvalError },
    #[error("--{option}: parameter '{key}' is missing")]
    Missing { option: &'static str, key: String },
    #[error("--{option}: parameter '{key}' is unexpected{hint}")]
    Unknown { option: &'static str, key: String, hint: String },
    #[error("--{option}: parameter '{key}' = '{value}': {reason}")]
    Bad { option: &'static str, key: String, value: String, reason: String },
}

/// Reads one option's tree, remembering which keys were used so the rest can be refused.
struct Fields {
    option: &'static str,
    map: Map<String, Value>,
}

impl Fields {
    fn parse(option: &'static str, text: &str) -> Result<Fields, OptionError> {
        let map = keyval::parse(text).map_err(|source| OptionError::Syntax { option, source })?;
        Ok(Fields { option, map })
    }

    /// A QMP command's arguments: the same tree, already JSON.
    fn from_map(option: &'static str, map: Map<String, Value>) -> Fields {
        Fields { option, map }
    }

    fn bad(&self, key: &str, value: &Value, reason: impl Into<String>) -> OptionError {
        let value = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        OptionError::Bad { option: self.option, key: key.into(), value, reason: reason.into() }
    }

    /// A string field (JSON numbers are accepted as their text, as QEMU does for keyval).
    fn string(&mut self, key: &str) -> Result<Option<String>, OptionError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(self.bad(key, &other, "expected a string")),
        }
    }

    fn required(&mut self, key: &str) -> Result<String, OptionError> {
        self.string(key)?.ok_or_else(|| OptionError::Missing { option: self.option, key: key.into() })
    }

    /// on/off, true/false, yes/no (keyval) or a JSON boolean.
    fn bool(&mut self, key: &str) -> Result<Option<bool>, OptionError> {
        let value = match self.map.remove(key) {
            None => return Ok(None),
            Some(Value::Bool(b)) => return Ok(Some(b)),
            Some(value) => value,
        };
        match value.as_str() {
            Some("on" | "true" | "yes") => Ok(Some(true)),
            Some("off" | "false" | "no") => Ok(Some(false)),
            _ => Err(self.bad(key, &value, "expected on or off")),
        }
    }

    fn number(&mut self, key: &str, max: u64) -> Result<Option<u64>, OptionError> {
        let Some(value) = self.map.remove(key) else { return Ok(None) };
        let parsed = match &value {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse::<u64>().ok(),
            _ => None,
        };
        match parsed {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(self.bad(key, &value, format!("expected a whole number from 0 to {max}"))),
        }
    }

    /// A nested object (`cache.direct=on` gives `cache` = {direct: on}).
    fn object(&mut self, key: &str) -> Result<Option<Fields>, OptionError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Fields { option: self.option, map })),
            Some(other) => Err(self.bad(key, &other, "expected an object")),
        }
    }

    /// Every key must have been read: the first left over is refused by name.
    fn finish(self, prefix: &str, hint: &str) -> Result<(), OptionError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(key) => Err(OptionError::Unknown {
                option: self.option,
                key: format!("{prefix}{key}"),
                hint: if hint.is_empty() { String::new() } else { format!(" ({hint})") },
            }),
        }
    }
}

/// One `--blockdev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockdevSpec {
    pub node_name: String,
    pub read_only: bool,
    /// QEMU's `discard=unmap`: trims and zeroing may deallocate. Its default, `ignore`, keeps
    /// everything allocated, and so does Tandem's.
    pub unmap: bool,
    pub driver: DriverSpec,
    /// Nodes given inline (`"file": {"driver": "file", ...}`), opened first and named by
    /// tandemd (`#blockN`) unless they carry a node-name; deleted with this node.
    pub children: Vec<BlockdevSpec>,
}

/// How deep inline node definitions may nest.
const INLINE_DEPTH_MAX: u32 = 8;

/// QEMU's names for nodes defined without one: `#block` and a number unique in the process.
fn implicit_node_name() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("#block{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverSpec {
    /// `driver=file,filename=PATH[,cache.direct=on|off]`: an existing file or block device.
    File { filename: PathBuf, direct: bool },
    /// `driver=raw,file=NODE`: the raw format over another node (the bytes as they are).
    Raw { file: String },
    /// `driver=null-co,size=N`: reads zeros, drops writes.
    NullCo { size_bytes: u64 },
    /// `driver=copy-before-write,file=NODE,target=NODE[,on-cbw-error=..][,cbw-timeout=S]
    /// [,min-cluster-size=N]`: guest writes through it save the old data to `target` first
    /// (QEMU's fleecing filter); a `snapshot-access` node reads the point in time.
    CopyBeforeWrite {
        file: String,
        target: String,
        on_cbw_error: Option<String>,
        cbw_timeout_s: Option<u64>,
        min_cluster_bytes: Option<u64>,
    },
    /// `driver=snapshot-access,file=NODE`: the point in time of a copy-before-write node,
    /// read-only.
    SnapshotAccess { file: String },
    /// `driver=nbd,server.type=unix,server.path=P|server.type=inet,server.host=H[,server.port=N]
    /// [,export=NAME]`: an export of another server, through Tandem's NBD client.
    Nbd { uri: tandem_drivers::nbd::NbdUri },
    /// `driver=rbd,pool=P,image=I[,namespace=N][,snapshot=S][,conf=PATH][,user=U]`: a Ceph image.
    Rbd { spec: tandem_drivers::rbd::RbdSpec },
}

const NODE_NAME_BYTES_MAX: usize = 31; // QEMU's limit on node names

fn node_name(fields: &Fields, key: &str, name: String) -> Result<String, OptionError> {
    let ok = !name.is_empty()
        && name.len() <= NODE_NAME_BYTES_MAX
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    match ok {
        true => Ok(name),
        false => Err(fields.bad(
            key,
            &Value::String(name),
            "a node name is 1-31 letters, digits, '-', '_' or '.', starting with a letter",
        )),
    }
}

pub fn parse_blockdev(text: &str) -> Result<BlockdevSpec, OptionError> {
    blockdev(Fields::parse("blockdev", text)?, 0)
}

/// QMP's `blockdev-add`: the same options as `--blockdev`, as JSON.
pub fn blockdev_from_map(arguments: Map<String, Value>) -> Result<BlockdevSpec, OptionError> {
    blockdev(Fields::from_map("blockdev-add", arguments), 0)
}

/// One node's options; `depth` > 0 for a node given inline, whose node-name is optional.
fn blockdev(mut f: Fields, depth: u32) -> Result<BlockdevSpec, OptionError> {
    let driver = f.required("driver")?;
    let node_name = match (f.string("node-name")?, depth) {
        (Some(name), _) => node_name(&f, "node-name", name)?,
        (None, 0) => return Err(OptionError::Missing { option: f.option, key: "node-name".into() }),
        (None, _) => implicit_node_name(),
    };
    let mut children = Vec::new();
    let read_only = f.bool("read-only")?.unwrap_or(false);
    let _ = f.bool("auto-read-only")?; // Tandem opens what it is asked for; nothing to relax
    let unmap = match f.string("discard")?.as_deref() {
        None | Some("ignore" | "off") => false,
        Some("unmap" | "on") => true,
        Some(other) => return Err(f.bad("discard", &Value::String(other.into()), "expected unmap or ignore")),
    };
    let driver = match driver.as_str() {
        "file" | "host_device" => file_driver(&mut f)?,
        "raw" => DriverSpec::Raw { file: child(&mut f, "file", depth, &mut children)? },
        "null-co" => DriverSpec::NullCo { size_bytes: f.number("size", i64::MAX as u64)?.unwrap_or(1 << 30) },
        "copy-before-write" => copy_before_write(&mut f)?,
        "snapshot-access" => DriverSpec::SnapshotAccess { file: f.required("file")? },
        "nbd" => nbd_driver(&mut f)?,
        "rbd" => rbd_driver(&mut f)?,
        other => {
            let reason =
                "supported drivers: file, host_device, raw, null-co, nbd, rbd, copy-before-write, snapshot-access";
            return Err(f.bad("driver", &Value::String(other.into()), reason));
        }
    };
    f.finish("", "")?;
    Ok(BlockdevSpec { node_name, read_only, unmap, driver, children })
}

/// A child named by `key`: a node-name, or a node defined inline (added to `children`).
fn child(f: &mut Fields, key: &str, depth: u32, children: &mut Vec<BlockdevSpec>) -> Result<String, OptionError> {
    match f.map.remove(key) {
        None => Err(OptionError::Missing { option: f.option, key: key.into() }),
        Some(Value::String(name)) => Ok(name),
        Some(Value::Object(map)) if depth < INLINE_DEPTH_MAX => {
            let spec = blockdev(Fields { option: f.option, map }, depth + 1)?;
            let name = spec.node_name.clone();
            children.push(spec);
            Ok(name)
        }
        Some(other) => Err(f.bad(key, &other, "expected a node-name or a node's options (nested at most 8 deep)")),
    }
}

fn nbd_driver(f: &mut Fields) -> Result<DriverSpec, OptionError> {
    use tandem_drivers::nbd::{Endpoint, NbdUri};
    let mut server = f.object("server")?.ok_or(OptionError::Missing { option: f.option, key: "server".into() })?;
    let endpoint = match socket_address(&mut server, "server.")? {
        SocketAddress::Unix(path) => Endpoint::Unix { path },
        SocketAddress::Inet { host, port } => Endpoint::Tcp { host, port },
    };
    server.finish("server.", "")?;
    let export = f.string("export")?.unwrap_or_default();
    if let Some(tls) = f.string("tls-creds")? {
        return Err(f.bad("tls-creds", &Value::String(tls), "TLS is not supported yet"));
    }
    let _reconnect = f.number("reconnect-delay", 3600)?; // the client fails over on its own
    Ok(DriverSpec::Nbd { uri: NbdUri { endpoint, export } })
}

fn rbd_driver(f: &mut Fields) -> Result<DriverSpec, OptionError> {
    let spec = tandem_drivers::rbd::RbdSpec {
        pool: f.required("pool")?,
        namespace: f.string("namespace")?,
        image: f.required("image")?,
        snapshot: f.string("snapshot")?,
        conf_path: f.string("conf")?.map(PathBuf::from),
        user: f.string("user")?,
        options: Vec::new(),
    };
    Ok(DriverSpec::Rbd { spec })
}

fn copy_before_write(f: &mut Fields) -> Result<DriverSpec, OptionError> {
    let file = f.required("file")?;
    let target = f.required("target")?;
    let on_cbw_error = f.string("on-cbw-error")?;
    if let Some(policy) = on_cbw_error.as_deref().filter(|p| !["break-guest-write", "break-snapshot"].contains(p)) {
        return Err(f.bad(
            "on-cbw-error",
            &Value::String(policy.into()),
            "expected break-guest-write or break-snapshot",
        ));
    }
    let cbw_timeout_s = f.number("cbw-timeout", 3600)?.filter(|s| *s > 0);
    let min_cluster_bytes = f.number("min-cluster-size", 64 << 20)?;
    if f.map.contains_key("bitmap") {
        let bitmap = f.map.remove("bitmap").unwrap_or(Value::Null);
        return Err(f.bad(
            "bitmap",
            &bitmap,
            "a copy-before-write bitmap is not supported yet: the filter saves every cluster",
        ));
    }
    Ok(DriverSpec::CopyBeforeWrite { file, target, on_cbw_error, cbw_timeout_s, min_cluster_bytes })
}

fn file_driver(f: &mut Fields) -> Result<DriverSpec, OptionError> {
    let filename = PathBuf::from(f.required("filename")?);
    let mut direct = false;
    if let Some(mut cache) = f.object("cache")? {
        direct = cache.bool("direct")?.unwrap_or(false);
        // no-flush=on would make flushes lies; Tandem always flushes.
        if cache.bool("no-flush")? == Some(true) {
            return Err(f.bad("cache.no-flush", &Value::String("on".into()), "Tandem never skips a flush"));
        }
        cache.finish("cache.", "")?;
    }
    let aio = f.string("aio")?;
    if let Some(aio) = aio.filter(|a| !["threads", "native", "io_uring"].contains(&a.as_str())) {
        return Err(f.bad("aio", &Value::String(aio), "expected threads, native or io_uring"));
    }
    if let Some(locking) = f.string("locking")?.filter(|l| !["auto", "on", "off"].contains(&l.as_str())) {
        return Err(f.bad("locking", &Value::String(locking), "expected auto, on or off"));
    }
    Ok(DriverSpec::File { filename, direct })
}

/// `--nbd-server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdServerSpec {
    pub listen: Listen,
    /// QEMU's `max-connections` (0: QEMU's "no limit", which here is the server's maximum).
    pub connections_max: Option<usize>,
    pub handshake_timeout: Option<Duration>,
}

pub fn parse_nbd_server(text: &str) -> Result<NbdServerSpec, OptionError> {
    nbd_server(Fields::parse("nbd-server", text)?)
}

/// QMP's `nbd-server-start`, whose `addr` is QEMU's legacy form (`{"type": "unix", "data":
/// {"path": ...}}`); the flat form of `--nbd-server` is taken too.
pub fn nbd_server_from_map(mut arguments: Map<String, Value>) -> Result<NbdServerSpec, OptionError> {
    if let Some(Value::Object(addr)) = arguments.get_mut("addr") {
        if let Some(Value::Object(data)) = addr.remove("data") {
            addr.extend(data);
        }
    }
    nbd_server(Fields::from_map("nbd-server-start", arguments))
}

fn nbd_server(mut f: Fields) -> Result<NbdServerSpec, OptionError> {
    let mut addr = f.object("addr")?.ok_or(OptionError::Missing { option: f.option, key: "addr".into() })?;
    let listen = match socket_address(&mut addr, "addr.")? {
        SocketAddress::Unix(path) => Listen::Unix(path),
        SocketAddress::Inet { host, port } => Listen::Tcp { host, port },
    };
    addr.finish("addr.", "")?;
    let connections_max = f.number("max-connections", tandem_nbd::server::CONNECTIONS_MAX_LIMIT as u64)?;
    let connections_max =
        connections_max.map(|n| if n == 0 { tandem_nbd::server::CONNECTIONS_MAX_LIMIT } else { n as usize });
    // QEMU's 0 means no limit; ours is bounded, so 0 is the longest allowed: one hour.
    let handshake_timeout =
        f.number("handshake-max-seconds", 3600)?.map(|s| Duration::from_secs(if s == 0 { 3600 } else { s }));
    f.finish("", "tls-creds and tls-authz: TLS is not supported yet")?;
    Ok(NbdServerSpec { listen, connections_max, handshake_timeout })
}

/// QEMU's SocketAddress, flat: `type=unix,path=P` or `type=inet,host=H[,port=N]` (NBD's port
/// by default). `prefix` names the keys in messages (`addr.`, `server.`).
enum SocketAddress {
    Unix(PathBuf),
    Inet { host: String, port: u16 },
}

fn socket_address(f: &mut Fields, prefix: &str) -> Result<SocketAddress, OptionError> {
    let option = f.option;
    let missing = |key: &str| OptionError::Missing { option, key: format!("{prefix}{key}") };
    let kind = f.string("type")?.ok_or_else(|| missing("type"))?;
    match kind.as_str() {
        "unix" => Ok(SocketAddress::Unix(PathBuf::from(f.string("path")?.ok_or_else(|| missing("path"))?))),
        "inet" => {
            let host = f.string("host")?.ok_or_else(|| missing("host"))?;
            let port = match f.string("port")? {
                None => tandem_drivers::nbd::proto::DEFAULT_PORT,
                Some(port) => port.parse::<u16>().map_err(|_| {
                    f.bad(&format!("{prefix}port"), &Value::String(port), "expected a port number 0-65535")
                })?,
            };
            Ok(SocketAddress::Inet { host, port })
        }
        other => Err(f.bad(&format!("{prefix}type"), &Value::String(other.into()), "expected unix or inet")),
    }
}

/// `--export type=nbd,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub id: String,
    pub node_name: String,
    /// The NBD export name (QEMU's default: the node name).
    pub name: String,
    pub description: Option<String>,
    pub writable: bool,
    pub bitmaps: Vec<String>,
    /// For each bitmap named as `{"node": N, "name": B}` (QEMU's BlockDirtyBitmapOrStr): the
    /// node it lives on, when not the exported one.
    pub bitmap_nodes: Vec<Option<String>>,
    pub multi_conn: Option<bool>,
    /// QEMU's `writethrough=on`: every write is durable before its reply.
    pub writethrough: bool,
}

pub fn parse_export(text: &str) -> Result<ExportSpec, OptionError> {
    export(Fields::parse("export", text)?)
}

/// QMP's `block-export-add`: the same options as `--export`, as JSON.
pub fn export_from_map(arguments: Map<String, Value>) -> Result<ExportSpec, OptionError> {
    export(Fields::from_map("block-export-add", arguments))
}

fn export(mut f: Fields) -> Result<ExportSpec, OptionError> {
    let kind = f.required("type")?;
    if kind != "nbd" {
        return Err(f.bad("type", &Value::String(kind), "only type=nbd is supported"));
    }
    let id = f.required("id")?;
    let node_name = f.required("node-name")?;
    let name = f.string("name")?.unwrap_or_else(|| node_name.clone());
    let description = f.string("description")?;
    let writable = f.bool("writable")?.unwrap_or(false);
    let writethrough = f.bool("writethrough")?.unwrap_or(false);
    let multi_conn = match f.string("multi-conn")?.as_deref() {
        None | Some("auto") => None,
        Some("on") => Some(true),
        Some("off") => Some(false),
        Some(other) => return Err(f.bad("multi-conn", &Value::String(other.into()), "expected on, off or auto")),
    };
    let (bitmaps, bitmap_nodes) = bitmap_list(&mut f)?.into_iter().unzip();
    f.finish("", "")?;
    Ok(ExportSpec { id, node_name, name, description, writable, bitmaps, bitmap_nodes, multi_conn, writethrough })
}

/// `--chardev socket,id=ID,path=PATH,server=on,wait=off`: where a QMP monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevSpec {
    pub id: String,
    pub path: PathBuf,
}

/// QSD's `--chardev` takes the backend as its first, unnamed value (`socket,id=...`), which
/// keyval reads as `socket=` with no value... so the backend is split off first.
pub fn parse_chardev(text: &str) -> Result<ChardevSpec, OptionError> {
    let (backend, rest) = match text.trim_start().starts_with('{') {
        true => ("", text),
        false => text.split_once(',').unwrap_or((text, "")),
    };
    let mut f = Fields::parse("chardev", rest)?;
    let backend = match backend {
        "" => f.required("backend")?,
        named => named.to_string(),
    };
    if backend != "socket" {
        return Err(f.bad("backend", &Value::String(backend), "only a socket chardev (a QMP monitor) is supported"));
    }
    let id = f.required("id")?;
    let path = PathBuf::from(f.required("path")?);
    if f.bool("server")? == Some(false) {
        return Err(f.bad("server", &Value::String("off".into()), "the monitor listens: server=on"));
    }
    if f.bool("wait")? == Some(true) {
        return Err(f.bad("wait", &Value::String("on".into()), "the daemon does not wait for a client: wait=off"));
    }
    f.finish("", "a Unix socket path is the only address tandemd's monitor takes")?;
    Ok(ChardevSpec { id, path })
}

/// `--monitor chardev=ID[,mode=control]`.
pub fn parse_monitor(text: &str) -> Result<String, OptionError> {
    let mut f = Fields::parse("monitor", text)?;
    let chardev = f.required("chardev")?;
    if let Some(mode) = f.string("mode")?.filter(|mode| mode != "control") {
        return Err(f.bad("mode", &Value::String(mode), "only mode=control (QMP) is supported"));
    }
    let _pretty = f.bool("pretty")?; // replies are one line each either way
    f.finish("", "")?;
    Ok(chardev)
}

/// `--object TYPE,id=...`: QSD scripts declare iothreads for exports; Tandem's cores serve
/// every export already, so an iothread is accepted and has nothing to do. Anything else is
/// refused by name.
pub fn parse_object(text: &str) -> Result<String, OptionError> {
    let (kind, rest) = text.split_once(',').unwrap_or((text, ""));
    let mut f = Fields::parse("object", rest)?;
    let id = f.required("id")?;
    match kind {
        "iothread" => {
            for key in
                ["poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch", "thread-pool-min", "thread-pool-max"]
            {
                let _ = f.map.remove(key);
            }
            f.finish("", "")?;
            Ok(id)
        }
        other => Err(f.bad("qom-type", &Value::String(other.into()), "only iothread objects are supported")),
    }
}

/// `bitmaps` as a JSON array of names or `{"node", "name"}` objects, or keyval's
/// `bitmaps.0=a,bitmaps.1=b`: each bitmap's name and, if given, its node.
fn bitmap_list(f: &mut Fields) -> Result<Vec<(String, Option<String>)>, OptionError> {
    let item = |f: &Fields, v: Value| match v {
        Value::String(name) => Ok((name, None)),
        Value::Object(ref map) => {
            match (map.get("node").and_then(Value::as_str), map.get("name").and_then(Value::as_str)) {
                (Some(node), Some(name)) if map.len() == 2 => Ok((name.to_string(), Some(node.to_string()))),
                _ => Err(f.bad("bitmaps", &v, "expected a bitmap name or {\"node\": N, \"name\": B}")),
            }
        }
        other => Err(f.bad("bitmaps", &other, "expected bitmap names")),
    };
    match f.map.remove("bitmaps") {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items.into_iter().map(|v| item(f, v)).collect(),
        Some(Value::Object(map)) => {
            let mut list = Vec::with_capacity(map.len());
            for index in 0..map.len() {
                match map.get(&index.to_string()).and_then(Value::as_str) {
                    Some(name) => list.push((name.to_string(), None)),
                    None => {
                        return Err(f.bad("bitmaps", &Value::Object(map.clone()), "expected bitmaps.0, bitmaps.1, ..."))
                    }
                }
            }
            Ok(list)
        }
        Some(other) => Err(f.bad("bitmaps", &other, "expected a list of bitmap names")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qsd_lines_parse() {
        let file = parse_blockdev("driver=file,node-name=f,filename=/d.img,cache.direct=on,aio=io_uring").unwrap();
        assert_eq!(file.driver, DriverSpec::File { filename: "/d.img".into(), direct: true });
        assert!(!file.unmap, "QEMU's default is discard=ignore");
        assert!(parse_blockdev("driver=file,node-name=f,filename=/d.img,discard=unmap").unwrap().unmap);
        let raw = parse_blockdev("driver=raw,node-name=r,file=f").unwrap();
        assert_eq!(raw.driver, DriverSpec::Raw { file: "f".into() });
        let server = parse_nbd_server("addr.type=unix,addr.path=/s.sock,max-connections=8").unwrap();
        assert_eq!((server.listen, server.connections_max), (Listen::Unix("/s.sock".into()), Some(8)));
        let tcp = parse_nbd_server("addr.type=inet,addr.host=127.0.0.1,addr.port=10810").unwrap();
        assert_eq!(tcp.listen, Listen::Tcp { host: "127.0.0.1".into(), port: 10810 });
        let export = parse_export("type=nbd,id=e,node-name=r,name=,writable=on,bitmaps.0=b0").unwrap();
        assert_eq!((export.name.as_str(), export.writable, export.bitmaps), ("", true, vec!["b0".to_string()]));
        let json = parse_export(r#"{"type":"nbd","id":"e","node-name":"r","bitmaps":["a","b"]}"#).unwrap();
        assert_eq!((json.name.as_str(), json.bitmaps.len()), ("r", 2));
    }

    #[test]
    fn monitor_options_parse_and_bad_ones_are_named() {
        let chardev = parse_chardev("socket,id=qmp,path=/run/qmp.sock,server=on,wait=off").unwrap();
        assert_eq!(chardev, ChardevSpec { id: "qmp".into(), path: "/run/qmp.sock".into() });
        assert_eq!(parse_monitor("chardev=qmp").unwrap(), "qmp");
        assert_eq!(parse_monitor("chardev=qmp,mode=control").unwrap(), "qmp");
        assert_eq!(parse_object("iothread,id=io0").unwrap(), "io0");
        let err = |r: Result<ChardevSpec, OptionError>| r.unwrap_err().to_string();
        assert!(err(parse_chardev("stdio,id=c")).contains("'backend' = 'stdio'"));
        assert!(err(parse_chardev("socket,id=c,path=/s,wait=on")).contains("'wait' = 'on'"));
        assert!(err(parse_chardev("socket,id=c,path=/s,host=h")).contains("'host' is unexpected"));
        assert!(parse_monitor("chardev=c,mode=readline").unwrap_err().to_string().contains("'mode' = 'readline'"));
        assert!(parse_object("secret,id=s,data=x").unwrap_err().to_string().contains("'qom-type' = 'secret'"));
    }

    #[test]
    fn bad_and_unknown_options_are_named() {
        let err = |r: Result<BlockdevSpec, OptionError>| r.unwrap_err().to_string();
        assert!(err(parse_blockdev("driver=qcow2,node-name=q,file=f")).contains("'driver' = 'qcow2'"));
        assert!(err(parse_blockdev("driver=file,node-name=f")).contains("'filename' is missing"));
        assert!(err(parse_blockdev("driver=file,node-name=f,filename=x,bogus=1")).contains("'bogus' is unexpected"));
        assert!(
            err(parse_blockdev("driver=file,node-name=f,filename=x,cache.direct=maybe")).contains("'direct' = 'maybe'")
        );
        assert!(err(parse_blockdev("driver=raw,node-name=9r,file=f")).contains("'node-name' = '9r'"));
        let server = parse_nbd_server("addr.type=unix,addr.path=/s,tls-creds=t").unwrap_err().to_string();
        assert!(
            server.contains("'tls-creds' is unexpected (tls-creds and tls-authz: TLS is not supported yet)"),
            "{server}"
        );
        let port = parse_nbd_server("addr.type=inet,addr.host=h,addr.port=99999").unwrap_err().to_string();
        assert!(port.contains("'addr.port' = '99999'"), "{port}");
        assert!(parse_export("type=vhost-user-blk,id=e,node-name=r")
            .unwrap_err()
            .to_string()
            .contains("only type=nbd"));
    }
}

//! `query-qmp-schema`: QEMU's introspection (qapi/introspect.json) for the commands and events
//! tandemd has, so a client that probes before it calls (libvirt does) finds each argument it
//! may pass. Type names are masked as numbers, as QEMU masks them; builtins keep their names.
//!
//! The tables here list what each handler reads. A test passes every listed argument to its
//! command and checks none is refused as unexpected, so a table cannot list what a handler
//! does not take.

use serde_json::{json, Value};

#[derive(Clone, Copy)]
pub(super) enum Ty {
    Str,
    Int,
    Bool,
    Any,
    Enum(&'static [&'static str]),
    Object(&'static [Member]),
    List(&'static Ty),
}

#[derive(Clone, Copy)]
pub(super) struct Member {
    pub(super) name: &'static str,
    pub(super) ty: Ty,
    pub(super) optional: bool,
}

const fn req(name: &'static str, ty: Ty) -> Member {
    Member { name, ty, optional: false }
}

const fn opt(name: &'static str, ty: Ty) -> Member {
    Member { name, ty, optional: true }
}

use Ty::{Any, Bool, Enum, Int, List, Object, Str};

const ON_ERROR: Ty = Enum(&["report", "ignore", "enospc", "stop", "auto"]);
const COPY_MODE: Ty = Enum(&["background", "write-blocking", "write-behind", "auto"]);
const PRIORITY: Ty = Enum(&["guest", "balanced", "job"]);
const VERIFY: Ty = Enum(&["off", "sample", "full"]);
const JOB_ID: &[Member] = &[req("id", Str)];
const DEVICE: &[Member] = &[req("device", Str)];
const BITMAP: &[Member] = &[req("node", Str), req("name", Str)];
const NONE: &[Member] = &[];

/// Each command's arguments, in `COMMANDS`' order (the monitor's own two first).
pub(super) const COMMAND_ARGS: &[(&str, &[Member])] = &[
    ("qmp_capabilities", &[opt("enable", List(&Enum(&["oob"])))]),
    ("query-commands", NONE),
    ("query-qmp-schema", NONE),
    ("query-version", NONE),
    ("quit", NONE),
    ("query-named-block-nodes", &[opt("flat", Bool)]),
    // The members every driver has; the rest are the driver's own (`BLOCKDEV_VARIANTS`).
    (
        "blockdev-add",
        &[
            req(
                "driver",
                Enum(&["file", "host_device", "raw", "null-co", "nbd", "rbd", "copy-before-write", "snapshot-access"]),
            ),
            opt("node-name", Str),
            opt("read-only", Bool),
            opt("auto-read-only", Bool),
            opt("discard", Enum(&["ignore", "unmap"])),
        ],
    ),
    ("blockdev-del", &[req("node-name", Str)]),
    (
        "nbd-server-start",
        &[
            req(
                "addr",
                Object(&[
                    req("type", Enum(&["unix", "inet"])),
                    opt("data", Object(&[opt("path", Str), opt("host", Str), opt("port", Str)])),
                    opt("path", Str),
                    opt("host", Str),
                    opt("port", Str),
                ]),
            ),
            opt("max-connections", Int),
            opt("handshake-max-seconds", Int),
        ],
    ),
    ("nbd-server-stop", NONE),
    (
        "block-export-add",
        &[
            req("type", Enum(&["nbd"])),
            req("id", Str),
            req("node-name", Str),
            opt("name", Str),
            opt("description", Str),
            opt("writable", Bool),
            opt("writethrough", Bool),
            opt("multi-conn", Enum(&["on", "off", "auto"])),
            opt("bitmaps", List(&Any)),
        ],
    ),
    ("block-export-del", &[req("id", Str), opt("mode", Enum(&["safe", "hard"]))]),
    ("query-block-exports", NONE),
    (
        "blockdev-mirror",
        &[
            opt("job-id", Str),
            req("device", Str),
            req("target", Str),
            req("sync", Enum(&["full", "top", "none", "bitmap"])),
            opt("replaces", Str),
            opt("filter-node-name", Str),
            opt("copy-mode", COPY_MODE),
            opt("bitmap", Str),
            opt("granularity", Int),
            opt("buf-size", Int),
            opt("speed", Int),
            opt("on-source-error", ON_ERROR),
            opt("on-target-error", ON_ERROR),
            opt("unmap", Bool),
            opt("auto-finalize", Bool),
            opt("auto-dismiss", Bool),
            opt("target-is-zero", Bool),
            opt("copy-priority", PRIORITY),
            opt("verify", VERIFY),
        ],
    ),
    (
        "blockdev-backup",
        &[
            opt("job-id", Str),
            req("device", Str),
            req("target", Str),
            req("sync", Enum(&["full", "top", "none", "bitmap", "incremental"])),
            opt("compress", Bool),
            opt("filter-node-name", Str),
            opt("bitmap-mode", Enum(&["on-success", "never", "always"])),
            opt("bitmap", Str),
            opt("speed", Int),
            opt("on-source-error", ON_ERROR),
            opt("on-target-error", ON_ERROR),
            opt("on-cbw-error", Enum(&["break-guest-write", "break-snapshot"])),
            opt("auto-finalize", Bool),
            opt("auto-dismiss", Bool),
            opt("discard-source", Bool),
            opt("on-inconsistent-bitmap", Enum(&["fail", "full"])),
            opt("copy-priority", PRIORITY),
            opt("verify", VERIFY),
            opt(
                "x-perf",
                Object(&[
                    opt("use-copy-range", Bool),
                    opt("max-workers", Int),
                    opt("max-chunk", Int),
                    opt("min-cluster-size", Int),
                ]),
            ),
        ],
    ),
    ("query-block-jobs", NONE),
    ("query-jobs", NONE),
    ("job-pause", JOB_ID),
    ("job-resume", JOB_ID),
    ("job-cancel", JOB_ID),
    ("job-complete", JOB_ID),
    ("job-finalize", JOB_ID),
    ("job-dismiss", JOB_ID),
    ("block-job-pause", DEVICE),
    ("block-job-resume", DEVICE),
    ("block-job-cancel", &[req("device", Str), opt("force", Bool)]),
    ("block-job-complete", DEVICE),
    ("block-job-finalize", JOB_ID),
    ("block-job-dismiss", JOB_ID),
    ("block-job-set-speed", &[req("device", Str), req("speed", Int)]),
    ("block-job-change", &[req("id", Str), req("type", Enum(&["mirror"])), opt("copy-mode", COPY_MODE)]),
    (
        "block-dirty-bitmap-add",
        &[
            req("node", Str),
            req("name", Str),
            opt("granularity", Int),
            opt("persistent", Bool),
            opt("disabled", Bool),
            opt("x-autoload", Bool),
        ],
    ),
    ("block-dirty-bitmap-remove", BITMAP),
    ("block-dirty-bitmap-clear", BITMAP),
    ("block-dirty-bitmap-enable", BITMAP),
    ("block-dirty-bitmap-disable", BITMAP),
    ("block-dirty-bitmap-merge", &[req("node", Str), req("target", Str), req("bitmaps", List(&Any))]),
    (
        "transaction",
        &[
            req("actions", List(&Object(&[req("type", Str), opt("data", Any)]))),
            opt("properties", Object(&[opt("completion-mode", Enum(&["individual", "grouped"]))])),
        ],
    ),
];

const FILE: &[Member] = &[
    req("filename", Str),
    opt("cache", Object(&[opt("direct", Bool), opt("no-flush", Bool)])),
    opt("aio", Enum(&["threads", "native", "io_uring"])),
    opt("locking", Enum(&["auto", "on", "off"])),
];

/// blockdev-add's members by `driver` (QEMU's BlockdevOptions union).
pub(super) const BLOCKDEV_VARIANTS: &[(&str, &[Member])] = &[
    ("file", FILE),
    ("host_device", FILE),
    // QEMU's BlockdevRef: a node-name or a node's options inline.
    ("raw", &[req("file", Any)]),
    ("null-co", &[opt("size", Int)]),
    (
        "nbd",
        &[
            req(
                "server",
                Object(&[req("type", Enum(&["unix", "inet"])), opt("path", Str), opt("host", Str), opt("port", Str)]),
            ),
            opt("export", Str),
            opt("reconnect-delay", Int),
        ],
    ),
    (
        "rbd",
        &[
            req("pool", Str),
            req("image", Str),
            opt("namespace", Str),
            opt("snapshot", Str),
            opt("conf", Str),
            opt("user", Str),
        ],
    ),
    (
        "copy-before-write",
        &[
            req("file", Str),
            req("target", Str),
            opt("on-cbw-error", Enum(&["break-guest-write", "break-snapshot"])),
            opt("cbw-timeout", Int),
            opt("min-cluster-size", Int),
        ],
    ),
    ("snapshot-access", &[req("file", Str)]),
];

const JOB_FIGURES: &[Member] =
    &[req("type", Str), req("device", Str), req("len", Int), req("offset", Int), req("speed", Int)];

/// The events tandemd sends and their data.
const EVENTS: &[(&str, &[Member])] = &[
    ("JOB_STATUS_CHANGE", &[req("id", Str), req("status", Str)]),
    ("BLOCK_JOB_READY", JOB_FIGURES),
    ("BLOCK_JOB_PENDING", &[req("type", Str), req("id", Str)]),
    (
        "BLOCK_JOB_COMPLETED",
        &[
            req("type", Str),
            req("device", Str),
            req("len", Int),
            req("offset", Int),
            req("speed", Int),
            opt("error", Str),
            opt("fallback", Str),
        ],
    ),
    ("BLOCK_JOB_CANCELLED", JOB_FIGURES),
    (
        "BLOCK_JOB_ERROR",
        &[
            req("device", Str),
            req("operation", Enum(&["read", "write"])),
            req("action", Enum(&["report", "ignore", "stop"])),
        ],
    ),
    ("BLOCK_EXPORT_DELETED", &[req("id", Str)]),
    (
        "MIRROR_COPY_MODE_CHANGE",
        &[req("id", Str), req("requested", Str), req("in-force", Str), req("actively-synced", Bool)],
    ),
];

/// Builds the SchemaInfo list, naming each non-builtin type by a number.
#[derive(Default)]
struct Builder {
    infos: Vec<Value>,
    next: u32,
}

impl Builder {
    fn fresh(&mut self) -> String {
        self.next += 1;
        self.next.to_string()
    }

    fn ty(&mut self, ty: Ty) -> String {
        match ty {
            Str => "str".into(),
            Int => "int".into(),
            Bool => "bool".into(),
            Any => "any".into(),
            Enum(values) => {
                let name = self.fresh();
                let members: Vec<Value> = values.iter().map(|v| json!({"name": v})).collect();
                self.infos.push(json!({"name": name, "meta-type": "enum", "values": values, "members": members}));
                name
            }
            Object(members) => self.object(members),
            List(element) => {
                let element = self.ty(*element);
                let name = format!("[{element}]");
                self.infos.push(json!({"name": name, "meta-type": "array", "element-type": element}));
                name
            }
        }
    }

    /// An object whose `tag` member picks more members (QEMU's flat union).
    fn union(&mut self, base: &[Member], tag: &str, variants: &[(&str, &[Member])]) -> String {
        let cases: Vec<Value> =
            variants.iter().map(|(case, members)| json!({"case": case, "type": self.object(members)})).collect();
        let name = self.object(base);
        let info = self.infos.iter_mut().rev().find(|info| info["name"] == name).expect("just made");
        info["tag"] = json!(tag);
        info["variants"] = Value::Array(cases);
        name
    }

    fn object(&mut self, members: &[Member]) -> String {
        let members: Vec<Value> = members
            .iter()
            .map(|m| {
                let ty = self.ty(m.ty);
                match m.optional {
                    true => json!({"name": m.name, "type": ty, "default": null}),
                    false => json!({"name": m.name, "type": ty}),
                }
            })
            .collect();
        let name = self.fresh();
        self.infos.push(json!({"name": name, "meta-type": "object", "members": members}));
        name
    }
}

/// The whole schema: builtins, then each command and event with its argument type.
pub(super) fn query_qmp_schema() -> Value {
    let mut builder = Builder::default();
    for (name, json_type) in [("str", "string"), ("int", "int"), ("bool", "boolean"), ("any", "value")] {
        builder.infos.push(json!({"name": name, "meta-type": "builtin", "json-type": json_type}));
    }
    for (command, members) in COMMAND_ARGS {
        let arg_type = match *command {
            "blockdev-add" => builder.union(members, "driver", BLOCKDEV_VARIANTS),
            _ => builder.object(members),
        };
        let info = json!({"name": command, "meta-type": "command", "arg-type": arg_type, "ret-type": "any", "allow-oob": false});
        builder.infos.push(info);
    }
    for (event, members) in EVENTS {
        let arg_type = builder.object(members);
        builder.infos.push(json!({"name": event, "meta-type": "event", "arg-type": arg_type}));
    }
    Value::Array(builder.infos)
}

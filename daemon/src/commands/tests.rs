//! The commands through `Commands::execute`, as the monitor calls them, on real files with
//! O_DIRECT: nodes, the NBD server and exports, bitmaps, a mirror and a backup driven only by
//! commands, and QEMU's error texts for bad arguments (each changing nothing).

use super::Daemon;
use crate::nodes::Catalog;
use crate::qmp::{Commands, ErrorClass};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tandem::reactor::{Config, Runtime};

const DISK_BYTES: usize = 8 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    _runtime: Runtime,
    daemon: Daemon,
}

impl Fixture {
    fn new() -> Fixture {
        let base = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tmp"));
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::Builder::new().prefix("qmp-commands-").tempdir_in(&base).unwrap();
        let runtime = Runtime::new(Config { cores: 2, pin: false, ..Config::default() }).unwrap();
        let daemon = Daemon::new(runtime.handle(), Catalog::default());
        Fixture { dir, _runtime: runtime, daemon }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, name: &str, arguments: Value) -> Result<Value, crate::qmp::QmpError> {
        self.daemon.execute(name, arguments.as_object().expect("arguments are an object").clone())
    }

    fn ok(&self, name: &str, arguments: Value) -> Value {
        self.run(name, arguments).unwrap_or_else(|e| panic!("{name}: {}", e.desc))
    }

    fn error(&self, name: &str, arguments: Value) -> String {
        self.run(name, arguments).expect_err(name).desc
    }

    /// A file node over a new file of `fill` bytes, and a raw node over it.
    fn file_node(&self, name: &str, fill: u8) -> PathBuf {
        let path = self.path(&format!("{name}.img"));
        std::fs::write(&path, vec![fill; DISK_BYTES]).unwrap();
        let file = format!("{name}-file");
        self.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": file, "filename": path, "cache": {"direct": true}}),
        );
        self.ok("blockdev-add", json!({"driver": "raw", "node-name": name, "file": file}));
        path
    }

    /// `block-export-del` once the server has seen its last client go (it is refused
    /// while one is connected).
    fn delete_export_once_idle(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.run("block-export-del", json!({"id": id})) {
                Ok(_) => return,
                Err(error) if error.desc.contains("still in use") => {
                    assert!(Instant::now() < deadline, "export {id} stayed in use after its clients left");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => panic!("block-export-del {id}: {}", error.desc),
            }
        }
    }

    fn wait_job(&self, id: &str, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let jobs = self.ok("query-jobs", json!({}));
            let found = jobs.as_array().unwrap().iter().find(|j| j["id"] == id).cloned();
            match found {
                Some(job) if job["status"] == status => return,
                None if status == "null" => return,
                other => assert!(Instant::now() < deadline, "job {id} never became {status}: {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn identical(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn nodes_are_added_listed_and_deleted_and_busy_ones_are_kept() {
    let f = Fixture::new();
    f.file_node("disk", 1);
    let nodes = f.ok("query-named-block-nodes", json!({}));
    let names: Vec<&str> = nodes.as_array().unwrap().iter().map(|n| n["node-name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["disk", "disk-file"]);
    assert_eq!(nodes[0]["image"]["virtual-size"], DISK_BYTES as u64);
    let busy = f.error("blockdev-del", json!({"node-name": "disk-file"}));
    assert!(busy.contains("node 'disk'"), "a raw node sits on it: {busy}");
    f.ok("blockdev-del", json!({"node-name": "disk"}));
    f.ok("blockdev-del", json!({"node-name": "disk-file"}));
    assert_eq!(f.ok("query-named-block-nodes", json!({})), json!([]));
    let missing = f.error("blockdev-del", json!({"node-name": "disk"}));
    assert_eq!(missing, "Failed to find node with node-name='disk'");
}

#[test]
fn bad_arguments_get_qemus_texts_and_change_nothing() {
    let f = Fixture::new();
    let path = f.path("missing.img");
    let open = f.error("blockdev-add", json!({"driver": "file", "node-name": "f", "filename": path}));
    assert!(open.contains("missing.img"), "{open}");
    let driver = f.error("blockdev-add", json!({"driver": "qcow3", "node-name": "q"}));
    assert!(driver.starts_with("Parameter 'driver' = 'qcow3'"), "{driver}");
    f.file_node("disk", 0);
    let unknown = f.error("blockdev-mirror", json!({"device": "disk", "target": "nowhere", "sync": "full"}));
    assert_eq!(unknown, "Cannot find device='nowhere' nor node-name='nowhere'");
    let sync = f.error("blockdev-mirror", json!({"device": "disk", "target": "disk", "sync": "most"}));
    assert_eq!(sync, "Parameter 'sync' does not accept value 'most'");
    let typed = f.error("blockdev-backup", json!({"device": "disk", "target": "disk", "sync": "full", "speed": "1"}));
    assert_eq!(typed, "Invalid parameter type for 'speed', expected: integer");
    let extra = f.error("query-jobs", json!({"all": true}));
    assert_eq!(extra, "Parameter 'all' is unexpected");
    let compress =
        f.error("blockdev-backup", json!({"device": "disk", "target": "disk", "sync": "full", "compress": true}));
    assert!(compress.contains("'compress' is not supported"), "{compress}");
    let no_job = f.run("block-job-pause", json!({"device": "disk"})).unwrap_err();
    assert_eq!((no_job.class, no_job.desc.as_str()), (ErrorClass::DeviceNotActive, "Block job 'disk' not found"));
    let nothing = f.run("no-such-command", json!({})).unwrap_err();
    assert_eq!(nothing.class, ErrorClass::CommandNotFound);
    assert_eq!(f.ok("query-jobs", json!({})), json!([]), "no job was started");
    assert_eq!(f.ok("query-named-block-nodes", json!({})).as_array().unwrap().len(), 2, "no node was added");
}

#[test]
fn a_mirror_driven_by_commands_reaches_ready_changes_mode_and_completes() {
    let f = Fixture::new();
    let source = f.file_node("src", 7);
    let target = f.file_node("dst", 0);
    let mirror = json!({"job-id": "m", "device": "src", "target": "dst", "sync": "full", "auto-dismiss": false});
    f.ok("blockdev-mirror", mirror);
    f.wait_job("m", "ready");
    let jobs = f.ok("query-block-jobs", json!({}));
    assert_eq!((jobs[0]["device"].as_str(), jobs[0]["ready"].as_bool()), (Some("m"), Some(true)));
    f.ok("block-job-change", json!({"id": "m", "type": "mirror", "copy-mode": "write-blocking"}));
    let busy = f.error("blockdev-del", json!({"node-name": "dst"}));
    assert!(busy.contains("block job 'm'"), "{busy}");
    f.ok("job-complete", json!({"id": "m"}));
    f.wait_job("m", "concluded");
    f.ok("job-dismiss", json!({"id": "m"}));
    f.wait_job("m", "null");
    assert!(identical(&source, &target));
}

#[test]
fn a_backup_with_a_bitmap_driven_by_commands_copies_what_it_marks() {
    let f = Fixture::new();
    let source = f.file_node("src", 3);
    let full = f.file_node("full", 0);
    f.ok("block-dirty-bitmap-add", json!({"node": "src", "name": "b0"}));
    f.ok("blockdev-backup", json!({"job-id": "b", "device": "src", "target": "full", "sync": "full"}));
    f.wait_job("b", "null");
    assert!(identical(&source, &full));
    let nodes = f.ok("query-named-block-nodes", json!({}));
    let src = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "src").unwrap().clone();
    assert_eq!(src["dirty-bitmaps"][0]["name"], "b0");
    assert_eq!(src["dirty-bitmaps"][0]["count"], 0, "nothing written since");
    let busy = f.error("block-dirty-bitmap-add", json!({"node": "src", "name": "b0"}));
    assert!(busy.contains("b0"), "{busy}");
    f.ok("block-dirty-bitmap-disable", json!({"node": "src", "name": "b0"}));
    f.ok("block-dirty-bitmap-add", json!({"node": "src", "name": "b1"}));
    f.ok("block-dirty-bitmap-merge", json!({"node": "src", "target": "b1", "bitmaps": ["b0"]}));
    f.ok("block-dirty-bitmap-remove", json!({"node": "src", "name": "b0"}));
    let gone = f.error("block-dirty-bitmap-clear", json!({"node": "src", "name": "b0"}));
    assert!(gone.contains("b0"), "{gone}");
}

#[test]
fn the_nbd_server_and_exports_come_and_go_by_command() {
    let f = Fixture::new();
    f.file_node("disk", 5);
    let socket = f.path("nbd.sock");
    let no_server = f.error("block-export-add", json!({"type": "nbd", "id": "e", "node-name": "disk"}));
    assert_eq!(no_server, "NBD server not running");
    f.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": socket}}}));
    assert!(socket.exists());
    let again = f.error("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": socket}}}));
    assert_eq!(again, "NBD server already running");
    f.ok("block-dirty-bitmap-add", json!({"node": "disk", "name": "b"}));
    let enabled = f.error("block-export-add", json!({"type": "nbd", "id": "r", "node-name": "disk", "bitmaps": ["b"]}));
    assert_eq!(enabled, "Enabled bitmap 'b' incompatible with readonly export");
    f.file_node("elsewhere", 0);
    f.ok("block-dirty-bitmap-add", json!({"node": "elsewhere", "name": "x", "disabled": true}));
    let foreign =
        json!({"type": "nbd", "id": "r", "node-name": "disk", "bitmaps": [{"node": "elsewhere", "name": "x"}]});
    let unrelated = f.error("block-export-add", foreign);
    assert!(unrelated.contains("not below export node 'disk'"), "{unrelated}");
    f.ok("block-export-add", json!({"type": "nbd", "id": "e", "node-name": "disk", "writable": true}));
    let exports = f.ok("query-block-exports", json!({}));
    assert_eq!(exports, json!([{"id": "e", "type": "nbd", "node-name": "disk", "shutting-down": false}]));
    let busy = f.error("blockdev-del", json!({"node-name": "disk"}));
    assert!(busy.contains("export 'e'"), "{busy}");
    f.ok("block-export-del", json!({"id": "e"}));
    assert_eq!(f.ok("query-block-exports", json!({})), json!([]));
    f.ok("nbd-server-stop", json!({}));
    assert!(!socket.exists(), "the server removes the socket it made");
}

/// Write `fill` over `[offset, offset + 64 KiB)` of node `name`, as a guest would.
fn guest_write(f: &Fixture, name: &str, offset: u64, fill: u8) {
    let disk = f.daemon.state().catalog.get(name).unwrap().disk.clone();
    let buf = tandem::buf::AlignedBuf::from_slice(&vec![fill; 64 << 10], 4096).unwrap();
    let (result, _) = disk.write_blocking(offset, buf, Default::default(), tandem::IoPriority::GUEST);
    result.unwrap();
}

#[test]
fn a_full_and_an_incremental_backup_through_transactions_restore_each_instant() {
    let f = Fixture::new();
    let source = f.file_node("src", 9);
    let full = f.file_node("full", 0);
    let incremental = f.file_node("inc", 0);
    let start_chain = json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
        {"type": "blockdev-backup", "data": {"job-id": "full", "device": "src", "target": "full", "sync": "full"}},
    ]});
    f.ok("transaction", start_chain);
    f.wait_job("full", "null");
    assert!(identical(&source, &full), "the full backup");
    guest_write(&f, "src", 1 << 20, 0xa1);
    guest_write(&f, "src", 5 << 20, 0xa2);
    let snapshot = std::fs::read(&source).unwrap();
    let next = json!({"actions": [
        {"type": "blockdev-backup", "data": {"job-id": "inc", "device": "src", "target": "inc", "sync": "incremental", "bitmap": "b0"}},
    ]});
    f.ok("transaction", next);
    f.wait_job("inc", "null");
    // Restore: the full backup, then the incremental's clusters over it.
    let mut restored = std::fs::read(&full).unwrap();
    let incremental = std::fs::read(&incremental).unwrap();
    for offset in [1usize << 20, 5 << 20] {
        restored[offset..offset + (64 << 10)].copy_from_slice(&incremental[offset..offset + (64 << 10)]);
    }
    assert_eq!(restored, snapshot, "full + incremental is the disk at the second instant");
    let nodes = f.ok("query-named-block-nodes", json!({}));
    let src = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "src").unwrap().clone();
    assert_eq!(src["dirty-bitmaps"][0]["count"], 0, "b0 starts over at the incremental's point in time");
}

#[test]
fn a_transaction_that_fails_or_aborts_changes_nothing() {
    let f = Fixture::new();
    f.file_node("src", 1);
    f.ok("block-dirty-bitmap-add", json!({"node": "src", "name": "old"}));
    guest_write(&f, "src", 0, 2);
    // The clear becomes remove-and-recreate at the backup's point in time; the backup fails,
    // so the removed bitmap comes back with its marks.
    let failing = json!({"actions": [
        {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "old"}},
        {"type": "blockdev-backup", "data": {"device": "src", "target": "nowhere", "sync": "full"}},
    ]});
    let error = f.error("transaction", failing);
    assert!(error.contains("nowhere"), "{error}");
    // Every bitmap action of a transaction happens at its backups' point in time; when the
    // backup fails (its target is its source), each one is taken back.
    let mixed = json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "new"}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "old"}},
        {"type": "blockdev-backup", "data": {"device": "src", "target": "src", "sync": "full"}},
    ]});
    let refused = f.error("transaction", mixed);
    assert!(refused.contains("same"), "{refused}");
    assert_eq!(bitmap_info(&f, "src")["recording"], true, "'old' records again");
    let aborted = json!({"actions": [
        {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "old"}},
        {"type": "abort", "data": {}},
    ]});
    assert_eq!(f.error("transaction", aborted), "Transaction aborted using Abort action");
    let nodes = f.ok("query-named-block-nodes", json!({}));
    let src = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "src").unwrap().clone();
    let bitmaps = src["dirty-bitmaps"].as_array().unwrap();
    assert_eq!(bitmaps.len(), 1, "no 'new' bitmap: {bitmaps:?}");
    assert_eq!(
        (bitmaps[0]["name"].as_str(), bitmaps[0]["count"].as_u64()),
        (Some("old"), Some(64 << 10)),
        "not cleared"
    );
    assert_eq!(f.ok("query-jobs", json!({})), json!([]));
}

fn bitmap_info(f: &Fixture, node: &str) -> Value {
    let nodes = f.ok("query-named-block-nodes", json!({}));
    let found = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == node).cloned();
    found.expect("the node")["dirty-bitmaps"][0].clone()
}

#[test]
fn a_persistent_bitmap_survives_a_clean_stop_and_loads_inconsistent_after_a_crash() {
    let f = Fixture::new();
    let image = f.file_node("src", 4);
    f.ok("block-dirty-bitmap-add", json!({"node": "src", "name": "b0", "persistent": true}));
    let sidecar = crate::nodes::sidecar_path(&image, "b0");
    assert!(sidecar.exists(), "{}", sidecar.display());
    guest_write(&f, "src", 2 << 20, 1);
    f.daemon.shutdown(); // the clean stop: saved, flag cleared

    let reopen = |f: &Fixture| {
        let spec = json!({"driver": "file", "node-name": "again", "filename": image, "cache": {"direct": true}});
        f.ok("blockdev-add", spec);
    };
    let g = Fixture::new();
    reopen(&g);
    let loaded = bitmap_info(&g, "again");
    assert_eq!((loaded["name"].as_str(), loaded["count"].as_u64()), (Some("b0"), Some(64 << 10)));
    assert_eq!(loaded["inconsistent"], false);
    guest_write(&g, "again", 0, 2);
    drop(g); // a crash: nothing saved, the sidecar stays in use

    let h = Fixture::new();
    reopen(&h);
    assert_eq!(bitmap_info(&h, "again")["inconsistent"], true, "loaded as inconsistent");
    let refused = h.error("block-dirty-bitmap-clear", json!({"node": "again", "name": "b0"}));
    assert!(refused.contains("b0"), "{refused}");
    h.ok("block-dirty-bitmap-remove", json!({"node": "again", "name": "b0"}));
    assert!(!sidecar.exists(), "removing the bitmap removes its sidecar");
    let existing = std::fs::write(&sidecar, b"not ours").map(|_| ());
    existing.unwrap();
    let kept = h.error("block-dirty-bitmap-add", json!({"node": "again", "name": "b0", "persistent": true}));
    assert!(kept.contains("exists already"), "{kept}");
    assert_eq!(std::fs::read(&sidecar).unwrap(), b"not ours", "a file we did not make is kept");
}

#[test]
fn pull_mode_backup_reads_the_point_in_time_and_its_bitmap_over_nbd() {
    let f = Fixture::new();
    let source = f.file_node("src", 6);
    let fleece = f.path("fleece.img");
    std::fs::File::create(&fleece).unwrap().set_len(DISK_BYTES as u64).unwrap();
    f.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "fleece", "filename": fleece, "cache": {"direct": true}}),
    );
    f.ok("block-dirty-bitmap-add", json!({"node": "src", "name": "b0"}));
    guest_write(&f, "src", 3 << 20, 0x33); // before the point in time: in b0 and in the backup
    f.ok("blockdev-add", json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "fleece"}));
    let snapshot = std::fs::read(&source).unwrap(); // the point in time
    f.ok("block-dirty-bitmap-disable", json!({"node": "src", "name": "b0"})); // frozen at the point in time
    f.ok("blockdev-add", json!({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"}));
    let socket = f.path("nbd.sock");
    f.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": socket}}}));
    f.ok("block-export-add", json!({"type": "nbd", "id": "e", "node-name": "snap", "name": "snap", "bitmaps": ["b0"]}));
    guest_write(&f, "src", 3 << 20, 0x44); // after: saved first, the export still reads 0x33
    guest_write(&f, "src", 6 << 20, 0x55);
    let copy = f.path("copy.img");
    let uri = format!("nbd+unix:///snap?socket={}", socket.display());
    let convert = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&copy)
        .output()
        .expect("qemu-img");
    assert!(convert.status.success(), "{}", String::from_utf8_lossy(&convert.stderr));
    assert_eq!(std::fs::read(&copy).unwrap(), snapshot, "the export reads exactly the point in time");
    let map = std::process::Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts"])
        .arg(format!(
            "driver=nbd,server.type=unix,server.path={},export=snap,x-dirty-bitmap=qemu:dirty-bitmap:b0",
            socket.display()
        ))
        .output()
        .expect("qemu-img");
    assert!(map.status.success(), "{}", String::from_utf8_lossy(&map.stderr));
    // x-dirty-bitmap turns dirty extents into "data": false (QEMU's inverted trick).
    let extents: Value = serde_json::from_slice(&map.stdout).unwrap();
    let dirty: Vec<(u64, u64)> = extents
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert!(
        dirty.iter().any(|(start, length)| *start <= 3 << 20 && start + length > 3 << 20),
        "b0 shows the write: {dirty:?}"
    );
    f.delete_export_once_idle("e"); // qemu-img has exited; the server notices a moment later
    let busy = f.error("blockdev-del", json!({"node-name": "fleece"}));
    assert!(busy.contains("cbw"), "the filter saves to it: {busy}");
    f.ok("blockdev-del", json!({"node-name": "snap"}));
    f.ok("blockdev-del", json!({"node-name": "cbw"}));
    f.ok("blockdev-del", json!({"node-name": "fleece"}));
}

#[test]
fn an_nbd_node_is_a_mirror_target_over_the_network() {
    let f = Fixture::new();
    let source = f.file_node("src", 8);
    let remote = f.file_node("remote", 0);
    let socket = f.path("nbd.sock");
    f.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": socket}}}));
    f.ok("block-export-add", json!({"type": "nbd", "id": "e", "node-name": "remote", "name": "r", "writable": true}));
    let nbd = json!({"driver": "nbd", "node-name": "net", "server": {"type": "unix", "path": socket}, "export": "r"});
    f.ok("blockdev-add", nbd);
    let nodes = f.ok("query-named-block-nodes", json!({}));
    let net = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "net").unwrap().clone();
    assert_eq!((net["drv"].as_str(), net["image"]["virtual-size"].as_u64()), (Some("nbd"), Some(DISK_BYTES as u64)));
    f.ok("blockdev-mirror", json!({"job-id": "m", "device": "src", "target": "net", "sync": "full"}));
    f.wait_job("m", "ready");
    f.ok("block-job-complete", json!({"device": "m"}));
    f.wait_job("m", "null");
    assert!(identical(&source, &remote), "the export's file holds the source");
    let bad = f.error("blockdev-add", json!({"driver": "nbd", "node-name": "x", "server": {"type": "vsock"}}));
    assert!(bad.contains("'server.type' = 'vsock'"), "{bad}");
}

#[test]
fn an_rbd_node_is_a_backup_target_in_the_test_cluster() {
    let conf = std::env::var("TANDEM_CEPH_CONF").unwrap_or_else(|_| {
        panic!("this test needs a Ceph cluster: run scripts/test, or export TANDEM_CEPH_CONF and TANDEM_CEPH_POOL from scripts/ceph-test-cluster")
    });
    let pool = std::env::var("TANDEM_CEPH_POOL").unwrap_or_else(|_| "tandem".into());
    let image = format!("qmp-{}", std::process::id());
    let spec = tandem_drivers::rbd::RbdSpec::parse(&format!("rbd:{pool}/{image}:conf={conf}")).unwrap();
    tandem_drivers::rbd::create_image(&spec, DISK_BYTES as u64).unwrap();
    let f = Fixture::new();
    let source = f.file_node("src", 0x5a);
    let added = f
        .run("blockdev-add", json!({"driver": "rbd", "node-name": "ceph", "pool": pool, "image": image, "conf": conf}));
    let result = added.and_then(|_| {
        f.run("blockdev-backup", json!({"job-id": "b", "device": "src", "target": "ceph", "sync": "full"}))
    });
    if result.is_ok() {
        f.wait_job("b", "null");
    }
    let copy = f.path("copy.img");
    let export =
        std::process::Command::new("rbd").args(["-c", &conf, "export", &format!("{pool}/{image}")]).arg(&copy).output();
    let removed = {
        f.ok("blockdev-del", json!({"node-name": "ceph"}));
        tandem_drivers::rbd::remove_image(&spec)
    };
    result.unwrap_or_else(|e| panic!("{}", e.desc));
    let export = export.expect("the rbd tool (ceph-common)");
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    assert!(identical(&source, &copy), "the image holds the backup");
    removed.unwrap();
}

/// A value of `ty` for the schema test: the first of an enum, an empty object or list.
fn sample(ty: super::schema::Ty) -> Value {
    use super::schema::Ty;
    match ty {
        Ty::Str => json!("x"),
        Ty::Int => json!(0),
        Ty::Bool => json!(false),
        Ty::Any => json!({}),
        Ty::Enum(values) => json!(values[0]),
        Ty::Object(_) => json!({}),
        Ty::List(_) => json!([]),
    }
}

#[test]
fn the_schema_lists_every_command_and_no_argument_a_handler_refuses() {
    let f = Fixture::new();
    let names: Vec<&str> = super::schema::COMMAND_ARGS.iter().map(|(name, _)| *name).collect();
    for command in f.daemon.names() {
        assert!(names.contains(&command), "{command} is not in the schema");
    }
    for (command, members) in super::schema::COMMAND_ARGS {
        // The monitor's own commands, and quit (it would stop the test), are not the handlers'.
        if ["qmp_capabilities", "query-commands", "quit"].contains(command) {
            continue;
        }
        let arguments: serde_json::Map<String, Value> =
            members.iter().map(|m| (m.name.to_string(), sample(m.ty))).collect();
        let variants: Vec<(&str, &[super::schema::Member])> = match *command {
            "blockdev-add" => super::schema::BLOCKDEV_VARIANTS.to_vec(),
            _ => vec![("", &[])],
        };
        for (driver, extra) in variants {
            let mut arguments = arguments.clone();
            arguments.extend(extra.iter().map(|m| (m.name.to_string(), sample(m.ty))));
            if !driver.is_empty() {
                arguments.insert("driver".into(), json!(driver));
            }
            if let Err(error) = f.daemon.execute(command, arguments) {
                let desc = error.desc;
                assert!(
                    !desc.contains("is unexpected"),
                    "{command} {driver}: the schema lists what it refuses: {desc}"
                );
            }
        }
    }
    let schema = f.ok("query-qmp-schema", json!({}));
    let infos = schema.as_array().unwrap();
    let mirror = infos.iter().find(|i| i["name"] == "blockdev-mirror").expect("blockdev-mirror");
    let arg_type = infos.iter().find(|i| i["name"] == mirror["arg-type"]).expect("its arguments");
    let members: Vec<&str> =
        arg_type["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(members.contains(&"target-is-zero") && members.contains(&"copy-mode"), "{members:?}");
    assert!(infos.iter().any(|i| i["name"] == "BLOCK_JOB_READY" && i["meta-type"] == "event"));
}

#[test]
fn an_export_a_client_uses_is_not_deleted_and_neither_is_its_node() {
    let f = Fixture::new();
    f.file_node("disk", 5);
    let socket = f.path("nbd.sock");
    f.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": socket}}}));
    f.ok("block-export-add", json!({"type": "nbd", "id": "e", "node-name": "disk", "name": "d", "writable": true}));
    // A client: tandemd's own NBD client, connected through an nbd node.
    f.ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "client", "server": {"type": "unix", "path": socket}, "export": "d"}),
    );
    assert_eq!(f.error("block-export-del", json!({"id": "e"})), "export 'e' still in use");
    let hard = f.error("block-export-del", json!({"id": "e", "mode": "hard"}));
    assert!(hard.contains("not supported yet"), "{hard}");
    let busy = f.error("blockdev-del", json!({"node-name": "disk"}));
    assert!(busy.contains("export 'e'"), "{busy}");
    assert_eq!(f.ok("query-block-exports", json!({})).as_array().unwrap().len(), 1, "still exported");
    f.ok("blockdev-del", json!({"node-name": "client"})); // the client disconnects
    f.delete_export_once_idle("e");
    f.ok("blockdev-del", json!({"node-name": "disk"}));
}

#[test]
fn a_failed_transaction_gives_each_bitmap_its_state_back() {
    let f = Fixture::new();
    f.file_node("src", 1);
    f.file_node("other", 2);
    f.ok("block-dirty-bitmap-add", json!({"node": "other", "name": "on"}));
    f.ok("block-dirty-bitmap-add", json!({"node": "other", "name": "off", "disabled": true}));
    let failing = json!({"actions": [
        {"type": "block-dirty-bitmap-enable", "data": {"node": "other", "name": "on"}},
        {"type": "block-dirty-bitmap-enable", "data": {"node": "other", "name": "off"}},
        {"type": "blockdev-backup", "data": {"device": "src", "target": "nowhere", "sync": "full"}},
    ]});
    f.error("transaction", failing);
    let nodes = f.ok("query-named-block-nodes", json!({}));
    let other = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "other").unwrap().clone();
    let recording: Vec<(String, bool)> = other["dirty-bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["name"].as_str().unwrap().to_string(), b["recording"].as_bool().unwrap()))
        .collect();
    assert_eq!(recording, vec![("on".to_string(), true), ("off".to_string(), false)], "each as it was");
}

#[test]
fn a_sidecar_of_another_image_with_a_longer_name_is_left_alone() {
    let f = Fixture::new();
    let other = f.file_node("disk.img.bak", 1);
    f.ok("block-dirty-bitmap-add", json!({"node": "disk.img.bak", "name": "b0", "persistent": true}));
    assert_eq!(bitmap_info(&f, "disk.img.bak")["persistent"], true);
    f.daemon.shutdown(); // saved clean
    let sidecar = crate::nodes::sidecar_path(&other, "b0");
    let before = std::fs::read(&sidecar).unwrap();
    // "disk.img" is a prefix of "disk.img.bak": its sidecar is not this image's.
    let g = Fixture::new();
    let image = f.path("disk.img");
    std::fs::write(&image, vec![0u8; DISK_BYTES]).unwrap();
    g.ok("blockdev-add", json!({"driver": "file", "node-name": "d", "filename": image, "cache": {"direct": true}}));
    let nodes = g.ok("query-named-block-nodes", json!({}));
    assert_eq!(nodes[0]["dirty-bitmaps"], json!([]), "no bitmap of the other image");
    assert_eq!(std::fs::read(&sidecar).unwrap(), before, "its sidecar is untouched (not marked in use)");
}

#[test]
fn a_node_defined_inline_is_opened_first_and_deleted_with_its_parent() {
    let f = Fixture::new();
    let image = f.path("inline.img");
    std::fs::write(&image, vec![3u8; DISK_BYTES]).unwrap();
    let nested = json!({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": image}});
    f.ok("blockdev-add", nested);
    let names = |f: &Fixture| -> Vec<String> {
        let nodes = f.ok("query-named-block-nodes", json!({}));
        nodes.as_array().unwrap().iter().map(|n| n["node-name"].as_str().unwrap().to_string()).collect()
    };
    let added = names(&f);
    assert_eq!(added.len(), 2, "{added:?}");
    assert!(added.iter().any(|n| n.starts_with("#block")), "QEMU's implicit name: {added:?}");
    f.ok("blockdev-del", json!({"node-name": "r"}));
    assert_eq!(names(&f), Vec::<String>::new(), "the inline child goes with its parent");
    let missing = f.path("missing.img");
    let bad = json!({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": missing}});
    let error = f.error("blockdev-add", bad);
    assert!(error.contains("missing.img"), "{error}");
    assert_eq!(names(&f), Vec::<String>::new(), "nothing half-added");
}

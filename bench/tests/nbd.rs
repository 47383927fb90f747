//! `tandem-bench` against NBD exports served by qemu-nbd: fio's flags on an NBD URI,
//! compare-fio against fio's nbd engine (libnbd) on the same export, mirror and backup into an
//! export (which needs --overwrite-target and is never removed). Behaviour only, never speed.

mod common;

use common::{small_job, tandem, Scratch};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// qemu-nbd serving a new raw file of `size` on a Unix socket; killed on drop.
struct Export {
    child: Child,
    file: PathBuf,
    uri: String,
}

impl Export {
    fn new(scratch: &Scratch, size_bytes: u64) -> Export {
        let file = scratch.path("export.raw");
        std::fs::File::create(&file).and_then(|f| f.set_len(size_bytes)).expect("creating the export's file");
        let socket = scratch.path("nbd.sock");
        let child = Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-e", "8", "--cache=none", "-k"])
            .arg(&socket)
            .arg(&file)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-nbd (scripts/install-test-deps installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not listen on {}", socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Export { child, file, uri: format!("nbd+unix:///?socket={}", socket.display()) }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn run_writes_the_export_through_the_nbd_client() {
    let scratch = Scratch::new("nbd-run");
    let export = Export::new(&scratch, 16 << 20);
    let mut args = vec!["run".to_string()];
    args.extend(small_job(&export.uri, "randwrite"));
    let json = tandem(&args.iter().map(String::as_str).collect::<Vec<_>>()).ok().json();
    assert_eq!(json["jobs"][0]["write"]["io_bytes"].as_u64(), Some(4 << 20), "{json}");
    let data = std::fs::read(&export.file).unwrap();
    assert!(data.iter().any(|&b| b != 0), "the writes reached qemu-nbd's file");
    assert_eq!(data.len(), 16 << 20, "never laid out or resized");
}

#[test]
fn compare_fio_runs_fio_s_nbd_engine_on_the_same_export() {
    let scratch = Scratch::new("nbd-compare");
    let export = Export::new(&scratch, 16 << 20);
    let mut args = vec!["compare-fio".to_string(), "--rounds=1".into()];
    args.extend(small_job(&export.uri, "randread"));
    let json = tandem(&args.iter().map(String::as_str).collect::<Vec<_>>()).ok().json();
    let command = json["fio_command"].as_str().unwrap_or_default();
    assert!(command.contains("--ioengine=nbd") && command.contains(&format!("--uri={}", export.uri)), "{command}");
    for side in ["fio", "tandem"] {
        assert!(json[side]["iops"]["mean"].as_f64() > Some(0.0), "{side}: {json}");
    }
}

#[test]
fn mirror_and_backup_into_an_export_need_overwrite_target_and_keep_it() {
    let scratch = Scratch::new("nbd-jobs");
    let export = Export::new(&scratch, 64 << 20);
    let source = scratch.file("source.img");
    let refused = ["mirror", "--source", &source, "--target", &export.uri, "--size", "32M"];
    let run = tandem(&refused).failed();
    assert!(run.stderr.contains("--overwrite-target"), "{}", run.stderr);
    assert!(!scratch.path("source.img").exists(), "refused before anything was touched");
    let allowed = [&refused[..], &["--overwrite-target", "--output-format", "json"]].concat();
    let json = tandem(&allowed).ok().json();
    assert_eq!(json["identical"], true, "{json}");
    assert!(export.file.exists(), "the export stays");
    let backup = ["backup", "--source", &source, "--target", &export.uri, "--size", "32M", "--overwrite-target"];
    let json = tandem(&[&backup[..], &["--output-format", "json"]].concat()).ok().json();
    assert_eq!(json["point_in_time_ok"], true, "{json}");
    let with_qemu = [&backup[..], &["--compare-qemu"]].concat();
    let run = tandem(&with_qemu).failed();
    assert!(run.stderr.contains("--compare-qemu with the NBD target"), "{}", run.stderr);
}

//! `tandemd` as users start it: qemu-storage-daemon's own command line, real clients, real
//! signals. The same line also starts qemu-storage-daemon, which is the point.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn scratch_dir() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new().prefix("tandemd-").tempdir_in(&base).unwrap()
}

fn make_file(path: &Path, size_bytes: u64, fill: u8) {
    std::fs::write(path, vec![fill; size_bytes as usize]).unwrap();
}

/// QSD's line for one writable raw-over-file export on `socket`.
fn qsd_line(image: &Path, socket: &Path, pidfile: &Path) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!("driver=file,node-name=f,filename={},cache.direct=on", image.display()),
        "--blockdev".into(),
        "driver=raw,node-name=r,file=f".into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", socket.display()),
        "--export".into(),
        "type=nbd,id=e,node-name=r,name=disk,writable=on".into(),
        "--pidfile".into(),
        pidfile.display().to_string(),
    ]
}

fn start(program: &str, args: &[String]) -> Child {
    Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect(program)
}

/// Wait until `path` exists or the child exits (then the test fails with its stderr).
fn wait_for(child: &mut Child, path: &Path) {
    for _ in 0..200 {
        if path.exists() {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("daemon exited with {status}: {err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} never appeared", path.display());
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
}

#[test]
fn the_qsd_line_serves_and_sigterm_shuts_down_cleanly() {
    let dir = scratch_dir();
    let (image, socket, pidfile) = (dir.path().join("d.img"), dir.path().join("s.sock"), dir.path().join("pid"));
    make_file(&image, 4 * MIB, 0x11);
    let mut daemon = start(env!("CARGO_BIN_EXE_tandemd"), &qsd_line(&image, &socket, &pidfile));
    wait_for(&mut daemon, &pidfile);
    assert_eq!(std::fs::read_to_string(&pidfile).unwrap().trim(), daemon.id().to_string());
    let uri = format!("nbd+unix:///disk?socket={}", socket.display());
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k", &uri]);
    assert!(!out.contains("failed"), "{out}");
    signal(&daemon, libc::SIGTERM);
    let status = daemon.wait().unwrap();
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
    assert!(!socket.exists() && !pidfile.exists(), "the socket and pidfile it created are gone");
    let bytes = std::fs::read(&image).unwrap();
    assert!(bytes[MIB as usize..(MIB + 65536) as usize].iter().all(|b| *b == 0x5a), "the write is on disk");
    assert!(bytes[..MIB as usize].iter().all(|b| *b == 0x11), "nothing else changed");
}

#[test]
fn the_same_line_starts_qemu_storage_daemon() {
    let dir = scratch_dir();
    let (image, socket, pidfile) = (dir.path().join("d.img"), dir.path().join("q.sock"), dir.path().join("qpid"));
    make_file(&image, 4 * MIB, 0x22);
    let mut qsd = start("qemu-storage-daemon", &qsd_line(&image, &socket, &pidfile));
    wait_for(&mut qsd, &socket);
    let info = run("qemu-img", &["info", &format!("nbd+unix:///disk?socket={}", socket.display())]);
    signal(&qsd, libc::SIGTERM);
    let _ = qsd.wait();
    assert!(info.contains("4 MiB"), "{info}");
}

#[test]
fn sigint_also_shuts_down() {
    let dir = scratch_dir();
    let (image, socket, pidfile) = (dir.path().join("d.img"), dir.path().join("s.sock"), dir.path().join("pid"));
    make_file(&image, MIB, 0);
    let mut daemon = start(env!("CARGO_BIN_EXE_tandemd"), &qsd_line(&image, &socket, &pidfile));
    wait_for(&mut daemon, &pidfile);
    signal(&daemon, libc::SIGINT);
    assert!(daemon.wait().unwrap().success());
    assert!(!socket.exists());
}

#[test]
fn bad_options_are_named_and_nothing_is_created_or_changed() {
    let dir = scratch_dir();
    let (image, socket, pidfile) = (dir.path().join("d.img"), dir.path().join("s.sock"), dir.path().join("pid"));
    make_file(&image, MIB, 0x33);
    let good = qsd_line(&image, &socket, &pidfile);
    let with = |index: usize, value: &str| {
        let mut args = good.clone();
        args[index] = value.to_string();
        args
    };
    let cases = [
        (with(1, "driver=file,node-name=f,filename=/nonexistent/x.img"), "/nonexistent/x.img"),
        (with(1, "driver=qcow2,node-name=f,file=x"), "'driver' = 'qcow2'"),
        (with(3, "driver=raw,node-name=r,file=nosuch"), "no node named 'nosuch'"),
        (with(5, "addr.type=vsock,addr.cid=3"), "'addr.type' = 'vsock'"),
        (with(7, "type=nbd,id=e,node-name=missing"), "node 'missing' not found"),
        (with(7, "type=nbd,id=e,node-name=r,writable=maybe"), "'writable' = 'maybe'"),
        (with(7, "type=nbd,id=e,node-name=r,frobnicate=1"), "'frobnicate' is unexpected"),
    ];
    for (args, expected) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_tandemd")).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} must fail");
        assert!(stderr.contains(expected), "{expected:?} not in: {stderr}");
        assert!(!socket.exists() && !pidfile.exists(), "{args:?} left files behind");
    }
    assert!(std::fs::read(&image).unwrap().iter().all(|b| *b == 0x33), "the image is untouched");
}

#[test]
fn an_existing_socket_path_is_refused_and_kept() {
    let dir = scratch_dir();
    let (image, socket, pidfile) = (dir.path().join("d.img"), dir.path().join("s.sock"), dir.path().join("pid"));
    make_file(&image, MIB, 0);
    std::fs::write(&socket, b"someone else's").unwrap();
    let output =
        Command::new(env!("CARGO_BIN_EXE_tandemd")).args(qsd_line(&image, &socket, &pidfile)).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&socket).unwrap(), b"someone else's");
    assert!(!pidfile.exists());
}

#[test]
fn a_monitor_path_holding_a_file_or_a_live_socket_is_refused_and_kept() {
    let dir = scratch_dir();
    let (image, socket, pidfile) = (dir.path().join("d.img"), dir.path().join("s.sock"), dir.path().join("pid"));
    make_file(&image, MIB, 0);
    let qmp = dir.path().join("qmp.sock");
    let listening = std::os::unix::net::UnixListener::bind(dir.path().join("live.sock")).unwrap();
    for (path, keep) in [(qmp.clone(), true), (dir.path().join("live.sock"), false)] {
        if keep {
            std::fs::write(&path, b"someone else's").unwrap();
        }
        let mut args = qsd_line(&image, &socket, &pidfile);
        args.extend(["--chardev".into(), format!("socket,id=qmp,path={},server=on,wait=off", path.display())]);
        args.extend(["--monitor".into(), "chardev=qmp".into()]);
        let output = Command::new(env!("CARGO_BIN_EXE_tandemd")).args(&args).output().unwrap();
        assert!(!output.status.success(), "{} must be refused", path.display());
        assert!(String::from_utf8_lossy(&output.stderr).contains("is not a dead socket"), "{output:?}");
        assert!(path.exists(), "kept");
        assert!(!socket.exists() && !pidfile.exists(), "nothing was started");
    }
    assert_eq!(std::fs::read(&qmp).unwrap(), b"someone else's");
    drop(listening);
}

#[test]
fn a_pidfile_path_holding_other_data_or_a_live_pid_is_refused_and_kept() {
    let dir = scratch_dir();
    let (image, socket, pidfile) = (dir.path().join("d.img"), dir.path().join("s.sock"), dir.path().join("pid"));
    make_file(&image, MIB, 0);
    for content in ["precious data, not a pid\n".to_string(), format!("{}\n", std::process::id())] {
        std::fs::write(&pidfile, &content).unwrap();
        let output =
            Command::new(env!("CARGO_BIN_EXE_tandemd")).args(qsd_line(&image, &socket, &pidfile)).output().unwrap();
        assert!(!output.status.success(), "{content:?} must be refused");
        assert!(String::from_utf8_lossy(&output.stderr).contains("--pidfile"));
        assert_eq!(std::fs::read_to_string(&pidfile).unwrap(), content, "the file is kept as it was");
        assert!(!socket.exists(), "nothing was started");
    }
}

#[test]
fn exports_are_checked_against_the_nodes_before_the_socket_is_bound() {
    let dir = scratch_dir();
    let (image, socket, pidfile) = (dir.path().join("d.img"), dir.path().join("s.sock"), dir.path().join("pid"));
    make_file(&image, MIB, 0);
    let mut args = qsd_line(&image, &socket, &pidfile);
    args[1] += ",read-only=on";
    let cases = [
        ("type=nbd,id=e,node-name=r,writable=on", "read-only"),
        ("type=nbd,id=e,node-name=r,bitmaps.0=b0", "Bitmap 'b0' is not found on node 'r'"),
        ("type=nbd,id=e,node-name=nosuch", "node 'nosuch' not found"),
    ];
    for (export, expected) in cases {
        args[7] = export.to_string();
        // Watch the socket path while the daemon runs: it must never appear.
        let mut child = start(env!("CARGO_BIN_EXE_tandemd"), &args);
        let mut socket_seen = false;
        let status = loop {
            socket_seen |= socket.exists();
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(!status.success() && stderr.contains(expected), "{export}: {stderr}");
        assert!(!socket_seen, "{export}: the socket was bound before the export was checked");
    }
}

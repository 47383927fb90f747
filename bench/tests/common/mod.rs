//! Helpers for the CLI tests: run the real `tandem-bench` binary (with a time limit, so a
//! hung run fails the test instead of the suite) on scratch files under Cargo's target tmp dir.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest any single command may take; far above what each test asks for.
const TIME_LIMIT: Duration = Duration::from_secs(120);

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tandem-bench")
}

/// A scratch directory for one test under `CARGO_TARGET_TMPDIR` (a real filesystem, unlike
/// /tmp which may be tmpfs), removed when dropped. Fails if the directory refuses O_DIRECT.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-tests");
        std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
        let dir = tempfile::Builder::new()
            .prefix(&format!("{test}-"))
            .tempdir_in(&root)
            .unwrap_or_else(|e| panic!("cannot create a scratch dir in {}: {e}", root.display()));
        let probe = dir.path().join("o_direct_probe");
        if let Err(e) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
        {
            panic!(
                "{} refuses O_DIRECT ({e}); tandem-bench opens files with O_DIRECT, so run the tests with \
                 CARGO_TARGET_DIR on a disk-backed filesystem (not tmpfs)",
                dir.path().display()
            );
        }
        let _ = std::fs::remove_file(&probe);
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `path(name)` as a string, for `--filename=`.
    pub fn file(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// What one run printed and how it ended.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl Run {
    /// Panics with the whole output unless the run exited 0.
    pub fn ok(self) -> Run {
        assert!(
            self.status.success(),
            "{} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        self.assert_no_panic();
        self
    }

    /// Panics unless the run exited non-zero, without a panic and with nothing on stdout.
    pub fn failed(self) -> Run {
        assert!(!self.status.success(), "{} should fail but exited 0:\nstdout:\n{}", self.what, self.stdout);
        assert_eq!(
            self.status.code(),
            Some(1),
            "{}: exit status {} (101 would be a panic)\n{}",
            self.what,
            self.status,
            self.stderr
        );
        self.assert_no_panic();
        self
    }

    pub fn assert_no_panic(&self) {
        assert!(!self.stderr.contains("panicked"), "{} panicked:\n{}", self.what, self.stderr);
    }

    /// stdout as JSON (anything before the first `{`, as fio sometimes prints, is skipped).
    pub fn json(&self) -> serde_json::Value {
        let start = self.stdout.find('{').unwrap_or_else(|| panic!("{} printed no JSON:\n{}", self.what, self.stdout));
        serde_json::from_str(&self.stdout[start..])
            .unwrap_or_else(|e| panic!("{} printed invalid JSON ({e}):\n{}", self.what, self.stdout))
    }
}

/// Runs `program args` with `env` added to the environment, killing it after [`TIME_LIMIT`].
pub fn run_program(program: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let what = format!(
        "`{} {}`",
        Path::new(program).file_name().map_or(program.into(), |n| n.to_string_lossy()),
        args.join(" ")
    );
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break status;
        }
        if started.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} took longer than {TIME_LIMIT:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run { status, stdout: stdout.join().expect("stdout reader"), stderr: stderr.join().expect("stderr reader"), what }
}

/// Runs `tandem-bench args`.
pub fn tandem(args: &[&str]) -> Run {
    run_program(bin(), args, &[])
}

/// A loop device over a backing file, detached when dropped (also when a test panics). The
/// tests run as root, as `losetup` needs.
pub struct LoopDevice {
    pub device: PathBuf,
}

impl LoopDevice {
    /// A loop device over `backing` (a file of whole 512-byte sectors).
    pub fn over(backing: &Path) -> LoopDevice {
        let output = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .unwrap_or_else(|e| panic!("cannot run losetup (util-linux): {e}"));
        assert!(
            output.status.success(),
            "losetup -f --show {} failed (the tests run as root): {}",
            backing.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let device = LoopDevice { device: PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()) };
        // Checked once the guard exists, so a failed check still detaches it.
        assert!(device.path().starts_with("/dev/loop"), "losetup printed {}", device.path());
        device
    }

    pub fn path(&self) -> &str {
        self.device.to_str().expect("a /dev/loopN path")
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// Seeded bytes, for files whose content a test checks afterwards.
pub fn pattern_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Options `backup` must refuse, with the text its error must name.
pub const BACKUP_BAD_OPTIONS: [(&str, &str); 7] = [
    ("--sync=sideways", "sideways"),
    ("--sync=none", "none"),
    ("--cluster-size=3000", "3000"),
    ("--copy-priority=me", "me"),
    ("--max-workers=0", "max-workers"),
    ("--output-format=xml", "xml"),
    ("--verify=twice", "twice"),
];

/// A short 4k job on `filename` (16 MiB region, 4 MiB of I/O, QD8) with JSON output: what the
/// remote-disk tests (rbd, nbd) run through `run` and `compare-fio`.
pub fn small_job(filename: &str, rw: &str) -> Vec<String> {
    [
        "--name=j".to_string(),
        format!("--filename={filename}"),
        format!("--rw={rw}"),
        "--size=16M".into(),
        "--io_size=4M".into(),
        "--bs=4k".into(),
        "--iodepth=8".into(),
        "--output-format=json".into(),
    ]
    .into()
}

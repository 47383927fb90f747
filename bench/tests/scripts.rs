//! The README's test command sets up a fresh machine itself: `scripts/install-test-deps`
//! installs what is missing as root and, as anyone else, prints the exact command and stops.

use std::path::Path;
use std::process::Command;

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-test-deps")
}

#[test]
fn an_unprivileged_run_on_a_bare_machine_prints_the_exact_install_command() {
    // A PATH with only `id` in it: to the script every tool is missing, as on a fresh machine.
    let bare = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/usr/bin/id", bare.path().join("id")).unwrap();
    let output = Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/bin/bash"])
        .arg(script())
        .env_clear()
        .env("PATH", bare.path())
        .output()
        .expect("setpriv (util-linux) runs the script as nobody");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let expected = "apt-get update && apt-get install -y --no-install-recommends \
                    fio ceph-mon ceph-osd ceph-common uuid-runtime qemu-utils mount";
    assert!(stderr.contains(expected), "{stderr}");
}

#[test]
fn a_machine_with_everything_installed_is_left_alone() {
    // The suite runs after scripts/test installed what it needs: nothing is missing now.
    let output = Command::new(script()).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.stderr.is_empty() && output.stdout.is_empty(), "it installed or said something");
}

//! `tandem-bench` against Ceph RBD images on the test cluster (`scripts/test` starts one; see
//! scripts/ceph-test-cluster): fio's flags on an `rbd:` filename, compare-fio against fio's
//! rbd engine, and a mirror into an image. Behaviour only, never speed.

mod common;

use common::{small_job, tandem, Scratch};
use std::process::Command;

fn cluster() -> (String, String) {
    let conf = std::env::var("TANDEM_CEPH_CONF").unwrap_or_else(|_| {
        panic!("these tests need a Ceph cluster: run the suite with scripts/test, or export TANDEM_CEPH_CONF")
    });
    (conf, std::env::var("TANDEM_CEPH_POOL").unwrap_or_else(|_| "tandem".into()))
}

/// An image name of this test process, and its spec; removed on drop.
struct Image {
    conf: String,
    path: String,
    spec: String,
}

impl Image {
    fn new(name: &str) -> Image {
        let (conf, pool) = cluster();
        let path = format!("{pool}/cli-{name}-{}", std::process::id());
        Image { spec: format!("rbd:{path}:conf={conf}"), conf, path }
    }

    fn exists(&self) -> bool {
        let status = Command::new("rbd").args(["-c", &self.conf, "info", &self.path]).output().expect("rbd");
        status.status.success()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("rbd").args(["-c", &self.conf, "rm", "--no-progress", &self.path]).output();
    }
}

#[test]
fn run_creates_the_image_and_writes_it_through_librbd() {
    let image = Image::new("run");
    let mut args = vec!["run".to_string()];
    args.extend(small_job(&image.spec, "randwrite"));
    let json = tandem(&args.iter().map(String::as_str).collect::<Vec<_>>()).ok().json();
    let write = &json["jobs"][0]["write"];
    assert_eq!(write["io_bytes"].as_u64(), Some(4 << 20), "{write}");
    assert!(image.exists(), "the image was created");
}

#[test]
fn compare_fio_runs_fio_s_rbd_engine_on_the_same_image() {
    let image = Image::new("compare");
    let mut args = vec!["compare-fio".to_string(), "--rounds=1".into()];
    args.extend(small_job(&image.spec, "randread"));
    let json = tandem(&args.iter().map(String::as_str).collect::<Vec<_>>()).ok().json();
    let command = json["fio_command"].as_str().unwrap_or_default();
    assert!(command.contains("--ioengine=rbd") && command.contains("--rbdname="), "{command}");
    assert!(!command.contains("--filename"), "fio's rbd engine names the image itself: {command}");
    for side in ["fio", "tandem"] {
        assert!(json[side]["iops"]["mean"].as_f64() > Some(0.0), "{side}: {json}");
    }
}

#[test]
fn mirror_into_an_image_ends_identical_and_removes_it() {
    let scratch = Scratch::new("rbd-mirror");
    let image = Image::new("mirror");
    let source = scratch.file("source.img");
    let args = ["mirror", "--source", &source, "--target", &image.spec, "--size", "64M", "--output-format", "json"];
    let json = tandem(&args).ok().json();
    assert_eq!(json["identical"], true, "{json}");
    assert_eq!(json["copied_bytes"].as_u64(), Some(64 << 20), "{json}");
    assert!(!image.exists(), "without --keep the image goes");
}

#[test]
fn a_bad_rbd_filename_is_named_and_changes_nothing() {
    let image = Image::new("bad");
    let bad = image.spec.replace("rbd:", "rbd:no-such-pool-");
    let run = tandem(&["run", "--name=b", &format!("--filename={bad}"), "--size=1M", "--rw=read"]).failed();
    assert!(run.stderr.contains("no-such-pool-"), "{}", run.stderr);
    let run = tandem(&["run", "--name=b", "--filename=rbd:only-a-name", "--size=1M", "--rw=read"]).failed();
    assert!(run.stderr.contains("no pool"), "{}", run.stderr);
    assert!(!image.exists());
}

#[test]
fn an_existing_image_needs_overwrite_target_and_is_never_removed() {
    let scratch = Scratch::new("rbd-existing");
    let image = Image::new("existing");
    let created = Command::new("rbd").args(["-c", &image.conf, "create", "--size", "64M", &image.path]).output();
    let created = created.expect("rbd");
    assert!(created.status.success(), "rbd create: {}", String::from_utf8_lossy(&created.stderr));
    let source = scratch.file("source.img");
    let refused = ["mirror", "--source", &source, "--target", &image.spec, "--size", "64M"];
    let run = tandem(&refused).failed();
    assert!(run.stderr.contains("--overwrite-target"), "{}", run.stderr);
    assert!(image.exists() && !scratch.path("source.img").exists(), "refused before anything was touched");
    let allowed = [&refused[..], &["--overwrite-target", "--output-format", "json"]].concat();
    let json = tandem(&allowed).ok().json();
    assert_eq!(json["identical"], true, "{json}");
    assert!(image.exists(), "an image the bench found stays, --keep or not");
}

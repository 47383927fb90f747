//! The rbd driver against the test cluster, beyond the conformance suite: what a user gets for
//! bad specs, read-only snapshots, and a cluster that stops answering.

mod common;

use common::{ceph_cluster, pattern, ScratchImage};
use tandem::block::{BlockDriver, Disk, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::IoPriority;
use tandem_drivers::rbd::{RbdDriver, RbdError, RbdOptions, RbdSpec};

const G: IoPriority = IoPriority::GUEST;

fn open(spec: &str) -> Result<RbdDriver, RbdError> {
    RbdDriver::open_spec(spec, &RbdOptions::default())
}

#[test]
fn bad_specs_get_typed_errors_that_name_the_value() {
    let (conf, pool) = ceph_cluster();
    let scratch = ScratchImage::new(1 << 20);
    let image = &scratch.spec.image;

    let error = open(&format!("rbd:{pool}/no-such-image:conf={conf}")).err().unwrap();
    assert!(
        matches!(&error, RbdError::Image { image, errno: libc::ENOENT } if image.contains("no-such-image")),
        "{error}"
    );

    let error = open(&format!("rbd:no-such-pool/{image}:conf={conf}")).err().unwrap();
    assert!(matches!(&error, RbdError::Pool { pool, errno: libc::ENOENT } if pool == "no-such-pool"), "{error}");

    let error = open(&format!("rbd:{pool}/{image}:conf={conf}:no_such_rados_option=1")).err().unwrap();
    assert!(matches!(&error, RbdError::Option { key, .. } if key == "no_such_rados_option"), "{error}");

    let error = open(&format!("rbd:{pool}/{image}:conf=/nonexistent/ceph.conf")).err().unwrap();
    assert!(
        matches!(&error, RbdError::Conf { path, errno: libc::ENOENT } if path == "/nonexistent/ceph.conf"),
        "{error}"
    );

    let error = open(&format!("rbd:{image}:conf={conf}")).err().unwrap();
    assert!(matches!(&error, RbdError::Spec { reason, .. } if reason.contains("no pool")), "{error}");

    let error = open(&format!("rbd:{pool}/{image}:conf={conf}:id=nobody")).err().unwrap();
    assert!(matches!(&error, RbdError::Connect { user, .. } if user == "nobody"), "{error}");

    // None of it touched the image.
    let disk = Disk::new(std::sync::Arc::new(scratch.open()));
    let (result, buf) = disk.read_blocking(0, AlignedBuf::zeroed(1 << 20, 4096).unwrap(), G);
    result.unwrap();
    assert!(buf.is_all_zero());
}

#[test]
fn a_snapshot_opens_read_only_and_keeps_its_point_in_time() {
    let (conf, _) = ceph_cluster();
    let scratch = ScratchImage::new(4 << 20);
    let disk = Disk::new(std::sync::Arc::new(scratch.open()));
    let before = pattern(65536, 1);
    let expected = before.as_slice().to_vec();
    disk.write_blocking(0, before, WriteFlags::default(), G).0.unwrap();
    let snap = format!("{}@s1", scratch.spec.image_path());
    let status = std::process::Command::new("rbd").args(["-c", &conf, "snap", "create", &snap]).status().unwrap();
    assert!(status.success(), "rbd snap create {snap}");
    disk.write_blocking(0, pattern(65536, 2), WriteFlags::default(), G).0.unwrap();

    let spec = RbdSpec { snapshot: Some("s1".into()), ..scratch.spec.clone() };
    let snapshot = RbdDriver::open(&spec, &RbdOptions::default()).unwrap();
    assert!(snapshot.capabilities().read_only);
    let snapshot = Disk::new(std::sync::Arc::new(snapshot));
    let (result, buf) = snapshot.read_blocking(0, AlignedBuf::zeroed(65536, 4096).unwrap(), G);
    result.unwrap();
    assert_eq!(buf.as_slice(), &expected[..], "the snapshot holds the data of its instant");
    let (result, _) = snapshot.write_blocking(0, pattern(4096, 3), WriteFlags::default(), G);
    assert!(matches!(result, Err(tandem::Error::ReadOnly { .. })), "{result:?}");
    drop(snapshot);
    let image = scratch.spec.image_path();
    let purge = std::process::Command::new("rbd").args(["-c", &conf, "snap", "purge", &image]).status().unwrap();
    assert!(purge.success(), "rbd snap purge {image}");
}

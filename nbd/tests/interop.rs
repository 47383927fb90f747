//! The server against the clients users have: qemu-img, qemu-io, nbdinfo, nbdcopy and fio's
//! nbd engine, on real files with O_DIRECT. `qemu-img compare` is the arbiter of "identical".

mod common;

use common::{make_file, open_disk, run, runtime, scratch_dir, try_run, Served};
use std::process::Command;
use tandem::block::WriteFlags;
use tandem::buf::AlignedBuf;
use tandem::reactor::BackendChoice;
use tandem::IoPriority;
use tandem_nbd::ExportOptions;

const MIB: u64 = 1 << 20;

fn writable(name: &str) -> ExportOptions {
    ExportOptions { writable: true, ..ExportOptions::new(name) }
}

#[test]
fn qemu_img_info_compare_and_convert_over_our_export() {
    for backend in [BackendChoice::Uring, BackendChoice::Threads] {
        let (dir, rt) = (scratch_dir(), runtime(backend));
        let image = dir.path().join("d.img");
        make_file(&image, 8 * MIB, &[(0, MIB), (5 * MIB, 64 << 10)], 3);
        let served = Served::start(&rt, dir.path(), open_disk(&rt, &image), ExportOptions::new("disk"));
        let uri = served.uri("disk");
        let info = run("qemu-img", &["info", "--output=json", &uri]);
        assert!(info.contains("\"virtual-size\": 8388608"), "{info}");
        run("qemu-img", &["compare", "-f", "raw", "-F", "raw", image.to_str().unwrap(), &uri]);
        let copy = dir.path().join("copy.img");
        run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, copy.to_str().unwrap()]);
        run("qemu-img", &["compare", "-f", "raw", "-F", "raw", image.to_str().unwrap(), copy.to_str().unwrap()]);
    }
}

#[test]
fn qemu_io_writes_discards_and_zeroes_land_and_read_back() {
    for backend in [BackendChoice::Uring, BackendChoice::Threads] {
        let (dir, rt) = (scratch_dir(), runtime(backend));
        let image = dir.path().join("d.img");
        make_file(&image, 4 * MIB, &[(0, 4 * MIB)], 9);
        let served = Served::start(&rt, dir.path(), open_disk(&rt, &image), writable("disk"));
        let uri = served.uri("disk");
        let commands = [
            "write -P 0xab 0 64k",
            "write -P 0xcd -f 64k 64k", // FUA
            "write -z -n 1M 128k",      // FAST_ZERO
            "write -z -u 2M 256k",      // may unmap
            "discard 3M 64k",
            "flush",
            "read -P 0xab 0 64k",
            "read -P 0xcd 64k 64k",
            "read -P 0 1M 128k",
            "read -P 0 2M 256k",
        ];
        let mut args = vec!["-f", "raw"];
        for command in &commands {
            args.extend(["-c", command]);
        }
        args.push(&uri);
        let out = run("qemu-io", &args);
        assert!(!out.contains("Pattern verification failed") && !out.contains("failed"), "{out}");
        drop(served);
        let bytes = std::fs::read(&image).unwrap();
        assert!(bytes[..64 << 10].iter().all(|b| *b == 0xab), "the write reached the file");
        assert!(bytes[MIB as usize..(MIB + (128 << 10)) as usize].iter().all(|b| *b == 0), "zeroes reached the file");
    }
}

#[test]
fn nbdinfo_map_matches_qemu_nbd_on_a_sparse_file() {
    let (dir, rt) = (scratch_dir(), runtime(BackendChoice::Uring));
    let image = dir.path().join("sparse.img");
    make_file(&image, 16 * MIB, &[(MIB, MIB), (8 * MIB, 256 << 10), (15 * MIB, 4096)], 1);
    let served = Served::start(&rt, dir.path(), open_disk(&rt, &image), ExportOptions::new(""));
    let ours = run("nbdinfo", &["--map", &served.uri("")]);
    drop(served);
    let socket = dir.path().join("q.sock");
    let mut qemu_nbd = Command::new("qemu-nbd")
        .args(["-f", "raw", "-r", "-k", socket.to_str().unwrap(), "--cache=none", image.to_str().unwrap()])
        .spawn()
        .expect("qemu-nbd");
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let theirs = run("nbdinfo", &["--map", &format!("nbd+unix:///?socket={}", socket.display())]);
    let _ = qemu_nbd.kill();
    let _ = qemu_nbd.wait();
    assert!(ours.contains("hole"), "the map shows holes: {ours}");
    assert_eq!(ours, theirs, "the same file maps the same through both servers");
}

#[test]
fn nbdinfo_lists_what_the_guest_wrote_since_the_bitmap_was_created() {
    let (dir, rt) = (scratch_dir(), runtime(BackendChoice::Uring));
    let image = dir.path().join("d.img");
    make_file(&image, 8 * MIB, &[(0, 8 * MIB)], 2);
    let disk = open_disk(&rt, &image);
    disk.bitmaps().add("b0", tandem::bitmap::DirtyBitmap::new(65536, 8 * MIB).unwrap()).unwrap();
    // The guest writes after the bitmap exists.
    for offset in [MIB, 6 * MIB] {
        let data = AlignedBuf::from_slice(&[7u8; 65536], 4096).unwrap();
        disk.write_blocking(offset, data, WriteFlags::default(), IoPriority::GUEST).0.unwrap();
    }
    let options = ExportOptions { bitmaps: vec!["b0".into()], ..ExportOptions::new("disk") };
    let served = Served::start(&rt, dir.path(), disk, options);
    let map = run("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &served.uri("disk")]);
    let dirty: Vec<(u64, u64)> = map
        .lines()
        .filter(|line| line.contains("dirty") && !line.contains("clean"))
        .map(|line| {
            let fields: Vec<u64> = line.split_whitespace().take(2).map(|f| f.parse().unwrap()).collect();
            (fields[0], fields[1])
        })
        .collect();
    assert_eq!(dirty, [(MIB, 65536), (6 * MIB, 65536)], "{map}");
}

#[test]
fn nbdcopy_to_a_file_and_back() {
    let (dir, rt) = (scratch_dir(), runtime(BackendChoice::Uring));
    let image = dir.path().join("d.img");
    make_file(&image, 8 * MIB, &[(0, 3 * MIB), (6 * MIB, MIB)], 4);
    let served = Served::start(&rt, dir.path(), open_disk(&rt, &image), writable("disk"));
    let out = dir.path().join("out.img");
    run("nbdcopy", &[&served.uri("disk"), out.to_str().unwrap()]);
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", image.to_str().unwrap(), out.to_str().unwrap()]);
    let other = dir.path().join("other.img");
    make_file(&other, 8 * MIB, &[(MIB, 5 * MIB)], 77);
    run("nbdcopy", &[other.to_str().unwrap(), &served.uri("disk")]);
    drop(served);
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", image.to_str().unwrap(), other.to_str().unwrap()]);
}

#[test]
fn fio_nbd_randrw_with_verify() {
    let (dir, rt) = (scratch_dir(), runtime(BackendChoice::Uring));
    let image = dir.path().join("d.img");
    make_file(&image, 32 * MIB, &[], 0);
    let served = Served::start(&rt, dir.path(), open_disk(&rt, &image), writable(""));
    let uri = format!("--uri={}", served.uri(""));
    let out = run(
        "fio",
        &[
            "--name=nbd",
            "--ioengine=nbd",
            &uri,
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    assert!(out.contains("\"error\" : 0"), "{out}");
}

#[test]
fn a_read_only_export_is_seen_read_only_by_qemu_io_and_nbdinfo() {
    let (dir, rt) = (scratch_dir(), runtime(BackendChoice::Uring));
    let image = dir.path().join("d.img");
    make_file(&image, MIB, &[(0, MIB)], 5);
    let before = std::fs::read(&image).unwrap();
    let served = Served::start(&rt, dir.path(), open_disk(&rt, &image), ExportOptions::new("ro"));
    // qemu-io sees the read-only flag and refuses to open the export for writing; the raw
    // requests' EPERM is checked in robustness.rs.
    let (ok, out) = try_run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &served.uri("ro")]);
    assert!(!ok && out.contains("Permission denied"), "{out}");
    let (ok, _) = try_run("nbdinfo", &["--can", "write", &served.uri("ro")]);
    assert!(!ok, "nbdinfo sees a read-only export");
    drop(served);
    assert_eq!(std::fs::read(&image).unwrap(), before, "nothing changed");
}

#[test]
fn multi_conn_is_advertised_and_four_connections_write_one_disk() {
    let (dir, rt) = (scratch_dir(), runtime(BackendChoice::Uring));
    let image = dir.path().join("d.img");
    make_file(&image, 4 * MIB, &[], 0);
    let served = Served::start(&rt, dir.path(), open_disk(&rt, &image), writable("disk"));
    run("nbdinfo", &["--can", "multi-conn", &served.uri("disk")]);
    // nbdcopy with several connections writes on all of them and flushes on one. (Whether
    // that flush covers the other connections' writes cannot be observed from outside; it
    // holds because every connection writes the same Disk and a flush is the device's.)
    let source = dir.path().join("src.img");
    make_file(&source, 4 * MIB, &[(0, 4 * MIB)], 8);
    run("nbdcopy", &["--connections=4", "--flush", source.to_str().unwrap(), &served.uri("disk")]);
    let (ok, out) =
        try_run("qemu-img", &["compare", "-f", "raw", "-F", "raw", source.to_str().unwrap(), &served.uri("disk")]);
    assert!(ok, "{out}");
}

#[test]
fn list_and_info_show_names_and_descriptions() {
    let (dir, rt) = (scratch_dir(), runtime(BackendChoice::Uring));
    let image = dir.path().join("d.img");
    make_file(&image, MIB, &[], 0);
    let options = ExportOptions { description: Some("the test disk".into()), ..ExportOptions::new("disk") };
    let served = Served::start(&rt, dir.path(), open_disk(&rt, &image), options);
    let list = run("nbdinfo", &["--list", "--json", &served.uri("")]);
    assert!(list.contains("\"export-name\": \"disk\"") && list.contains("the test disk"), "{list}");
    let info = run("nbdinfo", &["--json", &served.uri("disk")]);
    for field in ["\"export-size\": 1048576", "\"block_size_minimum\"", "\"can_multi_conn\": true", "base:allocation"] {
        assert!(info.contains(field), "{field} missing from {info}");
    }
}

#[test]
fn tcp_listens_where_told_and_serves_nbd_uris() {
    let (dir, rt) = (scratch_dir(), runtime(BackendChoice::Uring));
    let image = dir.path().join("d.img");
    make_file(&image, 2 * MIB, &[(0, 2 * MIB)], 12);
    let config = tandem_nbd::ServerConfig::new(tandem_nbd::Listen::Tcp { host: "127.0.0.1".into(), port: 0 });
    let server = tandem_nbd::Server::start(rt.handle(), config).unwrap();
    server.add_export(open_disk(&rt, &image), writable("disk")).unwrap();
    let addr = server.local_addr().expect("a TCP server knows its address");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    let uri = format!("nbd://127.0.0.1:{}/disk", addr.port());
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", image.to_str().unwrap(), &uri]);
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 0x42 512k 64k", "-c", "read -P 0x42 512k 64k", &uri]);
    assert!(!out.contains("failed"), "{out}");
    server.shutdown();
    let bytes = std::fs::read(&image).unwrap();
    assert!(bytes[512 << 10..(512 << 10) + 65536].iter().all(|b| *b == 0x42));
}

//! Bitmap sidecar files: the input bytes written to a file (optionally with a valid CRC) and
//! read back with `load`.
//! Invariant: any file is a typed `PersistError` or a bitmap, never a panic, and never an
//! allocation larger than the file; a file that loads survives a save/load round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// One scratch file per fuzzing process, under fuzz/target (never /tmp).
fn scratch_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/sidecar-scratch");
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir.join(format!("input-{}.bitmap", std::process::id()))
    })
}

/// CRC-32 (IEEE, reflected), the one crc32fast computes; bitwise, since inputs are small and
/// the fuzz crate's dependencies stay as they are.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// The file for `data`: its first byte picks the mode. Odd: the rest with a correct CRC32 in
/// its last 4 bytes, so mutations reach the checks behind the checksum (flags, name, geometry);
/// even: the rest as it is.
fn file_bytes(data: &[u8]) -> Vec<u8> {
    let Some((mode, rest)) = data.split_first() else { return Vec::new() };
    let mut bytes = rest.to_vec();
    if mode % 2 == 1 && bytes.len() >= 4 {
        let crc_at = bytes.len() - 4;
        let crc = crc32(&bytes[..crc_at]);
        bytes[crc_at..].copy_from_slice(&crc.to_le_bytes());
    }
    bytes
}

fuzz_target!(|data: &[u8]| {
    let path = scratch_path();
    std::fs::write(path, file_bytes(data)).expect("write scratch file");
    let Ok(loaded) = tandem::bitmap::load(path) else { return };
    // Whatever loads must save and load back to the same bits and name.
    let words = loaded.bitmap.to_words();
    tandem::bitmap::save(path, &loaded.name, &loaded.bitmap, loaded.inconsistent).expect("save a loaded bitmap");
    let again = tandem::bitmap::load(path).expect("load what was saved");
    assert_eq!(again.name, loaded.name);
    assert_eq!(again.inconsistent, loaded.inconsistent);
    assert!(again.bitmap.to_words() == words);
});

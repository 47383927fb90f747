//! fio's `verify=` for the runner: a header stamped into every written block (where it was
//! written, how long it is, a checksum of the whole block) and the check of a block read
//! back. The layout is ours (fio cannot read it, nor we fio's); the semantics are fio's.

use crate::fio::values::VerifyKind;

/// Bytes at the start of each block that the header takes; blocks must be at least this long.
pub const HEADER_BYTES: usize = 48;
const MAGIC: u32 = 0x5444_5631; // "TDV1"
const CHECKSUM_AT: usize = 32;

/// Why a block read back does not match what was written there.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("verify: no header at offset {offset_bytes} (magic {found:#x}): never written, or overwritten by something else")]
    NoHeader { offset_bytes: u64, found: u32 },
    #[error("verify: block at offset {offset_bytes} holds the block written for offset {found_bytes}")]
    WrongOffset { offset_bytes: u64, found_bytes: u64 },
    #[error("verify: block at offset {offset_bytes} is {length_bytes} bytes, its header says {found_bytes}")]
    WrongLength { offset_bytes: u64, length_bytes: u64, found_bytes: u64 },
    #[error("verify: {kind:?} checksum mismatch in the block at offset {offset_bytes} ({length_bytes} bytes)")]
    Checksum { kind: VerifyKind, offset_bytes: u64, length_bytes: u64 },
}

/// Writes the header for a block of `block.len()` bytes going to `offset_bytes`. `sequence`
/// makes each write's block differ from the last one written there.
pub fn stamp(kind: VerifyKind, block: &mut [u8], offset_bytes: u64, sequence: u64) {
    assert!(block.len() >= HEADER_BYTES, "verify blocks hold their header");
    block[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    block[4..8].copy_from_slice(&kind_code(kind).to_le_bytes());
    let length_bytes = block.len() as u64;
    block[8..16].copy_from_slice(&length_bytes.to_le_bytes());
    block[16..24].copy_from_slice(&offset_bytes.to_le_bytes());
    block[24..32].copy_from_slice(&sequence.to_le_bytes());
    let sum = checksum(kind, block);
    block[CHECKSUM_AT..HEADER_BYTES].copy_from_slice(&sum);
}

/// Checks a block read from `offset_bytes` against its header.
pub fn check(kind: VerifyKind, block: &[u8], offset_bytes: u64) -> Result<(), VerifyError> {
    let length_bytes = block.len() as u64;
    let word = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"));
    let magic = u32::from_le_bytes(block[0..4].try_into().expect("4 bytes"));
    if block.len() < HEADER_BYTES || magic != MAGIC {
        return Err(VerifyError::NoHeader { offset_bytes, found: magic });
    }
    if word(8) != length_bytes {
        return Err(VerifyError::WrongLength { offset_bytes, length_bytes, found_bytes: word(8) });
    }
    if word(16) != offset_bytes {
        return Err(VerifyError::WrongOffset { offset_bytes, found_bytes: word(16) });
    }
    if checksum(kind, block)[..] != block[CHECKSUM_AT..HEADER_BYTES] {
        return Err(VerifyError::Checksum { kind, offset_bytes, length_bytes });
    }
    Ok(())
}

fn kind_code(kind: VerifyKind) -> u32 {
    match kind {
        VerifyKind::Crc32c => 1,
        VerifyKind::Md5 => 2,
    }
}

/// The checksum of the block without its checksum field, zero-padded to the field's 16 bytes.
fn checksum(kind: VerifyKind, block: &[u8]) -> [u8; HEADER_BYTES - CHECKSUM_AT] {
    let (before, after) = (&block[..CHECKSUM_AT], &block[HEADER_BYTES..]);
    let mut sum = [0u8; HEADER_BYTES - CHECKSUM_AT];
    match kind {
        VerifyKind::Crc32c => {
            let crc = crc32c::crc32c_append(crc32c::crc32c(before), after);
            sum[..4].copy_from_slice(&crc.to_le_bytes());
        }
        VerifyKind::Md5 => {
            use md5::Digest;
            let mut hasher = md5::Md5::new();
            hasher.update(before);
            hasher.update(after);
            sum.copy_from_slice(&hasher.finalize());
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_blocks_verify_and_damage_is_named() {
        for kind in [VerifyKind::Crc32c, VerifyKind::Md5] {
            let mut block = vec![7u8; 4096];
            stamp(kind, &mut block, 8192, 1);
            assert_eq!(check(kind, &block, 8192), Ok(()));
            assert_eq!(check(kind, &block, 0), Err(VerifyError::WrongOffset { offset_bytes: 0, found_bytes: 8192 }));
            assert!(matches!(check(kind, &block[..2048], 8192), Err(VerifyError::WrongLength { .. })));
            block[4000] ^= 1;
            let err = check(kind, &block, 8192).unwrap_err();
            assert_eq!(err, VerifyError::Checksum { kind, offset_bytes: 8192, length_bytes: 4096 });
            assert!(err.to_string().contains("8192"));
            assert!(matches!(check(kind, &[0u8; 512], 0), Err(VerifyError::NoHeader { found: 0, .. })));
        }
    }
}

//! The memory driver: a sparse disk in RAM, for tests and examples. Storage is kept in 4 KiB
//! chunks allocated on first write, so it reports holes, known-zero and data ranges like a
//! real sparse file, and a 64 GiB disk costs only what is written (plus 16 bytes a chunk).

use parking_lot::Mutex;
use tandem::block::{Alignment, BlockDriver, BlockStatus, BufResult, Capabilities, Extent, IoFuture, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::{IoPriority, Result};

const CHUNK_BYTES: u64 = 4096;
/// Chunks per lock stripe: concurrent writers to different regions rarely contend.
const STRIPE_CHUNK_COUNT: u64 = 256;

enum Chunk {
    Hole,
    Zero,
    Data(Box<[u8]>),
}

impl Chunk {
    fn status(&self) -> BlockStatus {
        match self {
            Chunk::Hole => BlockStatus::Hole,
            Chunk::Zero => BlockStatus::Zero,
            Chunk::Data(_) => BlockStatus::Data,
        }
    }
}

/// A RAM disk of a fixed size.
pub struct MemoryDriver {
    size_bytes: u64,
    stripes: Vec<Mutex<Vec<Chunk>>>,
}

impl MemoryDriver {
    /// An all-hole disk of `size_bytes`.
    pub fn new(size_bytes: u64) -> MemoryDriver {
        let chunk_count = size_bytes.div_ceil(CHUNK_BYTES);
        let stripe_count = chunk_count.div_ceil(STRIPE_CHUNK_COUNT);
        let stripes = (0..stripe_count)
            .map(|s| {
                let chunks = STRIPE_CHUNK_COUNT.min(chunk_count - s * STRIPE_CHUNK_COUNT);
                Mutex::new((0..chunks).map(|_| Chunk::Hole).collect())
            })
            .collect();
        MemoryDriver { size_bytes, stripes }
    }

    /// Run `f` on each chunk piece of `[offset, offset + length_bytes)`: (chunk, offset in
    /// chunk, piece length, offset in the request).
    fn for_each_piece(&self, offset: u64, length_bytes: u64, mut f: impl FnMut(&mut Chunk, usize, usize, usize)) {
        assert!(offset + length_bytes <= self.size_bytes, "Disk checked the range");
        let mut done = 0u64;
        while done < length_bytes {
            let position = offset + done;
            let chunk_index = position / CHUNK_BYTES;
            let within = position % CHUNK_BYTES;
            let piece = (CHUNK_BYTES - within).min(length_bytes - done);
            let mut stripe = self.stripes[(chunk_index / STRIPE_CHUNK_COUNT) as usize].lock();
            let chunk = &mut stripe[(chunk_index % STRIPE_CHUNK_COUNT) as usize];
            f(chunk, within as usize, piece as usize, done as usize);
            done += piece;
        }
    }

    fn zero_range(&self, offset: u64, length_bytes: u64, whole_chunk: Chunk) {
        let whole_status = whole_chunk.status();
        self.for_each_piece(offset, length_bytes, |chunk, within, piece, _| {
            if piece as u64 == CHUNK_BYTES {
                *chunk = match whole_status {
                    BlockStatus::Hole => Chunk::Hole,
                    _ => Chunk::Zero,
                };
            } else if let Chunk::Data(data) = chunk {
                data[within..within + piece].fill(0);
            }
        });
    }
}

impl BlockDriver for MemoryDriver {
    fn name(&self) -> &str {
        "memory"
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn alignment(&self) -> Alignment {
        Alignment { request_bytes: 512, memory_bytes: 1 }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { read_only: false, fua: true, write_zeroes: true, discard: true, block_status: true }
    }

    fn read(&self, offset: u64, mut buf: AlignedBuf, _priority: IoPriority) -> IoFuture<BufResult<()>> {
        let out = buf.as_mut_slice();
        self.for_each_piece(offset, out.len() as u64, |chunk, within, piece, at| {
            let target = &mut out[at..at + piece];
            match chunk {
                Chunk::Data(data) => target.copy_from_slice(&data[within..within + piece]),
                Chunk::Hole | Chunk::Zero => target.fill(0),
            }
        });
        IoFuture::ready((Ok(()), buf))
    }

    fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
        _flags: WriteFlags,
        _priority: IoPriority,
    ) -> IoFuture<BufResult<()>> {
        let data_in = buf.as_slice();
        self.for_each_piece(offset, data_in.len() as u64, |chunk, within, piece, at| {
            if !matches!(chunk, Chunk::Data(_)) {
                *chunk = Chunk::Data(vec![0u8; CHUNK_BYTES as usize].into_boxed_slice());
            }
            if let Chunk::Data(data) = chunk {
                data[within..within + piece].copy_from_slice(&data_in[at..at + piece]);
            }
        });
        IoFuture::ready((Ok(()), buf))
    }

    fn flush(&self, _priority: IoPriority) -> IoFuture<Result<()>> {
        IoFuture::ready(Ok(()))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length_bytes: u64,
        may_unmap: bool,
        _priority: IoPriority,
    ) -> IoFuture<Result<()>> {
        self.zero_range(offset, length_bytes, if may_unmap { Chunk::Hole } else { Chunk::Zero });
        IoFuture::ready(Ok(()))
    }

    /// Discarded whole chunks become holes; partial chunks read as zeros afterwards.
    fn discard(&self, offset: u64, length_bytes: u64, _priority: IoPriority) -> IoFuture<Result<()>> {
        self.zero_range(offset, length_bytes, Chunk::Hole);
        IoFuture::ready(Ok(()))
    }

    fn block_status(&self, offset: u64, length_bytes: u64) -> IoFuture<Result<Extent>> {
        let mut status = None;
        let mut run_bytes = 0u64;
        let mut stopped = false;
        self.for_each_piece(offset, length_bytes, |chunk, _, piece, _| {
            if stopped {
                return;
            }
            match status {
                None => status = Some(chunk.status()),
                Some(s) if s != chunk.status() => {
                    stopped = true;
                    return;
                }
                Some(_) => {}
            }
            run_bytes += piece as u64;
        });
        let status = status.expect("Disk refuses empty ranges");
        IoFuture::ready(Ok(Extent { status, offset, length_bytes: run_bytes }))
    }
}

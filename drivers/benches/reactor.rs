//! Criterion benches of the reactor's own cost: a no-op through the ring (submit to
//! completion, alone and in batches), the null driver through `Disk` on a core, and a task
//! round trip from a plain thread. Speed is measured here, never asserted in tests.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::block::Disk;
use tandem::buf::AlignedBuf;
use tandem::reactor::{BackendChoice, Config, Op, OpKind, Runtime};
use tandem::IoPriority;
use tandem_drivers::NullDriver;

fn runtime(backend: BackendChoice) -> Runtime {
    Runtime::new(Config { cores: 1, backend, ..Config::default() }).expect("runtime")
}

/// `iters` no-ops in batches of `batch`, timed on the core itself.
fn nop_batches(runtime: &Runtime, batch: u64, iters: u64) -> Duration {
    let handle = runtime.handle();
    runtime
        .block_on(move || async move {
            let started = Instant::now();
            let mut done = 0;
            while done < iters {
                let count = batch.min(iters - done);
                let futures: Vec<_> = (0..count)
                    .map(|_| handle.submit(Op { kind: OpKind::Nop, buf: None, priority: IoPriority::GUEST }))
                    .collect();
                for future in futures {
                    assert_eq!(future.await.result, 0);
                }
                done += count;
            }
            started.elapsed()
        })
        .expect("bench task")
}

fn ring_round_trip(c: &mut Criterion) {
    let mut group = c.benchmark_group("nop_submit_to_completion");
    for (name, backend) in [("uring", BackendChoice::Uring), ("threads", BackendChoice::Threads)] {
        let runtime = runtime(backend);
        for batch in [1u64, 8, 32, 128] {
            group.throughput(Throughput::Elements(1));
            group.bench_with_input(BenchmarkId::new(name, batch), &batch, |b, &batch| {
                b.iter_custom(|iters| nop_batches(&runtime, batch, iters))
            });
        }
    }
    group.finish();
}

fn null_driver_on_core(c: &mut Criterion) {
    let runtime = runtime(BackendChoice::Uring);
    let disk = Disk::new(Arc::new(NullDriver::new(1 << 30)));
    let mut group = c.benchmark_group("null_driver_read_4k");
    group.throughput(Throughput::Elements(1));
    group.bench_function("disk_read_on_core", |b| {
        b.iter_custom(|iters| {
            let disk = disk.clone();
            runtime
                .block_on(move || async move {
                    let mut buf = AlignedBuf::zeroed(4096, 4096).expect("buffer");
                    let started = Instant::now();
                    for i in 0..iters {
                        let (result, back) = disk.read((i % 1024) * 4096, buf, IoPriority::GUEST).await;
                        result.expect("null read");
                        buf = back;
                    }
                    started.elapsed()
                })
                .expect("bench task")
        })
    });
    group.finish();
}

fn spawn_round_trip(c: &mut Criterion) {
    let runtime = runtime(BackendChoice::Uring);
    c.bench_function("spawn_join_from_plain_thread", |b| b.iter(|| runtime.block_on(|| async { 1 }).expect("task")));
}

criterion_group!(benches, ring_round_trip, null_driver_on_core, spawn_round_trip);
criterion_main!(benches);

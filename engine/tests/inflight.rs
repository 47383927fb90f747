//! The in-flight table against an interval-list model (proptest), across threads and reactor
//! cores, its fairness, its bounds and its errors.

use proptest::prelude::*;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tandem::inflight::{InflightError, InflightGuard, InflightKind, InflightTable, Register};

const KIND: InflightKind = InflightKind::Copy;

fn poll_now(register: &mut Register) -> Option<Result<InflightGuard, InflightError>> {
    match Pin::new(register).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => Some(result),
        Poll::Pending => None,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Register(u64, u64),
    Finish(usize),
    Withdraw(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        3 => ((0u64..64), (1u64..16)).prop_map(|(o, l)| Op::Register(o, l)),
        2 => any::<usize>().prop_map(Op::Finish),
        1 => any::<usize>().prop_map(Op::Withdraw),
    ];
    prop::collection::vec(op, 1..120)
}

/// The model: intervals under way plus a FIFO of waiting intervals, admitted by the rule
/// "no overlap with anything under way nor with an earlier waiter, while there is capacity".
#[derive(Default)]
struct Model {
    active: Vec<(usize, u64, u64)>,
    waiting: Vec<(usize, u64, u64)>,
}

impl Model {
    fn admit(&mut self, capacity: usize) {
        let mut index = 0;
        while index < self.waiting.len() && self.active.len() < capacity {
            let (id, s, e) = self.waiting[index];
            let overlaps = |&(_, s2, e2): &(usize, u64, u64)| s < e2 && s2 < e;
            if self.active.iter().any(overlaps) || self.waiting[..index].iter().any(overlaps) {
                index += 1;
                continue;
            }
            self.waiting.remove(index);
            self.active.push((id, s, e));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn agrees_with_the_interval_model(capacity in 1usize..5, ops in ops()) {
        let table = InflightTable::new(capacity).unwrap();
        let mut model = Model::default();
        let mut pending: Vec<(usize, Register)> = Vec::new();
        let mut guards: Vec<(usize, InflightGuard)> = Vec::new();
        for (id, op) in ops.iter().enumerate() {
            match op {
                Op::Register(o, l) => {
                    let mut register = table.register(*o, *l, KIND);
                    if model.waiting.len() >= 16 * capacity {
                        let full = matches!(poll_now(&mut register), Some(Err(InflightError::Full { .. })));
                        prop_assert!(full, "the waiting bound holds");
                        continue;
                    }
                    pending.push((id, register));
                    model.waiting.push((id, *o, o + l));
                }
                Op::Finish(i) if !guards.is_empty() => {
                    let (id, guard) = guards.remove(i % guards.len());
                    drop(guard);
                    model.active.retain(|r| r.0 != id);
                }
                Op::Withdraw(i) if !pending.is_empty() => {
                    let (id, register) = pending.remove(i % pending.len());
                    drop(register);
                    model.waiting.retain(|r| r.0 != id);
                    model.active.retain(|r| r.0 != id);
                }
                _ => continue,
            }
            model.admit(capacity);
            // Collect every registration the table admitted.
            let mut still = Vec::new();
            for (id, mut register) in pending.drain(..) {
                match poll_now(&mut register) {
                    Some(result) => guards.push((id, result.unwrap())),
                    None => still.push((id, register)),
                }
            }
            pending = still;
            let mut admitted: Vec<usize> = guards.iter().map(|g| g.0).collect();
            let mut expected: Vec<usize> = model.active.iter().map(|r| r.0).collect();
            admitted.sort_unstable();
            expected.sort_unstable();
            prop_assert_eq!(&admitted, &expected, "after {:?}", op);
            prop_assert_eq!(table.counts(), (model.active.len(), model.waiting.len()));
        }
    }
}

#[test]
fn an_overlapping_registration_waits_across_threads() {
    let table = InflightTable::new(16).unwrap();
    let first = table.register_blocking(0, 65536, InflightKind::GuestWrite).unwrap();
    let released = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (table, released) = (table.clone(), released.clone());
        std::thread::spawn(move || {
            let guard = table.register_blocking(32768, 65536, KIND).unwrap();
            assert!(released.load(Ordering::SeqCst), "admitted only after the overlapping operation ended");
            guard.offset()
        })
    };
    while table.counts().1 == 0 {
        std::thread::yield_now();
    }
    let disjoint = table.try_register(65536 + 32768, 4096, KIND).unwrap();
    assert!(disjoint.is_some(), "a range overlapping neither runs at once");
    released.store(true, Ordering::SeqCst);
    drop(first);
    assert_eq!(waiter.join().unwrap(), 32768);
}

/// A waiting registration is not starved by a stream of short ones that overlap it but not
/// the operation it waits for: they queue behind it.
#[test]
fn short_operations_cannot_starve_a_waiter() {
    let table = InflightTable::new(16).unwrap();
    let holder = table.try_register(0, 8192, KIND).unwrap().unwrap();
    let mut big = table.register(0, 1 << 20, KIND);
    assert!(poll_now(&mut big).is_none(), "waits for the holder");
    for i in 0..100u64 {
        let short = table.try_register(65536 + i * 4096, 4096, InflightKind::GuestWrite).unwrap();
        assert!(short.is_none(), "short operation {i} would overtake the waiter");
    }
    let mut short = table.register(65536, 4096, InflightKind::GuestWrite);
    assert!(poll_now(&mut short).is_none());
    drop(holder);
    let big = poll_now(&mut big).expect("admitted first").unwrap();
    assert!(poll_now(&mut short).is_none(), "still behind the big one");
    drop(big);
    assert!(poll_now(&mut short).is_some());
}

#[test]
fn capacity_bounds_operations_under_way() {
    let table = InflightTable::new(2).unwrap();
    let a = table.try_register(0, 1, KIND).unwrap().unwrap();
    let _b = table.try_register(10, 1, KIND).unwrap().unwrap();
    assert!(table.try_register(20, 1, KIND).unwrap().is_none(), "capacity 2");
    let mut third = table.register(20, 1, KIND);
    assert!(poll_now(&mut third).is_none());
    drop(a);
    assert!(poll_now(&mut third).is_some());
}

#[test]
fn bad_input_is_named_and_registers_nothing() {
    let table = InflightTable::new(1).unwrap();
    assert_eq!(table.try_register(7, 0, KIND).err(), Some(InflightError::EmptyRange { offset: 7 }));
    let err = table.register_blocking(u64::MAX, 2, KIND).err().unwrap();
    assert_eq!(err, InflightError::Overflow { offset: u64::MAX, length_bytes: 2 });
    assert_eq!(InflightTable::new(0).err(), Some(InflightError::BadCapacity { capacity: 0 }));
    assert_eq!(table.counts(), (0, 0));
    let _held = table.try_register(0, 1, KIND).unwrap().unwrap();
    let waiters: Vec<_> = (0..16).map(|_| table.register(0, 1, KIND)).collect();
    let full = table.register_blocking(0, 1, KIND).err().unwrap();
    assert_eq!(full, InflightError::Full { waiting_count: 16, waiting_count_max: 16 });
    drop(waiters);
    assert_eq!(table.counts(), (1, 0), "withdrawn registrations leave nothing behind");
}

/// Tasks on two reactor cores write overlapping ranges; the table keeps their critical
/// sections apart (no two overlapping operations are ever under way together).
#[test]
fn tasks_on_two_cores_never_overlap() {
    let runtime =
        tandem::reactor::Runtime::new(tandem::reactor::Config { cores: 2, pin: false, ..Default::default() }).unwrap();
    let table = InflightTable::new(64).unwrap();
    let inside = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..8u64)
        .map(|task| {
            let (table, inside) = (table.clone(), inside.clone());
            runtime.spawn(move || async move {
                for i in 0..200u64 {
                    let offset = ((task * 7 + i * 3) % 16) * 4096;
                    let guard = table.register(offset, 8192, KIND).await.unwrap();
                    let slot = 1usize << (offset / 4096);
                    let overlap = slot | (slot << 1);
                    let before = inside.fetch_or(overlap, Ordering::SeqCst);
                    assert_eq!(before & overlap, 0, "two overlapping operations under way");
                    if i % 7 == 0 {
                        tandem::reactor::sleep(Duration::from_micros(50)).await;
                    } else {
                        tandem::reactor::yield_now().await;
                    }
                    inside.fetch_and(!overlap, Ordering::SeqCst);
                    drop(guard);
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    assert_eq!(table.counts(), (0, 0));
}

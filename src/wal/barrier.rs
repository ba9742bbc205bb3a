//! The group-commit write barrier: many threads wait for their LSN to become durable, one of
//! them (the leader) runs the sync for all of them (raft-engine's write barrier, built on
//! atomics and `parking_lot_core` instead of a mutex and a condition variable).
//!
//! Why not a `Condvar`: `notify_all` requeues the waiters onto the mutex, so they wake one
//! after another, each woken by the previous one's unlock. On two vCPUs that chain of eight
//! hand-offs cost about as much as the ~110 us flush itself. Here the leader publishes the
//! durable LSN in an atomic and wakes every satisfied waiter directly; waiters check the atomic
//! without taking a lock. Waiters whose entry the sync did not cover stay asleep, except one,
//! which is woken to lead the next sync.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use parking_lot_core::{FilterOp, ParkToken, DEFAULT_PARK_TOKEN, DEFAULT_UNPARK_TOKEN};

/// Upper bound on the threads one barrier tracks as callers (a sanity limit, not a tuning knob:
/// each caller is a thread blocked in [`SyncBarrier::sync_to`]).
const MAX_CALLERS: usize = 1 << 20;

/// Leader election, durable-LSN publication and wake-ups for group commit.
pub(crate) struct SyncBarrier {
    /// Every LSN at or below this is durable. Only grows.
    durable_lsn: AtomicU64,
    /// A leader is running (or gathering for) a sync.
    leader_active: AtomicBool,
    /// Threads inside [`SyncBarrier::sync_to`], waiting or leading.
    callers: AtomicUsize,
    /// Arrivals in [`SyncBarrier::sync_to`] that found their LSN not durable (only grows).
    arrivals: AtomicUsize,
    /// `arrivals` when the last leader started its sync: later arrivals are the next group.
    arrivals_at_sync: AtomicUsize,
    /// How many threads were in the barrier when the last sync ended: the group the next
    /// leader waits for (each of them comes back with a new entry, in a closed loop).
    last_group: AtomicUsize,
    /// Set once a sync failed; never cleared (reopen the WAL).
    failed: AtomicBool,
    failed_cause: Mutex<Option<String>>,
    /// How long (at most) a leader waits for `last_group` callers before syncing.
    gather_wait: Duration,
}

impl SyncBarrier {
    pub(crate) fn new(durable_lsn: u64, gather_wait: Duration) -> Self {
        SyncBarrier {
            durable_lsn: AtomicU64::new(durable_lsn),
            leader_active: AtomicBool::new(false),
            callers: AtomicUsize::new(0),
            arrivals: AtomicUsize::new(0),
            arrivals_at_sync: AtomicUsize::new(0),
            last_group: AtomicUsize::new(1),
            failed: AtomicBool::new(false),
            failed_cause: Mutex::new(None),
            gather_wait,
        }
    }

    /// The durable LSN (every LSN at or below it is durable).
    pub(crate) fn durable_lsn(&self) -> u64 {
        self.durable_lsn.load(Ordering::Acquire)
    }

    /// Why the barrier failed, if it did.
    pub(crate) fn failure(&self) -> Option<String> {
        if self.failed.load(Ordering::Acquire) {
            self.failed_cause.lock().clone()
        } else {
            None
        }
    }

    /// Key threads waiting for durability park on.
    fn done_key(&self) -> usize {
        &self.durable_lsn as *const AtomicU64 as usize
    }

    /// Key a gathering leader parks on.
    fn gather_key(&self) -> usize {
        &self.callers as *const AtomicUsize as usize
    }

    /// Returns once `target` is durable (the durable LSN, at least `target`), running
    /// `sync` as the leader when no other thread is: `sync` makes everything appended so far
    /// durable and returns the last LSN it covered. An `Err` from `sync` fails the barrier
    /// for good: this and every later call returns the cause.
    pub(crate) fn sync_to<E>(
        &self,
        target: u64,
        sync: impl Fn() -> Result<u64, E>,
        failed: impl Fn(String) -> E,
        describe: impl Fn(&E) -> String,
    ) -> Result<u64, E> {
        if let Some(cause) = self.failure() {
            return Err(failed(cause));
        }
        let durable = self.durable_lsn();
        if durable >= target {
            return Ok(durable);
        }
        let callers = self.callers.fetch_add(1, Ordering::AcqRel) + 1;
        assert!(
            callers <= MAX_CALLERS,
            "{callers} threads in one sync barrier"
        );
        let arrived = self.arrivals.fetch_add(1, Ordering::AcqRel) + 1;
        let next_group = arrived.wrapping_sub(self.arrivals_at_sync.load(Ordering::Acquire));
        if next_group == self.last_group.load(Ordering::Acquire) {
            // The group a gathering leader waits for is complete.
            // SAFETY: the callback does not call into parking_lot.
            unsafe { parking_lot_core::unpark_one(self.gather_key(), |_| DEFAULT_UNPARK_TOKEN) };
        }
        let result = self.wait_or_lead(target, &sync, &failed, &describe);
        self.callers.fetch_sub(1, Ordering::AcqRel);
        result
    }

    fn wait_or_lead<E>(
        &self,
        target: u64,
        sync: &impl Fn() -> Result<u64, E>,
        failed: &impl Fn(String) -> E,
        describe: &impl Fn(&E) -> String,
    ) -> Result<u64, E> {
        loop {
            if let Some(cause) = self.failure() {
                return Err(failed(cause));
            }
            let durable = self.durable_lsn();
            if durable >= target {
                return Ok(durable);
            }
            if self
                .leader_active
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return self.lead(target, sync, describe);
            }
            // Sleep until a leader publishes a durable LSN covering `target`, hands leadership
            // to us, or fails. The check runs under the park queue's lock, and a leader
            // publishes before it wakes anyone, so no wake-up is lost.
            let key = self.done_key();
            // SAFETY: the validate closure only reads atomics; no parking_lot call inside.
            unsafe {
                parking_lot_core::park(
                    key,
                    || {
                        self.durable_lsn.load(Ordering::Acquire) < target
                            && self.leader_active.load(Ordering::Acquire)
                            && !self.failed.load(Ordering::Acquire)
                    },
                    || {},
                    |_, _| {},
                    ParkToken(target as usize),
                    None,
                );
            }
        }
    }

    fn lead<E>(
        &self,
        target: u64,
        sync: &impl Fn() -> Result<u64, E>,
        describe: &impl Fn(&E) -> String,
    ) -> Result<u64, E> {
        // The writers the previous sync released are appending again right now: wait
        // (bounded) until as many callers as last time are here, so one sync serves them all
        // instead of the group splitting in two.
        let want = self.last_group.load(Ordering::Acquire);
        if want > 1 && !self.gather_wait.is_zero() {
            let deadline = Instant::now() + self.gather_wait;
            let gathered = || {
                self.arrivals
                    .load(Ordering::Acquire)
                    .wrapping_sub(self.arrivals_at_sync.load(Ordering::Acquire))
            };
            while gathered() < want && Instant::now() < deadline {
                // SAFETY: the validate closure only reads atomics.
                unsafe {
                    parking_lot_core::park(
                        self.gather_key(),
                        || gathered() < want,
                        || {},
                        |_, _| {},
                        DEFAULT_PARK_TOKEN,
                        Some(deadline),
                    );
                }
            }
        }
        self.arrivals_at_sync
            .store(self.arrivals.load(Ordering::Acquire), Ordering::Release);
        // A panic inside `sync` must not park every later caller forever: the guard fails the
        // barrier and wakes everyone while the panic unwinds.
        let guard = PanicGuard { barrier: self };
        let result = sync();
        std::mem::forget(guard);
        let out = match result {
            Ok(end_lsn) => {
                assert!(end_lsn >= target, "a leader syncs at least its own target");
                self.durable_lsn.fetch_max(end_lsn, Ordering::AcqRel);
                // Everyone here now (served by this sync, or waiting for the next) is the
                // group the next leader gathers.
                let group = self.callers.load(Ordering::Acquire).max(1);
                self.last_group.store(group, Ordering::Release);
                Ok(self.durable_lsn())
            }
            Err(e) => {
                *self.failed_cause.lock() = Some(describe(&e));
                self.failed.store(true, Ordering::Release);
                Err(e)
            }
        };
        self.leader_active.store(false, Ordering::Release);
        self.wake_after_sync();
        out
    }

    /// Wakes every waiter the sync satisfied (all of them after a failure), and one waiter it
    /// did not, to lead the next sync.
    fn wake_after_sync(&self) {
        let durable = self.durable_lsn();
        let failed = self.failed.load(Ordering::Acquire);
        let mut next_leader_woken = false;
        // SAFETY: the filter and callback only touch locals; no parking_lot call inside.
        unsafe {
            parking_lot_core::unpark_filter(
                self.done_key(),
                |ParkToken(target)| {
                    if failed || target as u64 <= durable {
                        FilterOp::Unpark
                    } else if !next_leader_woken {
                        next_leader_woken = true;
                        FilterOp::Unpark
                    } else {
                        FilterOp::Skip
                    }
                },
                |_| DEFAULT_UNPARK_TOKEN,
            );
        }
    }
}

/// Armed while a leader runs its sync; dropped only when that sync panics.
struct PanicGuard<'a> {
    barrier: &'a SyncBarrier,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        let b = self.barrier;
        b.failed_cause
            .lock()
            .get_or_insert_with(|| "a sync panicked (see the panic message); nothing after the last successful sync is durable".to_string());
        b.failed.store(true, Ordering::Release);
        b.leader_active.store(false, Ordering::Release);
        b.wake_after_sync();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// A fake log: `appended` is the last appended LSN, a sync makes it durable.
    struct Fake {
        appended: AtomicU64,
        syncs: AtomicU64,
        barrier: SyncBarrier,
    }

    fn sync_to(f: &Fake, target: u64) -> Result<u64, String> {
        f.barrier.sync_to(
            target,
            || {
                f.syncs.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(50));
                Ok(f.appended.load(Ordering::Acquire))
            },
            |cause| cause,
            |e| e.clone(),
        )
    }

    #[test]
    fn every_waiter_returns_durable_and_syncs_are_shared() {
        let f = Arc::new(Fake {
            appended: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            barrier: SyncBarrier::new(0, Duration::from_micros(200)),
        });
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let f = f.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        let lsn = f.appended.fetch_add(1, Ordering::AcqRel) + 1;
                        let durable = sync_to(&f, lsn).unwrap();
                        assert!(durable >= lsn, "returned before {lsn} was durable");
                        assert!(f.barrier.durable_lsn() >= lsn);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(f.barrier.durable_lsn(), 4000);
        let syncs = f.syncs.load(Ordering::Relaxed);
        assert!(
            syncs < 4000,
            "no sync was shared ({syncs} syncs for 4000 entries)"
        );
    }

    #[test]
    fn a_panicking_sync_fails_the_barrier_instead_of_parking_everyone() {
        let b = Arc::new(SyncBarrier::new(0, Duration::ZERO));
        let in_sync = Arc::new(AtomicBool::new(false));
        let leader = {
            let (b, in_sync) = (b.clone(), in_sync.clone());
            std::thread::spawn(move || {
                b.sync_to(
                    1,
                    || -> Result<u64, String> {
                        in_sync.store(true, Ordering::Release);
                        std::thread::sleep(Duration::from_millis(50));
                        panic!("sync panicked on purpose")
                    },
                    |c| c,
                    |e: &String| e.clone(),
                )
            })
        };
        while !in_sync.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        // Arrives while the leader is inside its sync, so it parks behind it.
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.sync_to(1, || Ok(1), |c| c, |e: &String| e.clone()))
        };
        assert!(leader.join().is_err(), "the leader's panic propagates");
        let r = waiter
            .join()
            .expect("the waiter returns instead of parking forever");
        assert!(r.unwrap_err().contains("panicked"));
        let later: Result<u64, String> = b.sync_to(2, || Ok(2), |c| c, |e| e.clone());
        assert!(later.unwrap_err().contains("panicked"));
    }

    #[test]
    fn a_failed_sync_fails_every_waiter_and_every_later_call() {
        let b = SyncBarrier::new(0, Duration::ZERO);
        let r: Result<u64, String> = b.sync_to(1, || Err("EIO".to_string()), |c| c, |e| e.clone());
        assert_eq!(r.unwrap_err(), "EIO");
        let r: Result<u64, String> =
            b.sync_to(2, || Ok(2), |c| format!("failed: {c}"), |e| e.clone());
        assert_eq!(r.unwrap_err(), "failed: EIO");
        assert_eq!(b.failure().as_deref(), Some("EIO"));
        // Even an LSN that was durable before the failure: the WAL refuses all work.
        assert!(b
            .sync_to(0, || Ok(9), |c| c, |e: &String| e.clone())
            .is_err());
    }
}

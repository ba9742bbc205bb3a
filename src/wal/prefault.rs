//! Background prefaulting of the active segment: a thread that makes the pages ahead of the
//! write offset present and writable (`MADV_POPULATE_WRITE`), so appends copy into mapped
//! pages instead of faulting them in one by one.
//!
//! Why a thread: populating the pages of a fresh, fallocated segment is kernel work (allocate
//! and zero a page-cache page, map its block, make it writable) of 1-2 us per 4 KiB page. Done
//! inline it was about half the CPU time of a writer appending 128-byte records with a sync
//! every 4096 (perf, `examples`-style probe, 2026-11-23). On its own thread it runs beside the
//! writer. It is an optimization only: an append that reaches a page first simply takes the
//! fault, and on a kernel without `MADV_POPULATE_WRITE` (before 5.14) nothing is populated.

use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::segment::Segment;

/// One range to populate: `[from, to)` bytes of `segment`.
struct Job {
    segment: Arc<Segment>,
    from: usize,
    to: usize,
}

#[derive(Default)]
struct Queue {
    /// The newest request only: an older one the thread has not started is superseded (the
    /// writer has moved on, or rolled to a new segment).
    job: Option<Job>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// Populates ranges of the active segment on a background thread named `wal-prefault`.
pub(crate) struct Prefaulter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Prefaulter {
    /// Starts the thread. `None` if it cannot be spawned: the caller populates inline.
    pub(crate) fn start() -> Option<Prefaulter> {
        let shared = Arc::new(Shared::default());
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("wal-prefault".into())
            .spawn(move || run(&worker))
            .map_err(
                |e| tracing::warn!(error = %e, "no prefault thread; appends populate pages inline"),
            )
            .ok()?;
        Some(Prefaulter {
            shared,
            thread: Some(thread),
        })
    }

    /// Asks the thread to populate `[from, to)` of `segment` (replacing a request it has not
    /// started). Returns at once.
    pub(crate) fn request(&self, segment: Arc<Segment>, from: usize, to: usize) {
        assert!(
            from < to && to <= segment.len_bytes,
            "prefault range {from}..{to}"
        );
        self.shared.queue.lock().job = Some(Job { segment, from, to });
        self.shared.wake.notify_one();
    }
}

impl Drop for Prefaulter {
    fn drop(&mut self) {
        self.shared.queue.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            // The thread only runs madvise; it does not panic, and if it did there is nothing
            // to recover here.
            let _ = thread.join();
        }
    }
}

fn run(shared: &Shared) {
    loop {
        let job = {
            let mut q = shared.queue.lock();
            loop {
                if q.stop {
                    return;
                }
                if let Some(job) = q.job.take() {
                    break job;
                }
                shared.wake.wait(&mut q);
            }
        };
        // An error is found again by the writer, which populates (checked) what it needs.
        let _ = populate(&job.segment, job.from, job.to);
    }
}

/// Makes `[from, to)` of `segment`'s mapping present and writable (`MADV_POPULATE_WRITE`) and,
/// when `from` is at or below [`Segment::populated_to`], moves that mark to `to`. An error says
/// a write there would raise SIGBUS (EIO paging the page in, a range beyond a truncated end):
/// the writer must not write there. On a kernel without `MADV_POPULATE_WRITE` (before 5.14,
/// `EINVAL`) nothing can be checked and the mark moves anyway, as writes did before.
pub(crate) fn populate(segment: &Segment, from: usize, to: usize) -> std::io::Result<()> {
    use std::sync::atomic::Ordering;
    assert!(
        from <= to && to <= segment.len_bytes,
        "populate {from}..{to}"
    );
    if from == to {
        return Ok(());
    }
    let result = segment
        .map()
        .advise_range(memmap2::Advice::PopulateWrite, from, to - from);
    match result {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(e),
    }
    let mark = &segment.populated_to;
    let mut at = mark.load(Ordering::Acquire);
    while from <= at && at < to {
        match mark.compare_exchange_weak(at, to, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => break,
            Err(now) => at = now,
        }
    }
    Ok(())
}

//! Fork-join for the CPU kernels: [`parallel_for`] runs `f` over `0..n` on the calling thread
//! plus a few persistent workers.
//!
//! Why not rayon or candle's barrier pool: a decode step makes ~80 short parallel calls (tens to
//! hundreds of µs each) on a machine that may be shared, and both pools lose there. rayon puts
//! the caller to sleep and wakes sleeping workers for each call; candle's pool makes the caller
//! spin until every worker has checked in, so when another process holds the worker's core the
//! caller burns its own core waiting for a thread that cannot run (a 5× slowdown, measured).
//! Here:
//! - Work claiming: items are taken one at a time from a per-call atomic cursor; the caller works
//!   too, so a worker that wakes late simply finds nothing left, and nobody waits for a thread
//!   that never started.
//! - The caller waits only for items already claimed and not yet finished: it spins briefly,
//!   then yields its core, so a descheduled worker can finish on it.
//! - Workers spin for new work for ~50 µs after each call (decode calls come back to back), then
//!   park; the caller unparks them.
//! - Lifetime safety: each call allocates its job (`Arc`); the caller returns only when every
//!   item is done, so a late worker holding the `Arc` only ever sees an exhausted cursor and
//!   never touches the borrowed closure after the call.
//! - candle's own pool (its element-wise ops) keeps a worker spinning for ~0.5 ms after each op,
//!   on the core our worker needs for the next matmul: 13 % of a prefill's samples. [`init`],
//!   called first thing in `main`, turns that spin off unless the user set it
//!   (`CANDLE_BARRIER_POOL_SPIN_LIMIT`): +14 % prefill measured, decode unchanged.
//! - Threads: `RAYON_NUM_THREADS`, else `CANDLE_NUM_THREADS`, else the available parallelism;
//!   the caller is one of them. Nested calls run inline. A panicking item does not stop the
//!   others; the first panic is re-raised on the caller once all items are done.

use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker keeps polling for the next call before it parks.
const WORKER_SPIN: Duration = Duration::from_micros(50);
/// How long the caller spins on unfinished items before it starts yielding its core.
const CALLER_SPIN: Duration = Duration::from_micros(20);

/// One call: a lifetime-erased `&dyn Fn(Range<usize>)` and its progress.
struct Job {
    /// `*const (dyn Fn(Range<usize>) + Sync)`, valid while the caller waits in `parallel_for`.
    f: *const (dyn Fn(Range<usize>) + Sync + 'static),
    n: usize,
    next: AtomicUsize,
    /// Items finished (or panicked).
    done: AtomicUsize,
    /// The first panic of an item, re-raised on the caller.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

// SAFETY: `f` points to a `Sync` closure; it is only called for items claimed from `next`,
// which the caller waits for before returning (see `parallel_for`).
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs items until none are left. A panicking item still counts as done and
    /// the other items still run; the first payload is kept for the caller.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= self.n {
                return;
            }
            // SAFETY: item `i < n` was claimed and is not yet counted in `done`, so the caller
            // is still inside `parallel_for` and `f` is alive.
            let run = || unsafe { (*self.f)(i..i + 1) };
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                if let Ok(mut slot) = self.panic.lock() {
                    slot.get_or_insert(p);
                }
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

struct Pool {
    /// The current job and its generation (bumped per call).
    slot: Mutex<(usize, Option<Arc<Job>>)>,
    generation: AtomicUsize,
    workers: Vec<Thread>,
    /// Serialises callers from different threads.
    call: Mutex<()>,
}

thread_local! {
    /// This thread is a worker, or a caller inside `parallel_for`: nested calls run inline.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Threads the pool runs with (the caller included); read once, as the pool is sized once.
pub(crate) fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(threads_from_env)
}

fn threads_from_env() -> usize {
    ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"]
        .iter()
        .find_map(|v| {
            std::env::var(v)
                .ok()?
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
        })
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let workers = (1..threads())
            .filter_map(|i| {
                std::thread::Builder::new()
                    .name(format!("llmarch-cpu-{i}"))
                    .spawn(worker)
                    .ok()
                    .map(|h| h.thread().clone())
            })
            .collect();
        Pool {
            slot: Mutex::new((0, None)),
            generation: AtomicUsize::new(0),
            workers,
            call: Mutex::new(()),
        }
    })
}

fn worker() {
    INSIDE.with(|w| w.set(true));
    let pool = pool();
    let mut seen = 0;
    loop {
        let since = Instant::now();
        while pool.generation.load(Ordering::Acquire) == seen {
            if since.elapsed() < WORKER_SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::park(); // spurious wake-ups just loop
            }
        }
        let job = match pool.slot.lock() {
            Ok(s) => {
                seen = s.0;
                s.1.clone()
            }
            Err(_) => return,
        };
        if let Some(job) = job {
            job.work();
        }
    }
}

/// Process-wide setup for the CPU kernels; call first thing in `main`, before any other thread
/// starts (it sets an environment variable). Stops candle's pool from spinning between ops
/// (`CANDLE_BARRIER_POOL_SPIN_LIMIT=0` unless already set); our workers start on first use.
/// With glibc, also keeps the activations' buffers in the heap (see [`keep_buffers_in_heap`]).
pub fn init() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    keep_buffers_in_heap();
}

/// glibc serves an allocation above its mmap threshold (128 KB, rising to at most 32 MB as
/// such blocks are freed) with a fresh mapping, and unmaps it on free: every prompt chunk's
/// activations (`[512, 2048]` f32 is 4 MB) were page-faulted in and zeroed by the kernel anew
/// for each op. With the threshold at its 32 MB maximum and freed heap kept up to 256 MB, they
/// reuse heap memory: +13 % prefill on an 8192-token prompt and +10 % on 64 tokens (q8_0, bench
/// model), for a peak RSS 25-30 MB higher. `GLIBC_TUNABLES` / `MALLOC_*` set by the user win.
fn keep_buffers_in_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        let user_set = [
            "GLIBC_TUNABLES",
            "MALLOC_MMAP_THRESHOLD_",
            "MALLOC_TRIM_THRESHOLD_",
        ]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
        if !user_set {
            // SAFETY: mallopt only sets allocator parameters; called before other threads run.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
                mallopt(M_TRIM_THRESHOLD, 256 << 20);
            }
        }
    }
}

/// Runs `f` over `0..n`, one index range at a time, on the calling thread and the pool's
/// workers; returns when every range is done. `f` gets each index once.
pub fn parallel_for(n: usize, f: impl Fn(Range<usize>) + Sync) {
    if n == 0 {
        return;
    }
    if n == 1 || INSIDE.with(|w| w.get()) {
        return f(0..n);
    }
    let pool = pool();
    if pool.workers.is_empty() {
        return f(0..n);
    }
    let _serial = pool.call.lock().unwrap_or_else(|e| e.into_inner());
    let f: &(dyn Fn(Range<usize>) + Sync) = &f;
    // SAFETY: erasing the lifetime; the job only calls `f` for claimed items, and we return
    // (or unwind) only after all of them are done (below).
    let f: *const (dyn Fn(Range<usize>) + Sync + 'static) = unsafe { std::mem::transmute(f) };
    let job = Arc::new(Job {
        f,
        n,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panic: Mutex::new(None),
    });
    {
        let mut slot = pool.slot.lock().unwrap_or_else(|e| e.into_inner());
        let generation = slot.0 + 1;
        *slot = (generation, Some(job.clone()));
        pool.generation.store(generation, Ordering::Release);
    }
    for w in &pool.workers {
        w.unpark();
    }
    INSIDE.with(|w| w.set(true));
    job.work();
    INSIDE.with(|w| w.set(false));
    // Every item is claimed; wait for the ones still running elsewhere.
    let since = Instant::now();
    while job.done.load(Ordering::Acquire) < n {
        if since.elapsed() < CALLER_SPIN {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    // Drop the pool's reference so the closure pointer is not kept past this call.
    if let Ok(mut slot) = pool.slot.lock() {
        slot.1 = None;
    }
    let panic = job.panic.lock().ok().and_then(|mut p| p.take());
    if let Some(p) = panic {
        std::panic::resume_unwind(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_index_runs_once_across_many_calls_and_threads() {
        for n in [0, 1, 2, 3, 17, 1000] {
            for _ in 0..50 {
                let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
                parallel_for(n, |r| {
                    for i in r {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "n = {n}"
                );
            }
        }
        // A panicking item reaches the caller, after which the pool still works.
        let r = std::panic::catch_unwind(|| {
            parallel_for(100, |r| assert!(r.start != 57, "boom"));
        });
        assert!(r.is_err());
        let count = AtomicU64::new(0);
        parallel_for(100, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 100);
        // Callers on several threads at once, and a nested call.
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for _ in 0..100 {
                        let sum = AtomicU64::new(0);
                        parallel_for(64, |r| {
                            parallel_for(2, |q| {
                                for q in q {
                                    sum.fetch_add((r.start * 2 + q) as u64, Ordering::Relaxed);
                                }
                            });
                        });
                        assert_eq!(sum.load(Ordering::Relaxed), (0..128).sum::<u64>(), "{t}");
                    }
                });
            }
        });
    }
}

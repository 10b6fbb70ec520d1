//! The kernels' thread pool: the calling thread and `threads - 1` helpers that spin
//! between jobs, as llama.cpp's does.
//!
//! A decode step calls a kernel about 200 times, 20-200 µs each. Handing each call to
//! rayon from a thread outside its pool blocked the caller and woke a sleeping worker
//! every time: a fifth of a SmolLM2 decode step went to the scheduler (perf:
//! `_raw_spin_unlock_irqrestore`, `finish_task_switch`). Here the caller runs tasks itself
//! and the helpers, after a job, spin on an atomic for [`SPIN`] before they park on a
//! condition variable, so a step's back-to-back calls cost no system call.
//!
//! A task that panics is caught where it runs; `run` panics in the caller once every
//! task of the job has finished, and the pool keeps working.
//!
//! The pool has `RAYON_NUM_THREADS` threads (rayon's global setting, which the rest of
//! Kiln follows), counting the caller. Jobs from several threads at once are
//! serialised (one job at a time). `KILN_POOL_SPIN_US` sets how long the helpers spin
//! (microseconds; [`set_spin`] from code): spinning costs the CPU that a server's other
//! threads (its HTTP edge, its clients on the same machine) would use.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a helper spins for the next job before it parks, by default.
pub const SPIN: Duration = Duration::from_millis(2);

/// The spin of every pool's helpers, in nanoseconds ([`set_spin`]).
static SPIN_NANOS: AtomicU64 = AtomicU64::new(SPIN.as_nanos() as u64);

/// How long the helpers of every pool spin for the next job before they park, from
/// their next wait on (zero: they park at once).
pub fn set_spin(spin: Duration) {
    SPIN_NANOS.store(u64::try_from(spin.as_nanos()).unwrap_or(u64::MAX), SeqCst);
}

/// The helpers' spin ([`set_spin`]; [`SPIN`] unless set).
pub fn spin() -> Duration {
    Duration::from_nanos(SPIN_NANOS.load(SeqCst))
}

/// `KILN_POOL_SPIN_US`, when set: microseconds. Anything else is an error naming it.
fn spin_from_env() -> Result<Option<Duration>, String> {
    std::env::var("KILN_POOL_SPIN_US")
        .ok()
        .map(|v| parse_spin(&v))
        .transpose()
}

/// A spin in microseconds, as `KILN_POOL_SPIN_US` gives it.
fn parse_spin(v: &str) -> Result<Duration, String> {
    v.trim()
        .parse::<u64>()
        .map(Duration::from_micros)
        .map_err(|_| format!("KILN_POOL_SPIN_US must be a number of microseconds, got {v:?}"))
}

/// A job: `tasks` calls of `f`, by index.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    tasks: u32,
}

struct Shared {
    /// `epoch << 32 | next task`: a task is claimed by a compare-exchange that also
    /// checks the job is still the current one.
    ticket: AtomicU64,
    /// The current job; rewritten only while no helper is [`active`](Self::active).
    job: UnsafeCell<Job>,
    /// Helpers between reading the ticket and leaving a job.
    active: AtomicUsize,
    /// Tasks of the current job finished.
    done: AtomicUsize,
    /// Helpers parked on `wake`.
    parked: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// One job at a time.
    submit: Mutex<()>,
    /// Whether a task of the current job panicked.
    panicked: AtomicBool,
}

// SAFETY: `job` is written only by the submitter while no helper is active (see
// `Pool::run`) and read by helpers only while they are registered in `active`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// The pool: see the module documentation.
pub struct Pool {
    shared: &'static Shared,
    threads: usize,
}

impl Pool {
    /// The process-wide pool, started on first use (with `KILN_POOL_SPIN_US` when set;
    /// a value that is not a number is reported on stderr and the default kept).
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            match spin_from_env() {
                Ok(Some(spin)) => set_spin(spin),
                Ok(None) => {}
                Err(e) => eprintln!("warning: {e}; the kernel threads spin {SPIN:?}"),
            }
            Pool::new(rayon::current_num_threads().max(1))
        })
    }

    /// A pool of `threads` threads counting the caller (`threads - 1` helpers, which
    /// live as long as the process).
    pub fn new(threads: usize) -> Pool {
        let noop: &'static (dyn Fn(usize) + Sync) = &|_| {};
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            ticket: AtomicU64::new(0),
            job: UnsafeCell::new(Job { f: noop, tasks: 0 }),
            active: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            submit: Mutex::new(()),
            panicked: AtomicBool::new(false),
        }));
        for i in 1..threads {
            std::thread::Builder::new()
                .name(format!("kiln-kernels-{i}"))
                .spawn(move || helper(shared))
                .expect("spawn a kernel thread");
        }
        Pool { shared, threads }
    }

    /// Threads that run a job, counting the caller.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f(0)`, ..., `f(tasks - 1)` across the pool and return when all have run.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if self.threads == 1 || tasks == 1 {
            (0..tasks).for_each(f);
            return;
        }
        let tasks = u32::try_from(tasks).expect("fewer than 2^32 tasks");
        let s = self.shared;
        let _one_job = s.submit.lock().unwrap_or_else(|e| e.into_inner());
        // No helper may still hold the previous job when its slot is rewritten.
        while s.active.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        // SAFETY: the lifetime of `f` is erased for the slot; every task of this job has
        // run before `run` returns, and no helper calls `f` after that (a stale helper's
        // claim fails on the epoch).
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        // SAFETY: no helper is active, so none reads the slot now.
        unsafe { *s.job.get() = Job { f, tasks } };
        s.done.store(0, SeqCst);
        let epoch = (s.ticket.load(SeqCst) >> 32) + 1;
        s.ticket.store(epoch << 32, SeqCst);
        if s.parked.load(SeqCst) > 0 {
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // SAFETY: the job was just written and is current.
        let ran = unsafe { work(s, epoch << 32, Job { f, tasks }) };
        s.done.fetch_add(ran, SeqCst);
        while s.done.load(SeqCst) < tasks as usize {
            std::hint::spin_loop();
        }
        if s.panicked.swap(false, SeqCst) {
            panic!("a kernel task panicked (its message is above)");
        }
    }
}

/// Claim and run tasks of the job whose ticket starts at `ticket`; the number run.
///
/// # Safety
/// `job` must be the job of `ticket`'s epoch, not yet finished.
unsafe fn work(s: &Shared, mut ticket: u64, job: Job) -> usize {
    let epoch = ticket >> 32;
    let mut ran = 0;
    loop {
        let task = ticket & 0xffff_ffff;
        if ticket >> 32 != epoch || task >= job.tasks as u64 {
            return ran;
        }
        match s.ticket.compare_exchange(ticket, ticket + 1, SeqCst, SeqCst) {
            Ok(_) => {
                // SAFETY: task `task` of the current job is ours; `f` lives until every
                // task of it has run. A panicking task still counts as run (so neither the
                // caller nor `f`'s frame is left waiting on a dead helper); the caller
                // re-raises it once the job is over.
                let call = std::panic::AssertUnwindSafe(|| unsafe { (*job.f)(task as usize) });
                if std::panic::catch_unwind(call).is_err() {
                    s.panicked.store(true, SeqCst);
                }
                ran += 1;
                ticket += 1;
            }
            Err(now) => ticket = now,
        }
    }
}

fn helper(s: &'static Shared) {
    let mut seen = 0u64;
    loop {
        // Wait for a new epoch: spin, then park.
        let (start, limit) = (Instant::now(), spin());
        let mut spins = 0u32;
        while s.ticket.load(SeqCst) >> 32 == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if (limit.is_zero() || spins % 1024 == 0) && start.elapsed() >= limit {
                s.parked.fetch_add(1, SeqCst);
                let mut guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                while s.ticket.load(SeqCst) >> 32 == seen {
                    guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                drop(guard);
                s.parked.fetch_sub(1, SeqCst);
            }
        }
        s.active.fetch_add(1, SeqCst);
        let ticket = s.ticket.load(SeqCst);
        seen = ticket >> 32;
        // SAFETY: while this helper is active the submitter does not rewrite the slot; if
        // the ticket's job is finished, `work` claims nothing and does not call `f`.
        let job = unsafe { *s.job.get() };
        let ran = unsafe { work(s, ticket, job) };
        s.done.fetch_add(ran, SeqCst);
        s.active.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_per_job_across_many_jobs() {
        let pool = Pool::new(3);
        for tasks in [0usize, 1, 2, 3, 7, 64] {
            for _ in 0..200 {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.run(tasks, &|i| {
                    hits[i].fetch_add(1, SeqCst);
                });
                assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "{tasks} tasks");
            }
        }
    }

    #[test]
    fn jobs_after_the_helpers_park_still_run() {
        let pool = Pool::new(2);
        let sum = AtomicUsize::new(0);
        pool.run(4, &|i| {
            sum.fetch_add(i, SeqCst);
        });
        std::thread::sleep(SPIN * 3);
        pool.run(4, &|i| {
            sum.fetch_add(i, SeqCst);
        });
        assert_eq!(sum.load(SeqCst), 12);
    }

    #[test]
    fn helpers_that_park_at_once_still_run_every_job() {
        let pool = Pool::new(2);
        set_spin(Duration::ZERO);
        for _ in 0..50 {
            let sum = AtomicUsize::new(0);
            pool.run(6, &|i| {
                sum.fetch_add(i, SeqCst);
            });
            assert_eq!(sum.load(SeqCst), 15);
        }
        set_spin(SPIN);
        assert_eq!(spin(), SPIN);
    }

    #[test]
    fn the_spin_setting_is_microseconds_or_an_error_naming_it() {
        assert_eq!(parse_spin(" 100 "), Ok(Duration::from_micros(100)));
        assert_eq!(parse_spin("0"), Ok(Duration::ZERO));
        let e = parse_spin("2ms").unwrap_err();
        assert!(e.contains("KILN_POOL_SPIN_US") && e.contains("\"2ms\""), "{e}");
    }

    #[test]
    fn a_panicking_task_panics_the_caller_once_the_job_is_over_and_the_pool_goes_on() {
        let pool = Pool::new(2);
        let ran = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(8, &|i| {
                ran.fetch_add(1, SeqCst);
                assert!(i != 5, "task 5 fails");
            })
        }));
        assert!(result.is_err(), "the caller sees the panic");
        assert_eq!(ran.load(SeqCst), 8, "every task ran before run returned");
        let sum = AtomicUsize::new(0);
        pool.run(4, &|i| {
            sum.fetch_add(i, SeqCst);
        });
        assert_eq!(sum.load(SeqCst), 6, "the pool still works");
    }

    #[test]
    fn jobs_from_several_threads_are_serialised() {
        let pool = Pool::new(2);
        std::thread::scope(|scope| {
            for t in 0..4 {
                let pool = &pool;
                scope.spawn(move || {
                    for _ in 0..100 {
                        let sum = AtomicUsize::new(0);
                        pool.run(5, &|i| {
                            sum.fetch_add(i + t, SeqCst);
                        });
                        assert_eq!(sum.load(SeqCst), 10 + 5 * t);
                    }
                });
            }
        });
    }
}

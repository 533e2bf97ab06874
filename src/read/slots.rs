//! How many ranged GETs one remote gets at once, and how that number adapts.
//!
//! A remote that limits each connection (a rate per connection, or a long way to go, so that
//! one connection's window carries only so much) gives more bytes per second to more GETs at
//! once; a remote that is already at its bandwidth, or a machine that is already at its CPU,
//! gives nothing more. So the number of request slots starts at the configured value and is
//! probed upwards, by hill climbing on measured throughput:
//! - every [`PERIOD`] in which bytes arrived is one sample: bytes per second, and whether a
//!   fetch had to wait for a slot (only then can more slots bring more);
//! - no probe while this process and the machine are both busy (this process used at least
//!   [`BUSY_PROCESS`] of a core and the machine had less than [`IDLE_MACHINE`] of its CPU
//!   idle): more transfers at once cannot be faster without CPU to run them, and probing then
//!   only costs (a remote on the same machine, reading at memory speed);
//! - a waited-on sample doubles the slots (up to the maximum); the sample after that is left
//!   out (new connections are still starting), and the next one decides: at least
//!   [`GAIN`] times the rate before keeps the new number, anything less goes back to the old
//!   one and holds there for a while, twice as long after each failed probe;
//! - an overloaded remote (`429`, `503`, a connection that fails) halves the slots at once.
//!
//! [`Control`] is the pure rule, tested without I/O; [`Slots`] applies it to two resizable
//! semaphores (all requests, and the half background work may hold).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Length of one throughput sample.
pub const PERIOD: Duration = Duration::from_millis(250);
/// A probe is kept when the rate grew by at least this factor.
pub const GAIN: f64 = 1.25;
/// This process is busy from this share of one core on.
pub const BUSY_PROCESS: f64 = 0.5;
/// The machine is busy below this share of idle CPU.
pub const IDLE_MACHINE: f64 = 0.25;
/// Samples a failed probe holds the old number for, at first and at most.
const HOLD_MIN: u32 = 4;
const HOLD_MAX: u32 = 64;

/// One sample of the transfers of a period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Bytes per second received.
    pub rate: f64,
    /// A fetch waited for a slot during the period.
    pub saturated: bool,
    /// This process and the machine were both busy ([`BUSY_PROCESS`], [`IDLE_MACHINE`]).
    pub cpu_bound: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Steady,
    /// Slots were raised from `from` after a sample of `base` bytes per second; the next
    /// sample is left out.
    Settling {
        from: usize,
        base: f64,
    },
    /// The sample now decides whether the raise stays.
    Probing {
        from: usize,
        base: f64,
    },
}

/// The adaptation rule: which number of slots to use after each sample.
#[derive(Debug, Clone)]
pub struct Control {
    limit: usize,
    min: usize,
    max: usize,
    phase: Phase,
    /// Samples to wait after the last failed probe or overload, and what is left of it.
    hold: u32,
    hold_left: u32,
}

impl Control {
    /// Starts at `start` slots; adapts within `min..=max` (`max == start`: never grows).
    pub fn new(start: usize, max: usize) -> Control {
        let start = start.max(1);
        Control {
            limit: start,
            min: start.min(2),
            max: max.max(start),
            phase: Phase::Steady,
            hold: 0,
            hold_left: 0,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Takes one sample; returns the number of slots from now on.
    pub fn on_sample(&mut self, s: Sample) -> usize {
        match self.phase {
            Phase::Steady => {
                if self.hold_left > 0 {
                    self.hold_left -= 1;
                } else if s.saturated && !s.cpu_bound && self.limit < self.max {
                    self.phase = Phase::Settling {
                        from: self.limit,
                        base: s.rate,
                    };
                    self.limit = (self.limit * 2).min(self.max);
                }
            }
            Phase::Settling { from, base } => self.phase = Phase::Probing { from, base },
            Phase::Probing { from, base } => {
                self.phase = Phase::Steady;
                if s.rate >= base * GAIN {
                    // It paid: probe further as soon as the slots are all taken again.
                    self.hold = 0;
                } else {
                    self.limit = from;
                    self.back_off(HOLD_MIN);
                }
            }
        }
        self.limit
    }

    /// The remote said it is overloaded: half the slots, and no probe for a while.
    pub fn on_overload(&mut self) -> usize {
        let from = match self.phase {
            Phase::Settling { from, .. } | Phase::Probing { from, .. } => from,
            Phase::Steady => self.limit,
        };
        self.limit = (from / 2).max(self.min);
        self.phase = Phase::Steady;
        self.back_off(2 * HOLD_MIN);
        self.limit
    }

    fn back_off(&mut self, at_least: u32) {
        self.hold = (self.hold * 2).clamp(at_least, HOLD_MAX);
        self.hold_left = self.hold;
    }
}

/// A semaphore whose number of permits can shrink while permits are held: what cannot be
/// taken back at once is owed, and paid by the next permits returned.
#[derive(Debug)]
struct Resizable {
    sem: Semaphore,
    size: AtomicUsize,
    debt: AtomicUsize,
}

impl Resizable {
    fn new(size: usize) -> Resizable {
        Resizable {
            sem: Semaphore::new(size),
            size: AtomicUsize::new(size),
            debt: AtomicUsize::new(0),
        }
    }

    /// Permits held now.
    fn in_use(&self) -> usize {
        (self.size.load(Ordering::Acquire) + self.debt.load(Ordering::Acquire))
            .saturating_sub(self.sem.available_permits())
    }

    /// Called under the owner's lock only (one resize at a time).
    fn resize(&self, to: usize) {
        let from = self.size.swap(to, Ordering::AcqRel);
        if to > from {
            let grow = to - from;
            // Forgive debt first: those permits are still out and will come back.
            let owed = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| Some(d - d.min(grow)))
                .unwrap_or(0);
            self.sem.add_permits(grow - owed.min(grow));
        } else if from > to {
            let fewer = from - to;
            let taken = self.sem.forget_permits(fewer);
            self.debt.fetch_add(fewer - taken, Ordering::AcqRel);
        }
    }

    async fn acquire(&self, waited: &AtomicBool, waiting: &AtomicUsize) -> Option<Slot<'_>> {
        let permit = match self.sem.try_acquire() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return None,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                waited.store(true, Ordering::Release);
                waiting.fetch_add(1, Ordering::AcqRel);
                let _waiting = Decrement(waiting);
                self.sem.acquire().await.ok()?
            }
        };
        Some(Slot {
            permit: Some(permit),
            debt: &self.debt,
        })
    }
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One request slot, given back (or paid to a shrink) on drop.
#[derive(Debug)]
pub struct Slot<'a> {
    permit: Option<SemaphorePermit<'a>>,
    debt: &'a AtomicUsize,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let Some(p) = self.permit.take() else { return };
        let paid = self
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if paid {
            p.forget();
        }
    }
}

/// The request slots of one remote.
#[derive(Debug)]
pub struct Slots {
    requests: Resizable,
    /// Slots background fetches (readahead, warm-up) may hold: half of `requests`, so readers
    /// always find the other half.
    background: Resizable,
    control: Mutex<Control>,
    /// The control's number, readable without its lock.
    limit: AtomicUsize,
    max: usize,
    cpu_rule: bool,
    start: Instant,
    sample: Mutex<Sampler>,
    /// A fetch waited for a slot since the last sample.
    waited: AtomicBool,
    waiting: AtomicUsize,
    /// When the number last halved for an overload (nanoseconds after `start`; 0: never).
    last_overload: AtomicU64,
}

/// The sample being taken; times in nanoseconds after [`Slots`]' start.
#[derive(Debug, Default)]
struct Sampler {
    /// When it started (`None`: no bytes yet).
    begin: Option<u64>,
    bytes: u64,
    /// When bytes last came.
    last: u64,
    /// CPU counters when it started.
    cpu: Option<CpuTimes>,
}

/// CPU time used by this process and by the whole machine, and the machine's idle time.
#[derive(Debug, Clone, Copy, Default)]
struct CpuTimes {
    process: f64,
    machine_busy: f64,
    machine_idle: f64,
}

impl CpuTimes {
    /// Seconds, or `None` where the system does not tell.
    fn now() -> Option<CpuTimes> {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the struct it is given.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: initialized by the successful call above.
        let ru = unsafe { ru.assume_init() };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let (busy, idle) = machine_times(stat.lines().next()?)?;
        Some(CpuTimes {
            process: secs(ru.ru_utime) + secs(ru.ru_stime),
            machine_busy: busy,
            machine_idle: idle,
        })
    }

    /// Whether this process and the machine were both busy from `earlier` to now, `wall`
    /// seconds later.
    fn busy_since(&self, earlier: &CpuTimes, wall: f64) -> bool {
        let process = (self.process - earlier.process) / wall;
        let busy = self.machine_busy - earlier.machine_busy;
        let idle = self.machine_idle - earlier.machine_idle;
        let total = busy + idle;
        process >= BUSY_PROCESS && total > 0.0 && idle / total < IDLE_MACHINE
    }
}

/// Busy and idle seconds of all CPUs from the first line of `/proc/stat` (`cpu  user nice
/// system idle iowait irq softirq steal ...`, in clock ticks); iowait counts as idle.
fn machine_times(line: &str) -> Option<(f64, f64)> {
    let mut f = line.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<f64> = f.take(8).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks[..] else {
        return None;
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((
        (user + nice + system + irq + softirq + steal) / hz,
        (idle + iowait) / hz,
    ))
}

fn background_share(limit: usize) -> usize {
    (limit / 2).max(1)
}

impl Slots {
    /// `cpu_rule`: no probe while this process and the machine are busy (off only in tests
    /// that share their process with other tests).
    pub fn new(start: usize, max: usize, cpu_rule: bool) -> Slots {
        let control = Control::new(start, max);
        let (limit, max) = (control.limit(), control.max());
        Slots {
            limit: AtomicUsize::new(limit),
            max,
            cpu_rule,
            requests: Resizable::new(limit),
            background: Resizable::new(background_share(limit)),
            control: Mutex::new(control),
            start: Instant::now(),
            sample: Mutex::new(Sampler::default()),
            waited: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            last_overload: AtomicU64::new(0),
        }
    }

    /// Slots now.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// Slots at most.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Slots background work may hold now.
    pub fn background_limit(&self) -> usize {
        background_share(self.limit())
    }

    /// Requests in flight now.
    pub fn in_use(&self) -> usize {
        self.requests.in_use()
    }

    /// A slot for any request (`None`: shutting down).
    pub async fn request(&self) -> Option<Slot<'_>> {
        self.requests.acquire(&self.waited, &self.waiting).await
    }

    /// One of the background share of the slots, taken before [`Slots::request`].
    pub async fn background(&self) -> Option<Slot<'_>> {
        self.background.acquire(&self.waited, &self.waiting).await
    }

    /// `n` bytes arrived; closes the sample when its period is over. A sample covers busy
    /// time only: after a whole period without bytes, the next bytes start a new one.
    pub fn received(&self, n: u64) {
        let period = PERIOD.as_nanos() as u64;
        let mut s = self.sample.lock();
        // Read under the lock: times only grow from one caller to the next.
        let now = (self.start.elapsed().as_nanos() as u64).max(s.last);
        let last = std::mem::replace(&mut s.last, now);
        match s.begin {
            Some(begin) if now - last < period => {
                s.bytes += n;
                if now - begin < period {
                    return;
                }
            }
            _ => {
                // These bytes came in before the sample's start.
                *s = Sampler {
                    begin: Some(now),
                    bytes: 0,
                    last: now,
                    cpu: None,
                };
                drop(s);
                self.note_cpu();
                return;
            }
        }
        let begin = s.begin.replace(now).expect("checked above");
        let bytes = std::mem::take(&mut s.bytes);
        drop(s);
        let secs = (now - begin) as f64 / 1e9;
        // Read after the sampler's lock is let go: every body piece takes that lock.
        let (cpu, earlier) = self.note_cpu();
        let cpu_bound = matches!((cpu, earlier), (Some(c), Some(e)) if c.busy_since(&e, secs));
        let saturated = self.waited.swap(false, Ordering::AcqRel) || self.waiting.load(Ordering::Acquire) > 0;
        let rate = bytes as f64 / secs;
        let mut control = self.control.lock();
        let before = control.limit();
        let after = control.on_sample(Sample {
            rate,
            saturated,
            cpu_bound,
        });
        tracing::trace!(
            mib_per_s = rate / (1 << 20) as f64,
            saturated,
            cpu_bound,
            limit = after,
            "sample"
        );
        if after != before {
            tracing::debug!(
                from = before,
                to = after,
                mib_per_s = rate / (1 << 20) as f64,
                "parallel requests"
            );
            self.apply(after);
        }
    }

    /// Records the CPU counters at the start of a sample (with the CPU rule on); returns
    /// them and the ones recorded before.
    fn note_cpu(&self) -> (Option<CpuTimes>, Option<CpuTimes>) {
        if !self.cpu_rule {
            return (None, None);
        }
        let now = CpuTimes::now();
        let earlier = std::mem::replace(&mut self.sample.lock().cpu, now);
        (now, earlier)
    }

    /// The remote said it is overloaded. Every GET that met the overload says so; the
    /// number halves once per [`PERIOD`].
    pub fn overloaded(&self) {
        let now = self.start.elapsed().as_nanos() as u64;
        let last = self.last_overload.load(Ordering::Acquire);
        if last != 0 && now.saturating_sub(last) < PERIOD.as_nanos() as u64 {
            return;
        }
        let mut control = self.control.lock();
        if self.last_overload.load(Ordering::Acquire) != last {
            return;
        }
        self.last_overload.store(now.max(1), Ordering::Release);
        let before = control.limit();
        let after = control.on_overload();
        if after != before {
            tracing::info!(
                from = before,
                to = after,
                "the remote is overloaded: fewer parallel requests"
            );
            self.apply(after);
        }
    }

    fn apply(&self, limit: usize) {
        self.limit.store(limit, Ordering::Release);
        self.requests.resize(limit);
        self.background.resize(background_share(limit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(rate: f64, saturated: bool) -> Sample {
        Sample {
            rate,
            saturated,
            cpu_bound: false,
        }
    }

    #[test]
    fn slots_double_while_each_doubling_pays_and_stop_where_it_does_not() {
        // A remote that gives each connection 10 units, up to 100 in all.
        let rate = |n: usize| (n as f64 * 10.0).min(100.0);
        let mut c = Control::new(2, 64);
        let mut seen = vec![c.limit()];
        for _ in 0..40 {
            let n = c.limit();
            c.on_sample(s(rate(n), true));
            if *seen.last().unwrap() != c.limit() {
                seen.push(c.limit());
            }
        }
        // 2 → 4 → 8 → 16 paid (20, 40, 80, 100: 16 gave 1.25× of 8), 32 did not, back to 16,
        // probed again only after a hold.
        assert_eq!(&seen[..6], &[2, 4, 8, 16, 32, 16]);
        assert!(seen.iter().all(|&n| n <= 32));
        assert_eq!(c.limit(), 16);
    }

    #[test]
    fn failed_probes_wait_longer_each_time() {
        let mut c = Control::new(4, 64);
        let mut probes = Vec::new();
        for i in 0..200 {
            let before = c.limit();
            c.on_sample(s(100.0, true));
            if c.limit() > before {
                probes.push(i);
            }
        }
        let gaps: Vec<_> = probes.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.len() >= 3, "{probes:?}");
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "gaps grow: {gaps:?}");
        assert!(*gaps.last().unwrap() <= HOLD_MAX as usize + 3, "{gaps:?}");
        assert_eq!(c.limit(), 4, "never kept a raise that gained nothing");
    }

    #[test]
    fn nothing_changes_while_no_fetch_waits_for_a_slot() {
        let mut c = Control::new(4, 64);
        for _ in 0..20 {
            assert_eq!(c.on_sample(s(50.0, false)), 4);
        }
        // A fixed number never moves.
        let mut c = Control::new(4, 4);
        for _ in 0..20 {
            assert_eq!(c.on_sample(s(50.0, true)), 4);
        }
    }

    #[test]
    fn no_probe_while_this_process_and_the_machine_are_busy() {
        let mut c = Control::new(4, 64);
        let busy = Sample {
            cpu_bound: true,
            ..s(100.0, true)
        };
        for _ in 0..20 {
            assert_eq!(c.on_sample(busy), 4);
        }
        assert_eq!(c.on_sample(s(100.0, true)), 8, "probes once there is CPU to spare");

        let t = |process, busy, idle| CpuTimes {
            process,
            machine_busy: busy,
            machine_idle: idle,
        };
        let start = t(10.0, 100.0, 50.0);
        // Over one second: this process used 0.9 of a core, the machine 1.9 of 2.
        assert!(t(10.9, 101.9, 50.1).busy_since(&start, 1.0));
        // The machine is busy, but not with this process (other work on it).
        assert!(!t(10.1, 101.9, 50.1).busy_since(&start, 1.0));
        // This process is busy, and the machine has a core to spare.
        assert!(!t(10.9, 101.0, 51.0).busy_since(&start, 1.0));
        let (busy, idle) = machine_times("cpu  100 0 50 800 50 0 0 0 0 0").unwrap();
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!((busy * hz, idle * hz), (150.0, 850.0));
        assert!(machine_times("cpu0 1 2 3 4 5 6 7 8").is_none());
        assert!(CpuTimes::now().is_some(), "Linux tells both");
    }

    #[test]
    fn overload_halves_and_undoes_a_probe() {
        let mut c = Control::new(16, 64);
        assert_eq!(c.on_sample(s(100.0, true)), 32);
        // 503 while probing: half of what it was before the probe.
        assert_eq!(c.on_overload(), 8);
        // Held: saturated samples do not probe at once.
        for _ in 0..2 * HOLD_MIN {
            assert_eq!(c.on_sample(s(100.0, true)), 8);
        }
        assert_eq!(c.on_sample(s(100.0, true)), 16);
        assert_eq!(Control::new(3, 64).on_overload(), 2, "never below 2");
        assert_eq!(Control::new(1, 64).on_overload(), 1);
    }

    #[test]
    fn an_overload_met_by_many_gets_at_once_halves_the_number_once() {
        let slots = Slots::new(16, 64, false);
        for _ in 0..5 {
            slots.overloaded();
        }
        assert_eq!(slots.limit(), 8);
        assert_eq!(slots.background_limit(), 4);
        std::thread::sleep(PERIOD + Duration::from_millis(20));
        slots.overloaded();
        assert_eq!(slots.limit(), 4, "a later overload halves again");
    }

    #[tokio::test]
    async fn shrinking_takes_back_held_permits_as_they_return() {
        let r = Resizable::new(4);
        let (waited, waiting) = (AtomicBool::new(false), AtomicUsize::new(0));
        let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| r.acquire(&waited, &waiting))).await;
        assert!(!waited.load(Ordering::Acquire));
        assert_eq!(r.in_use(), 3);
        r.resize(1);
        assert_eq!(r.sem.available_permits(), 0);
        drop(held);
        assert_eq!(r.sem.available_permits(), 1, "two returned permits paid the debt");
        assert_eq!(r.in_use(), 0);
        let a = r.acquire(&waited, &waiting).await.unwrap();
        assert!(r.sem.try_acquire().is_err());
        // Growing while a permit is owed forgives the debt instead of adding permits.
        r.resize(0);
        r.resize(2);
        drop(a);
        assert_eq!(r.sem.available_permits(), 2);
        assert_eq!(r.in_use(), 0);
        // A fetch that finds no slot marks the sample as saturated.
        let _x = r.acquire(&waited, &waiting).await.unwrap();
        let _y = r.acquire(&waited, &waiting).await.unwrap();
        assert!(!waited.load(Ordering::Acquire));
        let third = tokio::time::timeout(Duration::from_millis(20), r.acquire(&waited, &waiting)).await;
        assert!(third.is_err());
        assert!(waited.load(Ordering::Acquire));
        assert_eq!(
            waiting.load(Ordering::Acquire),
            0,
            "a cancelled wait is no longer counted"
        );
    }
}

//! What each user's namespaces cost the mounts source, against the share of the daemon's
//! time one user may take (`[sources.mounts] user_cpu_percent`).
//!
//! Everything the daemon does for a namespace — reading its fanotify group and
//! describing the mounts it names, a mountinfo reread, a resync, the hub's fan-out of
//! the records that came of it (the hub publishes between two polls of the source, on
//! the same thread), and the bus's sending of each record to each subscriber (building
//! the signal and writing it, on the subscriber's delivery task, told through
//! `EventSource::delivered` and charged at the reader's next message) — is timed in the
//! thread's CPU time and charged to every user other than root watching the namespace. Each user has a bucket of CPU time that
//! refills at `user_cpu_percent` of a second per second, up to one second's worth; a
//! charge that empties it throttles the user until it is full enough again. A
//! throttled user's namespaces are not read, and their fds are taken out of the
//! runtime's epoll set (a registered fd wakes the daemon on each kernel event, read or
//! not: 85,765 wakeups in 9 s of one user's storm, uncharged, before this): the kernel
//! keeps their events queued (and drops them past its queue's 16,384), and when the user may run again each namespace
//! is resynced — its queue drained unread, its mounts listed again, the hub's table
//! brought up to date and its watchers told `Lost(kernel-overflow)`, on a blocking
//! thread while the other namespaces are read (see `job`). The resync is charged too,
//! so a user who churns without pause is resynced about as often as the share pays for
//! one, and no more. Other users' namespaces are read meanwhile as before.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the buckets refill over: a user may spend one such period's share at once.
const PERIOD: Duration = Duration::from_secs(1);

/// The default share of one CPU that one user's namespaces may take, in percent.
pub const DEFAULT_USER_CPU_PERCENT: u8 = 10;

/// The mounts source's counters, for `watchqctl status`.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Times a user went over their share.
    pub(super) throttled: AtomicU64,
    /// Kernel events read unparsed by a resync instead of one by one.
    pub(super) coalesced: AtomicU64,
    /// Namespaces listed again after a throttle or a kernel queue overflow.
    pub(super) resyncs: AtomicU64,
    /// Whole-mountinfo rereads (for remounts; with fanotify, coalesced and paced).
    pub(super) rereads: AtomicU64,
    /// Their CPU time, in microseconds: what remounts cost the daemon, apart from the
    /// per-change work of attaches and detaches.
    pub(super) reread_us: AtomicU64,
}

impl Counters {
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a mountinfo reread and the CPU time it took.
    pub(super) fn reread(&self, cost: Duration) {
        Self::add(&self.rereads, 1);
        Self::add(
            &self.reread_us,
            u64::try_from(cost.as_micros()).unwrap_or(u64::MAX),
        );
    }

    pub(super) fn list(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("users-throttled", self.throttled.load(Ordering::Relaxed)),
            ("events-coalesced", self.coalesced.load(Ordering::Relaxed)),
            ("namespaces-resynced", self.resyncs.load(Ordering::Relaxed)),
            ("mountinfo-rereads", self.rereads.load(Ordering::Relaxed)),
            (
                "mountinfo-reread-us",
                self.reread_us.load(Ordering::Relaxed),
            ),
        ]
    }
}

struct Bucket {
    /// CPU seconds left; below zero, owed.
    balance: f64,
    at: Instant,
}

/// Every user's bucket.
pub(super) struct Budget {
    /// CPU seconds per second one user may take.
    rate: f64,
    /// The same, as configured.
    percent: u8,
    buckets: HashMap<u32, Bucket>,
}

impl Budget {
    pub(super) fn new(user_cpu_percent: u8) -> Budget {
        Budget {
            rate: f64::from(user_cpu_percent) / 100.0,
            percent: user_cpu_percent,
            buckets: HashMap::new(),
        }
    }

    /// Changes every user's share (a reload): buckets keep their balance, capped at the
    /// new share's fill at their next charge.
    pub(super) fn set_share(&mut self, user_cpu_percent: u8) {
        self.rate = f64::from(user_cpu_percent) / 100.0;
        self.percent = user_cpu_percent;
        tracing::info!(
            source = super::NAME,
            "each user's mount namespaces may now take {user_cpu_percent}% of one CPU"
        );
    }

    /// Charges `cost` to `uid` at `now`; returns until when the user is over their
    /// share, if this charge put (or kept) them there.
    pub(super) fn charge(&mut self, uid: u32, cost: Duration, now: Instant) -> Option<Instant> {
        let full = self.rate * PERIOD.as_secs_f64();
        let bucket = self.buckets.entry(uid).or_insert(Bucket {
            balance: full,
            at: now,
        });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate;
        bucket.balance = (bucket.balance + refill).min(full) - cost.as_secs_f64();
        bucket.at = now;
        (bucket.balance < 0.0).then(|| now + Duration::from_secs_f64(-bucket.balance / self.rate))
    }

    /// One user's share of one CPU, in percent.
    pub(super) fn percent(&self) -> u8 {
        self.percent
    }

    /// Until when `uid` is over their share at `now`, if they are (charging nothing).
    pub(super) fn owed_until(&self, uid: u32, now: Instant) -> Option<Instant> {
        let bucket = self.buckets.get(&uid)?;
        let balance =
            bucket.balance + now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate;
        (balance < 0.0).then(|| now + Duration::from_secs_f64(-balance / self.rate))
    }

    /// Forgets users whose bucket is full again, so that the map holds only users who
    /// spent something lately.
    pub(super) fn forget_idle(&mut self, now: Instant) {
        let (rate, full) = (self.rate, self.rate * PERIOD.as_secs_f64());
        self.buckets.retain(|_, b| {
            b.balance + now.saturating_duration_since(b.at).as_secs_f64() * rate < full
        });
    }
}

pub(super) use crate::sys::clock::thread_cpu;

#[cfg(test)]
mod tests {
    use super::*;

    /// A user may spend their share at once, is throttled past it for as long as the
    /// refill takes to pay the debt, and other users' buckets are their own.
    #[test]
    fn a_user_past_their_share_waits_for_the_refill() {
        let mut budget = Budget::new(10);
        let start = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(budget.charge(1000, ms(100), start), None);
        let until = budget.charge(1000, ms(10), start).expect("over the share");
        // 10 ms owed at 100 ms per second: 100 ms.
        assert_eq!(until - start, ms(100));
        assert_eq!(budget.charge(1001, ms(50), start), None);
        // Half a second later the debt is paid and 40 ms are back.
        assert_eq!(budget.charge(1000, ms(40), start + ms(500)), None);
        assert!(budget.charge(1000, ms(1), start + ms(500)).is_some());
        // Looking charges nothing: 1 ms owed is paid in 10 ms.
        assert_eq!(
            budget.owed_until(1000, start + ms(500)),
            Some(start + ms(510))
        );
        assert_eq!(budget.owed_until(1000, start + ms(510)), None);
        assert_eq!(budget.owed_until(1001, start), None);
        budget.forget_idle(start + ms(10_000));
        assert!(budget.buckets.is_empty());
    }

    /// A reload's new share applies from the next charge: a larger one refills faster
    /// and holds more, a smaller one caps what a user had in hand.
    #[test]
    fn a_new_share_applies_from_the_next_charge() {
        let mut budget = Budget::new(10);
        let start = Instant::now();
        let ms = Duration::from_millis;
        let until = budget.charge(1000, ms(150), start).expect("over 10%");
        assert_eq!(until - start, ms(500));
        budget.set_share(50);
        // The 50 ms debt is paid in 100 ms at 50%, and a second later 500 ms are there.
        assert_eq!(budget.charge(1000, ms(0), start + ms(100)), None);
        assert_eq!(budget.charge(1000, ms(500), start + ms(1100)), None);
        assert!(budget.charge(1000, ms(1), start + ms(1100)).is_some());
        budget.set_share(1);
        // At 1% a second's worth is 10 ms, whatever the bucket held at 50%.
        assert!(budget.charge(1000, ms(11), start + ms(10_000)).is_some());
    }
}

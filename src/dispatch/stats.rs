//! What the hub counts for the metrics (`[metrics]`, `Manager.Metrics`): per source,
//! the events handed to subscribers and those lost, and the subscriptions and watches
//! held now. Counted under the hub's lock where the events pass anyway, so counting
//! costs an addition; read by [`Hub::stats`].
//!
//! Whoever writes the metrics waits on [`Hub::stats_changed`] instead of polling: it is
//! woken when a counter or gauge may have changed, never while nothing happens. Its
//! generation number also tells whoever keeps a rendered text whether that text is still
//! current, so that reading the metrics costs a copy while nothing changed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::source::Availability;

use super::lifecycle::SourceSlot;
use super::{Delivery, Hub};

/// A source's counters, kept in its slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) delivered: u64,
    pub(super) lost_queue_full: u64,
    pub(super) lost_policy_changed: u64,
    pub(super) kernel_overflows: u64,
}

/// One source's figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceStats {
    pub name: &'static str,
    pub availability: Availability,
    /// Events handed to subscribers' connections.
    pub delivered: u64,
    /// Events dropped because a subscriber's queue was full (each was reported to it in
    /// a `Lost` signal).
    pub lost_queue_full: u64,
    /// Events withheld from subscribers because policy no longer allowed the watch that
    /// matched them (each reported in a `Lost` signal, reason `policy-changed`).
    pub lost_policy_changed: u64,
    /// Times the kernel dropped an unknown number of the source's events.
    pub kernel_overflows: u64,
    /// Messages rejected at the edge as not sent by the kernel.
    pub forged_rejected: u64,
    /// Watches of the source held now.
    pub watches: usize,
}

/// Everything the hub counts, at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubStats {
    pub subscriptions: usize,
    pub sources: Vec<SourceStats>,
}

/// That a counter or gauge may have changed: a generation number that grows with every
/// change, and the wakeup of the one task that waits for changes (the metrics writer).
#[derive(Debug, Default)]
pub struct StatsChanged {
    generation: AtomicU64,
    notify: Notify,
}

impl StatsChanged {
    /// Says that a figure changed. Call it after the change, or under the lock the change
    /// is made under (what reads the figures takes that lock, so it sees the change).
    pub fn touch(&self) {
        // Release: whoever reads the new generation sees the counters written before.
        self.generation.fetch_add(1, Ordering::Release);
        self.notify.notify_one();
    }

    /// The number of changes so far: figures read after reading `n` are at least as new
    /// as change `n`.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Waits for a change since the last wait (one stored permit: changes made while
    /// nobody waited wake the next wait at once).
    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}

impl Hub {
    /// The hub's counters and gauges now.
    pub fn stats(&self) -> HubStats {
        let state = self.lock();
        let sources = self
            .registry
            .all()
            .iter()
            .zip(&state.sources)
            .map(|(source, slot)| SourceStats {
                name: source.name(),
                availability: source.availability(&slot.availability),
                delivered: slot.counts.delivered,
                lost_queue_full: slot.counts.lost_queue_full,
                lost_policy_changed: slot.counts.lost_policy_changed,
                kernel_overflows: slot.counts.kernel_overflows,
                forged_rejected: source.forged_rejected(),
                watches: slot.watches,
            })
            .collect();
        HubStats {
            subscriptions: state.subscriptions.len(),
            sources,
        }
    }

    /// Touched whenever what [`Hub::stats`] returns may have changed; also by the
    /// daemon's consumers when their own counters change.
    pub fn stats_changed(&self) -> Arc<StatsChanged> {
        Arc::clone(&self.changed)
    }

    pub(super) fn touch_stats(&self) {
        self.changed.touch();
    }

    /// Counts deliveries taken from an outbox to be sent.
    pub(super) fn count_taken(&self, slots: &mut [SourceSlot], taken: &[Delivery]) {
        let mut any = false;
        for delivery in taken {
            if let Delivery::Event { record, .. } = delivery {
                if let Some(index) = self.registry.index_of(record.source) {
                    slots[index].counts.delivered += 1;
                    any = true;
                }
            }
        }
        if any {
            self.touch_stats();
        }
    }
}

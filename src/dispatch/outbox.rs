//! Outboxes: a subscription's bounded queue of deliveries, with the kernel queue's loss
//! semantics (a full outbox drops newer events and counts them into one `Lost` entry
//! covering exactly the sequence numbers dropped), and the shared [`Published`] record.

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;

use crate::event::Record;
use crate::signal::EncodedSignal;

/// Why a `Lost` entry was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// The daemon dropped `count` events because the subscriber did not read them.
    QueueFull,
    /// The kernel dropped an unknown number of the source's events.
    KernelOverflow,
    /// Events queued for a watch that policy no longer allows, withheld when it ended
    /// (`count` exact).
    PolicyChanged,
}

impl LossReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::QueueFull => "queue-full",
            LossReason::KernelOverflow => "kernel-overflow",
            LossReason::PolicyChanged => "policy-changed",
        }
    }
}

/// A record as every subscription that receives it shares it.
#[derive(Debug)]
pub struct Published {
    record: Record,
    /// The record's signal, encoded by the first delivery that needs it, so that fanning
    /// a record out to many subscribers costs one encoding.
    encoded: OnceLock<Option<EncodedSignal>>,
}

impl Published {
    pub fn new(record: Record) -> Self {
        Published {
            record,
            encoded: OnceLock::new(),
        }
    }

    /// The encoding `encode` makes of the record, made once; `None` when it has none.
    pub fn encoded(
        &self,
        encode: impl FnOnce(&Record) -> Option<EncodedSignal>,
    ) -> Option<&EncodedSignal> {
        self.encoded.get_or_init(|| encode(&self.record)).as_ref()
    }
}

impl Deref for Published {
    type Target = Record;

    fn deref(&self) -> &Record {
        &self.record
    }
}

/// One signal waiting to go to a subscriber.
#[derive(Clone, Debug)]
pub enum Delivery {
    Event {
        seq: u64,
        tag: u64,
        record: Arc<Published>,
    },
    /// Covers sequence numbers `seq .. seq + count` (one number when `count` is 0).
    Lost {
        seq: u64,
        count: u64,
        source: &'static str,
        reason: LossReason,
    },
    WatchRemoved {
        seq: u64,
        tag: u64,
        reason: String,
    },
}

pub(super) struct Outbox {
    pub(super) entries: VecDeque<Delivery>,
    pub(super) depth: usize,
    queued_events: usize,
    pub(super) next_seq: u64,
    pub(super) notify: Arc<Notify>,
}

impl Outbox {
    pub(super) fn new(depth: usize) -> Self {
        Outbox {
            entries: VecDeque::new(),
            depth,
            queued_events: 0,
            next_seq: 1,
            notify: Arc::new(Notify::new()),
        }
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Queues an event; returns `false` when the outbox was full and the event was
    /// counted as lost instead.
    pub(super) fn push_event(&mut self, tag: u64, record: Arc<Published>) -> bool {
        let seq = self.take_seq();
        let queued = self.queued_events < self.depth;
        if queued {
            self.queued_events += 1;
            self.entries.push_back(Delivery::Event { seq, tag, record });
        } else if let Some(Delivery::Lost {
            count,
            reason: LossReason::QueueFull,
            ..
        }) = self.entries.back_mut()
        {
            *count += 1;
        } else {
            // Meta entries do not count against the depth; there is at most one per
            // event that was queued before it, so the outbox stays bounded.
            self.entries.push_back(Delivery::Lost {
                seq,
                count: 1,
                source: record.source,
                reason: LossReason::QueueFull,
            });
        }
        self.notify.notify_one();
        queued
    }

    pub(super) fn push_meta(&mut self, make: impl FnOnce(u64) -> Delivery) {
        let seq = self.take_seq();
        self.entries.push_back(make(seq));
        self.notify.notify_one();
    }

    /// Withholds every queued event of watch `tag`, which policy no longer allows: each
    /// becomes a `Lost` (`policy-changed`) with its own sequence number, runs of them one
    /// entry, so the numbering stays contiguous and nothing of the watch is sent. Returns
    /// how many events were withheld.
    pub(super) fn withhold(&mut self, tag: u64) -> u64 {
        let mut withheld = 0;
        for entry in std::mem::take(&mut self.entries) {
            let entry = match entry {
                Delivery::Event {
                    seq,
                    tag: of,
                    record,
                } if of == tag => {
                    self.queued_events -= 1;
                    withheld += 1;
                    Delivery::Lost {
                        seq,
                        count: 1,
                        source: record.source,
                        reason: LossReason::PolicyChanged,
                    }
                }
                other => other,
            };
            if let (
                Some(Delivery::Lost {
                    seq: run_seq,
                    count: run,
                    source: run_source,
                    reason: LossReason::PolicyChanged,
                }),
                Delivery::Lost {
                    seq,
                    source,
                    reason: LossReason::PolicyChanged,
                    ..
                },
            ) = (self.entries.back_mut(), &entry)
            {
                if *run_seq + *run == *seq && run_source == source {
                    *run += 1;
                    continue;
                }
            }
            self.entries.push_back(entry);
        }
        withheld
    }

    pub(super) fn pop(&mut self, max: usize, out: &mut Vec<Delivery>) {
        while out.len() < max {
            let Some(entry) = self.entries.pop_front() else {
                break;
            };
            if matches!(entry, Delivery::Event { .. }) {
                self.queued_events -= 1;
            }
            out.push(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::testing::{record, seqs};

    #[test]
    fn full_outbox_counts_exactly_what_it_drops_in_order() {
        let mut outbox = Outbox::new(3);
        for _ in 0..10 {
            outbox.push_event(1, record(0));
        }
        let mut out = Vec::new();
        outbox.pop(usize::MAX, &mut out);
        // Three events kept, then one Lost covering seq 4..=10.
        assert_eq!(seqs(&out), vec![(1, 1), (2, 1), (3, 1), (4, 7)]);

        // Room again: later events follow the loss, no gap.
        outbox.push_event(1, record(0));
        out.clear();
        outbox.pop(usize::MAX, &mut out);
        assert_eq!(seqs(&out), vec![(11, 1)]);
    }

    /// Withheld events keep their numbers as `Lost` entries (runs merged), the other
    /// watches' events stay, and the queue's room is given back.
    #[test]
    fn withheld_events_become_exact_losses_in_place() {
        let mut outbox = Outbox::new(8);
        for tag in [1, 2, 2, 1, 2] {
            outbox.push_event(tag, record(0));
        }
        assert_eq!(outbox.withhold(2), 3);
        let mut out = Vec::new();
        outbox.pop(usize::MAX, &mut out);
        assert_eq!(seqs(&out), vec![(1, 1), (2, 2), (4, 1), (5, 1)]);
        assert!(matches!(out[0], Delivery::Event { tag: 1, .. }));
        assert!(matches!(
            out[1],
            Delivery::Lost {
                reason: LossReason::PolicyChanged,
                ..
            }
        ));
        assert!(matches!(out[2], Delivery::Event { tag: 1, .. }));
        assert!(matches!(
            out[3],
            Delivery::Lost {
                reason: LossReason::PolicyChanged,
                ..
            }
        ));
        assert_eq!(outbox.queued_events, 0);
    }

    #[test]
    fn losses_interleave_with_events_that_fit() {
        let mut outbox = Outbox::new(1);
        outbox.push_event(1, record(0)); // 1 queued
        outbox.push_event(1, record(0)); // 2 lost
        let mut out = Vec::new();
        outbox.pop(1, &mut out); // frees room
        outbox.push_event(1, record(0)); // 3 queued after the loss
        outbox.push_event(1, record(0)); // 4 lost
        outbox.pop(usize::MAX, &mut out);
        assert_eq!(seqs(&out), vec![(1, 1), (2, 1), (3, 1), (4, 1)]);
        assert!(matches!(out[1], Delivery::Lost { .. }));
        assert!(matches!(out[3], Delivery::Lost { .. }));
        assert!(outbox.entries.len() <= outbox.depth + 1);
    }
}

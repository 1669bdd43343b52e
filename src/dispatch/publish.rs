//! Fan-out: one source message, under one lock, to its object table, the consumers that
//! want it and every subscription that watches it and may see it.

use std::ops::ControlFlow;
use std::sync::Arc;

use crate::event::SourceMsg;
use crate::policy;

use super::tables::{relist, upsert_listed};
use super::{apply_to_table, Consumed, Delivery, Hub, LossReason, Published};

impl Hub {
    /// Fans one source message out to every subscription that watches it and may see it.
    /// Breaks when the message ended the source's last watch, which stops the source.
    pub fn publish(&self, index: usize, msg: SourceMsg) -> ControlFlow<()> {
        if let SourceMsg::Counted = msg {
            // The source changed its own counter before yielding this.
            self.touch_stats();
            return ControlFlow::Continue(());
        }
        let mut state = self.lock();
        let state = &mut *state;
        // Whatever the message, a counter or gauge may change.
        self.touch_stats();
        let slot = &mut state.sources[index];
        slot.generation += 1;
        let generation = slot.generation;
        match msg {
            SourceMsg::Record(mut record) => {
                if let Some(table) = &mut slot.table {
                    apply_to_table(table, &mut record);
                }
                let record = Arc::new(Published::new(record));
                for consumer in &state.consumers {
                    if consumer
                        .interests
                        .iter()
                        .any(|(source, matcher)| *source == index && matcher.matches(&record))
                    {
                        consumer.offer(Consumed::Event {
                            seq: generation,
                            record: Arc::clone(&record),
                        });
                    }
                }
                // Watches that name the record's key exactly are looked up by it; only
                // the others are visited one by one.
                let key = self.registry.all()[index].index_key(&record);
                let mut lost = 0;
                for sub in state.subscriptions.values_mut() {
                    if !sub.filter.passes(record.source, record.subtype) {
                        continue;
                    }
                    for watch in sub.watches.candidates(index, key) {
                        // Event-time visibility: for every event and every watch,
                        // whatever was decided when the watch was set.
                        if policy::may_see(
                            &sub.identity,
                            &watch.grant,
                            record.source,
                            record.audience,
                        ) && watch.matcher.matches(&record)
                            && !sub.outbox.push_event(watch.tag, Arc::clone(&record))
                        {
                            lost += 1;
                        }
                    }
                }
                state.sources[index].counts.lost_queue_full += lost;
            }
            SourceMsg::Overflow { objects } => {
                if let Some(table) = &mut slot.table {
                    let old = std::mem::take(table);
                    relist(table, &old, objects);
                }
                slot.counts.kernel_overflows += 1;
                let source = self.registry.all()[index].name();
                state.tell_consumers_missed(index, source, "kernel-overflow");
                for sub in state.subscriptions.values_mut() {
                    if sub.watches.iter().any(|w| w.source == index) {
                        sub.outbox.push_meta(|seq| Delivery::Lost {
                            seq,
                            count: 0,
                            source,
                            reason: LossReason::KernelOverflow,
                        });
                    }
                }
            }
            SourceMsg::Resync {
                object,
                upserted,
                removed,
            } => {
                if let Some(table) = &mut slot.table {
                    for id in &removed {
                        table.remove(id);
                    }
                    upsert_listed(table, upserted);
                }
                let source = self.registry.all()[index].name();
                state.tell_consumers_missed(index, source, "kernel-overflow");
                for sub in state.subscriptions.values_mut() {
                    if sub.watches.iter().any(|w| {
                        w.source == index && w.matcher.watched_object() == Some(object.as_str())
                    }) {
                        sub.outbox.push_meta(|seq| Delivery::Lost {
                            seq,
                            count: 0,
                            source,
                            reason: LossReason::KernelOverflow,
                        });
                    }
                }
            }
            SourceMsg::Replace { prefix, objects } => {
                if let Some(table) = &mut slot.table {
                    table.retain(|id, _| !id.starts_with(&prefix));
                    table.extend(objects.into_iter().map(|o| (o.id.clone(), o)));
                }
            }
            // Handled above, without the lock.
            SourceMsg::Counted => {}
            SourceMsg::WatchedObjectGone { object, reason } => {
                let mut ended = 0;
                for sub in state.subscriptions.values_mut() {
                    let gone = sub.watches.take_where(|w| {
                        w.source == index && w.matcher.watched_object() == Some(object.as_str())
                    });
                    for watch in gone {
                        ended += 1;
                        sub.outbox.push_meta(|seq| Delivery::WatchRemoved {
                            seq,
                            tag: watch.tag,
                            reason: reason.clone(),
                        });
                    }
                }
                let slot = &mut state.sources[index];
                slot.watches = slot.watches.saturating_sub(ended);
                if ended > 0 && slot.watches == 0 && slot.consumers == 0 {
                    slot.table = None;
                    slot.pump = None;
                    tracing::info!(
                        source = self.registry.all()[index].name(),
                        "source stopped: its last watched object is gone"
                    );
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    }
}

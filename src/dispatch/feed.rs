//! The daemon's own consumers' feed (unit rules, journal records): each holds the
//! sources it names open, sees every record of them without policy, and gets them
//! through a bounded queue the hub never waits on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::error::Error;
use crate::source::{Availability, WatchMatcher};

use super::{finish_stopping, Hub, Published, State};

impl State {
    /// Tells every consumer of source `index` that some of its events were missed.
    pub(super) fn tell_consumers_missed(
        &self,
        index: usize,
        source: &'static str,
        reason: &'static str,
    ) {
        for consumer in &self.consumers {
            if consumer.interests.iter().any(|(s, _)| *s == index) {
                consumer.offer(Consumed::Missed { source, reason });
            }
        }
    }
}

/// What an internal consumer receives.
#[derive(Debug)]
pub enum Consumed {
    /// A record. `seq` is its source's sequence number (the one `Manager.Snapshot`
    /// reports), so that consumers can tell records apart and in order.
    Event { seq: u64, record: Arc<Published> },
    /// Events of `source` were missed, an unknown number: `reason` is `kernel-overflow`
    /// (the kernel dropped them; the source has resynchronised) or `source-restarted`
    /// (the source stopped unexpectedly and was opened again).
    Missed {
        source: &'static str,
        reason: &'static str,
    },
}

/// An internal consumer's end of its queue.
pub struct ConsumerFeed {
    /// Its slot's id, for [`Hub::consume`] and [`Hub::remove_consumer`].
    id: u64,
    pub name: &'static str,
    pub receiver: mpsc::Receiver<Consumed>,
    dropped: Arc<AtomicU64>,
}

impl ConsumerFeed {
    /// What [`Hub::remove_consumer`] takes.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How many entries the hub dropped because the queue was full, since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }
}

pub(super) struct ConsumerSlot {
    id: u64,
    sender: mpsc::Sender<Consumed>,
    dropped: Arc<AtomicU64>,
    /// The sources it consumes and which of their records it wants.
    pub(super) interests: Vec<(usize, Box<dyn WatchMatcher>)>,
}

impl ConsumerSlot {
    pub(super) fn offer(&self, entry: Consumed) {
        // Never wait: a consumer that falls behind loses entries, counted.
        if self.sender.try_send(entry).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Hub {
    /// Registers an internal consumer with a queue of `capacity` entries. It receives
    /// nothing until it names sources with [`Hub::consume`].
    pub fn add_consumer(&self, name: &'static str, capacity: usize) -> ConsumerFeed {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let mut state = self.lock();
        state.next_consumer += 1;
        let id = state.next_consumer;
        state.consumers.push(ConsumerSlot {
            id,
            sender,
            dropped: Arc::clone(&dropped),
            interests: Vec::new(),
        });
        ConsumerFeed {
            id,
            name,
            receiver,
            dropped,
        }
    }

    /// Makes a consumer receive the records of `source_name` that `matcher` accepts, with
    /// no policy check, and starts the source if it does not run. The source then runs
    /// for the daemon's life, whether or not anyone subscribes. Only sources that report
    /// on their own ([`crate::source::EventSource::system_wide`]) can be consumed.
    pub fn consume(
        self: &Arc<Self>,
        feed: &ConsumerFeed,
        source_name: &str,
        matcher: Box<dyn WatchMatcher>,
    ) -> Result<(), Error> {
        let index = self.source_index(source_name)?;
        if !self.registry.all()[index].system_wide() {
            return Err(Error::NotSupported(format!(
                "the {source_name} source reports only what a subscriber's watch names"
            )));
        }
        let mut state = self.lock();
        if let Availability::Unavailable(reason) = &state.sources[index].availability {
            return Err(Error::NotSupported(format!(
                "{source_name} events are not available: {reason}"
            )));
        }
        let Some(slot) = state.consumers.iter().position(|c| c.id == feed.id) else {
            return Err(Error::NotFound(format!(
                "the {} consumer was removed",
                feed.name
            )));
        };
        self.ensure_running(&mut state, index)?;
        state.sources[index].consumers += 1;
        state.consumers[slot].interests.push((index, matcher));
        Ok(())
    }

    /// Removes a consumer (a reload replaced it): its queue closes, and each source it
    /// held open is stopped if nothing else holds it. A reload registers the new
    /// consumers first, so a source both need keeps running without a gap.
    pub async fn remove_consumer(&self, id: u64) {
        let stopped: Vec<_> = {
            let mut state = self.lock();
            let Some(position) = state.consumers.iter().position(|c| c.id == id) else {
                return;
            };
            let slot = state.consumers.remove(position);
            slot.interests
                .iter()
                .filter_map(|(index, _)| {
                    let source = &mut state.sources[*index];
                    source.consumers = source.consumers.saturating_sub(1);
                    self.stop_if_unused(&mut state, *index)
                })
                .collect()
        };
        for pump in stopped {
            finish_stopping(Some(pump)).await;
        }
    }
}

//! Source lifecycle: a source is opened with its first watch or consumer and stopped
//! (its fds closed) with its last; one that stops under the daemon's own consumers is
//! reopened with a growing delay.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::event::Object;
use crate::source::Availability;

use super::stats::Counts;
use super::{Delivery, Hub, State};

pub(super) struct SourceSlot {
    pub(super) availability: Availability,
    pub(super) watches: usize,
    /// Internal consumers holding the source open (see [`Hub::consume`]).
    pub(super) consumers: usize,
    /// When the running source was opened.
    pub(super) opened: Option<Instant>,
    /// The wait before the next attempt to reopen it for consumers: it grows while the
    /// source keeps failing, so a source that dies at once is not reopened in a loop.
    pub(super) reopen_delay: Duration,
    pub(super) pump: Option<JoinHandle<()>>,
    /// Present while the source runs: every object it reported, by id.
    pub(super) table: Option<BTreeMap<String, Object>>,
    /// Records published since the daemon started; the Manager's snapshot sequence.
    pub(super) generation: u64,
    /// What the metrics report of it ([`Hub::stats`]).
    pub(super) counts: Counts,
}

/// The wait before the first attempt to reopen a source that stopped under the daemon's
/// own consumers; it doubles after each failed attempt, up to [`REOPEN_MAX_DELAY`].
pub(super) const REOPEN_FIRST_DELAY: Duration = Duration::from_secs(1);
pub(super) const REOPEN_MAX_DELAY: Duration = Duration::from_secs(60);

impl Hub {
    /// Starts a source that does not run: opens it, seeds its table and spawns its pump.
    pub(super) fn ensure_running(
        self: &Arc<Self>,
        state: &mut State,
        index: usize,
    ) -> Result<(), Error> {
        let slot = &mut state.sources[index];
        if slot.pump.is_some() {
            return Ok(());
        }
        let source = &self.registry.all()[index];
        let source_name = source.name();
        let stream = source.open().map_err(|e| {
            Error::Unavailable(format!("cannot start the {source_name} source: {e}"))
        })?;
        // Seed the table after the kernel interface is open, so nothing falls between
        // the scan and the first event; events already reflected in the scan are
        // idempotent upserts and removals.
        let objects = source.scan().unwrap_or_else(|e| {
            tracing::warn!(source = source_name, "initial scan failed: {e}");
            Vec::new()
        });
        slot.table = Some(objects.into_iter().map(|o| (o.id.clone(), o)).collect());
        let hub = Arc::clone(self);
        slot.pump = Some(tokio::spawn(async move { hub.pump(index, stream).await }));
        slot.opened = Some(Instant::now());
        tracing::info!(source = source_name, "source started");
        Ok(())
    }

    /// Drops one watch's hold on a source. When it was the last, the source's pump is
    /// aborted and returned so that the caller can wait, outside the lock, until its fds
    /// are closed.
    pub(super) fn release_source(&self, state: &mut State, index: usize) -> Option<JoinHandle<()>> {
        let slot = &mut state.sources[index];
        slot.watches = slot.watches.saturating_sub(1);
        self.touch_stats();
        self.stop_if_unused(state, index)
    }

    /// Stops a source that no watch and no consumer holds; returns its pump as
    /// [`Hub::release_source`] does.
    pub(super) fn stop_if_unused(&self, state: &mut State, index: usize) -> Option<JoinHandle<()>> {
        let slot = &mut state.sources[index];
        if slot.watches > 0 || slot.consumers > 0 {
            return None;
        }
        slot.table = None;
        let pump = slot.pump.take()?;
        pump.abort();
        tracing::info!(
            source = self.registry.all()[index].name(),
            "source stopped: nobody watches it"
        );
        Some(pump)
    }

    async fn pump(self: Arc<Self>, index: usize, mut stream: crate::source::SourceStream) {
        while let Some(msg) = stream.next().await {
            if self.publish(index, msg).is_break() {
                // The last watch ended with its object; the stream (and its fds) is
                // dropped on return, and the slot already shows the source stopped.
                return;
            }
        }
        if self.source_failed(index) > 0 {
            self.reopen_for_consumers(index).await;
        }
    }

    /// Ends the watches of a source whose stream ended unexpectedly, each with
    /// `WatchRemoved`, and marks it stopped. Returns how many of the daemon's own
    /// consumers held it open.
    fn source_failed(&self, index: usize) -> usize {
        let name = self.registry.all()[index].name();
        let mut state = self.lock();
        // Its watches end: the gauge changes (touched under the lock it changes under).
        self.touch_stats();
        let consumers = state.sources[index].consumers;
        tracing::error!(
            source = name,
            consumers,
            "source {name} stopped unexpectedly; removing its watches (the next watch restarts it)"
        );
        for sub in state.subscriptions.values_mut() {
            for watch in sub.watches.take_where(|w| w.source == index) {
                sub.outbox.push_meta(|seq| Delivery::WatchRemoved {
                    seq,
                    tag: watch.tag,
                    reason: format!("source-failed: the {name} source stopped"),
                });
            }
        }
        let slot = &mut state.sources[index];
        slot.watches = 0;
        slot.pump = None;
        slot.table = None;
        if slot
            .opened
            .take()
            .is_some_and(|opened| opened.elapsed() >= REOPEN_MAX_DELAY)
        {
            slot.reopen_delay = REOPEN_FIRST_DELAY;
        }
        consumers
    }

    /// Reopens a source that stopped under the daemon's own consumers (unit rules,
    /// journal records), which no subscriber would restart, retrying with a growing
    /// delay for as long as it fails. The consumers learn that events were missed.
    async fn reopen_for_consumers(self: Arc<Self>, index: usize) {
        let name = self.registry.all()[index].name();
        loop {
            let delay = {
                let slot = &mut self.lock().sources[index];
                let delay = slot.reopen_delay;
                slot.reopen_delay = (delay * 2).min(REOPEN_MAX_DELAY);
                delay
            };
            tokio::time::sleep(delay).await;
            let mut state = self.lock();
            // A subscriber's watch may have reopened it meanwhile.
            let reopened = state.sources[index].pump.is_some();
            match self.ensure_running(&mut state, index) {
                Ok(()) => {
                    state.tell_consumers_missed(index, name, "source-restarted");
                    if !reopened {
                        tracing::info!(
                            source = name,
                            "source {name} reopened for the daemon's own consumers after {} s",
                            delay.as_secs()
                        );
                    }
                    return;
                }
                Err(e) => tracing::warn!(
                    source = name,
                    "{e}; the daemon's own consumers of {name} events retry in {} s",
                    state.sources[index].reopen_delay.as_secs()
                ),
            }
        }
    }
}

/// Waits until an aborted pump has dropped its stream, so that "nobody watches it" means
/// "no fd is open" by the time the caller answers.
pub(super) async fn finish_stopping(pump: Option<JoinHandle<()>>) {
    if let Some(pump) = pump {
        // The result is Cancelled or the pump's own end; both mean it is gone.
        let _ = pump.await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::dispatch::{Consumed, DeliveryConfig, Limits};
    use crate::event::{Attrs, Audience, Change, Record, SourceMsg};
    use crate::policy::Identity;
    use crate::source::{PlannedWatch, Registry, WatchMatcher, WatchSpec};

    /// A source whose first stream ends after one record, as a kernel interface that
    /// fails; later streams stay open after their record.
    #[derive(Default)]
    struct DyingSource {
        opens: AtomicU64,
    }

    impl crate::source::EventSource for DyingSource {
        fn name(&self) -> &'static str {
            "dying"
        }

        fn subtypes(&self) -> &'static [&'static str] {
            &["change"]
        }

        // Never encoded here: these tests stop at the hub.
        fn signal(&self) -> &'static crate::signal::SignalKind {
            &crate::source::devices::signal::KIND
        }

        fn system_wide(&self) -> bool {
            true
        }

        fn probe(&self) -> Availability {
            Availability::Available
        }

        fn parse_watch(&self, _: &WatchSpec, _: &Identity) -> Result<PlannedWatch, Error> {
            Err(Error::NotSupported("consumers only".into()))
        }

        fn scan(&self) -> std::io::Result<Vec<Object>> {
            Ok(Vec::new())
        }

        fn open(&self) -> std::io::Result<crate::source::SourceStream> {
            let open = self.opens.fetch_add(1, Ordering::SeqCst) + 1;
            let record = SourceMsg::Record(Record {
                source: "dying",
                subtype: 0,
                object_id: format!("opened {open} times"),
                change: Change::None,
                attributes: Attrs::new(),
                properties: Default::default(),
                audience: Audience::Everyone,
            });
            let first = futures_util::stream::iter([record]);
            Ok(if open == 1 {
                Box::pin(first)
            } else {
                Box::pin(first.chain(futures_util::stream::pending()))
            })
        }
    }

    #[derive(Debug)]
    struct All;

    impl WatchMatcher for All {
        fn matches(&self, _: &Record) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn a_source_that_dies_under_consumers_is_reopened_and_they_hear_of_the_gap() {
        let source = Arc::new(DyingSource::default());
        let registry = Registry::from_sources(vec![Arc::clone(&source) as _]);
        let hub = Hub::new(registry, DeliveryConfig::default(), Limits::default());
        let mut feed = hub.add_consumer("test", 16);
        hub.consume(&feed, "dying", Box::new(All)).expect("consume");

        let mut received = Vec::new();
        while received.len() < 3 {
            let entry = tokio::time::timeout(REOPEN_FIRST_DELAY * 10, feed.receiver.recv())
                .await
                .expect("an entry in time")
                .expect("the feed stays open");
            received.push(match entry {
                Consumed::Event { record, .. } => record.object_id.clone(),
                Consumed::Missed { source, reason } => format!("{source} missed: {reason}"),
            });
        }
        assert_eq!(
            received,
            [
                "opened 1 times",
                "dying missed: source-restarted",
                "opened 2 times"
            ]
        );
        assert_eq!(source.opens.load(Ordering::SeqCst), 2);
        assert_eq!(feed.take_dropped(), 0);
    }
}

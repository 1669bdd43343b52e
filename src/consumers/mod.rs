//! The daemon's own consumers of events, beside D-Bus subscribers: rules that start
//! systemd units (`[[units]]`, [`units`]), structured journal records (`[journal]`,
//! [`journal`]) and counters for Prometheus (`[metrics]`, [`metrics`]).
//!
//! Each is registered in the [`Hub`] with [`Hub::add_consumer`] and names its sources
//! with [`Hub::consume`]: those sources are opened at start and stay open for the
//! daemon's life, with or without subscribers. A consumer sees every record of its
//! sources (it acts as the system; no policy applies), through a bounded queue the hub
//! never waits on: when the consumer falls behind, records are dropped and counted, and
//! the consumer logs the count. A source that stops unexpectedly under a consumer is
//! reopened by the hub (after 1 s, then less and less often while it keeps failing), and
//! the consumer is told that events were missed. Failures are logged at a bounded rate
//! ([`crate::logging::LogLimit`]).

pub mod journal;
pub mod metrics;
pub mod unit_name;
pub mod units;

use std::borrow::Cow;
use std::sync::Arc;

use tokio::task::JoinSet;

#[cfg(doc)]
use crate::dispatch::ConsumerFeed;
use crate::dispatch::Hub;
use crate::event::{Attr, Record};

/// The running consumers, for the supervisor.
pub struct Consumers {
    tasks: JoinSet<&'static str>,
    /// Their registrations in the hub ([`ConsumerFeed::id`]).
    ids: Vec<u64>,
}

impl Consumers {
    /// Starts every consumer the configuration enables (`[[units]]` rules, `[journal]`,
    /// `[metrics]`) and opens its sources. A source that cannot be opened (unavailable on this kernel)
    /// is logged and leaves the rules or records that need it inactive; the daemon serves
    /// on.
    pub fn start(
        units: &[units::UnitRule],
        journal: &journal::JournalConfig,
        metrics: &metrics::MetricsConfig,
        counters: &Arc<metrics::Counters>,
        hub: &Arc<Hub>,
        conn: &zbus::Connection,
    ) -> Consumers {
        let mut tasks = JoinSet::new();
        let mut ids = Vec::new();
        let registry = hub.registry().clone();
        if !units.is_empty() {
            let rules: Arc<[units::UnitRule]> = units.into();
            let feed = hub.add_consumer("unit rules", units::QUEUE);
            ids.push(feed.id());
            let mut sources: Vec<&'static str> = rules.iter().map(|r| r.source).collect();
            sources.sort_unstable();
            sources.dedup();
            for source in sources {
                let subtypes = registry.get(source).map_or(&[][..], |s| s.subtypes());
                let matcher = units::RulesMatcher {
                    rules: Arc::clone(&rules),
                    source,
                    subtypes,
                };
                match hub.consume(&feed, source, Box::new(matcher)) {
                    Ok(()) => tracing::info!(
                        source,
                        "unit rules: {} rule(s) watch {source} events",
                        rules.iter().filter(|r| r.source == source).count()
                    ),
                    Err(e) => tracing::error!(
                        source,
                        "unit rules: {e}; the rules for {source} events are inactive"
                    ),
                }
            }
            let (registry, conn) = (registry.clone(), conn.clone());
            let (counters, changed) = (Arc::clone(counters), hub.stats_changed());
            tasks.spawn(async move {
                units::run(feed, rules, registry, conn, counters, changed).await;
                "unit rules"
            });
        }
        if journal.events {
            let feed = hub.add_consumer("journal records", journal::QUEUE);
            ids.push(feed.id());
            for source in journal::sources(journal, registry.catalogue()) {
                match hub.consume(&feed, source, Box::new(Everything)) {
                    Ok(()) => {
                        tracing::info!(source, "journal: writing a record per {source} event")
                    }
                    Err(e) => {
                        tracing::error!(source, "journal: {e}; no records for {source} events")
                    }
                }
            }
            let socket = journal.socket.clone();
            let registry = hub.registry().clone();
            tasks.spawn(async move {
                journal::run(feed, socket, registry).await;
                "journal records"
            });
        }
        if metrics.textfile {
            let feed = hub.add_consumer("metrics", metrics::QUEUE);
            ids.push(feed.id());
            let catalogue = registry.catalogue();
            for source in metrics::SOURCES {
                // Only sources that report on their own can be counted without a watch.
                if !catalogue.get(source).is_some_and(|s| s.system_wide) {
                    continue;
                }
                match hub.consume(&feed, source, Box::new(Everything)) {
                    Ok(()) => tracing::info!(source, "metrics: counting {source} events"),
                    Err(e) => {
                        tracing::error!(source, "metrics: {e}; {source} events are not counted")
                    }
                }
            }
            let (config, counters, hub) = (metrics.clone(), Arc::clone(counters), Arc::clone(hub));
            tasks.spawn(async move {
                // The writer lives as long as the counter: a reload that replaces the
                // consumers closes the counter's queue, and its writer goes with it (the
                // counters themselves are the daemon's, so the figures carry on).
                let writer = tokio::spawn(metrics::write_file(
                    config,
                    Arc::clone(&counters),
                    Arc::clone(&hub),
                ));
                metrics::count_records(feed, counters, hub).await;
                writer.abort();
                "metrics"
            });
        }
        Consumers { tasks, ids }
    }

    /// Replaces these consumers with those of a reloaded configuration. The new ones are
    /// registered (and their sources opened) before the old ones go, so a source both
    /// name runs on without a gap; a source only the old ones named is stopped unless a
    /// subscriber watches it. The old consumers' queues are closed, not their tasks
    /// aborted: each handles what was queued for it (an event in between may reach an
    /// old and a new rule; starting a unit twice is harmless) and ends, and no call on
    /// the bus connection is cut in the middle.
    pub async fn replace(
        &mut self,
        units: &[units::UnitRule],
        journal: &journal::JournalConfig,
        metrics: &metrics::MetricsConfig,
        counters: &Arc<metrics::Counters>,
        hub: &Arc<Hub>,
        conn: &zbus::Connection,
    ) {
        let new = Consumers::start(units, journal, metrics, counters, hub, conn);
        let mut old = std::mem::replace(self, new);
        for id in old.ids {
            hub.remove_consumer(id).await;
        }
        old.tasks.detach_all();
    }

    /// Waits until a consumer's task ends (which it never should), and names it; pends
    /// forever when none runs.
    pub async fn ended(&mut self) -> String {
        match self.tasks.join_next().await {
            Some(Ok(name)) => format!("the {name} consumer stopped"),
            Some(Err(e)) => format!("a consumer failed: {e}"),
            None => std::future::pending().await,
        }
    }
}

/// Takes every record of a source.
#[derive(Debug)]
struct Everything;

impl crate::source::WatchMatcher for Everything {
    fn matches(&self, _record: &Record) -> bool {
        true
    }
}

/// A record's kind: its subtype's name in the source's table.
pub fn kind_of(subtypes: &'static [&'static str], record: &Record) -> &'static str {
    subtypes
        .get(usize::from(record.subtype))
        .copied()
        .unwrap_or("unknown")
}

/// The value of `key` in an event, as text: its attribute of that name, or else its raw
/// property (uevent `KEY=value`) of that name.
pub fn event_value<'r>(record: &'r Record, key: &str) -> Option<Cow<'r, str>> {
    match record.attributes.get(key) {
        Some(attr) => Some(attr_text(attr)),
        None => record
            .properties
            .get(key)
            .map(|v| Cow::Borrowed(v.as_str())),
    }
}

/// An attribute as text: numbers in decimal, booleans as `true`/`false`.
pub fn attr_text(attr: &Attr) -> Cow<'_, str> {
    match attr {
        Attr::Str(s) => Cow::Borrowed(s),
        Attr::U64(v) => Cow::Owned(v.to_string()),
        Attr::U32(v) => Cow::Owned(v.to_string()),
        Attr::Bool(v) => Cow::Borrowed(if *v { "true" } else { "false" }),
    }
}

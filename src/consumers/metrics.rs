//! Counters for Prometheus (`[metrics] textfile = true`): a text file for
//! node_exporter's textfile collector, and the same text from `Manager.Metrics`.
//!
//! Fleets scrape metrics rather than watch D-Bus, and the unit has `PrivateNetwork=yes`:
//! so the daemon opens no port, it writes `watchqd.prom` into the directory
//! node_exporter reads (Debian's `/var/lib/prometheus/node-exporter`), which exports it
//! with its own. The file is written atomically (a temporary file in the same directory,
//! whose name does not end in `.prom` so that the collector never reads it half-written,
//! made mode 0644 and renamed over the old one), at most once per `interval_ms`, and only
//! when its text changed. The writer waits on the hub's [`Hub::stats_changed`], so it
//! costs no wakeup while nothing happens. The text is rendered at most once per change
//! and kept ([`Counters::text`]), for the writer and `Manager.Metrics` alike: anyone may
//! call that in a loop, and while nothing changes each call costs a copy.
//!
//! The text is Prometheus' text exposition format 0.0.4, the one the textfile collector
//! parses: every family with `# HELP` and `# TYPE`, counters named `…_total`. Labels are
//! bounded: device names, file system types, errno names, request operations and rule
//! numbers come from small sets the system defines, never uids or paths; and a family
//! keeps at most [`MAX_SERIES`] label sets, the rest counted under `other`.
//!
//! Counted from records (this consumer holds those sources open for the daemon's life,
//! as the journal does, only while `textfile = true`): filesystem errors and read-only
//! switches (`filesystems`, whose system-wide marks see every block-backed filesystem),
//! block I/O errors
//! (`block-errors`), quota warnings (`quota`). From the unit rules: units started and
//! failed per rule. From the hub ([`Hub::stats`]): events delivered and lost per source
//! and reason, kernel overflows, forged messages rejected, subscriptions and watches
//! held, sources available.
//!
//! Touches: files in the configured directory (create, `fchmod`, `rename`). No
//! capability beyond writing there.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{attr_text, kind_of};
use crate::dispatch::{Consumed, ConsumerFeed, Hub, HubStats};
use crate::event::Record;
use crate::logging::LogLimit;
use crate::source::{blockerr, filesystems, quota, Availability, Registry};

/// Records waiting to be counted.
pub const QUEUE: usize = 1024;
pub const DEFAULT_DIRECTORY: &str = "/var/lib/prometheus/node-exporter";
pub const FILE: &str = "watchqd.prom";
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(15_000);
/// Label sets a family keeps; more are counted under the label value `other`, so that
/// a flood of new device names cannot grow the file without bound.
pub const MAX_SERIES: usize = 512;

/// `[metrics]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Whether to write the text file (and count the records it reports).
    pub textfile: bool,
    /// The textfile collector's directory.
    pub directory: PathBuf,
    /// The least time between two writes.
    pub interval: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            textfile: false,
            directory: PathBuf::from(DEFAULT_DIRECTORY),
            interval: DEFAULT_INTERVAL,
        }
    }
}

/// A family of counters the consumers keep.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: &'static [&'static str],
}

pub static FILESYSTEM_ERRORS: Family = Family {
    name: "watchqd_filesystem_errors_total",
    help: "Filesystem errors the kernel reported (fanotify FAN_FS_ERROR), by device, filesystem type and errno name.",
    labels: &["device", "fstype", "errno"],
};
pub static FILESYSTEM_READ_ONLY: Family = Family {
    name: "watchqd_filesystem_read_only_total",
    help: "Switches of a filesystem to read-only after an error, by device.",
    labels: &["device"],
};
pub static BLOCK_ERRORS: Family = Family {
    name: "watchqd_block_errors_total",
    help: "Failed block I/O requests (block:block_rq_error), by device and operation (the kernel's rwbs).",
    labels: &["device", "operation"],
};
pub static QUOTA_WARNINGS: Family = Family {
    name: "watchqd_quota_warnings_total",
    help: "Disk quota warnings, by device and kind (block-soft, inode-hard, ...).",
    labels: &["device", "kind"],
};
pub static UNIT_STARTS: Family = Family {
    name: "watchqd_unit_starts_total",
    help: "Units started by [[units]] rules, by rule number and unit.",
    labels: &["rule", "unit"],
};
pub static UNIT_FAILURES: Family = Family {
    name: "watchqd_unit_start_failures_total",
    help: "Units that [[units]] rules failed to start, by rule number and unit.",
    labels: &["rule", "unit"],
};
pub static MISSED: Family = Family {
    name: "watchqd_metrics_missed_total",
    help: "Times the record counters above missed records: reason queue-full (an exact number of records), kernel-overflow or source-restarted (an unknown number).",
    labels: &["reason"],
};

/// The record-derived families, in the order they are written.
const FAMILIES: [&Family; 7] = [
    &FILESYSTEM_ERRORS,
    &FILESYSTEM_READ_ONLY,
    &BLOCK_ERRORS,
    &QUOTA_WARNINGS,
    &UNIT_STARTS,
    &UNIT_FAILURES,
    &MISSED,
];

/// The counters the daemon's consumers keep, by family and label values; and the text
/// last rendered from them with the hub's figures.
#[derive(Debug, Default)]
pub struct Counters {
    series: Mutex<BTreeMap<&'static str, BTreeMap<Vec<String>, u64>>>,
    /// The last text and the generation of [`Hub::stats_changed`] it includes. Any local
    /// user may call `Manager.Metrics` in a loop: while nothing changes, each call costs
    /// a copy of this, not a render.
    rendered: Mutex<Option<(u64, Arc<str>)>>,
}

impl Counters {
    /// Adds `n` to the counter of `family` with these label values (in the family's
    /// label order).
    pub fn add(&self, family: &'static Family, values: Vec<String>, n: u64) {
        debug_assert_eq!(values.len(), family.labels.len(), "{}", family.name);
        let mut all = crate::sys::lock(&self.series);
        let series = all.entry(family.name).or_default();
        let key = if series.contains_key(&values) || series.len() < MAX_SERIES {
            values
        } else {
            vec!["other".to_owned(); family.labels.len()]
        };
        *series.entry(key).or_default() += n;
    }

    fn snapshot(&self) -> BTreeMap<&'static str, BTreeMap<Vec<String>, u64>> {
        crate::sys::lock(&self.series).clone()
    }

    /// The whole text now ([`render`]): rendered again only when a figure changed since
    /// the last render, that is when the generation of [`Hub::stats_changed`] moved
    /// (whoever changes a figure touches it, these counters' writers included).
    pub fn text(&self, hub: &Hub) -> Arc<str> {
        // Held while rendering, so that callers racing on one change render it once.
        let mut rendered = crate::sys::lock(&self.rendered);
        // Read before the figures: a change after this read moves the generation past
        // what is stored, and the next call renders again.
        let generation = hub.stats_changed().generation();
        if let Some((at, text)) = rendered.as_ref() {
            if *at == generation {
                return Arc::clone(text);
            }
        }
        let text: Arc<str> = render(&hub.stats(), self).into();
        *rendered = Some((generation, Arc::clone(&text)));
        text
    }
}

/// Counts one record; returns whether it counted anything.
pub fn count(counters: &Counters, subtypes: &'static [&'static str], record: &Record) -> bool {
    let text = |key: &str| {
        record
            .attributes
            .get(key)
            .map_or_else(|| "unknown".to_owned(), |a| attr_text(a).into_owned())
    };
    let number = |key: &str| {
        record
            .attributes
            .get(key)
            .and_then(|a| attr_text(a).parse::<u64>().ok())
            .unwrap_or(1)
    };
    let kind = kind_of(subtypes, record);
    match (record.source, kind) {
        (filesystems::NAME, "error") => counters.add(
            &FILESYSTEM_ERRORS,
            vec![text("device"), text("fs-type"), text("errno-name")],
            // The kernel merges errors it has not yet handed over into one event.
            number("count"),
        ),
        (filesystems::NAME, "read-only") => {
            if !matches!(
                record.attributes.get("read-only"),
                Some(crate::event::Attr::Bool(true))
            ) {
                return false;
            }
            counters.add(&FILESYSTEM_READ_ONLY, vec![text("device")], 1);
        }
        // A storm arrives summarised: one record standing for `count` errors.
        (blockerr::NAME, _) => counters.add(
            &BLOCK_ERRORS,
            vec![text("device"), text("operation")],
            number("count"),
        ),
        (quota::NAME, kind) => {
            counters.add(&QUOTA_WARNINGS, vec![text("device"), kind.to_owned()], 1)
        }
        _ => return false,
    }
    true
}

/// The sources whose records the counters need.
pub const SOURCES: [&str; 3] = [filesystems::NAME, blockerr::NAME, quota::NAME];

/// Counts the records in `feed` until the daemon stops.
pub async fn count_records(mut feed: ConsumerFeed, counters: Arc<Counters>, hub: Arc<Hub>) {
    let registry: Registry = hub.registry().clone();
    let changed = hub.stats_changed();
    while let Some(entry) = feed.receiver.recv().await {
        let dropped = feed.take_dropped();
        if dropped > 0 {
            counters.add(&MISSED, vec!["queue-full".to_owned()], dropped);
        }
        let counted = match entry {
            Consumed::Event { record, .. } => {
                let subtypes = registry
                    .get(record.source)
                    .map_or(&[][..], |s| s.subtypes());
                count(&counters, subtypes, &record)
            }
            Consumed::Missed { reason, .. } => {
                counters.add(&MISSED, vec![reason.to_owned()], 1);
                true
            }
        };
        // A record that counts nothing (a filesystem back to read-write, say) wakes no
        // writer: the text would be the same.
        if counted || dropped > 0 {
            changed.touch();
        }
    }
}

/// Writes the text file whenever a counter changed, at most once per interval, until
/// the daemon stops. Never returns an error: a failed write is logged (at a bounded
/// rate) and tried again with the next change.
pub async fn write_file(config: MetricsConfig, counters: Arc<Counters>, hub: Arc<Hub>) {
    let changed = hub.stats_changed();
    let path = config.directory.join(FILE);
    let mut written: Option<Arc<str>> = None;
    let mut last_write: Option<Instant> = None;
    let mut failures = LogLimit::default();
    // The first pass writes at once, so node_exporter exports zeros from the start.
    changed.touch();
    loop {
        changed.wait().await;
        if let Some(at) = last_write {
            tokio::time::sleep_until((at + config.interval).into()).await;
        }
        let text = counters.text(&hub);
        if written.as_deref() == Some(&*text) {
            continue;
        }
        last_write = Some(Instant::now());
        // A few kilobytes to a local directory: written inline rather than on a blocking
        // thread, which would cost a thread wakeup per write.
        match write_atomically(&config.directory, &path, text.as_bytes()) {
            Ok(()) => written = Some(text),
            Err(e) => {
                if let Some(suppressed) = failures.allow(Instant::now()) {
                    tracing::warn!(
                        "metrics: cannot write {}: {e}{}",
                        path.display(),
                        LogLimit::note(suppressed)
                    );
                }
            }
        }
    }
}

/// Replaces `path` with `contents`: a temporary file in `directory` (the same
/// filesystem, so the rename is atomic), mode 0644, renamed over it.
pub fn write_atomically(directory: &Path, path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = tempfile::Builder::new()
        .prefix(".watchqd.prom.")
        .tempfile_in(directory)?;
    file.write_all(contents)?;
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn labels(names: &[&str], values: &[&str]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let pairs: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", pairs.join(","))
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(
    out: &mut String,
    name: &str,
    names: &[&str],
    values: &[&str],
    value: impl std::fmt::Display,
) {
    let _ = writeln!(out, "{name}{} {value}", labels(names, values));
}

/// The whole text: the hub's figures, then the consumers' counters.
pub fn render(stats: &HubStats, counters: &Counters) -> String {
    let mut out = String::new();
    let sources = &stats.sources;
    header(
        &mut out,
        "watchqd_events_delivered_total",
        "counter",
        "Events handed to subscribers' connections, by source.",
    );
    for s in sources {
        sample(
            &mut out,
            "watchqd_events_delivered_total",
            &["source"],
            &[s.name],
            s.delivered,
        );
    }
    header(&mut out, "watchqd_events_lost_total", "counter", "Events not delivered, each reported to its subscriber in a Lost signal, by source and reason: queue-full (the subscriber's queue was full), policy-changed (withheld when policy ended the watch).");
    for s in sources {
        for (reason, n) in [
            ("queue-full", s.lost_queue_full),
            ("policy-changed", s.lost_policy_changed),
        ] {
            sample(
                &mut out,
                "watchqd_events_lost_total",
                &["source", "reason"],
                &[s.name, reason],
                n,
            );
        }
    }
    header(&mut out, "watchqd_kernel_overflows_total", "counter", "Times the kernel dropped an unknown number of a source's events (ENOBUFS, FAN_Q_OVERFLOW, watch queue loss), by source.");
    for s in sources {
        sample(
            &mut out,
            "watchqd_kernel_overflows_total",
            &["source"],
            &[s.name],
            s.kernel_overflows,
        );
    }
    header(
        &mut out,
        "watchqd_forged_messages_rejected_total",
        "counter",
        "Netlink messages rejected because they did not come from the kernel, by source.",
    );
    for s in sources {
        sample(
            &mut out,
            "watchqd_forged_messages_rejected_total",
            &["source"],
            &[s.name],
            s.forged_rejected,
        );
    }
    header(
        &mut out,
        "watchqd_subscriptions",
        "gauge",
        "Subscriptions held now.",
    );
    sample(
        &mut out,
        "watchqd_subscriptions",
        &[],
        &[],
        stats.subscriptions,
    );
    header(
        &mut out,
        "watchqd_watches",
        "gauge",
        "Watches held now, by source.",
    );
    for s in sources {
        sample(
            &mut out,
            "watchqd_watches",
            &["source"],
            &[s.name],
            s.watches,
        );
    }
    header(
        &mut out,
        "watchqd_source_available",
        "gauge",
        "1 when a source can run on this kernel (perhaps degraded), 0 when not, with the reason.",
    );
    for s in sources {
        match &s.availability {
            Availability::Unavailable(reason) => {
                sample(
                    &mut out,
                    "watchqd_source_available",
                    &["source", "reason"],
                    &[s.name, reason],
                    0,
                );
            }
            _ => sample(
                &mut out,
                "watchqd_source_available",
                &["source"],
                &[s.name],
                1,
            ),
        }
    }
    let counted = counters.snapshot();
    for family in FAMILIES {
        header(&mut out, family.name, "counter", family.help);
        for (values, n) in counted.get(family.name).into_iter().flatten() {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            sample(&mut out, family.name, family.labels, &values, n);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Attr, Attrs, Audience, Change};

    fn record(source: &'static str, subtype: u8, attributes: &[(&str, Attr)]) -> Record {
        Record {
            source,
            subtype,
            object_id: "7:0".into(),
            change: Change::None,
            attributes: attributes
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect::<Attrs>(),
            properties: Default::default(),
            audience: Audience::Administrators,
        }
    }

    #[test]
    fn records_count_what_they_stand_for_and_only_switches_to_read_only() {
        let counters = Counters::default();
        let fs = filesystems::SUBTYPES;
        let error = record(
            filesystems::NAME,
            0,
            &[
                ("device", "loop0".into()),
                ("fs-type", "ext4".into()),
                ("errno-name", "EUCLEAN".into()),
                ("count", Attr::U32(3)),
            ],
        );
        assert!(count(&counters, fs, &error));
        let back = record(filesystems::NAME, 1, &[("read-only", false.into())]);
        assert!(!count(&counters, fs, &back));
        let text = render(
            &HubStats {
                subscriptions: 0,
                sources: Vec::new(),
            },
            &counters,
        );
        assert!(
            text.contains(
                "\nwatchqd_filesystem_errors_total{device=\"loop0\",fstype=\"ext4\",errno=\"EUCLEAN\"} 3\n"
            ),
            "{text}"
        );
        assert!(
            !text.contains("watchqd_filesystem_read_only_total{"),
            "{text}"
        );
    }

    #[test]
    fn the_text_is_rendered_again_only_after_a_change() {
        let hub = Hub::new(
            Registry::from_sources(Vec::new()),
            Default::default(),
            Default::default(),
        );
        let counters = Counters::default();
        let first = counters.text(&hub);
        // The same allocation: the kept text, not a new render.
        assert!(Arc::ptr_eq(&first, &counters.text(&hub)));
        counters.add(&BLOCK_ERRORS, vec!["vda".to_owned(), "R".to_owned()], 2);
        hub.stats_changed().touch();
        let second = counters.text(&hub);
        assert!(!Arc::ptr_eq(&first, &second), "a change renders again");
        assert!(
            second.contains("\nwatchqd_block_errors_total{device=\"vda\",operation=\"R\"} 2\n"),
            "{second}"
        );
        assert!(Arc::ptr_eq(&second, &counters.text(&hub)));
    }

    #[test]
    fn label_values_are_escaped_and_series_are_bounded() {
        let counters = Counters::default();
        counters.add(&FILESYSTEM_READ_ONLY, vec!["a\"b\\c\nd".to_owned()], 1);
        for i in 0..MAX_SERIES + 10 {
            counters.add(&BLOCK_ERRORS, vec![format!("sd{i}"), "R".to_owned()], 1);
        }
        let stats = HubStats {
            subscriptions: 0,
            sources: Vec::new(),
        };
        let text = render(&stats, &counters);
        assert!(
            text.contains("watchqd_filesystem_read_only_total{device=\"a\\\"b\\\\c\\nd\"} 1"),
            "{text}"
        );
        let series = text
            .lines()
            .filter(|l| l.starts_with("watchqd_block_errors_total{"))
            .count();
        assert_eq!(series, MAX_SERIES + 1, "the cap and one 'other'");
        assert!(
            text.contains("watchqd_block_errors_total{device=\"other\",operation=\"other\"} 10\n")
        );
    }
}

//! Block I/O errors, from the kernel's `block:block_rq_error` tracepoint.
//!
//! Touches: reads `events/block/block_rq_error/{format}` below tracefs
//! (`/sys/kernel/tracing`, else `/sys/kernel/debug/tracing`; read-only is enough);
//! `perf_event_open(2)` with `PERF_TYPE_TRACEPOINT`, one fd per online CPU (`pid = -1`),
//! each with a `mmap`ed ring of [`RING_PAGES`] pages; `/sys/devices/system/cpu/online`;
//! `readlink /sys/dev/block/MAJ:MIN` to name the device. Needs `CAP_PERFMON` (5.8+) or
//! `CAP_SYS_ADMIN` (system-wide tracepoint events), the `perf_event_open` syscall (in
//! systemd's `@debug` group, not in `@system-service`: the unit's `SystemCallFilter=`
//! must list it), and a kernel with `CONFIG_PERF_EVENTS` and `CONFIG_BLK_DEV_IO_TRACE`
//! (`use_clockid` needs 4.1). No address family, no write anywhere.
//!
//! Why perf rather than a private tracefs instance (both were measured on this kind of
//! machine: tracefs ~1.1 ms, perf 50–900 µs):
//! - nothing outlives the daemon: the kernel frees the events and their rings when the
//!   fds close, also on a crash, whereas a tracefs instance stays (and keeps tracing)
//!   until someone removes it. There is no stale state to clean up at start;
//! - it works with `/sys` read-only (`ProtectKernelTunables=`): creating an instance
//!   writes to tracefs, perf only reads the event id and format;
//! - the kernel reports its own losses exactly (`PERF_RECORD_LOST` with a count), where
//!   `trace_pipe_raw` only flags "missed events" on a page;
//! - one wakeup per error (`wakeup_events = 1`) with no `buffer_percent` tuning, and
//!   timestamps on `CLOCK_MONOTONIC` (`use_clockid`) that a client can compare with its
//!   own clock.
//!
//! The cost: one fd and one small ring per CPU while someone watches, and CPUs brought
//! online after the source started are not covered until it restarts.
//!
//! The source is idle when nobody watches: no fd, no mapping, no timer. While it runs it
//! wakes only for errors, and for a rate-limit flush that is pending.
//!
//! Storms: each device may send [`BURST`] events per [`INTERVAL`]; errors beyond that are
//! held and summarised in one event per interval whose `count` says how many errors it
//! stands for, so nothing is ever silenced (see [`Limiter`]). Kernel losses (a full ring)
//! become `Lost(kernel-overflow)` for every watcher.
//!
//! The pid in a tracepoint record is the completion context (often an interrupt or a
//! kworker), not the process that issued the I/O, so it is not reported.

mod ring;
pub mod signal;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::stream;
use nix::libc;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{
    Availability, EventSource, JournalIds, PlannedWatch, SourceStream, SpecReader, WatchMatcher,
    WatchSpec,
};
use crate::error::Error;
use crate::event::{Attr, Attrs, Audience, Change, Object, Record, SourceMsg};
use crate::glob::Pattern;
use crate::policy::{Identity, Scope};
use ring::{open_event, page_size, Ring};
use wire::{Format, PerfRecord, RqError};

pub const NAME: &str = "block-errors";

/// Subtypes are operation classes (see [`wire::operation_class`]). Never reorder.
pub const SUBTYPES: &[&str] = &["read", "write", "flush", "discard", "other"];

/// How the daemon's journal records (`[journal]`) write this source's events: the
/// `MESSAGE_ID` of each subtype (made once with `systemd-id128 new`; never change one,
/// log shippers match on them) and the syslog priority.
pub const JOURNAL: JournalIds = JournalIds {
    message_ids: &[
        ("read", "55177835319440f8883fbd192db76877"),
        ("write", "6c1b8bd656c24649bd04b64244864bec"),
        ("flush", "1ecf6e8b9b8f46fd99a8c8cce8b46121"),
        ("discard", "711d663985fd49c5a319882f8badd607"),
        ("other", "19c241817f3943179058333cf9681987"),
    ],
    // Failed I/O: an error.
    priority: |_| 3,
};

/// Where tracefs may be mounted, in order of preference.
const TRACEFS: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
const EVENT_DIR: &str = "events/block/block_rq_error";

/// Data pages of each CPU's ring (a power of two). A sample is ~80 bytes, so 8 pages
/// hold ~400 errors between two reads of one CPU.
pub const RING_PAGES: usize = 8;
/// Events a device may send per [`INTERVAL`] before its errors are summarised.
pub const BURST: u32 = 10;
pub const INTERVAL: Duration = Duration::from_secs(1);

pub struct BlockErrors;

impl BlockErrors {
    pub fn new() -> Self {
        BlockErrors
    }
}

impl Default for BlockErrors {
    fn default() -> Self {
        BlockErrors::new()
    }
}

impl EventSource for BlockErrors {
    fn name(&self) -> &'static str {
        NAME
    }

    fn system_wide(&self) -> bool {
        true
    }

    fn subtypes(&self) -> &'static [&'static str] {
        SUBTYPES
    }

    fn signal(&self) -> &'static crate::signal::SignalKind {
        &signal::KIND
    }

    fn probe(&self) -> Availability {
        let probe = || -> io::Result<()> {
            let (_, format) = locate()?;
            let cpus = online_cpus()?;
            let cpu = cpus.first().copied().unwrap_or(0);
            open_event(format.id, cpu).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("perf_event_open(block:block_rq_error, cpu {cpu}): {e}"),
                )
            })?;
            Ok(())
        };
        match probe() {
            Ok(()) => Availability::Available,
            Err(e) => Availability::Unavailable(e.to_string()),
        }
    }

    /// Errors of every device, whoever caused them: system-wide, nothing to arm.
    /// The device's kernel name, which a watch's `name` without wildcards must equal.
    fn index_key<'r>(&self, record: &'r Record) -> Option<&'r str> {
        record.attr_str("device")
    }

    fn parse_watch(&self, spec: &WatchSpec, _requester: &Identity) -> Result<PlannedWatch, Error> {
        let watch = BlockErrorWatch::parse(spec)?;
        Ok(PlannedWatch::ready(Scope::System, Box::new(watch)))
    }

    /// Errors are events, not objects: there is nothing to list.
    fn scan(&self) -> io::Result<Vec<Object>> {
        Ok(Vec::new())
    }

    fn open(&self) -> io::Result<SourceStream> {
        let (_, format) = locate()?;
        let page = page_size()?;
        let rings = online_cpus()?
            .into_iter()
            .map(|cpu| {
                Ring::open(format.id, cpu, page).map_err(|e| {
                    io::Error::new(e.kind(), format!("opening the perf ring of cpu {cpu}: {e}"))
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let reader = Reader {
            rings,
            format,
            limiter: Limiter::new(BURST, INTERVAL),
            pending: VecDeque::new(),
            scratch: Vec::new(),
        };
        Ok(Box::pin(stream::unfold(reader, |mut reader| async move {
            let msg = reader.next().await?;
            Some((msg, reader))
        })))
    }
}

/// Finds tracefs and reads the event's layout.
fn locate() -> io::Result<(PathBuf, Format)> {
    for root in TRACEFS {
        let path = Path::new(root).join(EVENT_DIR).join("format");
        match fs::read_to_string(&path) {
            Ok(text) => {
                let format = Format::parse(&text).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {e}", path.display()),
                    )
                })?;
                return Ok((PathBuf::from(root), format));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "no {EVENT_DIR} below {}: tracefs is not mounted (mount -t tracefs nodev \
             /sys/kernel/tracing) or the kernel lacks CONFIG_BLK_DEV_IO_TRACE",
            TRACEFS.join(" or ")
        ),
    ))
}

fn online_cpus() -> io::Result<Vec<u32>> {
    let path = "/sys/devices/system/cpu/online";
    let text =
        fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    wire::cpu_list(&text)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}")))
}

struct Reader {
    rings: Vec<Ring>,
    format: Format,
    limiter: Limiter,
    pending: VecDeque<SourceMsg>,
    scratch: Vec<u8>,
}

impl Reader {
    /// The next message, or `None` when a perf fd failed for good.
    async fn next(&mut self) -> Option<SourceMsg> {
        loop {
            if let Some(msg) = self.pending.pop_front() {
                return Some(msg);
            }
            let deadline = self.limiter.next_deadline();
            let woke: io::Result<()> = {
                let readable = futures_util::future::select_all(
                    self.rings.iter().map(|ring| Box::pin(ring.fd.readable())),
                );
                let flush = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    (ready, _, _) = readable => ready.map(|mut guard| guard.clear_ready()),
                    () = flush => Ok(()),
                }
            };
            if let Err(e) = woke {
                tracing::error!(source = NAME, "perf event fd failed: {e}");
                return None;
            }
            self.drain_all();
            let now = Instant::now();
            for held in self.limiter.flush(now) {
                let record = record(
                    &held.first,
                    held.count,
                    held.first_time,
                    Some((held.last_sector, held.last_time)),
                );
                self.pending.push_back(SourceMsg::Record(record));
            }
        }
    }

    fn drain_all(&mut self) {
        let now = Instant::now();
        for index in 0..self.rings.len() {
            self.scratch.clear();
            let mut scratch = std::mem::take(&mut self.scratch);
            let consistent = self.rings[index].drain(&mut scratch);
            if !consistent {
                tracing::warn!(
                    source = NAME,
                    "perf ring indices inconsistent; records lost"
                );
                self.pending.push_back(SourceMsg::Overflow {
                    objects: Vec::new(),
                });
            }
            for item in wire::records(&scratch) {
                match item {
                    Ok(PerfRecord::Sample { time, cpu, raw }) => match self.format.decode(raw) {
                        Ok(error) => {
                            // Every error the kernel handed over, before rate limiting:
                            // what to compare against when a count looks short.
                            tracing::debug!(
                                source = NAME,
                                cpu,
                                ring = index,
                                time,
                                major = error.major,
                                minor = error.minor,
                                sector = error.sector,
                                "block_rq_error"
                            );
                            if self.limiter.admit(&error, time, now) {
                                self.pending
                                    .push_back(SourceMsg::Record(record(&error, 1, time, None)));
                            }
                        }
                        Err(e) => {
                            tracing::debug!(source = NAME, raw = ?raw, "dropped a malformed block_rq_error entry: {e}");
                        }
                    },
                    Ok(PerfRecord::Lost { lost }) => {
                        tracing::warn!(
                            source = NAME,
                            lost,
                            "the kernel dropped block errors (perf ring full)"
                        );
                        self.pending.push_back(SourceMsg::Overflow {
                            objects: Vec::new(),
                        });
                    }
                    Ok(PerfRecord::Other(_)) => {}
                    Err(e) => {
                        tracing::debug!(source = NAME, "dropped the rest of a perf ring read: {e}");
                        break;
                    }
                }
            }
            self.scratch = scratch;
        }
    }
}

/// The record for one error, or for a summary of `count` errors of one device starting
/// with `error` (then `last` is the sector and time of the last one).
fn record(error: &RqError, count: u64, time: u64, last: Option<(u64, u64)>) -> Record {
    let errno = error.errno();
    let mut attributes = Attrs::new();
    attributes.insert(
        "device".into(),
        crate::sys::blockdev::device_name_or_number(error.major, error.minor).into(),
    );
    attributes.insert("major".into(), error.major.into());
    attributes.insert("minor".into(), error.minor.into());
    attributes.insert("sector".into(), error.sector.into());
    attributes.insert("sectors".into(), error.sectors.into());
    attributes.insert("operation".into(), error.rwbs.clone().into());
    attributes.insert("errno".into(), Attr::U32(errno.unsigned_abs()));
    attributes.insert(
        "errno-name".into(),
        crate::sys::errno::errno_name(errno).into(),
    );
    attributes.insert("count".into(), count.into());
    attributes.insert("monotonic-ns".into(), time.into());
    if let Some((last_sector, last_time)) = last {
        attributes.insert("last-sector".into(), last_sector.into());
        attributes.insert("last-monotonic-ns".into(), last_time.into());
    }
    let class = error.operation_class();
    Record {
        source: NAME,
        subtype: SUBTYPES
            .iter()
            .position(|s| *s == class)
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(4),
        object_id: format!("{}:{}", error.major, error.minor),
        change: Change::None,
        attributes,
        properties: Default::default(),
        audience: Audience::Administrators,
    }
}

/// Errors held back from one device during a storm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub first: RqError,
    pub first_time: u64,
    pub count: u64,
    pub last_sector: u64,
    pub last_time: u64,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    sent: u32,
    held: Option<Held>,
}

/// Per-device rate limit that never hides a count: a device may send `burst` events per
/// `interval`; later errors in that interval are held, and at the interval's end they
/// become one event whose count is the number of errors held. While a storm lasts, a
/// device thus sends one summary per interval. Pure: the caller passes the time.
#[derive(Debug)]
pub struct Limiter {
    burst: u32,
    interval: Duration,
    devices: HashMap<(u32, u32), Window>,
}

impl Limiter {
    pub fn new(burst: u32, interval: Duration) -> Self {
        Limiter {
            burst,
            interval,
            devices: HashMap::new(),
        }
    }

    /// Whether `error` goes out now; if not, it is held for the next [`Limiter::flush`].
    pub fn admit(&mut self, error: &RqError, time: u64, now: Instant) -> bool {
        let interval = self.interval;
        // Forget devices that have been quiet for a whole interval (bounds the map).
        self.devices
            .retain(|_, w| w.held.is_some() || now < w.start + interval);
        let window = self
            .devices
            .entry((error.major, error.minor))
            .or_insert(Window {
                start: now,
                sent: 0,
                held: None,
            });
        if window.held.is_none() && now >= window.start + interval {
            window.start = now;
            window.sent = 0;
        }
        if window.held.is_none() && window.sent < self.burst {
            window.sent += 1;
            return true;
        }
        match &mut window.held {
            Some(held) => {
                held.count += 1;
                held.last_sector = error.sector;
                held.last_time = time;
            }
            None => {
                window.held = Some(Held {
                    first: error.clone(),
                    first_time: time,
                    count: 1,
                    last_sector: error.sector,
                    last_time: time,
                });
            }
        }
        false
    }

    /// The summaries whose interval has ended. A device that was summarised stays
    /// limited for one more interval, so a continuing storm yields one event per interval.
    pub fn flush(&mut self, now: Instant) -> Vec<Held> {
        let mut out = Vec::new();
        for window in self.devices.values_mut() {
            if window.held.is_some() && now >= window.start + self.interval {
                out.extend(window.held.take());
                window.start = now;
                window.sent = self.burst;
            }
        }
        out
    }

    /// When the next summary is due, if any is.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.devices
            .values()
            .filter(|w| w.held.is_some())
            .map(|w| w.start + self.interval)
            .min()
    }
}

/// A block-error watch. Keys: `name` (the device's kernel name, `*` and `?` wildcards).
/// No key: every block device.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BlockErrorWatch {
    name: Option<Pattern>,
}

impl BlockErrorWatch {
    const KEYS: &'static [&'static str] = &["name"];

    pub fn parse(spec: &WatchSpec) -> Result<Self, Error> {
        let spec = SpecReader::new(spec, NAME, Self::KEYS)?;
        Ok(BlockErrorWatch {
            name: spec
                .str("name")?
                .map(|name| Pattern::for_name("name", &name))
                .transpose()?,
        })
    }
}

impl WatchMatcher for BlockErrorWatch {
    /// A name without wildcards: looked up by the event's device name
    /// ([`EventSource::index_key`]) instead of visited for every error.
    fn index_key(&self) -> Option<&str> {
        self.name.as_ref().and_then(Pattern::exact)
    }

    fn matches(&self, record: &Record) -> bool {
        record.source == NAME
            && self.name.as_ref().is_none_or(|pattern| {
                record
                    .attr_str("device")
                    .is_some_and(|name| pattern.matches(name))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(minor: u32, sector: u64) -> RqError {
        RqError {
            major: 7,
            minor,
            sector,
            sectors: 8,
            error: -5,
            rwbs: "R".into(),
        }
    }

    #[test]
    fn a_storm_becomes_counted_summaries_never_silence() {
        let mut limiter = Limiter::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        let admitted = (0..10)
            .filter(|i| limiter.admit(&error(0, *i), *i, t0))
            .count();
        assert_eq!(admitted, 3);
        // Another device is limited on its own.
        assert!(limiter.admit(&error(1, 0), 0, t0));
        assert!(limiter.flush(t0 + Duration::from_millis(500)).is_empty());
        let due = limiter.next_deadline().unwrap();
        assert_eq!(due, t0 + Duration::from_secs(1));
        let held = limiter.flush(due);
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].count, 7);
        assert_eq!(held[0].first.sector, 3);
        assert_eq!(held[0].last_sector, 9);
        assert_eq!(limiter.next_deadline(), None);
        // The storm goes on: one summary per interval.
        let t1 = due + Duration::from_millis(10);
        assert!(!limiter.admit(&error(0, 20), 20, t1));
        assert!(!limiter.admit(&error(0, 21), 21, t1));
        let held = limiter.flush(due + Duration::from_secs(1));
        assert_eq!(held[0].count, 2);
        // After a quiet interval the device sends individual events again.
        let t2 = due + Duration::from_secs(3);
        assert!(limiter.admit(&error(0, 30), 30, t2));
        assert_eq!(limiter.devices.len(), 1, "quiet devices are forgotten");
    }

    #[test]
    fn watches_match_device_names() {
        let watch = BlockErrorWatch {
            name: Some(Pattern::new("loop*")),
        };
        let mut rec = record(&error(0, 1), 1, 0, None);
        rec.attributes.insert("device".into(), "loop3".into());
        assert!(watch.matches(&rec));
        rec.attributes.insert("device".into(), "vda".into());
        assert!(!watch.matches(&rec));
        assert!(BlockErrorWatch::default().matches(&rec));
        assert_eq!(rec.audience, Audience::Administrators);
        assert_eq!(SUBTYPES[usize::from(rec.subtype)], "read");
        let spec: WatchSpec = [("device".to_owned(), zbus::OwnedVariant::from(1u32))]
            .into_iter()
            .collect();
        assert!(BlockErrorWatch::parse(&spec).is_err());
        let sd = Pattern::new("sd?");
        assert!(sd.matches("sda") && !sd.matches("sda1"));
    }
}

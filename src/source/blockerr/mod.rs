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
    reject_unknown_keys, spec_str, Availability, EventSource, PlannedWatch, SourceStream,
    WatchMatcher, WatchSpec,
};
use crate::error::Error;
use crate::event::{Attr, Attrs, Audience, Change, Object, Record, SourceMsg};
use crate::glob::Pattern;
use crate::policy::{Identity, Scope};
use wire::{Format, PerfRecord, RqError};

pub const NAME: &str = "block-errors";

/// Subtypes are operation classes (see [`wire::operation_class`]). Never reorder.
pub const SUBTYPES: &[&str] = &["read", "write", "flush", "discard", "other"];

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

fn page_size() -> io::Result<usize> {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).map_err(|_| io::Error::other("sysconf(_SC_PAGESIZE) failed"))
}

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER5` (Linux 4.1); the kernel accepts
/// any size it knows.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
}

const PERF_ATTR_SIZE_VER5: u32 = 112;
const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == PERF_ATTR_SIZE_VER5 as usize);
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_SAMPLE_TIME: u64 = 1 << 2;
const PERF_SAMPLE_CPU: u64 = 1 << 7;
const PERF_SAMPLE_RAW: u64 = 1 << 10;
const FLAG_USE_CLOCKID: u64 = 1 << 25;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// Offsets in `struct perf_event_mmap_page`.
const DATA_HEAD: usize = 1024;
const DATA_TAIL: usize = 1032;
const DATA_OFFSET: usize = 1040;
const DATA_SIZE: usize = 1048;

/// Opens the tracepoint on one CPU for every task: a sample per error, woken per sample.
fn open_event(id: u16, cpu: u32) -> io::Result<OwnedFd> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: PERF_ATTR_SIZE_VER5,
        config: u64::from(id),
        sample_period: 1,
        sample_type: PERF_SAMPLE_TIME | PERF_SAMPLE_CPU | PERF_SAMPLE_RAW,
        flags: FLAG_USE_CLOCKID,
        wakeup_events: 1,
        clockid: libc::CLOCK_MONOTONIC,
        ..PerfEventAttr::default()
    };
    let cpu =
        libc::c_int::try_from(cpu).map_err(|_| io::Error::other("cpu number out of range"))?;
    // SAFETY: `attr` is a valid perf_event_attr whose `size` field matches its layout and
    // outlives the call; the other arguments are plain integers.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            std::ptr::from_ref(&attr),
            -1 as libc::pid_t,
            cpu,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("perf fd out of range"))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One CPU's perf event and its mapped ring.
struct Ring {
    fd: AsyncFd<OwnedFd>,
    base: NonNull<u8>,
    map_len: usize,
    data_offset: usize,
    data_size: usize,
}

// SAFETY: the mapping belongs to this Ring alone; it is read through `&mut self` or
// atomics, and unmapped only in Drop. Moving it to another thread is sound.
unsafe impl Send for Ring {}

impl Ring {
    fn open(id: u16, cpu: u32, page: usize) -> io::Result<Ring> {
        let fd = open_event(id, cpu)?;
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let map_len = page * (1 + RING_PAGES);
        // SAFETY: a fresh shared mapping of the perf fd, of the size perf requires (one
        // metadata page plus a power of two of data pages); checked for failure below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        let mut ring = Ring {
            // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open and the same
            // while registered and is closed only when the AsyncFd is dropped.
            fd: unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?,
            base,
            map_len,
            data_offset: page,
            data_size: page * RING_PAGES,
        };
        // Kernels since 4.1 say where the data lives; older ones use the layout above.
        let (offset, size) = (
            ring.meta(DATA_OFFSET).load(Ordering::Relaxed),
            ring.meta(DATA_SIZE).load(Ordering::Relaxed),
        );
        if let (Ok(offset), Ok(size)) = (usize::try_from(offset), usize::try_from(size)) {
            if size > 0 && offset.checked_add(size).is_some_and(|end| end <= map_len) {
                ring.data_offset = offset;
                ring.data_size = size;
            }
        }
        Ok(ring)
    }

    fn meta(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: `offset` is one of the u64 fields of the page-aligned metadata page,
        // which stays mapped while `self` lives; AtomicU64 has u64's layout, and the
        // kernel updates these fields atomically.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    /// Appends every record the kernel published since the last call to `out`, and
    /// gives the space back. Returns false when the ring's indices are inconsistent
    /// (records were lost; the ring is reset to empty).
    fn drain(&mut self, out: &mut Vec<u8>) -> bool {
        let head = self.meta(DATA_HEAD).load(Ordering::Acquire);
        let tail = self.meta(DATA_TAIL).load(Ordering::Relaxed);
        let size = self.data_size as u64;
        let available = head.wrapping_sub(tail);
        if available > size {
            self.meta(DATA_TAIL).store(head, Ordering::Release);
            return false;
        }
        let mut position = tail;
        let mut left = available;
        while left > 0 {
            // Both are below `data_size`, a usize.
            let start = usize::try_from(position % size).unwrap_or(0);
            let chunk = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.data_size - start);
            // SAFETY: [start, start + chunk) lies inside the data area of the mapping;
            // the kernel does not write between tail and head until we move the tail.
            let bytes = unsafe {
                std::slice::from_raw_parts(self.base.as_ptr().add(self.data_offset + start), chunk)
            };
            out.extend_from_slice(bytes);
            position += chunk as u64;
            left -= chunk as u64;
        }
        self.meta(DATA_TAIL).store(head, Ordering::Release);
        true
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `open` with this length and is not used after.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.map_len);
        }
    }
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

/// The kernel name of a block device (`loop0`, `sda1`), or `MAJ:MIN` when it is gone.
fn device_name(major: u32, minor: u32) -> String {
    fs::read_link(format!("/sys/dev/block/{major}:{minor}"))
        .ok()
        .and_then(|target| target.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| format!("{major}:{minor}"))
}

/// The record for one error, or for a summary of `count` errors of one device starting
/// with `error` (then `last` is the sector and time of the last one).
fn record(error: &RqError, count: u64, time: u64, last: Option<(u64, u64)>) -> Record {
    let errno = error.errno();
    let mut attributes = Attrs::new();
    attributes.insert(
        "device".into(),
        device_name(error.major, error.minor).into(),
    );
    attributes.insert("major".into(), error.major.into());
    attributes.insert("minor".into(), error.minor.into());
    attributes.insert("sector".into(), error.sector.into());
    attributes.insert("sectors".into(), error.sectors.into());
    attributes.insert("operation".into(), error.rwbs.clone().into());
    attributes.insert("errno".into(), Attr::U32(errno.unsigned_abs()));
    attributes.insert("errno-name".into(), wire::errno_name(errno).into());
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
        reject_unknown_keys(spec, NAME, Self::KEYS)?;
        Ok(BlockErrorWatch {
            name: spec_str(spec, "name")?
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

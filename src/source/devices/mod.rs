//! Block and USB devices, as udev finished them where udevd runs, from kernel uevents
//! elsewhere.
//!
//! Touches: a `NETLINK_KOBJECT_UEVENT` socket bound to multicast group 2 (udev's: events
//! re-broadcast by udevd once its rules ran, with its properties and links) when udevd
//! runs, else group 1 (the kernel's: containers, initrds, the minimal test guest);
//! `SO_RCVBUFFORCE` (CAP_NET_ADMIN; falls back to `SO_RCVBUF`), `SO_PASSCRED`, reads
//! below `/sys` and `/run/udev/data`, inotify on `/run` and `/run/udev` (`presence.rs`).
//! Works on any kernel with `CONFIG_NET`; no other capability. Under systemd the socket is
//! one `watchqd.socket` passes (`ListenNetlink=kobject-uevent 1` and `2`), in the host's
//! network namespace, with the buffer systemd sized ([`crate::activation`]); otherwise it
//! exists only while some subscription watches devices.
//!
//! "udevd runs" is decided as sd-device decides it (`device_monitor_new_full`):
//! `/run/udev/control` exists, at each open and whenever it comes or goes (a switch is a
//! loss with a rescan); `Sources` says which group and why ([`Availability::Via`], or
//! [`Availability::Degraded`] for the kernel's where udevd runs but cannot be heard).
//!
//! Origin is checked at the edge: on group 1 a message counts as the kernel's only when
//! the sender's netlink port id is 0 and its credentials say uid 0 (root in the initial
//! network namespace can multicast forged uevents from userspace; those carry its own
//! port id); on group 2 only what was multicast with credentials of uid 0 is taken, the
//! trust boundary sd-device uses (root can forge there as udevd itself does). On group 2
//! the header's subsystem hash drops what is not block or usb before the properties are
//! read. `ENOBUFS` means the kernel dropped events for us: the source rescans sysfs and
//! yields [`SourceMsg::Overflow`] so that every subscriber is told.

mod presence;
pub mod signal;
mod sysfs;
mod udev_db;
pub mod udev_wire;
mod uevent_socket;
mod watch_spec;
pub mod wire;

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures_util::stream;
use tokio::sync::watch;

pub use sysfs::{DeviceDir, Sysfs, SUBSYSTEMS};
use watch_spec::kernel_name;
pub use watch_spec::DeviceWatch;

use super::{
    Availability, EventSource, JournalIds, PlannedWatch, SourceStream, SourcesConfig, WatchSpec,
};
use crate::activation;
use crate::error::Error;
use crate::event::{Attrs, Audience, Change, Object, Record, SourceMsg};
use crate::policy::{Identity, Scope};
use crate::sys::lock;
pub use crate::sys::netlink::Counters;
use crate::sys::netlink::{Datagram, KernelSocket, Labels};
use presence::UdevPresence;
use udev_db::UdevDb;
use uevent_socket::{open_socket, size_buffer, LABELS, UDEV_LABELS};
use wire::Action;

pub const NAME: &str = "devices";

/// Subtype numbers are the index; the first eight are the kernel's `kobject_action`
/// values. `media-change` and `resize` are `change` events the kernel marks with
/// `DISK_MEDIA_CHANGE=1` or `RESIZE=1`, and `over-current` is the `change` a USB hub
/// interface sends with `OVER_CURRENT_PORT` (drivers/usb/core/hub.c), split out so that a
/// filter can tell them apart.
pub const SUBTYPES: &[&str] = &[
    "add",
    "remove",
    "change",
    "move",
    "online",
    "offline",
    "bind",
    "unbind",
    "media-change",
    "resize",
    "over-current",
];

/// How the daemon's journal records (`[journal]`) write this source's events: the
/// `MESSAGE_ID` of each subtype (made once with `systemd-id128 new`; never change one,
/// log shippers match on them) and the syslog priority.
pub const JOURNAL: JournalIds = JournalIds {
    message_ids: &[
        ("add", "384f719155194359bb7ed41ca9f34bb1"),
        ("remove", "cbe8ac3b41204ac6ba713fb7542e2a2c"),
        ("change", "9dac70fd54f04de293ff2890bf916cae"),
        ("move", "a247d324aef04628a0938d090fa44584"),
        ("online", "dac2031387ed4a87ba921ce902eef4b2"),
        ("offline", "933ea60e4b1a427c9265c405441adf28"),
        ("bind", "4536f85e74e14798b986dc4ac39bcaee"),
        ("unbind", "d14f6203db434c898f434031ba36b480"),
        ("media-change", "15f631e6de504276a42de38152807ff6"),
        ("resize", "aa352c47a83d4c57a3474ad426fc3b3d"),
        ("over-current", "648f466bfabb4740ac4d7fe9198190fa"),
    ],
    priority: JournalIds::INFO,
};

const UEVENT_GROUP_KERNEL: u32 = 1;
/// udev's monitor group (a bitmask, as group 1's is 1): what udevd re-broadcasts.
const UEVENT_GROUP_UDEV: u32 = 2;
/// What sd-device takes for "udevd runs": its control socket exists.
const UDEV_CONTROL: &str = "/run/udev/control";
/// Devices whose changing attribute files the reader holds open (three each), so that a
/// storm on them costs one read per attribute; the others reopen the files each event.
/// Bounds the fds a machine with thousands of devices makes the daemon hold.
const DEVICES_HOLDING_FILES: usize = 64;
/// Largest uevent the kernel sends (`UEVENT_BUFFER_SIZE`) plus the header, and the
/// largest udev message sd-device reads (8 KiB: udev adds its properties and links).
const UEVENT_BUFFER: usize = 8192;

/// Settings for the device source (`[sources.devices]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicesConfig {
    /// Bytes of kernel socket buffer; a burst larger than this is an overflow.
    pub receive_buffer: usize,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            receive_buffer: 16 * 1024 * 1024,
        }
    }
}

pub struct Devices {
    /// The settings; a reload changes them, and the open reader follows at once.
    config: watch::Sender<DevicesConfig>,
    sysfs: Sysfs,
    counters: Arc<Counters>,
    /// The group the open reader follows and why, for `Sources`; `None` while closed.
    following: Following,
}

/// See [`Devices::following`].
type Following = Arc<Mutex<Option<(Monitor, String)>>>;

impl Devices {
    pub fn new(config: &DevicesConfig) -> Self {
        Devices {
            config: watch::Sender::new(config.clone()),
            sysfs: Sysfs::default(),
            counters: Arc::default(),
            following: Following::default(),
        }
    }

    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }
}

impl EventSource for Devices {
    fn forged_rejected(&self) -> u64 {
        self.counters.rejected_origin.load(Ordering::Relaxed)
    }

    fn name(&self) -> &'static str {
        NAME
    }

    /// What its socket took in and dropped (`watchqctl status`, the Manager's
    /// `Counters`): messages received from the kernel or udevd, messages from anyone
    /// else rejected, undecodable ones, and the kernel's buffer overflows. On udev's
    /// group what the socket filter drops in the kernel is never received.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let get = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        vec![
            ("messages-received", get(&c.received)),
            ("messages-rejected", get(&c.rejected_origin)),
            ("messages-malformed", get(&c.malformed)),
            ("buffer-overflows", get(&c.overflows)),
        ]
    }

    /// A new `receive_buffer` resizes the open socket's buffer (no event lost: the
    /// socket stays the same) and is the size of any socket opened later.
    fn reconfigure(&self, config: &SourcesConfig) {
        self.config.send_if_modified(|current| {
            let changed = *current != config.devices;
            *current = config.devices.clone();
            changed
        });
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

    /// Which group the source follows (decided again at each open, and when udevd
    /// starts or stops) and why.
    fn probe(&self) -> Availability {
        let (monitor, why) = Monitor::choose(Path::new(UDEV_CONTROL));
        let note = || monitor.availability(why.clone());
        if activation::has_passed(activation::NETLINK_KOBJECT_UEVENT, monitor.group()) {
            return note();
        }
        match open_socket(monitor, 0) {
            Ok(_socket) => note(),
            Err(e) => {
                Availability::Unavailable(format!("cannot open the uevent netlink socket: {e}"))
            }
        }
    }

    /// Device events are system-wide and need nothing armed.
    /// Its kernel name, which a device watch's `name` without wildcards must equal.
    fn index_key<'r>(&self, record: &'r Record) -> Option<&'r str> {
        kernel_name(record)
    }

    fn parse_watch(&self, spec: &WatchSpec, _requester: &Identity) -> Result<PlannedWatch, Error> {
        let watch = DeviceWatch::parse(spec)?;
        Ok(PlannedWatch::ready(Scope::System, Box::new(watch)))
    }

    /// With udev's database while the source follows udev, so that a snapshot's
    /// devices carry the properties their events carry.
    fn scan(&self) -> io::Result<Vec<Object>> {
        let (monitor, _) = Monitor::choose(Path::new(UDEV_CONTROL));
        self.sysfs.scan_with(monitor.udev_db().as_ref())
    }

    /// What the open reader follows now (udevd may have started or stopped since the
    /// probe); what it would follow when closed.
    fn availability(&self, probed: &Availability) -> Availability {
        if matches!(probed, Availability::Unavailable(_)) {
            return probed.clone();
        }
        let following = lock(&self.following).clone();
        let (monitor, why) = following.unwrap_or_else(|| Monitor::choose(Path::new(UDEV_CONTROL)));
        monitor.availability(why)
    }

    fn open(&self) -> io::Result<SourceStream> {
        let mut settings = self.config.subscribe();
        let receive_buffer = settings.borrow_and_update().receive_buffer;
        let (monitor, why) = Monitor::choose(Path::new(UDEV_CONTROL));
        let (fd, passed) = open_socket(monitor, receive_buffer)?;
        tracing::info!(source = NAME, "following {why}");
        let presence = UdevPresence::new(Path::new(UDEV_CONTROL))
            .inspect_err(|e| {
                tracing::warn!(
                    source = NAME,
                    "cannot follow udevd starting or stopping ({e}): the group chosen now stays until the source reopens"
                );
            })
            .ok();
        *lock(&self.following) = Some((monitor, why));
        let reader = Reader {
            socket: KernelSocket::new(
                fd,
                UEVENT_BUFFER,
                Arc::clone(&self.counters),
                monitor.labels(),
            )?,
            monitor,
            presence,
            following: Arc::clone(&self.following),
            wanted_hashes: SUBSYSTEMS
                .iter()
                .map(|s| udev_wire::string_hash32(s))
                .collect(),
            settings,
            passed,
            known: HashMap::new(),
            sysfs: self.sysfs.clone(),
            counters: Arc::clone(&self.counters),
        };
        Ok(Box::pin(stream::unfold(reader, |mut reader| async move {
            let msg = reader.next().await?;
            Some((msg, reader))
        })))
    }
}

/// Which uevent group the source follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Monitor {
    /// udev's group 2: events once udevd is done with the device.
    Udev,
    /// The kernel's group 1.
    Kernel,
}

impl Monitor {
    /// udev's group when udevd runs (`control` exists) and a socket on it can hear it;
    /// the kernel's otherwise. With the reason, as `Sources` shows it.
    fn choose(control: &Path) -> (Monitor, String) {
        let shown = control.display();
        if !control.exists() {
            return (
                Monitor::Kernel,
                format!(
                    "kernel: no udevd ({shown} absent); events come before udev's rules \
                     ran, without its properties and links"
                ),
            );
        }
        // Under systemd the daemon has a network namespace of its own, where a socket it
        // opens would hear nothing udevd multicasts: only a passed one will do.
        if activation::any_passed()
            && !activation::has_passed(activation::NETLINK_KOBJECT_UEVENT, UEVENT_GROUP_UDEV)
        {
            return (
                Monitor::Kernel,
                format!(
                    "kernel: udevd runs ({shown} present) but systemd passed no socket on \
                     udev's group (ListenNetlink=kobject-uevent 2 in watchqd.socket); events \
                     come before udev's rules ran"
                ),
            );
        }
        (
            Monitor::Udev,
            format!("udev: {shown} present; events as udevd finished them, with its properties and links"),
        )
    }

    /// How `Sources` shows this group and why: the kernel's is degraded only where
    /// udevd runs; without udevd (containers, initrds) it is all there is.
    fn availability(self, why: String) -> Availability {
        match self {
            Monitor::Udev => Availability::Via(why),
            Monitor::Kernel if Path::new(UDEV_CONTROL).exists() => Availability::Degraded(why),
            Monitor::Kernel => Availability::Via(why),
        }
    }

    /// How the socket of this group is read.
    fn labels(self) -> Labels {
        match self {
            Monitor::Udev => UDEV_LABELS,
            Monitor::Kernel => LABELS,
        }
    }

    /// The database to read snapshots' properties from with this group.
    fn udev_db(self) -> Option<UdevDb> {
        (self == Monitor::Udev).then(UdevDb::default)
    }

    /// The multicast group bitmask of the socket.
    fn group(self) -> u32 {
        match self {
            Monitor::Udev => UEVENT_GROUP_UDEV,
            Monitor::Kernel => UEVENT_GROUP_KERNEL,
        }
    }
}

struct Reader {
    socket: KernelSocket,
    /// The group `socket` listens to.
    monitor: Monitor,
    /// Wakes the reader when udevd may have started or stopped; `None` when inotify
    /// failed (logged at open).
    presence: Option<UdevPresence>,
    /// Shared with [`Devices`] for `Sources`; cleared when the reader goes.
    following: Following,
    /// `string_hash32` of each of [`SUBSYSTEMS`]: a udev message whose header names
    /// another subsystem is dropped before its properties are read.
    wanted_hashes: Vec<u32>,
    /// `[sources.devices]`, as the last reload left it.
    settings: watch::Receiver<DevicesConfig>,
    /// Whether systemd passed the socket ([`size_buffer`]).
    passed: bool,
    /// Devices seen since the source started, by devpath: their static attributes and
    /// their open sysfs directory. Bounded by the devices present: removals drop them,
    /// and an overflow (when removals may have been missed) clears them all.
    known: HashMap<String, (Attrs, Option<DeviceDir>)>,
    sysfs: Sysfs,
    counters: Arc<Counters>,
}

impl Reader {
    /// The next record, or `None` when the socket failed for good.
    async fn next(&mut self) -> Option<SourceMsg> {
        loop {
            // Reading a datagram is cancel-safe: a reload's new settings interrupt only
            // the wait for one.
            let datagram = tokio::select! {
                datagram = self.socket.next() => datagram?,
                Ok(()) = self.settings.changed() => {
                    self.resize();
                    continue;
                }
                () = presence_changed(&mut self.presence) => {
                    match self.switch() {
                        Some(msg) => return Some(msg),
                        None => continue,
                    }
                }
            };
            match datagram {
                Datagram::Message(len) => {
                    self.counters.received.fetch_add(1, Ordering::Relaxed);
                    let bytes = self.socket.bytes(len);
                    let decoded = match self.monitor {
                        Monitor::Kernel => wire::parse(bytes).map(Some).map_err(|e| e.to_string()),
                        Monitor::Udev => match udev_wire::header(bytes) {
                            Ok(header) if !self.wanted_hashes.contains(&header.subsystem_hash) => {
                                Ok(None)
                            }
                            Ok(header) => udev_wire::event(bytes, &header).map(Some),
                            Err(e) => Err(e),
                        }
                        .map_err(|e| e.to_string()),
                    };
                    match decoded {
                        Ok(Some(event)) => {
                            if let Some(record) = self.record(event) {
                                return Some(SourceMsg::Record(record));
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(source = NAME, raw = ?String::from_utf8_lossy(bytes), "dropped malformed uevent: {e}");
                        }
                    }
                }
                Datagram::Rejected => return Some(SourceMsg::Counted),
                Datagram::Overflow { .. } => {
                    tracing::warn!(
                        source = NAME,
                        "kernel dropped uevents (ENOBUFS); rescanning sysfs"
                    );
                    // Removals may be among what was lost.
                    self.known.clear();
                    let udev = self.monitor.udev_db();
                    let objects = self.sysfs.scan_with(udev.as_ref()).unwrap_or_else(|e| {
                        tracing::error!(source = NAME, "sysfs rescan failed: {e}");
                        Vec::new()
                    });
                    return Some(SourceMsg::Overflow { objects });
                }
            }
        }
    }

    /// Moves to the other group when udevd started or stopped. Events around the switch
    /// may be missed (between the two sockets) or seen twice (on both): rather than
    /// match them up, the switch is reported as a loss, with a rescan of the devices,
    /// to every subscriber (`Lost(kernel-overflow)`), never silently.
    fn switch(&mut self) -> Option<SourceMsg> {
        let (monitor, why) = Monitor::choose(Path::new(UDEV_CONTROL));
        if monitor == self.monitor {
            return None;
        }
        let receive_buffer = self.settings.borrow().receive_buffer;
        // The new socket is bound before the old one closes: nothing falls between them
        // but what the rescan below covers.
        let opened = open_socket(monitor, receive_buffer).and_then(|(fd, passed)| {
            let socket = KernelSocket::new(
                fd,
                UEVENT_BUFFER,
                Arc::clone(&self.counters),
                monitor.labels(),
            )?;
            Ok((socket, passed))
        });
        let (socket, passed) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                tracing::error!(
                    source = NAME,
                    "cannot open the socket for {why}: {e}; staying on the group followed so far"
                );
                return None;
            }
        };
        tracing::warn!(
            source = NAME,
            "switching to {why}: events around the switch are reported as lost, and the devices rescanned"
        );
        self.socket = socket;
        self.passed = passed;
        self.monitor = monitor;
        *lock(&self.following) = Some((monitor, why));
        self.known.clear();
        let udev = monitor.udev_db();
        let objects = self.sysfs.scan_with(udev.as_ref()).unwrap_or_else(|e| {
            tracing::error!(source = NAME, "sysfs rescan failed: {e}");
            Vec::new()
        });
        Some(SourceMsg::Overflow { objects })
    }

    /// Applies a reload's `receive_buffer` to the open socket.
    fn resize(&mut self) {
        let bytes = self.settings.borrow_and_update().receive_buffer;
        match size_buffer(self.socket.fd(), bytes, self.passed) {
            Ok(got) => tracing::info!(
                source = NAME,
                "uevent socket buffer after a reload: {got} bytes"
            ),
            Err(e) => tracing::warn!(
                source = NAME,
                "cannot resize the uevent socket buffer to {bytes} bytes: {e}; it keeps its size"
            ),
        }
    }

    fn record(&mut self, event: wire::UEvent) -> Option<Record> {
        if !SUBSYSTEMS.contains(&event.subsystem.as_str()) {
            return None;
        }
        let subtype = subtype_of(&event);
        let (change, mut attributes) = match event.action {
            // Gone from sysfs: the core fills in the last attributes it knew.
            Action::Remove => {
                self.known.remove(&event.devpath);
                (Change::Remove, Attrs::new())
            }
            action => {
                let fresh = matches!(action, Action::Add | Action::Move);
                let read_anew = fresh || !self.known.contains_key(&event.devpath);
                if read_anew {
                    let attributes = self.sysfs.static_attributes(
                        &event.devpath,
                        &event.subsystem,
                        &event.properties,
                    );
                    let holding = self
                        .known
                        .values()
                        .filter(|(_, dir)| dir.as_ref().is_some_and(DeviceDir::holds_files))
                        .count();
                    let dir = self
                        .sysfs
                        .open(&event.devpath, holding < DEVICES_HOLDING_FILES);
                    self.known.insert(event.devpath.clone(), (attributes, dir));
                }
                let Some((known, dir)) = self.known.get_mut(&event.devpath) else {
                    return None; // inserted above when it was missing
                };
                if let Some(dir) = dir {
                    // The driver changes only with add, bind and unbind (the kernel
                    // announces every binding since 4.14), so it is cached between them.
                    if read_anew
                        || matches!(action, Action::Bind | Action::Unbind)
                        || event.properties.contains_key("DRIVER")
                    {
                        dir.refresh_driver(&event.properties, known);
                    }
                }
                let mut attributes = known.clone();
                if let Some(dir) = dir {
                    dir.refresh_changing(&event.subsystem, &event.properties, &mut attributes);
                }
                (Change::Upsert, attributes)
            }
        };
        attributes.insert("kernel-seqnum".into(), event.seqnum.into());
        Some(Record {
            source: NAME,
            subtype,
            object_id: event.devpath,
            change,
            attributes,
            properties: event.properties,
            audience: Audience::Everyone,
        })
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        *lock(&self.following) = None;
    }
}

/// Resolves when udevd may have started or stopped; never without a follower.
async fn presence_changed(presence: &mut Option<UdevPresence>) {
    let Some(follower) = presence else {
        return std::future::pending().await;
    };
    if let Err(e) = follower.changed().await {
        tracing::warn!(
            source = NAME,
            "stopped following udevd starting or stopping: {e}"
        );
        *presence = None;
    }
}

fn subtype_of(event: &wire::UEvent) -> u8 {
    let name = match event.action {
        Action::Change
            if event
                .properties
                .get("DISK_MEDIA_CHANGE")
                .is_some_and(|v| v == "1") =>
        {
            "media-change"
        }
        Action::Change if event.properties.get("RESIZE").is_some_and(|v| v == "1") => "resize",
        Action::Change if event.properties.contains_key("OVER_CURRENT_PORT") => "over-current",
        action => action.as_str(),
    };
    SUBTYPES
        .iter()
        .position(|s| *s == name)
        .and_then(|i| u8::try_from(i).ok())
        .unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_change_and_resize_are_their_own_subtypes() {
        let mut event = wire::parse(b"change@/devices/virtual/block/loop0\0ACTION=change\0DEVPATH=/devices/virtual/block/loop0\0SUBSYSTEM=block\0SEQNUM=1\0").unwrap();
        assert_eq!(SUBTYPES[usize::from(subtype_of(&event))], "change");
        event.properties.insert("RESIZE".into(), "1".into());
        assert_eq!(SUBTYPES[usize::from(subtype_of(&event))], "resize");
        event
            .properties
            .insert("DISK_MEDIA_CHANGE".into(), "1".into());
        assert_eq!(SUBTYPES[usize::from(subtype_of(&event))], "media-change");
    }

    /// The uevent hub.c sends for an over-current condition on port 2 of a root hub.
    #[test]
    fn hub_over_current_is_its_own_subtype() {
        let event = wire::parse(b"change@/devices/pci0000:00/0000:00:04.0/usb1/1-0:1.0\0ACTION=change\0DEVPATH=/devices/pci0000:00/0000:00:04.0/usb1/1-0:1.0\0SUBSYSTEM=usb\0DEVTYPE=usb_interface\0OVER_CURRENT_PORT=usb1-port2\0OVER_CURRENT_COUNT=3\0SEQNUM=9\0").unwrap();
        assert_eq!(SUBTYPES[usize::from(subtype_of(&event))], "over-current");
    }
}

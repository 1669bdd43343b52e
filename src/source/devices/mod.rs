//! Block and USB devices, from kernel uevents.
//!
//! Touches: a `NETLINK_KOBJECT_UEVENT` socket bound to multicast group 1 (the kernel's,
//! not udev's), `SO_RCVBUFFORCE` (CAP_NET_ADMIN; falls back to `SO_RCVBUF`),
//! `SO_PASSCRED`, and reads below `/sys`. Works on any kernel with `CONFIG_NET`; no
//! other capability. Under systemd the socket is the one `watchqd.socket` passes, in the
//! host's network namespace, with the buffer systemd sized ([`crate::activation`]);
//! otherwise it exists only while some subscription watches devices.
//!
//! Origin is checked at the edge: a message counts as the kernel's only when the sender's
//! netlink port id is 0 and its credentials say uid 0. Root in the initial network
//! namespace can multicast forged uevents from userspace; those carry its own port id.
//! `ENOBUFS` means the kernel dropped events for us: the source rescans sysfs and yields
//! [`SourceMsg::Overflow`] so that every subscriber is told.

pub mod signal;
mod sysfs;
pub mod udev_wire;
pub mod wire;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::stream;
use nix::sys::socket::{
    self, sockopt, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use tokio::sync::watch;

pub use sysfs::{DeviceDir, Sysfs, SUBSYSTEMS};

use super::{
    Availability, EventSource, JournalIds, PlannedWatch, SourceStream, SourcesConfig, SpecReader,
    WatchMatcher, WatchSpec,
};
use crate::activation;
use crate::error::Error;
use crate::event::{Attrs, Audience, Change, Object, Record, SourceMsg};
use crate::glob::Pattern;
use crate::policy::{Identity, Scope};
pub use crate::sys::netlink::Counters;
use crate::sys::netlink::{Datagram, KernelSocket, Labels};
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
/// Devices whose changing attribute files the reader holds open (three each), so that a
/// storm on them costs one read per attribute; the others reopen the files each event.
/// Bounds the fds a machine with thousands of devices makes the daemon hold.
const DEVICES_HOLDING_FILES: usize = 64;
/// Largest uevent the kernel sends (`UEVENT_BUFFER_SIZE`) plus the header.
const UEVENT_BUFFER: usize = 2048 + 512;

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
}

impl Devices {
    pub fn new(config: &DevicesConfig) -> Self {
        Devices {
            config: watch::Sender::new(config.clone()),
            sysfs: Sysfs::default(),
            counters: Arc::default(),
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

    fn probe(&self) -> Availability {
        if activation::has_passed(activation::NETLINK_KOBJECT_UEVENT) {
            return Availability::Available;
        }
        match open_socket(0) {
            Ok(_socket) => Availability::Available,
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

    fn scan(&self) -> io::Result<Vec<Object>> {
        self.sysfs.scan()
    }

    fn open(&self) -> io::Result<SourceStream> {
        let mut settings = self.config.subscribe();
        let receive_buffer = settings.borrow_and_update().receive_buffer;
        let (fd, passed) = open_socket(receive_buffer)?;
        let reader = Reader {
            socket: KernelSocket::new(fd, UEVENT_BUFFER, Arc::clone(&self.counters), LABELS)?,
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

/// The socket systemd passed (bound by its `ListenNetlink=kobject-uevent 1`), or one of
/// our own; and whether it was passed.
fn open_socket(receive_buffer: usize) -> io::Result<(OwnedFd, bool)> {
    let (fd, passed) = match activation::passed_socket(activation::NETLINK_KOBJECT_UEVENT)? {
        Some(fd) => (fd, true),
        None => {
            let fd = socket::socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                SockProtocol::NetlinkKObjectUEvent,
            )?;
            (fd, false)
        }
    };
    if receive_buffer > 0 {
        size_buffer(&fd, receive_buffer, passed)?;
    }
    socket::setsockopt(&fd, sockopt::PassCred, &true)?;
    if !passed {
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, UEVENT_GROUP_KERNEL))?;
    }
    Ok((fd, passed))
}

/// Gives the socket `receive_buffer` bytes: exactly, for a socket of our own; at least,
/// for one systemd passed (its `ReceiveBuffer=` is the administrator's too).
fn size_buffer(fd: &OwnedFd, receive_buffer: usize, passed: bool) -> io::Result<usize> {
    let got = if passed {
        activation::raise_receive_buffer(fd, receive_buffer)?
    } else {
        activation::set_receive_buffer(fd, receive_buffer)?
    };
    if got < receive_buffer {
        tracing::info!(
            source = NAME,
            "uevent socket buffer is {got} bytes, not {receive_buffer}: without CAP_NET_ADMIN the kernel caps it at net.core.rmem_max (ReceiveBuffer= in watchqd.socket sets it under systemd)"
        );
    }
    Ok(got)
}

/// How the uevent socket is read ([`crate::sys::netlink`]): credentials must say uid 0.
const LABELS: Labels = Labels {
    source: NAME,
    socket: "uevent socket",
    message: "uevent",
    datagram: None,
    warn_truncated: false,
    check_credentials: true,
};

struct Reader {
    socket: KernelSocket,
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
            };
            match datagram {
                Datagram::Message(len) => {
                    self.counters.received.fetch_add(1, Ordering::Relaxed);
                    let bytes = self.socket.bytes(len);
                    match wire::parse(bytes) {
                        Ok(event) => {
                            if let Some(record) = self.record(event) {
                                return Some(SourceMsg::Record(record));
                            }
                        }
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
                    let objects = self.sysfs.scan().unwrap_or_else(|e| {
                        tracing::error!(source = NAME, "sysfs rescan failed: {e}");
                        Vec::new()
                    });
                    return Some(SourceMsg::Overflow { objects });
                }
            }
        }
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

/// A device watch: every given condition must hold.
///
/// Keys: `subsystem` (`block` or `usb`), `devtype` (`disk`, `partition`, `usb_device`,
/// `usb_interface`, …), `name` (the kernel name, `*` and `?` wildcards, compiled once
/// here), `properties` (`a{ss}` of uevent properties that must be equal).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeviceWatch {
    /// Uevent properties that must be equal, `SUBSYSTEM` and `DEVTYPE` from their keys
    /// included, sorted by key: one walk along the record's (sorted) properties checks
    /// them all, whatever their number, as every watch is checked for every event.
    required: Vec<(String, String)>,
    name: Option<Pattern>,
}

impl DeviceWatch {
    const KEYS: &'static [&'static str] = &["subsystem", "devtype", "name", "properties"];
    const MAX_PROPERTIES: usize = 16;

    pub fn parse(spec: &WatchSpec) -> Result<Self, Error> {
        let spec = SpecReader::new(spec, NAME, Self::KEYS)?;
        let subsystem = spec.str("subsystem")?;
        if let Some(subsystem) = &subsystem {
            if !SUBSYSTEMS.contains(&subsystem.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "device watches cover the subsystems {}; '{subsystem}' is not one of them",
                    SUBSYSTEMS.join(", ")
                )));
            }
        }
        let properties = spec.str_map("properties")?.unwrap_or_default();
        if properties.len() > Self::MAX_PROPERTIES {
            return Err(Error::LimitExceeded(format!(
                "a device watch may match at most {} properties",
                Self::MAX_PROPERTIES
            )));
        }
        let devtype = spec.str("devtype")?;
        let mut required: Vec<(String, String)> = properties.into_iter().collect();
        required.extend(subsystem.map(|s| ("SUBSYSTEM".to_owned(), s)));
        required.extend(devtype.map(|d| ("DEVTYPE".to_owned(), d)));
        // By key, then value: equal specs compile to equal watches.
        required.sort_unstable();
        Ok(DeviceWatch {
            required,
            name: spec
                .str("name")?
                .map(|name| Pattern::for_name("name", &name))
                .transpose()?,
        })
    }
}

/// A device's kernel name: the last component of its sysfs path (its object id).
fn kernel_name(record: &Record) -> Option<&str> {
    record.object_id.rsplit('/').next()
}

impl WatchMatcher for DeviceWatch {
    /// A name without wildcards: the hub looks the watch up by the event's kernel name
    /// ([`EventSource::index_key`]) instead of visiting it for every device.
    fn index_key(&self) -> Option<&str> {
        self.name.as_ref().and_then(Pattern::exact)
    }

    fn matches(&self, record: &Record) -> bool {
        record.source == NAME
            && has_all(&record.properties, &self.required)
            && self
                .name
                .as_ref()
                .is_none_or(|pattern| kernel_name(record).is_some_and(|name| pattern.matches(name)))
    }
}

/// Whether `properties` has every (key, value) of `required` (sorted by key), in one walk
/// along both: at most one key comparison per property and per requirement.
fn has_all(properties: &crate::event::Properties, required: &[(String, String)]) -> bool {
    let mut properties = properties.iter().peekable();
    'required: for (key, value) in required {
        while let Some((k, v)) = properties.peek() {
            match k.as_str().cmp(key.as_str()) {
                std::cmp::Ordering::Less => {
                    properties.next();
                }
                // Not advanced: a key may be required twice (`subsystem` and
                // `properties`), with the same value or never matching.
                std::cmp::Ordering::Equal if *v == value => continue 'required,
                _ => return false,
            }
        }
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::spec::spec;

    fn record(devpath: &str, props: &[(&str, &str)]) -> Record {
        Record {
            source: NAME,
            subtype: 0,
            object_id: devpath.into(),
            change: Change::Upsert,
            attributes: Attrs::new(),
            properties: props
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            audience: Audience::Everyone,
        }
    }

    #[test]
    fn watch_matches_subsystem_name_and_properties() {
        let watch = DeviceWatch::parse(&spec(&[
            ("subsystem", "block".into()),
            ("name", "loop*".into()),
        ]))
        .unwrap();
        let loop0 = record("/devices/virtual/block/loop0", &[("SUBSYSTEM", "block")]);
        let vda = record("/devices/pci/virtio/block/vda", &[("SUBSYSTEM", "block")]);
        assert!(watch.matches(&loop0));
        assert!(!watch.matches(&vda));
    }

    /// Subsystem, devtype and properties are one sorted list checked in one walk; it
    /// answers as lookups one by one would.
    #[test]
    fn watch_requires_every_property_given_and_nothing_else() {
        let props = [
            ("DEVNAME", "loop0"),
            ("DEVTYPE", "disk"),
            ("MAJOR", "7"),
            ("SUBSYSTEM", "block"),
        ];
        let loop0 = record("/devices/virtual/block/loop0", &props);
        let watch = |pairs: &[(&str, zbus::Variant<'_>)]| DeviceWatch::parse(&spec(pairs)).unwrap();
        let properties = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            zbus::Variant::from(map)
        };
        assert!(watch(&[]).matches(&loop0));
        assert!(watch(&[("devtype", "disk".into())]).matches(&loop0));
        assert!(watch(&[
            ("subsystem", "block".into()),
            ("devtype", "disk".into()),
            (
                "properties",
                properties(&[("MAJOR", "7"), ("DEVNAME", "loop0")])
            ),
        ])
        .matches(&loop0));
        // The first key, the last key, a key between two, a key past the end.
        for missing in ["A", "ZZZ", "DEVPATH", "MINOR"] {
            assert!(
                !watch(&[("properties", properties(&[("MAJOR", "7"), (missing, "x")]))])
                    .matches(&loop0),
                "{missing}"
            );
        }
        assert!(!watch(&[("properties", properties(&[("MAJOR", "8")]))]).matches(&loop0));
        assert!(!watch(&[("devtype", "partition".into())]).matches(&loop0));
        // A key given twice: both values must be the one the event has.
        assert!(watch(&[
            ("subsystem", "block".into()),
            ("properties", properties(&[("SUBSYSTEM", "block")])),
        ])
        .matches(&loop0));
        assert!(!watch(&[
            ("subsystem", "usb".into()),
            ("properties", properties(&[("SUBSYSTEM", "block")])),
        ])
        .matches(&loop0));
    }

    #[test]
    fn watch_rejects_unknown_keys_subsystems_and_types() {
        assert!(matches!(
            DeviceWatch::parse(&spec(&[("subsytem", "block".into())])),
            Err(Error::InvalidArgument(m)) if m.contains("subsytem")
        ));
        assert!(matches!(
            DeviceWatch::parse(&spec(&[("subsystem", "net".into())])),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            DeviceWatch::parse(&spec(&[("subsystem", 7u32.into())])),
            Err(Error::InvalidArgument(m)) if m.contains("'u'")
        ));
    }

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

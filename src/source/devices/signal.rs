//! `DeviceChanged`: the devices source's signal and its part of the interface: the struct's
//! doc comment is the signal's documentation for clients, `add_watch_doc` its paragraph of
//! `AddWatch`'s (both land in `dbus/org.watchq1.Subscription.xml`).

use std::fmt;

use crate::signal::{event_signal, Attributes, SignalKind};

event_signal! {
    source: super::NAME,
    member_fn: device_changed,
    add_watch_doc: {
        /// devices: "subsystem" (s: block or usb), "devtype" (s), "name" (s), "properties"
        /// (a{ss}, uevent properties that must match: udev's too where the source follows
        /// udev, such as ID_FS_TYPE or TAGS); devtype, name and property values take * and
        /// ? wildcards.
    },
    /// A block or USB device changed. action is the subtype name (add, remove, change,
    /// move, online, offline, bind, unbind, media-change, resize, over-current); sys_path the device's
    /// path below /sys; attributes are typed (name, devname, major, minor, size, ...);
    /// properties are the uevent environment: udev's where udevd runs (the kernel's keys
    /// and udev's: ID_*, DEVLINKS, TAGS, DEVNAME as a path, ...; sent once its rules ran),
    /// the kernel's elsewhere (Sources says which).
    pub struct DeviceChanged(record, fields) {
        /// The subtype name (add, remove, change, …).
        pub action: String = fields.subtype(super::SUBTYPES, "change"),
        pub subsystem: String = fields.text("subsystem"),
        /// The device's path below /sys.
        pub sys_path: String = record.object_id.as_str().into(),
        pub attributes: crate::signal::Attributes<'static> = Attributes::of(record),
        /// The uevent environment, udev's or the kernel's.
        pub properties: std::collections::BTreeMap<String, String> = std::borrow::Cow::Borrowed(&record.properties),
    }
}

pub static KIND: SignalKind = SignalKind::of::<DeviceChanged>();

impl fmt::Display for DeviceChanged<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.attributes.str("name").unwrap_or(&self.sys_path);
        write!(
            f,
            "#{:<6} devices {:<12} {:<6} {name:<10} {}",
            self.seq,
            self.action,
            self.subsystem,
            self.attributes
                .text(&["name", "subsystem", "kernel-seqnum"])
        )
    }
}

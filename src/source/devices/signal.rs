//! `DeviceChanged`: the devices source's signal (its documentation for clients is the
//! interface's, in `dbus/org.watchq1.Subscription.xml`).

use std::collections::BTreeMap;
use std::fmt;

use crate::signal::{event_signal, Attributes, SignalKind};

event_signal! {
    source: super::NAME,
    /// A block or USB device changed.
    pub struct DeviceChanged(record, fields) {
        /// The subtype name (add, remove, change, …).
        pub action: String = fields.subtype(super::SUBTYPES, "change"),
        pub subsystem: String = fields.text("subsystem"),
        /// The device's path below /sys.
        pub sys_path: String = record.object_id.clone(),
        pub attributes: Attributes = Attributes::of(record),
        /// The kernel's uevent environment.
        pub properties: BTreeMap<String, String> = record.properties.clone(),
    }
}

pub static KIND: SignalKind = SignalKind::of::<DeviceChanged>();

impl fmt::Display for DeviceChanged {
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

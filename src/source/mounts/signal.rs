//! `MountChanged`: the mounts source's signal (its documentation for clients is the
//! interface's, in `dbus/org.watchq1.Subscription.xml`).

use std::fmt;

use crate::signal::{event_signal, Attributes, SignalKind};

event_signal! {
    source: super::NAME,
    /// A mount changed in a watched mount namespace.
    pub struct MountChanged(record, fields) {
        /// The subtype name: attach, detach, move or remount.
        pub change: String = fields.subtype(super::SUBTYPES, "attach"),
        /// The kernel's 64-bit unique mount id.
        pub mount_id: u64 = fields.u64("mount-id"),
        pub parent_id: u64 = fields.u64("parent-id"),
        pub mount_point: String = fields.text("mount-point"),
        /// The mount's source; `mount_source` in JSON, where `source` names the source.
        #[serde(rename = "mount_source")]
        pub source: String = fields.text("source"),
        pub fs_type: String = fields.text("fs-type"),
        pub options: String = fields.text("options"),
        pub attributes: Attributes = Attributes::of(record),
    }
}

pub static KIND: SignalKind = SignalKind::of::<MountChanged>();

impl fmt::Display for MountChanged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{:<6} mounts  {:<12} {} ({} from {}, {}) id {} parent {}",
            self.seq,
            self.change,
            self.mount_point,
            self.fs_type,
            self.source,
            self.options,
            self.mount_id,
            self.parent_id
        )
    }
}

//! `SpaceWarning`: the space source's signal (its documentation for clients is the
//! interface's, in `dbus/org.watchq1.Subscription.xml`).

use std::fmt;

use crate::signal::{event_signal, Attributes, SignalKind};

event_signal! {
    source: super::NAME,
    /// Space on a watched filesystem crossed or cleared a level of the watch.
    pub struct SpaceWarning(record, fields) {
        /// crossed or cleared.
        pub state: String = fields.text("state"),
        /// The subtype name: low or full.
        pub level: String = fields.subtype(super::SUBTYPES, "low"),
        pub path: String = fields.text("path"),
        pub mount_point: String = fields.text("mount-point"),
        pub available_bytes: u64 = fields.u64("available-bytes"),
        pub total_bytes: u64 = fields.u64("total-bytes"),
        pub threshold_bytes: u64 = fields.u64("threshold-bytes"),
        pub attributes: Attributes = Attributes::of(record),
    }
}

pub static KIND: SignalKind = SignalKind::of::<SpaceWarning>();

impl fmt::Display for SpaceWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{:<6} space {} {} on {} ({}): {} of {} bytes available, threshold {}",
            self.seq,
            self.level,
            self.state,
            self.mount_point,
            self.path,
            self.available_bytes,
            self.total_bytes,
            self.threshold_bytes
        )
    }
}

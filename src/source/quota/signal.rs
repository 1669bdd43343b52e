//! `QuotaWarning`: the quota source's signal (its documentation for clients is the
//! interface's, in `dbus/org.watchq1.Subscription.xml`).

use std::fmt;

use crate::signal::{event_signal, Attributes, SignalKind};

event_signal! {
    source: super::NAME,
    /// A disk quota warning.
    pub struct QuotaWarning(record, fields) {
        /// The subtype name (block-soft, …, or other).
        pub warning: String = fields.text("warning"),
        pub kind: String = fields.text("kind"),
        pub resource: String = fields.text("resource"),
        pub quota_type: String = fields.text("quota-type"),
        /// The uid, gid or project id whose limit it is.
        pub excess_id: u64 = fields.u64("excess-id"),
        /// The uid whose operation crossed it.
        pub caused_id: u64 = fields.u64("caused-id"),
        pub device: String = fields.text("device"),
        pub major: u32 = fields.u32("major"),
        pub minor: u32 = fields.u32("minor"),
        pub attributes: Attributes = Attributes::of(record),
    }
}

pub static KIND: SignalKind = SignalKind::of::<QuotaWarning>();

impl fmt::Display for QuotaWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let place = self
            .attributes
            .str("mount-point")
            .map(|m| format!(" on {m}"))
            .unwrap_or_default();
        write!(
            f,
            "#{:<6} quota {} {} limit of {} {} on {} ({}:{}){place}, caused by uid {}",
            self.seq,
            self.kind,
            self.resource,
            self.quota_type,
            self.excess_id,
            self.device,
            self.major,
            self.minor,
            self.caused_id
        )
    }
}

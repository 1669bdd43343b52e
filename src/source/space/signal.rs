//! `SpaceWarning`: the space source's signal and its part of the interface: the struct's
//! doc comment is the signal's documentation for clients, `add_watch_doc` its paragraph of
//! `AddWatch`'s (both land in `dbus/org.watchq1.Subscription.xml`).

use std::fmt;

use crate::signal::{event_signal, Attributes, SignalKind};

event_signal! {
    source: super::NAME,
    member_fn: space_warning,
    add_watch_doc: {
        /// space (own): "path" (s, absolute, which the caller must be able to reach) and
        /// exactly one of "low-percent" (u, 1-99) and "low-bytes" (t).
    },
    /// Space on a watched filesystem crossed or cleared a level of this watch. state is
    /// "crossed" or "cleared"; level "low" (available space below the watch's
    /// low-percent or low-bytes) or "full" (at most 1% of the size left for
    /// unprivileged users: ext4 says ENOSPC before nothing at all is left);
    /// path the path the watch named, mount_point where its filesystem is mounted;
    /// available_bytes and total_bytes as df counts them (f_bavail, f_blocks);
    /// threshold_bytes the level's threshold. Each crossing is sent once;
    /// a level clears once space is 1% of the size above its threshold.
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
        pub attributes: crate::signal::Attributes<'static> = Attributes::of(record),
    }
}

pub static KIND: SignalKind = SignalKind::of::<SpaceWarning>();

impl fmt::Display for SpaceWarning<'_> {
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

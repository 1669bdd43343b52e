//! `MountChanged`: the mounts source's signal and its part of the interface: the struct's
//! doc comment is the signal's documentation for clients, `add_watch_doc` its paragraph of
//! `AddWatch`'s (both land in `dbus/org.watchq1.Subscription.xml`).

use std::fmt;

use crate::signal::{event_signal, Attributes, SignalKind};

event_signal! {
    source: super::NAME,
    member_fn: mount_changed,
    add_watch_doc: {
        /// mounts: none for the caller's own mount namespace, or "pid" (u) for that
        /// process's namespace (administrators, unless it is the caller's own); the watch
        /// ends when no process is left in the namespace.
    },
    /// A mount changed in a watched mount namespace. change is the subtype name: attach,
    /// detach, move (one event: the mount moved within its namespace) or remount (its
    /// options changed: read-only, nosuid, filesystem options). mount_id and parent_id are
    /// the kernel's 64-bit unique mount ids (not mountinfo's, which are in the attributes
    /// as mountinfo-id); a detach is described as the mount was before it went. options
    /// are the mount's own (ro,nosuid,nodev,noexec,relatime...). attributes repeat these
    /// typed and add namespace, root, fs-options, read-only, fs-read-only, nosuid, nodev,
    /// noexec, nosymfollow, idmapped, atime, propagation, peer-group, master, major, minor.
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
        pub attributes: crate::signal::Attributes<'static> = Attributes::of(record),
    }
}

pub static KIND: SignalKind = SignalKind::of::<MountChanged>();

impl fmt::Display for MountChanged<'_> {
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

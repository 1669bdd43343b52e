//! `QuotaWarning`: the quota source's signal and its part of the interface: the struct's
//! doc comment is the signal's documentation for clients, `add_watch_doc` its paragraph of
//! `AddWatch`'s (both land in `dbus/org.watchq1.Subscription.xml`).

use std::fmt;

use crate::signal::{event_signal, Attributes, SignalKind};

event_signal! {
    source: super::NAME,
    member_fn: quota_warning,
    add_watch_doc: {
        /// quota: "scope" (s: own, the default, for warnings about the caller's uid; system
        /// for every uid, administrators), "type" (s: user, group or project), "device" (s:
        /// MAJ:MIN or the kernel name).
    },
    /// A disk quota warning (the kernel's VFS_DQUOT netlink family). warning is the
    /// subtype name (block-soft, block-hard, block-soft-long, block-soft-below,
    /// block-hard-below, the inode-* ones, or other for a code this daemon does not
    /// know); kind is hard, soft, soft-long, hard-below or soft-below; resource blocks or
    /// inodes; quota_type user, group or project. excess_id is the uid, gid or project id
    /// whose limit it is, caused_id the uid whose operation crossed it. device is the
    /// kernel name (loop0, sda1) or "MAJ:MIN" for filesystems without a block device.
    /// attributes repeat these typed and add code (the kernel's number), mount-point and
    /// fs-type when the daemon finds the filesystem mounted. Sent only to subscribers
    /// of the uid the warning concerns and to administrators.
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
        pub attributes: crate::signal::Attributes<'static> = Attributes::of(record),
    }
}

pub static KIND: SignalKind = SignalKind::of::<QuotaWarning>();

impl fmt::Display for QuotaWarning<'_> {
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

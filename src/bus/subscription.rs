//! `org.watchq1.Subscription` at `/org/watchq1/subscription/N`: only its owner may call it.

// Signals carry their whole payload as arguments, and the interface macro generates
// code from them outside the impl block, so the allowance has to be module-wide.
#![allow(clippy::too_many_arguments)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, OwnedVariant};

use super::error::BusError;
use super::types::{AttrMap, SnapshotObject};
use super::Service;
use crate::event::Attrs;

pub const PATH_PREFIX: &str = "/org/watchq1/subscription";
/// The interface below, for signals built by hand (see `super::emit`).
pub const INTERFACE: &str = "org.watchq1.Subscription";

pub fn path(id: u64) -> String {
    format!("{PATH_PREFIX}/{id}")
}

pub struct SubscriptionObject {
    pub(super) id: u64,
    pub(super) service: Arc<Service>,
}

impl SubscriptionObject {
    fn caller<'h>(header: &'h Header<'_>) -> Result<&'h str, BusError> {
        super::sender(header).map(|s| s.as_str())
    }

    fn check_owner(&self, header: Option<&Header<'_>>) -> Result<(), BusError> {
        // Local reads (no header) come from the daemon itself.
        let Some(header) = header else { return Ok(()) };
        let caller = Self::caller(header)?;
        match self.service.hub.owner_of(self.id) {
            Some(owner) if owner == caller => Ok(()),
            Some(_) => Err(BusError::AccessDenied(format!(
                "subscription {} belongs to another connection",
                self.id
            ))),
            None => Err(BusError::NotFound(format!(
                "subscription {} is closed",
                self.id
            ))),
        }
    }
}

/// One client's subscription. Every signal is sent only to the owner. Every signal
/// carries a sequence number: it grows by one per signal, except that Lost(seq, count)
/// stands for count numbers when count > 0.
#[interface(name = "org.watchq1.Subscription")]
impl SubscriptionObject {
    /// Adds a watch. kind names a source (see the Manager's Sources property); tag is
    /// echoed in every event the watch matches and must be unique in this subscription;
    /// spec holds the source's match keys. devices: "subsystem" (s: block or usb),
    /// "devtype" (s), "name" (s, with * and ? wildcards), "properties" (a{ss}, uevent
    /// properties that must be equal). block-errors (administrators): "name" (s, the
    /// device's kernel name, with * and ? wildcards). quota: "scope" (s: own, the
    /// default, for warnings about the caller's uid; system for every uid,
    /// administrators), "type" (s: user, group or project), "device" (s: MAJ:MIN or the
    /// kernel name). filesystems (administrators): "path" (s, absolute; the whole
    /// filesystem holding it is watched). space (own): "path" (s, absolute, which the
    /// caller must be able to reach) and exactly one of "low-percent" (u, 1-99) and
    /// "low-bytes" (t). mounts: none for the caller's own mount namespace, or "pid" (u)
    /// for that process's namespace (administrators, unless it is the caller's own); the
    /// watch ends when no process is left in the namespace. keys: at most one of
    /// "keyring" (s: user or persistent; with "uid" (u) another user's, for
    /// administrators) or "serial" (i: a key or keyring of yours, e.g. your session
    /// keyring), and optionally "changes" (as: the change kinds wanted); by default your
    /// user keyring.
    async fn add_watch(
        &self,
        #[zbus(header)] header: Header<'_>,
        kind: &str,
        tag: u64,
        spec: HashMap<String, OwnedVariant>,
    ) -> Result<(), BusError> {
        let caller = Self::caller(&header)?;
        // Whose it is comes first: a stranger learns nothing from argument errors.
        self.check_owner(Some(&header))?;
        Ok(self
            .service
            .add_watch(self.id, caller, kind, tag, &spec)
            .await?)
    }

    /// Removes the watch with this tag.
    async fn remove_watch(
        &self,
        #[zbus(header)] header: Header<'_>,
        tag: u64,
    ) -> Result<(), BusError> {
        let caller = Self::caller(&header)?;
        // Whose it is comes first: a stranger learns nothing from argument errors.
        self.check_owner(Some(&header))?;
        Ok(self.service.hub.remove_watch(self.id, caller, tag).await?)
    }

    /// Replaces the filter: a list of (source, subtype names). An event passes when some
    /// entry names its source and subtype. An empty list passes everything. Lost and
    /// WatchRemoved are never filtered.
    async fn set_filter(
        &self,
        #[zbus(header)] header: Header<'_>,
        filter: Vec<(String, Vec<String>)>,
    ) -> Result<(), BusError> {
        let caller = Self::caller(&header)?;
        // Whose it is comes first: a stranger learns nothing from argument errors.
        self.check_owner(Some(&header))?;
        Ok(self.service.hub.set_filter(self.id, caller, &filter)?)
    }

    /// Current objects of a source and the sequence number they are valid at: apply
    /// every event with a higher number, and none with a lower one.
    #[zbus(out_args("seq", "objects"))]
    async fn snapshot(
        &self,
        #[zbus(header)] header: Header<'_>,
        source: &str,
    ) -> Result<(u64, Vec<SnapshotObject>), BusError> {
        let caller = super::sender(&header)?;
        self.check_owner(Some(&header))?;
        let (seq, objects) = self.service.snapshot(caller, source, Some(self.id)).await?;
        Ok((seq, objects.into_iter().map(SnapshotObject::from).collect()))
    }

    /// Ends the subscription: its watches are removed and the object disappears.
    async fn close(&self, #[zbus(header)] header: Header<'_>) -> Result<(), BusError> {
        let caller = Self::caller(&header)?;
        self.check_owner(Some(&header))?;
        tracing::debug!(subscription = self.id, caller, "closed by its owner");
        self.service.close(self.id).await;
        Ok(())
    }

    /// Events kept for the subscriber before newer ones are dropped and counted.
    #[zbus(property(emits_changed_signal = "const"))]
    fn queue_depth(&self, #[zbus(header)] header: Option<Header<'_>>) -> Result<u32, BusError> {
        self.check_owner(header.as_ref())?;
        Ok(u32::try_from(self.service.hub.queue_depth(self.id)).unwrap_or(u32::MAX))
    }

    /// The watches: (tag, source).
    #[zbus(property(emits_changed_signal = "false"))]
    fn watches(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
    ) -> Result<Vec<(u64, String)>, BusError> {
        self.check_owner(header.as_ref())?;
        Ok(self
            .service
            .hub
            .watches(self.id)
            .into_iter()
            .map(|w| (w.tag, w.source.to_owned()))
            .collect())
    }

    /// The filter as SetFilter took it.
    #[zbus(property(emits_changed_signal = "false"))]
    fn filter(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
    ) -> Result<Vec<(String, Vec<String>)>, BusError> {
        self.check_owner(header.as_ref())?;
        Ok(self.service.hub.filter(self.id))
    }

    /// A block or USB device changed. action is the subtype name (add, remove, change,
    /// move, online, offline, bind, unbind, media-change, resize, over-current); sys_path the device's
    /// path below /sys; attributes are typed (name, devname, major, minor, size, ...);
    /// properties are the kernel's uevent environment.
    #[zbus(signal)]
    pub async fn device_changed(
        emitter: &SignalEmitter<'_>,
        seq: u64,
        tag: u64,
        action: &str,
        subsystem: &str,
        sys_path: &str,
        attributes: AttrMap<&Attrs>,
        properties: &BTreeMap<String, String>,
    ) -> zbus::Result<()>;

    /// A block device failed an I/O request (the kernel's block:block_rq_error).
    /// device is the kernel name (loop0, sda) or "MAJ:MIN" when the device is already
    /// gone; sector and sectors the request's range in 512-byte sectors; operation the
    /// kernel's rwbs string (R, W, WS, FF, D, ...); errno_name and errno the error (EIO,
    /// 5). count is how many errors this event stands for: 1, or more when a storm on the
    /// device was summarised by the rate limit (then sector is the first one's and the
    /// attributes hold last-sector and last-monotonic-ns). attributes repeat these fields
    /// typed and add monotonic-ns (CLOCK_MONOTONIC time of the error).
    #[zbus(signal)]
    pub async fn block_error(
        emitter: &SignalEmitter<'_>,
        seq: u64,
        tag: u64,
        device: &str,
        major: u32,
        minor: u32,
        sector: u64,
        sectors: u32,
        operation: &str,
        errno_name: &str,
        errno: i32,
        count: u64,
        attributes: AttrMap<&Attrs>,
    ) -> zbus::Result<()>;

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
    #[zbus(signal)]
    pub async fn quota_warning(
        emitter: &SignalEmitter<'_>,
        seq: u64,
        tag: u64,
        warning: &str,
        kind: &str,
        resource: &str,
        quota_type: &str,
        excess_id: u64,
        caused_id: u64,
        device: &str,
        major: u32,
        minor: u32,
        attributes: AttrMap<&Attrs>,
    ) -> zbus::Result<()>;

    /// A watched filesystem reported an error (fanotify FAN_FS_ERROR), kind "error", or
    /// switched between read-write and read-only, kind "read-only" (after an error with
    /// errors=remount-ro, or a remount; attributes read-only (b) and after-error (b)).
    /// device is the kernel name (loop3) or the mount source; fs_type and mount_point
    /// where it is mounted; errno_name and errno the first error the event stands for
    /// (EUCLEAN = 117 is the kernel's EFSCORRUPTED, also given as kernel-errno-name; for
    /// read-only, the last error before the switch: 0 and "" if none); error_count how many
    /// errors the kernel merged into this event; inode the inode concerned, 0 when the
    /// filesystem named none (errors of the filesystem as a whole).
    #[zbus(signal)]
    pub async fn filesystem_error(
        emitter: &SignalEmitter<'_>,
        seq: u64,
        tag: u64,
        kind: &str,
        device: &str,
        major: u32,
        minor: u32,
        fs_type: &str,
        mount_point: &str,
        errno_name: &str,
        errno: i32,
        error_count: u32,
        inode: u64,
        attributes: AttrMap<&Attrs>,
    ) -> zbus::Result<()>;

    /// Space on a watched filesystem crossed or cleared a level of this watch. state is
    /// "crossed" or "cleared"; level "low" (available space below the watch's
    /// low-percent or low-bytes) or "full" (at most 1% of the size left for
    /// unprivileged users: ext4 says ENOSPC before nothing at all is left);
    /// path the path the watch named, mount_point where its filesystem is mounted;
    /// available_bytes and total_bytes as df counts them (f_bavail, f_blocks);
    /// threshold_bytes the level's threshold. Each crossing is sent once;
    /// a level clears once space is 1% of the size above its threshold.
    #[zbus(signal)]
    pub async fn space_warning(
        emitter: &SignalEmitter<'_>,
        seq: u64,
        tag: u64,
        state: &str,
        level: &str,
        path: &str,
        mount_point: &str,
        available_bytes: u64,
        total_bytes: u64,
        threshold_bytes: u64,
        attributes: AttrMap<&Attrs>,
    ) -> zbus::Result<()>;

    /// A mount changed in a watched mount namespace. change is the subtype name: attach,
    /// detach, move (one event: the mount moved within its namespace) or remount (its
    /// options changed: read-only, nosuid, filesystem options). mount_id and parent_id are
    /// the kernel's 64-bit unique mount ids (not mountinfo's, which are in the attributes
    /// as mountinfo-id); a detach is described as the mount was before it went. options
    /// are the mount's own (ro,nosuid,nodev,noexec,relatime...). attributes repeat these
    /// typed and add namespace, root, fs-options, read-only, fs-read-only, nosuid, nodev,
    /// noexec, nosymfollow, idmapped, atime, propagation, peer-group, master, major, minor.
    #[zbus(signal)]
    pub async fn mount_changed(
        emitter: &SignalEmitter<'_>,
        seq: u64,
        tag: u64,
        change: &str,
        mount_id: u64,
        parent_id: u64,
        mount_point: &str,
        source: &str,
        fs_type: &str,
        options: &str,
        attributes: AttrMap<&Attrs>,
    ) -> zbus::Result<()>;

    /// A key or keyring changed (the kernel's watch_queue key notification). change is
    /// the kind: instantiated, updated, linked, unlinked, cleared, revoked, invalidated,
    /// setattr; key the serial of the watched key; aux the key linked or unlinked (for
    /// linked/unlinked), the error of a negative instantiation, else 0. key_type and
    /// description describe the watched key when known ("" otherwise); attributes repeat
    /// key, aux, type, description and add owner (the key's uid).
    #[zbus(signal)]
    pub async fn key_changed(
        emitter: &SignalEmitter<'_>,
        seq: u64,
        tag: u64,
        change: &str,
        key: i32,
        aux: i32,
        key_type: &str,
        description: &str,
        attributes: AttrMap<&Attrs>,
    ) -> zbus::Result<()>;

    /// Events were lost. reason "queue-full": the daemon dropped count events of this
    /// subscription (sequence numbers seq to seq+count-1) because they were not read in
    /// time. reason "kernel-overflow": the kernel dropped an unknown number of source's
    /// events (count is 0); take a new snapshot.
    #[zbus(signal)]
    pub async fn lost(
        emitter: &SignalEmitter<'_>,
        seq: u64,
        count: u64,
        source: &str,
        reason: &str,
    ) -> zbus::Result<()>;

    /// The watch with this tag ended without being asked to (its object or source went
    /// away); reason says why.
    #[zbus(signal)]
    pub async fn watch_removed(
        emitter: &SignalEmitter<'_>,
        seq: u64,
        tag: u64,
        reason: &str,
    ) -> zbus::Result<()>;
}

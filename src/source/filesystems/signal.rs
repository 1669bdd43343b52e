//! `FilesystemError`: the filesystems source's signal and its part of the interface: the struct's
//! doc comment is the signal's documentation for clients, `add_watch_doc` its paragraph of
//! `AddWatch`'s (both land in `dbus/org.watchq1.Subscription.xml`).

use std::fmt;

use crate::signal::{event_signal, Attributes, SignalKind};

event_signal! {
    source: super::NAME,
    member_fn: filesystem_error,
    add_watch_doc: {
        /// filesystems (administrators): "path" (s, absolute; the whole filesystem holding
        /// it is watched).
    },
    /// A watched filesystem reported an error (fanotify FAN_FS_ERROR), kind "error", or
    /// switched between read-write and read-only, kind "read-only" (after an error with
    /// errors=remount-ro, or a remount; attributes read-only (b) and after-error (b)).
    /// device is the kernel name (loop3) or the mount source; fs_type and mount_point
    /// where it is mounted; errno_name and errno the first error the event stands for
    /// (EUCLEAN = 117 is the kernel's EFSCORRUPTED, also given as kernel-errno-name; for
    /// read-only, the last error before the switch: 0 and "" if none); error_count how many
    /// errors the kernel merged into this event; inode the inode concerned, 0 when the
    /// filesystem named none (errors of the filesystem as a whole).
    pub struct FilesystemError(record, fields) {
        /// The subtype name: error or read-only.
        pub kind: String = fields.subtype(super::SUBTYPES, "error"),
        pub device: String = fields.text("device"),
        pub major: u32 = fields.u32("major"),
        pub minor: u32 = fields.u32("minor"),
        pub fs_type: String = fields.text("fs-type"),
        pub mount_point: String = fields.text("mount-point"),
        pub errno_name: String = fields.text("errno-name"),
        pub errno: i32 = fields.i32("errno"),
        /// How many errors the kernel merged into this event.
        pub error_count: u32 = fields.u32("count"),
        /// The inode concerned; 0 for the filesystem as a whole.
        pub inode: u64 = fields.u64("inode"),
        pub attributes: crate::signal::Attributes<'static> = Attributes::of(record),
    }
}

pub static KIND: SignalKind = SignalKind::of::<FilesystemError>();

impl fmt::Display for FilesystemError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (seq, fs_type, mount_point) = (self.seq, &self.fs_type, &self.mount_point);
        let device = format!("{} ({}:{})", self.device, self.major, self.minor);
        if self.kind == "read-only" {
            write!(
                f,
                "#{seq:<6} filesystems {fs_type} on {device} at {mount_point} is now read-only (last error {})",
                self.errno_name
            )
        } else {
            let inode = if self.inode == 0 {
                String::new()
            } else {
                format!(" inode {}", self.inode)
            };
            write!(
                f,
                "#{seq:<6} filesystems {} x{} on {device} {fs_type} at {mount_point}{inode}",
                self.errno_name, self.error_count
            )
        }
    }
}

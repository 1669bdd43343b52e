//! `BlockError`: the block-errors source's signal and its part of the interface: the struct's
//! doc comment is the signal's documentation for clients, `add_watch_doc` its paragraph of
//! `AddWatch`'s (both land in `dbus/org.watchq1.Subscription.xml`).

use std::fmt;

use crate::signal::{event_signal, Attributes, SignalKind};

event_signal! {
    source: super::NAME,
    member_fn: block_error,
    add_watch_doc: {
        /// block-errors (administrators): "name" (s, the device's kernel name, with * and ?
        /// wildcards).
    },
    /// A block device failed an I/O request (the kernel's block:block_rq_error).
    /// device is the kernel name (loop0, sda) or "MAJ:MIN" when the device is already
    /// gone; sector and sectors the request's range in 512-byte sectors; operation the
    /// kernel's rwbs string (R, W, WS, FF, D, ...); errno_name and errno the error (EIO,
    /// 5). count is how many errors this event stands for: 1, or more when a storm on the
    /// device was summarised by the rate limit (then sector is the first one's and the
    /// attributes hold last-sector and last-monotonic-ns). attributes repeat these fields
    /// typed and add monotonic-ns (CLOCK_MONOTONIC time of the error).
    pub struct BlockError(record, fields) {
        /// The kernel name, or "MAJ:MIN" when the device is already gone.
        pub device: String = fields.text("device"),
        pub major: u32 = fields.u32("major"),
        pub minor: u32 = fields.u32("minor"),
        pub sector: u64 = fields.u64("sector"),
        pub sectors: u32 = fields.u32("sectors"),
        /// The kernel's rwbs string.
        pub operation: String = fields.text("operation"),
        pub errno_name: String = fields.text("errno-name"),
        pub errno: i32 = fields.i32("errno"),
        /// How many errors this event stands for (more than 1 for a summarised storm).
        pub count: u64 = fields.u64("count"),
        pub attributes: crate::signal::Attributes<'static> = Attributes::of(record),
    }
}

pub static KIND: SignalKind = SignalKind::of::<BlockError>();

impl fmt::Display for BlockError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (seq, count, sector) = (self.seq, self.count, self.sector);
        let place = format!(
            "{} on {} ({}:{})",
            self.errno_name, self.device, self.major, self.minor
        );
        if count > 1 {
            write!(
                f,
                "#{seq:<6} block-errors {place} x{count} from sector {sector}, op {}",
                self.operation
            )
        } else {
            write!(
                f,
                "#{seq:<6} block-errors {place} sector {sector} +{}, op {}",
                self.sectors, self.operation
            )
        }
    }
}

//! `BlockError`: the block-errors source's signal (its documentation for clients is the
//! interface's, in `dbus/org.watchq1.Subscription.xml`).

use std::fmt;

use crate::signal::{event_signal, Attributes, SignalKind};

event_signal! {
    source: super::NAME,
    /// A block device failed an I/O request.
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
        pub attributes: Attributes = Attributes::of(record),
    }
}

pub static KIND: SignalKind = SignalKind::of::<BlockError>();

impl fmt::Display for BlockError {
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

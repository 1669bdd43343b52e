//! `watchqctl`'s command line.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "watchqctl",
    version,
    about = "Look at and listen to watchqd (honours DBUS_SYSTEM_BUS_ADDRESS)"
)]
pub struct Args {
    /// Bus address instead of the system bus.
    #[arg(long, global = true, value_name = "ADDRESS")]
    pub address: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The daemon's version and which sources this kernel offers.
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print events as they happen, until interrupted. Events arrive on a connection of
    /// the subscription's own (SubscribeDirect), or on the bus where the daemon or the
    /// bus cannot hand one over.
    Monitor {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Receive events through the bus (Subscribe) rather than on a direct connection.
        #[arg(long)]
        bus: bool,
        /// Events the daemon keeps for us if we fall behind.
        #[arg(long, value_name = "N")]
        queue_depth: Option<u32>,
        /// Watch option KEY=VALUE passed to every watch (devices: subsystem, devtype, name;
        /// quota: scope, type, device; filesystems: path; space: path, low-percent or
        /// low-bytes; mounts: pid, a process whose mount namespace to watch).
        #[arg(long = "match", value_name = "KEY=VALUE")]
        matches: Vec<String>,
        /// Only these subtypes (repeatable), e.g. --subtype add --subtype remove.
        #[arg(long = "subtype", value_name = "NAME")]
        subtypes: Vec<String>,
        /// Sources to watch (default: every available one).
        sources: Vec<String>,
    },
    /// The current devices (block and USB) with their attributes.
    Devices {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The daemon's counters in Prometheus' text format: the text of the file it writes
    /// for node_exporter's textfile collector (the metrics section of watchqd.toml).
    Metrics,
}

//! `watchqd`'s command line.

use std::path::PathBuf;

use clap::Parser;

/// Policy-checked, typed, loss-aware D-Bus events from the kernel's notification sources.
#[derive(Parser, Debug)]
#[command(name = "watchqd", version, about)]
pub struct Args {
    /// Configuration file (default: /etc/watchqd/watchqd.toml if it exists).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Check the configuration, print it, and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Log level or filter when RUST_LOG is not set (error, warn, info, debug, trace).
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

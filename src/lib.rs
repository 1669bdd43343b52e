//! watchqd: the kernel's notification sources behind one policy-checked, typed,
//! loss-aware D-Bus event bus.
//!
//! Layers, each its own module: [`source`] (kernel interfaces → typed [`event`] records),
//! [`policy`] (who may watch and see what), [`dispatch`] (fan-out into bounded
//! per-subscription outboxes), [`bus`] (the `org.watchq1` objects and signal delivery),
//! [`daemon`] (the supervisor), [`consumers`] (the daemon's own uses of events: unit
//! rules, journal records) and [`config`]; [`portal`] is `watchq-portal`, the session-bus
//! service through which sandboxed apps get device events.

pub mod activation;
pub mod bus;
pub mod cli;
pub mod client;
pub mod config;
pub mod consumers;
pub mod daemon;
pub mod dispatch;
pub mod error;
pub mod event;
pub mod filter;
pub mod glob;
pub mod logging;
pub mod policy;
pub mod portal;
pub mod signal;
pub mod source;
pub mod sys;

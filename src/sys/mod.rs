//! Kernel plumbing that more than one source needs, kept in one place so that each
//! source folder holds only what is its own (its wire format's meaning, its watches,
//! its records).
//!
//! Nothing here knows a source by name: a source passes its name for log lines. The
//! modules depend on nothing in the crate but [`crate::error`] and [`crate::logging`],
//! so any source (and the benches) can use them without an import cycle.
//!
//! - [`netlink`]: receiving datagrams from the kernel on a netlink socket, with the
//!   origin checks, `ENOBUFS` as overflow, and the counters (devices, quota).
//! - [`fanotify`]: a fanotify group, its record decoder, and the watch engine that runs
//!   one group for filesystem marks (filesystems, space; mounts uses the group).
//! - [`mountinfo`]: the one `/proc/PID/mountinfo` parser (pure, fuzzed).
//! - [`resolve`]: a path as a caller sees it, in its root and mount namespace.
//! - [`mount_api`]: `statmount(2)`, `listmount(2)` and mount namespace ids.
//! - [`clock`]: the calling thread's CPU time (costs charged to a user's share).
//! - [`pidfd`], [`blockdev`] (block device names), [`errno`] (errno names), and
//!   [`lock`], the poison-tolerant mutex lock every source uses.

pub mod blockdev;
pub mod clock;
pub mod errno;
pub mod fanotify;
pub mod mount_api;
pub mod mountinfo;
pub mod netlink;
pub mod pidfd;
pub mod resolve;

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, taking the data even if a thread panicked while holding it: the state
/// the sources keep there stays consistent between statements (a panic would be a bug
/// reported on its own), and a daemon that stopped serving over it would be worse.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

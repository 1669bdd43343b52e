//! Whether udevd runs, followed while the source is open, so that it moves to udev's
//! group when udevd starts and back to the kernel's when it stops.
//!
//! Touches: one inotify instance (`inotify_init1`, `IN_NONBLOCK | IN_CLOEXEC`) with a
//! watch on `/run` (for `udev/` coming or going) and one on `/run/udev` (for `control`
//! coming or going: systemd creates it with `systemd-udevd-control.socket` and removes it
//! on stop, `RemoveOnStop=yes`). Any change there wakes the source, which looks again.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// An [`Inotify`] as tokio registers it.
struct Watched(Inotify);

impl AsRawFd for Watched {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Wakes when the directory holding udev's control socket, or the socket, comes or goes.
pub struct UdevPresence {
    fd: AsyncFd<Watched>,
    /// `/run/udev`, watched again each time something changes (it may have been made).
    dir: PathBuf,
}

const FLAGS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_ONLYDIR);

impl UdevPresence {
    /// Follows `control` (`/run/udev/control`) and its directory.
    pub fn new(control: &Path) -> io::Result<Self> {
        let no_parent = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} has no parent directory", control.display()),
            )
        };
        let dir = control.parent().ok_or_else(no_parent)?.to_owned();
        let run = dir.parent().ok_or_else(no_parent)?;
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(run, FLAGS).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("inotify on {}: {e}", run.display()),
            )
        })?;
        // Absent until udevd first ran: the watch on its parent sees it made.
        let _ = inotify.add_watch(&dir, FLAGS);
        // SAFETY: `register` needs the fd to stay open while registered; the AsyncFd
        // owns the Inotify, which owns the fd, so it closes only when the AsyncFd drops.
        let fd = unsafe { AsyncFd::register(Watched(inotify)) }?;
        Ok(UdevPresence { fd, dir })
    }

    /// Waits until something changed in `/run` or `/run/udev`. Cancel-safe: an event
    /// not yet read stays queued.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                Ok(Ok(_events)) => {
                    // Made since (or made again): watched from now on; a watch that
                    // exists is kept as it is.
                    let _ = self.fd.get_ref().0.add_watch(&self.dir, FLAGS);
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }
}

//! The system-wide marks: while the source runs, one `FAN_MARK_FILESYSTEM` mark of
//! `FAN_FS_ERROR` on every block-backed filesystem mounted in the daemon's mount
//! namespace (the host's; under `PrivateMounts=` a slave of it), so that the daemon's
//! own consumers (journal records, `[[units]]` rules, metrics) see filesystem errors
//! with no subscriber's watch. Set when the group is made, and for each filesystem
//! mounted later when the mount table changes (mountinfo's `POLLPRI`, which the engine
//! already waits on); a filesystem unmounted takes its mark with its superblock.
//!
//! A watch of a filesystem marked here shares the mark; the mark stays when the last
//! watch ends.

use std::os::fd::AsFd;

use super::{read_only_now, Errors, Marked, NAME};
use crate::sys::fanotify::{wire, Fanotify};
use crate::sys::resolve::{self, Place};

impl Errors {
    /// Marks every block-backed filesystem of the daemon's namespace not marked yet.
    pub(super) fn mark_every_filesystem(&mut self, group: &Fanotify) {
        let found = Place::own().and_then(|place| resolve::block_filesystems(&place));
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(
                    source = NAME,
                    "cannot list the mounted filesystems: {e}; errors of filesystems no watch names are not reported"
                );
                return;
            }
        };
        for (fs, fd) in found {
            if let Some(marked) = self.marks.get_mut(&fs.fsid) {
                marked.system = true;
                continue;
            }
            // Each mark keeps a place of its own to look at its mount table from.
            let place = match Place::own() {
                Ok(place) => place,
                Err(e) => {
                    tracing::warn!(source = NAME, "cannot open the daemon's mount table: {e}");
                    return;
                }
            };
            if let Err(e) = group.mark_filesystem_of(wire::FAN_FS_ERROR, fd.as_fd()) {
                // A filesystem that does not take the mark (no file handles) is skipped.
                tracing::debug!(
                    source = NAME,
                    device = fs.device,
                    "not marking {} ({}) for errors: {e}",
                    fs.mount_point,
                    fs.fs_type
                );
                continue;
            }
            tracing::info!(
                source = NAME,
                device = fs.device,
                mount_point = fs.mount_point,
                "marked filesystem for errors (system-wide)"
            );
            let read_only = read_only_now(&fs, &place).unwrap_or(false);
            self.marks.insert(
                fs.fsid,
                Marked {
                    refs: 0,
                    system: true,
                    fs,
                    place,
                    read_only,
                    last_error: None,
                    recheck: None,
                },
            );
        }
    }
}

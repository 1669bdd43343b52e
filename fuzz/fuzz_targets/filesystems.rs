//! What the filesystem-error and space sources do with kernel bytes (through the shared
//! `watchqd::sys::fanotify::wire` and `watchqd::sys::mountinfo`): fanotify reads
//! (metadata, FID and error info records, file handles), taken apart as their read loops
//! do (events until the first malformed one; overflow, the error record, the fid's
//! filesystem key and inode, the errno's kernel name), and mountinfo text, searched as
//! the daemon searches it (by mount id when a watch is armed, by device for the
//! read-only state). Whatever the bytes, each returns a typed value or a typed error,
//! and never claims more than the buffer holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchqd::sys::fanotify::wire;
use watchqd::sys::{errno, mountinfo};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector % 2 == 0 {
        let mut seen = 0usize;
        for item in wire::events(rest) {
            let Ok(event) = item else { break };
            seen += 1;
            assert!(
                seen * wire::METADATA_LEN <= rest.len(),
                "more events than bytes"
            );
            if event.mask & wire::FAN_Q_OVERFLOW != 0 {
                continue;
            }
            if let Some(fid) = event.fid() {
                let _ = fid.fsid_key();
                let _ = fid.inode();
                assert!(fid.handle.len() <= rest.len());
            }
            if let Some((error, _count)) = event.error() {
                // (i32::MIN has no absolute value.)
                let error = error.saturating_abs();
                let _ = errno::errno_name(error);
                let _ = errno::filesystem_errno_name(error);
            }
        }
    } else if let Ok(text) = std::str::from_utf8(rest) {
        let mounts = mountinfo::parse_lenient(text);
        assert!(mounts.len() <= text.lines().count());
        let Some(first) = mounts.first() else { return };
        let by_id = mounts.iter().find(|m| m.id == first.id);
        assert_eq!(by_id, Some(first));
        let by_device = mounts
            .iter()
            .find(|m| m.major == first.major && m.minor == first.minor)
            .map(mountinfo::MountinfoLine::filesystem_read_only);
        assert_eq!(by_device, Some(first.filesystem_read_only()));
        assert!(first.mount_point.len() <= text.len());
    }
});

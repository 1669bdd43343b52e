//! The filesystem sources' parsers: fanotify event buffers (metadata, FID and error info
//! records, file handles) and mountinfo text. Whatever the bytes, each returns a typed
//! value or a typed error, and never claims more than the buffer holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchqd::source::filesystems::wire;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    if selector % 2 == 0 {
        let mut seen = 0usize;
        for item in wire::events(rest) {
            let Ok(event) = item else { break };
            seen += 1;
            assert!(seen * wire::METADATA_LEN <= rest.len(), "more events than bytes");
            let _ = event.error();
            if let Some(fid) = event.fid() {
                let _ = fid.inode();
                let _ = fid.fsid_key();
                assert!(fid.handle.len() <= rest.len());
            }
        }
    } else if let Ok(text) = std::str::from_utf8(rest) {
        let mounts = wire::mountinfo(text);
        for mount in &mounts {
            let _ = mount.filesystem_read_only();
            let _ = wire::mount_of(&mounts, &mount.mount_point, mount.major, mount.minor);
        }
    }
});

//! The mount source's `struct statmount` parser (what statmount(2) wrote) and its
//! mountinfo parser (what /proc/PID/mountinfo reads as): typed values or typed errors,
//! and strings never longer than the buffer they came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchqd::source::mounts::wire;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector % 2 == 0 {
        if let Ok(mount) = wire::parse_statmount(rest) {
            for text in [
                &mount.fs_type,
                &mount.mount_point,
                &mount.source,
                &mount.fs_options,
            ] {
                assert!(text.len() <= rest.len() * 3, "lossy UTF-8 at most triples");
            }
            let _ = mount.mount_options();
            let _ = mount.propagation_name();
        }
    } else if let Ok(text) = std::str::from_utf8(rest) {
        if let Ok(lines) = wire::parse_mountinfo(text) {
            assert!(lines.len() <= text.lines().count());
        }
    }
});

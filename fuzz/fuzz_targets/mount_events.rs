//! The mount source's fanotify record parser: whatever a read(2) on a fanotify group
//! returns, it yields typed events or a typed error, never more events than 24-byte
//! metadata blocks fit in the buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchqd::source::mounts::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(events) = wire::fanotify_events(data) {
        assert!(events.len() <= data.len() / wire::METADATA_LEN);
    }
});

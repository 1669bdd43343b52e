//! Kernel uevent messages: whatever bytes arrive on the netlink socket, the decoder returns
//! a typed event or a typed error, and what it accepts is self-consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchqd::source::devices::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = wire::parse(data) {
        assert_eq!(
            event.properties.get("ACTION").map(String::as_str),
            Some(event.action.as_str())
        );
        assert_eq!(event.properties.get("DEVPATH"), Some(&event.devpath));
        assert!(event.devpath.starts_with('/'));
        assert!(!event.devpath.split('/').any(|c| c == ".."));
    }
});

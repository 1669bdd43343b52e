//! udev's monitor messages (group 2): whatever bytes arrive, the header decoder and the
//! event decoder return typed values or typed errors, and what they accept is
//! self-consistent: the properties lie after the header and inside the message, and the
//! event is what the kernel path would accept.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchqd::source::devices::udev_wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = udev_wire::header(data) {
        let off = header.properties_off as usize;
        let len = header.properties_len as usize;
        assert!(off >= udev_wire::HEADER_LEN);
        assert!(off + len <= data.len());
        let _ = header.may_have_tag("uaccess");
        if let Ok(event) = udev_wire::event(data, &header) {
            assert_eq!(
                event.properties.get("ACTION").map(String::as_str),
                Some(event.action.as_str())
            );
            assert_eq!(event.properties.get("DEVPATH"), Some(&event.devpath));
            assert_eq!(event.properties.get("SUBSYSTEM"), Some(&event.subsystem));
            assert!(event.devpath.starts_with('/'));
            assert!(!event.devpath.split('/').any(|c| c == ".."));
        }
    }
    let _ = udev_wire::string_hash32(&String::from_utf8_lossy(data));
});

//! Generic netlink datagrams on the quota socket: whatever bytes arrive, the decoders
//! return typed values or typed errors, and an accepted warning survives a round trip
//! through the kernel's layout.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchqd::source::quota::wire;

fuzz_target!(|data: &[u8]| {
    for message in wire::messages(data) {
        let Ok(message) = message else { break };
        assert!(message.payload.len() <= data.len());
        if let Ok(warning) = wire::parse_warning(message.payload) {
            let encoded = wire::encode_warning(message.kind, message.seq, &warning);
            let again = wire::messages(&encoded)
                .next()
                .and_then(Result::ok)
                .and_then(|m| wire::parse_warning(m.payload).ok());
            assert_eq!(again, Some(warning));
        }
        if let Ok(family) = wire::parse_family_reply(&message) {
            for (name, _) in &family.groups {
                assert!(!name.contains('\0'));
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = wire::mount_of(text, 7, 0);
    }
});

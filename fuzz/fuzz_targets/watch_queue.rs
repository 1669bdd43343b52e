//! The keys source's parser of notification pipe reads (`watch_notification` records):
//! whatever the bytes, it returns the records before the first malformed one and a typed
//! error, never panics, and a key record it accepts says what the bytes say.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchqd::source::keys::wire::{self, Note};

fuzz_target!(|data: &[u8]| {
    let (notes, error) = wire::parse(data);
    if let Some(error) = &error {
        assert!(!error.to_string().is_empty());
    } else if !data.is_empty() {
        assert!(!notes.is_empty(), "bytes consumed without a record");
    }
    if let Some(
        note @ Note::Key {
            change,
            watch_id,
            key,
            aux,
        },
    ) = notes.first()
    {
        // The serial and aux are the record's bytes 8..16, and re-encoding decodes the same.
        let encoded = wire::encode_key(*change, *watch_id, *key, *aux);
        assert_eq!(&encoded[8..16], &data[8..16]);
        assert_eq!(wire::parse(&encoded), (vec![note.clone()], None));
    }
});

//! The block-error source's parsers: the tracepoint's `format` file, raw tracepoint
//! entries decoded with a format, perf ring records, and the online-CPU list. Whatever
//! the bytes, each returns a typed value or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchqd::source::blockerr::wire;

/// The 6.18 host's `events/block/block_rq_error/format`, the known-good starting point.
const FORMAT: &str = include_str!("../data/block_rq_error.format");

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(format) = wire::Format::parse(text) {
                    let _ = format.decode(rest);
                }
            }
        }
        1 => {
            if let Ok(format) = wire::Format::parse(FORMAT) {
                if let Ok(error) = format.decode(rest) {
                    let _ = error.operation_class();
                    let _ = watchqd::sys::errno::errno_name(error.errno());
                }
            }
        }
        2 => {
            let mut total = 0usize;
            for record in wire::records(rest) {
                if record.is_err() {
                    break;
                }
                total += 1;
                assert!(total <= rest.len() / 8, "more records than 8-byte units");
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                let _ = wire::cpu_list(text);
            }
        }
    }
});

//! The configuration file: any text is either a valid configuration or an error that
//! names where it came from; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchqd::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match Config::from_toml(text, "fuzz.toml") {
            Ok(config) => {
                assert!(config.delivery.default_queue_depth <= config.delivery.max_queue_depth);
                assert!(config.delivery.default_queue_depth >= 1);
                // A rule has an instance exactly when its unit is a template.
                for rule in &config.units {
                    assert_eq!(rule.unit.is_template(), rule.instance.is_some());
                }
            }
            Err(e) => assert!(e.to_string().starts_with("fuzz.toml")),
        }
    }
});

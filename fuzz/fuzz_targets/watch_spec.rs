//! D-Bus method arguments a caller controls: watch specifications (`a{sv}`) and filters
//! (`a(sas)`), decoded from D-Bus wire bytes exactly as the daemon receives them, then
//! validated by the same code the daemon runs.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use zbus::wire::serialized::{Context, Data};
use zbus::wire::LE;
use zbus::OwnedVariant;
use watchqd::filter::Filter;
use watchqd::source::devices::{Devices, DevicesConfig, DeviceWatch};
use watchqd::source::{EventSource, Registry};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let ctxt = Context::new(LE, 0);
    let bytes = Data::new(body, ctxt);
    if selector & 1 == 0 {
        if let Ok((spec, _)) = bytes.deserialize::<HashMap<String, OwnedVariant>>() {
            let _ = DeviceWatch::parse(&spec);
        }
    } else if let Ok((filter, _)) = bytes.deserialize::<Vec<(String, Vec<String>)>>() {
        let devices: Arc<dyn EventSource> = Arc::new(Devices::new(&DevicesConfig::default()));
        let registry = Registry::from_sources(vec![devices]);
        if let Ok(parsed) = Filter::parse(&registry, &filter) {
            // What was accepted describes itself back as the same sources.
            let described = parsed.describe(&registry);
            assert_eq!(described.len(), filter.len());
        }
    }
});

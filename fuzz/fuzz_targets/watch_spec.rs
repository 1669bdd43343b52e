//! D-Bus method arguments a caller controls: watch specifications (`a{sv}`) for every
//! built-in source, filters (`a(sas)`) and Subscribe options (`a{sv}`), decoded from D-Bus wire bytes exactly as the
//! daemon receives them, then validated by the same code the daemon runs. Only parsing
//! runs: arming a watch (helpers, fanotify marks) happens after policy, not here.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use watchqd::filter::Filter;
use watchqd::policy::Identity;
use watchqd::source::{Registry, SourcesConfig, CATALOGUE};
use zbus::wire::serialized::{Context, Data};
use zbus::wire::LE;
use zbus::OwnedVariant;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry::builtin(&SourcesConfig::default()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let ctxt = Context::new(LE, 0);
    let bytes = Data::new(body, ctxt);
    let registry = registry();
    if selector & 1 == 0 {
        if let Ok((spec, _)) = bytes.deserialize::<HashMap<String, OwnedVariant>>() {
            let sources = registry.all();
            let source = &sources[usize::from(selector >> 1) % sources.len()];
            // Root and an ordinary user, with and without a pid from the bus.
            let mut requester =
                Identity::new(":1.7".into(), if selector & 0x40 != 0 { 0 } else { 1000 });
            if selector & 0x80 != 0 {
                requester.pid = Some(std::process::id());
            }
            let _ = source.parse_watch(&spec, &requester);
        }
    } else if selector & 2 != 0 {
        if let Ok((options, _)) = bytes.deserialize::<HashMap<String, OwnedVariant>>() {
            let _ = watchqd::bus::subscribe_options(&options);
        }
    } else if let Ok((filter, _)) = bytes.deserialize::<Vec<(String, Vec<String>)>>() {
        if let Ok(parsed) = Filter::parse(CATALOGUE, &filter) {
            // What was accepted describes itself back as the same sources.
            let described = parsed.describe(CATALOGUE);
            assert_eq!(described.len(), filter.len());
        }
    }
});

//! What the daemon says of its sources (`Manager.Sources`, `Manager.Counters`).

use watchqd::bus::types::SourceInfo;
use watchqd::client::ManagerProxy;

/// The daemon's entry for the source `name`, failing when it has none.
pub async fn source_info(conn: &zbus::Connection, name: &str) -> SourceInfo {
    let manager = ManagerProxy::new(conn).await.expect("manager proxy");
    let sources = manager.sources().await.expect("Sources");
    sources
        .iter()
        .find(|s| s.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} source in {sources:?}"))
}

/// Counter `name` of source `source` in the Manager's `Counters`, read through `manager`
/// (one proxy read twice must see the figure move), failing when there is none.
pub async fn counter(manager: &ManagerProxy<'_>, source: &str, name: &str) -> u64 {
    let counters = manager.counters().await.expect("Counters");
    counters
        .iter()
        .find(|(s, n, _)| s == source && n == name)
        .map(|(_, _, v)| *v)
        .unwrap_or_else(|| panic!("{source} {name} in {counters:?}"))
}

//! What the daemon says of its sources (`Manager.Sources`).

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

//! Client side of the interface, for `watchqctl`, tests and Rust programs.

use std::collections::{BTreeMap, HashMap};

use zbus::{proxy, Connection, OwnedObjectPath, OwnedVariant};

use crate::bus::types::SourceInfo;

/// `DeviceChanged(t seq, t tag, s action, s subsystem, s sys_path, a{sv} attributes,
/// a{ss} properties)` as received.
pub type DeviceChangedBody = (
    u64,
    u64,
    String,
    String,
    String,
    HashMap<String, OwnedVariant>,
    BTreeMap<String, String>,
);

/// `BlockError(t seq, t tag, s device, u major, u minor, t sector, u sectors,
/// s operation, s errno_name, i errno, t count, a{sv} attributes)` as received.
pub type BlockErrorBody = (
    u64,
    u64,
    String,
    u32,
    u32,
    u64,
    u32,
    String,
    String,
    i32,
    u64,
    HashMap<String, OwnedVariant>,
);

/// `QuotaWarning(t seq, t tag, s warning, s kind, s resource, s quota_type, t excess_id,
/// t caused_id, s device, u major, u minor, a{sv} attributes)` as received.
pub type QuotaWarningBody = (
    u64,
    u64,
    String,
    String,
    String,
    String,
    u64,
    u64,
    String,
    u32,
    u32,
    HashMap<String, OwnedVariant>,
);

/// `FilesystemError(t seq, t tag, s kind, s device, u major, u minor, s fs_type,
/// s mount_point, s errno_name, i errno, u error_count, t inode, a{sv} attributes)` as
/// received.
pub type FilesystemErrorBody = (
    u64,
    u64,
    String,
    String,
    u32,
    u32,
    String,
    String,
    String,
    i32,
    u32,
    u64,
    HashMap<String, OwnedVariant>,
);

/// `SpaceWarning(t seq, t tag, s state, s level, s path, s mount_point,
/// t available_bytes, t total_bytes, t threshold_bytes, a{sv} attributes)` as received.
pub type SpaceWarningBody = (
    u64,
    u64,
    String,
    String,
    String,
    String,
    u64,
    u64,
    u64,
    HashMap<String, OwnedVariant>,
);

/// `MountChanged(t seq, t tag, s change, t mount_id, t parent_id, s mount_point,
/// s source, s fs_type, s options, a{sv} attributes)` as received.
pub type MountChangedBody = (
    u64,
    u64,
    String,
    u64,
    u64,
    String,
    String,
    String,
    String,
    HashMap<String, OwnedVariant>,
);
/// `KeyChanged(t seq, t tag, s change, i key, i aux, s key_type, s description,
/// a{sv} attributes)` as received.
pub type KeyChangedBody = (
    u64,
    u64,
    String,
    i32,
    i32,
    String,
    String,
    HashMap<String, OwnedVariant>,
);

/// `Lost(t seq, t count, s source, s reason)` as received.
pub type LostBody = (u64, u64, String, String);

/// `WatchRemoved(t seq, t tag, s reason)` as received.
pub type WatchRemovedBody = (u64, u64, String);

/// A snapshot object as received: (id, changes, attributes, properties).
pub type ReceivedObject = (
    String,
    u64,
    HashMap<String, OwnedVariant>,
    BTreeMap<String, String>,
);

#[proxy(
    interface = "org.watchq1.Manager",
    default_service = "org.watchq1",
    default_path = "/org/watchq1"
)]
pub trait Manager {
    fn subscribe(&self, options: HashMap<&str, zbus::Variant<'_>>)
        -> zbus::Result<OwnedObjectPath>;
    fn snapshot(&self, source: &str) -> zbus::Result<(u64, Vec<ReceivedObject>)>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sources(&self) -> zbus::Result<Vec<SourceInfo>>;
}

#[proxy(
    interface = "org.watchq1.Subscription",
    default_service = "org.watchq1"
)]
pub trait Subscription {
    fn add_watch(
        &self,
        kind: &str,
        tag: u64,
        spec: HashMap<&str, zbus::Variant<'_>>,
    ) -> zbus::Result<()>;
    fn remove_watch(&self, tag: u64) -> zbus::Result<()>;
    fn set_filter(&self, filter: &[(&str, &[&str])]) -> zbus::Result<()>;
    fn snapshot(&self, source: &str) -> zbus::Result<(u64, Vec<ReceivedObject>)>;
    fn close(&self) -> zbus::Result<()>;
    #[zbus(property)]
    fn queue_depth(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn watches(&self) -> zbus::Result<Vec<(u64, String)>>;
}

/// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS` honoured) or to `address`.
///
/// The connection answers `org.freedesktop.DBus.Peer.Ping`, which watchqd uses to learn
/// that a subscriber has read its signals: a zbus connection does so only once its object
/// server runs, so this starts it.
pub async fn connect(address: Option<&str>) -> zbus::Result<Connection> {
    let address = address.map_or_else(crate::daemon::system_bus_address, str::to_owned);
    let conn = zbus::connection::Builder::address(address.as_str())
        .build()
        .await?;
    // Starting the object server is what makes zbus answer Peer methods.
    let _ = conn.object_server();
    Ok(conn)
}

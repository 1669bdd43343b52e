//! Client side of the interface, for `watchqctl`, tests and Rust programs.
//!
//! [`Subscription`] is the way to receive events: it hands out only signals that the
//! daemon holding the subscription sent (any connection on a bus may send any other a
//! unicast signal, and match rules do not stop those), and it survives a restart of the
//! daemon, saying so in-band. The proxies below are the raw interface.

use std::collections::{BTreeMap, HashMap};

use zbus::{proxy, Connection, Message, OwnedObjectPath, OwnedVariant};

use crate::bus::types::SourceInfo;
use crate::signal::EventSignal;

/// An event signal's body as its source's typed struct (`watchqd::source::devices::signal::
/// DeviceChanged` and the like, listed in [`crate::source::CATALOGUE`]); `None` when
/// `message` is another signal.
pub fn event<S: EventSignal>(message: &Message) -> Option<zbus::Result<S>> {
    if message.header().member()?.as_str() != S::MEMBER {
        return None;
    }
    Some(message.body().deserialize())
}

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
    /// The subscription's path and the fd of its own peer-to-peer connection.
    fn subscribe_direct(
        &self,
        options: HashMap<&str, zbus::Variant<'_>>,
    ) -> zbus::Result<(OwnedObjectPath, zbus::OwnedFd)>;
    fn snapshot(&self, source: &str) -> zbus::Result<(u64, Vec<ReceivedObject>)>;
    fn metrics(&self) -> zbus::Result<String>;
    /// The caller as the daemon sees it: "uid", and where known "pid", "label", "unit",
    /// "session", "sandbox".
    fn caller(&self) -> zbus::Result<HashMap<String, String>>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    /// Read anew at each call: the daemon emits no change of it (a cached value would
    /// stay what the first read said).
    #[zbus(property(emits_changed_signal = "false"))]
    fn sources(&self) -> zbus::Result<Vec<SourceInfo>>;
    /// (source, counter, value). Read anew at each call, as `sources`.
    #[zbus(property(emits_changed_signal = "false"))]
    fn counters(&self) -> zbus::Result<Vec<(String, String, u64)>>;
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

/// The daemon's well-known bus name.
pub const BUS_NAME: &str = "org.watchq1";
/// The manager object.
pub const MANAGER_PATH: &str = "/org/watchq1";
/// The manager's interface.
pub const MANAGER_INTERFACE: &str = "org.watchq1.Manager";
/// The interface of subscription objects and of every event signal.
pub const SUBSCRIPTION_INTERFACE: &str = "org.watchq1.Subscription";
/// The `Lost` reason under which a restart's gap is reported (see [`Item::Restarted`]).
pub const DAEMON_RESTARTED: &str = "daemon-restarted";

mod direct;
mod subscription;
pub use direct::{direct_unsupported, DirectSubscription};
pub use subscription::{
    FilterEntry, Item, Restart, Subscription, SubscriptionBuilder, WatchRequest,
};

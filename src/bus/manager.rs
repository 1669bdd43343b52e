//! `org.watchq1.Manager` at `/org/watchq1`.

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::{interface, OwnedObjectPath, OwnedVariant};

use super::error::BusError;
use super::types::{SnapshotObject, SourceInfo};
use super::Service;
use crate::source::Availability;

pub const PATH: &str = "/org/watchq1";

pub struct Manager {
    pub(super) service: Arc<Service>,
}

/// The entry point: subscriptions, what this kernel offers, and snapshots.
#[interface(name = "org.watchq1.Manager")]
impl Manager {
    /// Creates a subscription owned by the caller's connection and returns its path.
    /// Options: "queue-depth" (u): events kept for the subscriber before newer ones are
    /// dropped and counted in Lost.
    async fn subscribe(
        &self,
        #[zbus(header)] header: Header<'_>,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<OwnedObjectPath, BusError> {
        let sender = super::sender(&header)?;
        self.service.subscribe(sender, &options).await
    }

    /// Like Subscribe, but the subscription's signals travel on a peer-to-peer D-Bus
    /// connection of its own: returns the subscription's path and one end of a socket on
    /// which the daemon serves peer-to-peer D-Bus (authentication ANONYMOUS), with the same
    /// Subscription object at that path. Refused where Subscribe is, and counted in the
    /// same limits. Calls on that connection act as the caller of SubscribeDirect, whoever
    /// holds the socket. It ends when the socket is closed, on Close, or when the caller
    /// leaves the bus. A reader that falls behind fills the socket, then its queue: what
    /// overflows is counted in Lost.
    #[zbus(out_args("path", "fd"))]
    async fn subscribe_direct(
        &self,
        #[zbus(header)] header: Header<'_>,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<(OwnedObjectPath, zbus::OwnedFd), BusError> {
        let sender = super::sender(&header)?;
        let (path, fd) = self.service.subscribe_direct(sender, &options).await?;
        Ok((path, fd.into()))
    }

    /// Current objects of a source: (the source's generation, [(id, changes, attributes,
    /// properties)]). For a snapshot aligned with a subscription's events, use the
    /// subscription's Snapshot method.
    #[zbus(out_args("seq", "objects"))]
    async fn snapshot(
        &self,
        #[zbus(header)] header: Header<'_>,
        source: &str,
    ) -> Result<(u64, Vec<SnapshotObject>), BusError> {
        let sender = super::sender(&header)?;
        let (seq, objects) = self.service.snapshot(sender, source, None).await?;
        Ok((seq, objects.into_iter().map(SnapshotObject::from).collect()))
    }

    /// The caller as watchqd sees it, what its policy decides on: from the bus
    /// (GetConnectionCredentials) and the caller's process, never from the message. Keys
    /// "uid", and where known "pid", "label" (the security label: SELinux context,
    /// AppArmor profile), "unit", "session", "sandbox". Anyone may ask about themselves.
    async fn caller(
        &self,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<HashMap<String, String>, BusError> {
        let sender = super::sender(&header)?;
        let identity = self.service.identity(sender).await?;
        let mut out = HashMap::from([("uid".to_owned(), identity.uid.to_string())]);
        let known = [
            ("pid", identity.pid.map(|p| p.to_string())),
            ("label", identity.label),
            ("unit", identity.unit),
            ("session", identity.session),
            ("sandbox", identity.sandbox.map(|s| s.describe())),
        ];
        for (key, value) in known {
            if let Some(value) = value {
                out.insert(key.to_owned(), value);
            }
        }
        Ok(out)
    }

    /// The daemon's counters in Prometheus' text format, the text of the file it writes
    /// for node_exporter's textfile collector (`[metrics]`): events delivered and lost,
    /// errors seen, subscriptions, sources. Anyone may read it, as anyone may read that
    /// file.
    fn metrics(&self) -> String {
        (self.service.metrics)()
    }

    /// The daemon's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    /// Every source: (name, available on this kernel, why not, how it is degraded or by
    /// which means it works, subtype names in number order).
    #[zbus(property(emits_changed_signal = "false"))]
    fn sources(&self) -> Vec<SourceInfo> {
        self.service
            .hub
            .sources()
            .into_iter()
            .map(|s| {
                let (available, reason) = match s.availability {
                    Availability::Available => (true, String::new()),
                    Availability::Via(note) | Availability::Degraded(note) => (true, note),
                    Availability::Unavailable(reason) => (false, reason),
                };
                SourceInfo {
                    name: s.name.to_owned(),
                    available,
                    reason,
                    subtypes: s.subtypes.iter().map(|t| (*t).to_owned()).collect(),
                }
            })
            .collect()
    }

    /// What sources counted that a person may want to know: (source, counter, value),
    /// for example how often the mounts source coalesced a user's events because their
    /// namespaces took more than their share of the daemon's time.
    #[zbus(property(emits_changed_signal = "false"))]
    fn counters(&self) -> Vec<(String, String, u64)> {
        self.service
            .hub
            .sources()
            .into_iter()
            .flat_map(|s| {
                s.counters
                    .into_iter()
                    .map(move |(counter, value)| (s.name.to_owned(), counter.to_owned(), value))
            })
            .collect()
    }
}

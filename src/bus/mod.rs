//! The D-Bus adapter, which names no source: the service (objects, identity lookup,
//! subscriptions and their end) here; adding watches and snapshots through policy
//! (`watch.rs`); re-authorizing live watches when policy may have changed
//! (`reauthorize.rs`); deliveries as signal messages (`emit.rs`), sent with flow control
//! (`delivery.rs`); subscriptions on a peer-to-peer connection of their own, handed over
//! as a file descriptor (`direct.rs`), whose socket bounds what the peer may send
//! (`peer_socket.rs`).

mod delivery;
mod direct;
mod emit;
pub mod error;
pub mod manager;
mod peer_socket;
mod reauthorize;
pub mod subscription;
pub mod types;
mod watch;

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use zbus::fdo::DBusProxy;
use zbus::names::{BusName, UniqueName};
use zbus::{Connection, OwnedObjectPath, OwnedVariant};

use crate::dispatch::Hub;
use crate::error::Error;
use crate::policy::identity::BusCredentials;
use crate::policy::{Authorizer, Identity, PolicyConfig, Polkit};
use error::BusError;
use subscription::SubscriptionObject;

pub const BUS_NAME: &str = "org.watchq1";

/// The unique name of a call's sender: who the caller is, as the bus says it.
fn sender<'h>(header: &'h zbus::message::Header<'_>) -> Result<&'h UniqueName<'h>, BusError> {
    header
        .sender()
        .ok_or_else(|| BusError::InvalidArgument("message has no sender".into()))
}

/// What `Manager.Metrics` returns: the daemon's counters as Prometheus text, made by
/// whoever keeps them (the bus layer knows none of them).
pub type MetricsText = Box<dyn Fn() -> String + Send + Sync>;

pub struct Service {
    conn: Connection,
    metrics: MetricsText,
    hub: Arc<Hub>,
    dbus: DBusProxy<'static>,
    /// Every access decision goes through here (see [`crate::policy`]).
    authorizer: Authorizer,
    /// What every subscription's deliverer shares ([`delivery`]).
    delivery: delivery::Shared,
    /// Which subscriptions are direct ([`direct`]).
    direct: direct::Directs,
    /// Woken when policy may have changed: live watches are re-authorized
    /// ([`reauthorize`]). Wakes coalesce.
    policy_changed: tokio::sync::Notify,
}

impl Service {
    /// Serves the Manager object; the caller requests the name afterwards, so that no
    /// client can reach a half-built daemon.
    pub async fn serve(
        conn: &Connection,
        hub: Arc<Hub>,
        policy: PolicyConfig,
        metrics: MetricsText,
    ) -> zbus::Result<Arc<Service>> {
        let service = Arc::new(Service {
            conn: conn.clone(),
            metrics,
            hub,
            dbus: DBusProxy::new(conn).await?,
            authorizer: Authorizer::new(policy, Box::new(Polkit::new(conn.clone()))),
            delivery: delivery::Shared::new(conn).await,
            direct: direct::Directs::default(),
            policy_changed: tokio::sync::Notify::new(),
        });
        conn.object_server()
            .at(
                manager::PATH,
                manager::Manager {
                    service: Arc::clone(&service),
                },
            )
            .await?;
        Ok(service)
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Who the caller is, from the bus (never from the message) and the caller's
    /// process; see [`crate::policy::identity`].
    async fn identity(&self, sender: &UniqueName<'_>) -> Result<Identity, BusError> {
        let credentials = self
            .dbus
            .get_connection_credentials(BusName::Unique(sender.to_owned()))
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot identify the caller: {e}")))?;
        let uid = credentials.unix_user_id().ok_or_else(|| {
            BusError::AccessDenied("the bus does not know the caller's uid".into())
        })?;
        let pid = credentials.process_id();
        let gids = credentials.unix_group_ids().cloned().unwrap_or_default();
        let label = credentials.linux_security_label().cloned();
        let bus_credentials = BusCredentials {
            unique_name: sender.to_string(),
            uid,
            gids,
            pid,
            label,
            pidfd: credentials
                .into_process_fd()
                .map(std::os::fd::OwnedFd::from),
        };
        Ok(crate::policy::identity::resolve(bus_credentials))
    }

    fn known_source(&self, name: &str) -> Result<(), Error> {
        match self.hub.registry().index_of(name) {
            Some(_) => Ok(()),
            None => Err(Error::InvalidArgument(format!(
                "unknown source '{name}'; known: {}",
                self.hub.registry().names().join(", ")
            ))),
        }
    }

    async fn subscribe(
        self: &Arc<Self>,
        sender: &UniqueName<'_>,
        options: &HashMap<String, OwnedVariant>,
    ) -> Result<OwnedObjectPath, BusError> {
        let (subscribed, uid) = self.open(sender, options).await?;
        let id = subscribed.id;
        let path = subscription::path(id);
        self.conn
            .object_server()
            .at(
                path.as_str(),
                SubscriptionObject {
                    id,
                    service: Arc::clone(self),
                    direct: None,
                },
            )
            .await?;
        let owner = sender.to_owned();
        let service = Arc::clone(self);
        tokio::spawn(async move { service.deliver(owner, subscribed).await });
        self.close_if_departed(sender, id).await;
        tracing::info!(subscription = id, owner = %sender, uid, "subscribed");
        OwnedObjectPath::try_from(path).map_err(BusError::ZBus)
    }

    /// What `Subscribe` and `SubscribeDirect` share: the options read, the caller
    /// identified and allowed by policy, and the hub's subscription (with its limits).
    async fn open(
        &self,
        sender: &UniqueName<'_>,
        options: &HashMap<String, OwnedVariant>,
    ) -> Result<(crate::dispatch::Subscribed, u32), BusError> {
        let SubscribeOptions { depth, app_id } = subscribe_options(options)?;
        let identity = self.identity(sender).await?;
        // The app id is what a caller says of itself (the portal, for the app it serves):
        // it goes to the log for people to read, and never into a decision.
        self.authorizer.subscribe(&identity)?;
        tracing::debug!(
            owner = %sender,
            uid = identity.uid,
            pid = ?identity.pid,
            unit = ?identity.unit,
            session = ?identity.session,
            label = ?identity.label,
            "caller identified"
        );
        let uid = identity.uid;
        let subscribed = self.hub.subscribe(identity, depth)?;
        if let Some(app_id) = app_id {
            tracing::info!(
                subscription = subscribed.id,
                owner = %sender,
                uid,
                app_id,
                "subscribing for an application (as the caller says; decides nothing)"
            );
        }
        Ok((subscribed, uid))
    }

    /// The owner may have left before [`Service::reap_departed`] could see it go.
    async fn close_if_departed(&self, sender: &UniqueName<'_>, id: u64) {
        if !self
            .dbus
            .name_has_owner(BusName::Unique(sender.to_owned()))
            .await
            .unwrap_or(false)
        {
            self.close(id).await;
        }
    }

    /// Ends a subscription: state, object and delivery task.
    pub async fn close(&self, id: u64) {
        if self.hub.close(id).await {
            if self.end_direct(id) {
                tracing::info!(subscription = id, "direct subscription closed");
                return;
            }
            let path = subscription::path(id);
            if let Err(e) = self
                .conn
                .object_server()
                .remove::<SubscriptionObject, _>(path.as_str())
                .await
            {
                tracing::warn!(subscription = id, "removing the object failed: {e}");
            }
            tracing::info!(subscription = id, "subscription closed");
        }
    }

    /// Closes the subscriptions of every connection that leaves the bus. Runs for the
    /// daemon's life.
    pub async fn reap_departed(self: Arc<Self>) -> zbus::Result<()> {
        let mut changes = self.dbus.receive_name_owner_changed().await?;
        while let Some(change) = changes.next().await {
            let Ok(args) = change.args() else { continue };
            if args.new_owner().is_some() || !args.name().starts_with(':') {
                continue;
            }
            let gone = self.hub.subscriptions_of(args.name());
            self.authorizer.forget(args.name());
            self.delivery.forget_peer(args.name());
            if gone.is_empty() {
                continue;
            }
            // Closed on a task of their own: this stream must keep being read, or zbus
            // stops reading the connection when its queue is full, and a close waits for
            // the object server, which may be waiting for that very connection.
            let (service, owner) = (Arc::clone(&self), args.name().to_string());
            tokio::spawn(async move {
                for id in gone {
                    tracing::debug!(subscription = id, owner, "owner left the bus");
                    service.close(id).await;
                }
            });
        }
        Err(zbus::Error::Failure("NameOwnerChanged stream ended".into()))
    }
}

/// `Subscribe`'s options as read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// `queue-depth` (u), whose range the hub checks.
    pub depth: Option<usize>,
    /// `app-id` (s): the application a portal subscribes for, as the portal established
    /// it. Logged only: any caller can write any string here, so no decision reads it.
    pub app_id: Option<String>,
}

/// Reads `Subscribe`'s options: `queue-depth` (u) and `app-id` (s). Public so that the
/// fuzzer runs exactly what the daemon runs.
pub fn subscribe_options(
    options: &HashMap<String, OwnedVariant>,
) -> Result<SubscribeOptions, BusError> {
    let mut read = SubscribeOptions::default();
    for (key, value) in options {
        match key.as_str() {
            "queue-depth" => {
                let requested: u32 = typed_option(key, value, "a u32 (D-Bus type 'u')")?;
                read.depth = Some(usize::try_from(requested).unwrap_or(usize::MAX));
            }
            "app-id" => {
                let app_id: String = typed_option(key, value, "a string (D-Bus type 's')")?;
                // Bounded like a bus name: it only ever lands in a log line.
                if app_id.len() > 255 {
                    return Err(Error::InvalidArgument(
                        "option 'app-id' is longer than 255 bytes".to_owned(),
                    )
                    .into());
                }
                read.app_id = Some(app_id);
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown Subscribe option '{other}'; known: queue-depth, app-id"
                ))
                .into())
            }
        }
    }
    Ok(read)
}

/// An option's value as `T`, or the error naming what it must be.
fn typed_option<T: TryFrom<OwnedVariant>>(
    key: &str,
    value: &OwnedVariant,
    must_be: &str,
) -> Result<T, BusError> {
    T::try_from(value.clone()).map_err(|_| {
        Error::InvalidArgument(format!(
            "option '{key}' must be {must_be}, got '{}'",
            value.value_signature()
        ))
        .into()
    })
}

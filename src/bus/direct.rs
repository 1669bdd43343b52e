//! Direct subscriptions (`Manager.SubscribeDirect`): a subscription whose signals travel
//! on a peer-to-peer D-Bus connection of its own, around the bus.
//!
//! The daemon makes a socket pair, returns one end to the caller through the bus
//! (SCM_RIGHTS), and serves peer-to-peer D-Bus (ANONYMOUS authentication) on the other,
//! with the same `org.watchq1.Subscription` object at the same path as `Subscribe` would
//! have made. Who it is for is decided when it is opened, from the bus caller, through
//! the same code as `Subscribe` (identity, policy, the hub's limits); a call on the
//! connection acts as that opener whoever holds the fd, so every watch added later is
//! authorized against the opener's identity ([`super::subscription::SubscriptionObject`]).
//!
//! The peer may send no message longer than [`super::peer_socket::MAX_INCOMING`]: zbus
//! would allocate what a header announces before the rest arrives
//! ([`super::peer_socket`]).
//!
//! Flow control is the socket: signals are written as fast as the peer reads them, and a
//! deliverer waiting for a full socket leaves the hub's bounded outbox to fill and
//! overflow into counted `Lost` entries, as a stalled bus subscriber does. No Pings.
//!
//! The subscription ends when the peer closes its end (the connection's socket closes),
//! when the opener leaves the bus (its identity, and polkit's subject for it, are gone:
//! [`Service::reap_departed`]), on `Close`, or when no handshake comes within
//! [`HANDSHAKE_TIMEOUT`]: all through [`Service::close`], as for a bus subscription.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use zbus::connection::{AuthMechanism, Builder};
use zbus::names::UniqueName;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, Guid, OwnedObjectPath, OwnedVariant};

use super::error::BusError;
use super::subscription::{self, SubscriptionObject};
use super::Service;
use crate::dispatch::Subscribed;

/// How long the peer has to authenticate on its end after the fd was handed over.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a call being answered when the subscription ends may take to get its reply
/// out before the connection is closed under it.
const REPLY_GRACE: Duration = Duration::from_secs(5);

/// Deliveries taken from the outbox per write: a full socket takes what it can, and the
/// rest waits in the batch, so this bounds what is held outside the outbox.
const BATCH: usize = 256;

/// Which subscriptions are direct: their objects live on their own connections, not on
/// the bus's object server.
#[derive(Default)]
pub(super) struct Directs(std::sync::Mutex<HashSet<u64>>);

impl Directs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Service {
    /// Opens a direct subscription for `sender`: everything `Subscribe` checks, then the
    /// socket pair. Returns the path and the caller's end.
    pub(super) async fn subscribe_direct(
        self: &Arc<Self>,
        sender: &UniqueName<'_>,
        options: &HashMap<String, OwnedVariant>,
    ) -> Result<(OwnedObjectPath, OwnedFd), BusError> {
        let (subscribed, uid) = self.open(sender, options).await?;
        let id = subscribed.id;
        let (ours, theirs) = match std::os::unix::net::UnixStream::pair()
            .and_then(|(ours, theirs)| ours.set_nonblocking(true).map(|()| (ours, theirs)))
        {
            Ok(pair) => pair,
            Err(e) => {
                self.close(id).await;
                return Err(BusError::Unavailable(format!(
                    "cannot make a socket pair for a direct subscription: {e}"
                )));
            }
        };
        self.direct.lock().insert(id);
        let opener = sender.to_owned();
        let service = Arc::clone(self);
        tokio::spawn(async move { service.serve_direct(opener, ours, subscribed).await });
        self.close_if_departed(sender, id).await;
        tracing::info!(subscription = id, owner = %sender, uid, "subscribed directly");
        let path = OwnedObjectPath::try_from(subscription::path(id)).map_err(BusError::ZBus)?;
        Ok((path, OwnedFd::from(theirs)))
    }

    /// Forgets that `id` was direct; whether it was.
    pub(super) fn end_direct(&self, id: u64) -> bool {
        self.direct.lock().remove(&id)
    }

    /// Serves one direct subscription for its life: the handshake, the object, delivery;
    /// then closes it, whichever way it ended.
    async fn serve_direct(
        self: Arc<Self>,
        opener: UniqueName<'static>,
        socket: std::os::unix::net::UnixStream,
        mut sub: Subscribed,
    ) {
        let id = sub.id;
        let connect = async {
            let object = SubscriptionObject {
                id,
                service: Arc::clone(&self),
                direct: Some(opener),
            };
            let socket = tokio::net::UnixStream::from_std(socket)?;
            Builder::socket(super::peer_socket::split(socket))
                .server(Guid::generate())
                .p2p()
                .auth_mechanism(AuthMechanism::Anonymous)
                .serve_at(subscription::path(id), object)
                .build()
                .await
        };
        let conn = tokio::select! {
            biased;
            _ = sub.closed.changed() => None,
            built = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect) => match built {
                Ok(Ok(conn)) => Some(conn),
                Ok(Err(e)) => {
                    tracing::info!(subscription = id, "the direct peer's handshake failed: {e}");
                    None
                }
                Err(_) => {
                    tracing::info!(subscription = id, "no handshake on the direct connection within {} s", HANDSHAKE_TIMEOUT.as_secs());
                    None
                }
            },
        };
        if let Some(conn) = conn {
            self.deliver_direct(&conn, sub).await;
            self.close(id).await;
            // A call being answered (Close, usually) holds the object until its reply is
            // written: it is let out first, for a bounded time (a stalled peer may never
            // take it). Then the object goes (it holds the service, and the connection
            // holds it) so that nothing keeps the socket open.
            let path = subscription::path(id);
            let server = conn.object_server();
            if let Ok(object) = server
                .interface::<_, SubscriptionObject>(path.as_str())
                .await
            {
                let _ = tokio::time::timeout(REPLY_GRACE, object.get_mut()).await;
            }
            let _ = server.remove::<SubscriptionObject, _>(path.as_str()).await;
            if let Err(e) = conn.close().await {
                tracing::debug!(subscription = id, "closing the direct connection: {e}");
            }
        } else {
            self.close(id).await;
        }
    }

    /// Sends the outbox on the direct connection until the subscription or the connection
    /// ends. A write the socket cannot take yet waits here, and the outbox fills meanwhile.
    async fn deliver_direct(&self, conn: &Connection, sub: Subscribed) {
        let Subscribed {
            id,
            notify,
            mut closed,
        } = sub;
        let path = subscription::path(id);
        let emitter = match SignalEmitter::new(conn, path.as_str()) {
            Ok(emitter) => emitter,
            Err(e) => {
                tracing::error!(subscription = id, "cannot emit signals: {e}");
                return;
            }
        };
        loop {
            let Some(batch) = self.hub.take(id, BATCH) else {
                return; // closed
            };
            if batch.is_empty() {
                tokio::select! {
                    biased;
                    _ = closed.changed() => return,
                    () = conn.closed() => return,
                    () = notify.notified() => {}
                }
                continue;
            }
            // A stalled peer holds the send forever: the end of the subscription (or of
            // the connection) interrupts it. zbus's send is not cancel-safe (a message
            // dropped half-written corrupts the stream), which is harmless here: the
            // connection is closed right after.
            tokio::select! {
                biased;
                _ = closed.changed() => return,
                () = conn.closed() => return,
                () = self.send_batch(conn, id, &emitter, None, &batch) => {}
            }
        }
    }
}

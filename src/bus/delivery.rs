//! Delivery of one subscription's outbox as unicast signals, with flow control that needs
//! no cooperation from the client.
//!
//! The bus daemon queues what a slow reader does not read until its own limit, then
//! drops silently (dbus-daemon) or disconnects the reader (dbus-broker), and tells the
//! sender neither. So the daemon keeps at most `in_flight` signals per subscriber
//! unacknowledged, and only an acknowledgement opens the window again. Two proofs count:
//!
//! 1. **A reply to `org.freedesktop.DBus.Peer.Ping`**, the primary one. Messages between
//!    two peers are delivered in order, so any reply the peer itself sends — a method
//!    return, or an error such as `UnknownMethod` from a library without `Peer` — proves
//!    it read everything sent before the Ping.
//! 2. **The bus holds nothing for the peer**, asked of dbus-daemon's
//!    `org.freedesktop.DBus.Debug.Stats.GetConnectionStats` (`OutgoingMessages` = 0) once
//!    a Ping has gone unanswered for [`PING_PATIENCE`]: everything sent before the
//!    question was then written into the peer's socket, where nothing is dropped. This
//!    serves clients that never answer Ping (jeepney), and keeps stalled ones exact: the
//!    bus of a stopped reader keeps a backlog, so it gets no credit.
//!
//! Where neither proof can be had (a bus without those statistics, such as dbus-broker,
//! and a peer that does not answer Ping), the window opens again once per
//! [`PING_TIMEOUT`]: delivery goes on at that slow pace, the outbox overflows into
//! counted `Lost` entries, and the log says which connection and why. Nothing stalls
//! silently.
//!
//! Cost: a subscription that is gone stops its deliverer at once ([`Subscribed::closed`]);
//! at most one Ping per subscription is outstanding, none once a peer failed to answer
//! one while the statistics serve, and at most [`MAX_PINGS`] in all: the bus allows a
//! connection a bounded number of pending replies (dbus-daemon: 128), and Pings that a
//! crowd of silent peers never answer must not use up the ones polkit's checks need.
//! Bus errors are retried after a growing pause; the bus's statistics are asked with a
//! growing pause while it holds a backlog. Nothing here loops without progress or a
//! timer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use zbus::fdo::StatsProxy;
use zbus::names::{BusName, UniqueName};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, Message};

use super::emit::{emit, event_message};
use super::subscription;
use super::Service;
use crate::dispatch::{Delivery, Published, Subscribed};
use crate::sys::clock::ThreadCpu;

/// Pings outstanding at once, over all subscriptions.
const MAX_PINGS: usize = 32;

/// How long a deliverer waits before it tries again for a Ping permit.
const PERMIT_WAIT: Duration = Duration::from_millis(250);

/// How long a Ping may go unanswered before the bus's statistics are asked instead.
const PING_PATIENCE: Duration = Duration::from_secs(1);

/// How long a Ping may stay unanswered before it is given up. A bus configured with no
/// reply timeout (the system bus's `reply_timeout` can be unlimited) never answers
/// `NoReply`; without this a lost or unanswerable Ping would hold the window shut.
const PING_TIMEOUT: Duration = Duration::from_secs(25);

/// The pause before the bus's statistics are asked again while it holds a backlog for
/// the peer: it starts short and doubles, so that a stalled reader costs one question
/// every few seconds.
const STATS_FIRST_PAUSE: Duration = Duration::from_millis(5);
const STATS_MAX_PAUSE: Duration = Duration::from_secs(4);

/// The pause before a Ping is sent again after the bus refused one.
const RETRY_FIRST_PAUSE: Duration = Duration::from_secs(1);
const RETRY_MAX_PAUSE: Duration = Duration::from_secs(30);

/// What the deliverers of all subscriptions share.
pub(super) struct Shared {
    /// The bus's per-connection statistics; one proxy for all.
    stats: Option<StatsProxy<'static>>,
    /// Set once the bus refused its statistics, so that no deliverer asks again.
    stats_refused: AtomicBool,
    /// Permits for Pings in flight ([`MAX_PINGS`]).
    pings: Arc<Semaphore>,
    /// Connections that left a Ping unanswered, with that Ping's permit.
    silent_peers: Mutex<HashMap<String, OwnedSemaphorePermit>>,
}

impl Shared {
    pub(super) async fn new(conn: &Connection) -> Shared {
        let stats = match StatsProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
        {
            Ok(stats) => Some(stats),
            Err(e) => {
                tracing::debug!("no bus statistics proxy: {e}");
                None
            }
        };
        Shared {
            stats,
            stats_refused: AtomicBool::new(false),
            pings: Arc::new(Semaphore::new(MAX_PINGS)),
            silent_peers: Mutex::new(HashMap::new()),
        }
    }

    fn silent_peers(&self) -> MutexGuard<'_, HashMap<String, OwnedSemaphorePermit>> {
        self.silent_peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `owner` left a Ping unanswered (see [`Shared::silence`]).
    fn is_silent(&self, owner: &UniqueName<'_>) -> bool {
        self.silent_peers().contains_key(owner.as_str())
    }

    /// Records that `owner` did not answer a Ping, keeping the Ping's permit until the
    /// peer leaves the bus ([`Shared::forget_peer`]).
    fn silence(&self, owner: &UniqueName<'_>, permit: OwnedSemaphorePermit) {
        self.silent_peers()
            .entry(owner.to_string())
            .or_insert(permit);
    }

    /// Forgets a peer that left the bus, giving back the permit of its unanswered Ping.
    pub(super) fn forget_peer(&self, owner: &str) {
        self.silent_peers().remove(owner);
    }
}

/// What became of a Ping.
#[derive(Debug, PartialEq, Eq)]
enum PingOutcome {
    /// The peer answered (a return or an error of its own): it has read everything sent
    /// before the Ping.
    Read,
    /// No answer within [`PING_TIMEOUT`], or the bus gave up waiting (`NoReply`): the
    /// peer is connected but stuck, or does not implement `Peer`.
    Unanswered,
    /// The peer has left the bus.
    Gone,
    /// The bus or our own connection refused the call; nothing is known of the peer.
    Failed(String),
}

/// What the bus holds for the peer, from its statistics.
#[derive(Debug, PartialEq, Eq)]
enum Backlog {
    /// Nothing: everything sent to the peer so far is in its socket.
    Empty,
    Pending,
    Gone,
    /// This bus offers no such statistics to us.
    Unknown(String),
}

/// A Ping on its way.
struct Probe {
    reply: std::pin::Pin<Box<dyn std::future::Future<Output = PingOutcome> + Send>>,
    /// How many signals had been sent when it was: its reply acknowledges them.
    covers: u64,
}

/// One subscriber's window: signals sent and acknowledged, counted from the start.
#[derive(Debug, Default)]
struct Window {
    sent: u64,
    acked: u64,
}

impl Window {
    fn in_flight(&self) -> u64 {
        self.sent - self.acked
    }

    fn acknowledge(&mut self, upto: u64) {
        self.acked = self.acked.max(upto);
    }
}

impl Service {
    /// Sends one subscription's outbox as unicast signals, keeping at most the configured
    /// window unacknowledged (see the module doc). Returns when the subscription is gone.
    pub(super) async fn deliver(self: Arc<Self>, owner: UniqueName<'static>, sub: Subscribed) {
        let Subscribed {
            id,
            notify,
            mut closed,
        } = sub;
        let limit = u64::try_from(self.hub.delivery().in_flight.max(1)).unwrap_or(u64::MAX);
        // Ask for an acknowledgement when half the window is out, so that a reader that
        // keeps up never sees the window shut.
        let ask_at = (limit / 2).max(1);
        let path = subscription::path(id);
        let emitter = match SignalEmitter::new(&self.conn, path.as_str()) {
            Ok(emitter) => emitter.set_destination(BusName::Unique(owner.clone())),
            Err(e) => {
                tracing::error!(subscription = id, "cannot emit signals: {e}");
                return;
            }
        };
        let shared = &self.delivery;
        let stats = shared.stats.as_ref();
        let stats_known = || stats.is_some() && !shared.stats_refused.load(Ordering::Relaxed);
        let mut window = Window::default();
        let mut probe: Option<Probe> = None;
        // Since when an acknowledgement is owed, and when the statistics are next asked.
        let mut owed_since: Option<Instant> = None;
        let mut stats_at = Instant::now();
        let mut stats_pause = STATS_FIRST_PAUSE;
        // A Ping the bus refused is sent again no earlier than this.
        let mut retry_at: Option<Instant> = None;
        let mut retry_pause = RETRY_FIRST_PAUSE;
        // Whether the peer was seen not to answer, so that it is logged once per episode.
        let mut unanswered = false;
        loop {
            // Fill the window.
            let credit = limit - window.in_flight().min(limit);
            if credit > 0 {
                let credit = usize::try_from(credit).unwrap_or(usize::MAX);
                let Some(batch) = self.hub.take(id, credit) else {
                    return; // closed
                };
                if !batch.is_empty() {
                    self.send_batch(&self.conn, id, &emitter, Some(&owner), &batch)
                        .await;
                    window.sent += batch.len() as u64;
                    continue;
                }
            }
            if window.in_flight() < ask_at {
                owed_since = None;
            } else {
                let now = Instant::now();
                if owed_since.is_none() {
                    owed_since = Some(now);
                    stats_at = now + PING_PATIENCE;
                    stats_pause = STATS_FIRST_PAUSE;
                }
                // A connection that left a Ping unanswered is not pinged again, by any
                // of its subscriptions: the bus keeps that Ping pending (the system
                // bus has no reply timeout), and each one holds one of the pending
                // replies the bus allows our connection, which polkit's checks need.
                let ping_worth_it = !shared.is_silent(&owner);
                if probe.is_none() && retry_at.is_none() && ping_worth_it {
                    // Without a permit the Ping waits; the statistics may acknowledge
                    // meanwhile.
                    match Arc::clone(&shared.pings).try_acquire_owned() {
                        Ok(permit) => {
                            let (conn, owner) = (self.conn.clone(), owner.clone());
                            probe = Some(Probe {
                                // On a task of its own: zbus's send is not cancel-safe
                                // (a message dropped half-written corrupts the connection),
                                // and this deliverer may stop at any await.
                                reply: Box::pin({
                                    let service = Arc::clone(&self);
                                    let task = tokio::spawn(async move {
                                        let outcome = ping_peer(conn, owner.clone()).await;
                                        if outcome == PingOutcome::Unanswered {
                                            // Still pending in the bus: its permit stays
                                            // taken until the peer leaves.
                                            service.delivery.silence(&owner, permit);
                                        }
                                        outcome
                                    });
                                    async move {
                                        task.await.unwrap_or_else(|e| {
                                            PingOutcome::Failed(format!(
                                                "the Ping task failed: {e}"
                                            ))
                                        })
                                    }
                                }),
                                covers: window.sent,
                            });
                        }
                        Err(_) => retry_at = Some(now + PERMIT_WAIT),
                    }
                }
            }
            let owed = owed_since.is_some();
            tokio::select! {
                biased;
                _ = closed.changed() => return,
                outcome = async { (&mut probe.as_mut().expect("guarded").reply).await },
                    if probe.is_some() =>
                {
                    let covers = probe.take().map_or(0, |p| p.covers);
                    match outcome {
                        PingOutcome::Read => {
                            window.acknowledge(covers);
                            retry_pause = RETRY_FIRST_PAUSE;
                            if std::mem::take(&mut unanswered) {
                                tracing::info!(subscription = id, owner = %owner, "the subscriber answers Peer.Ping again");
                            }
                        }
                        PingOutcome::Gone => {
                            tracing::debug!(subscription = id, owner = %owner, "the subscriber left the bus");
                            self.close(id).await;
                            return;
                        }
                        PingOutcome::Unanswered => {
                            // Without statistics the slow clock below opens the window.
                            if !std::mem::replace(&mut unanswered, true) {
                                self.log_unanswered(id, &owner, stats_known());
                            }
                        }
                        PingOutcome::Failed(e) => {
                            tracing::warn!(subscription = id, owner = %owner,
                                "pinging the subscriber failed: {e}; trying again in {} s",
                                retry_pause.as_secs());
                            retry_at = Some(Instant::now() + retry_pause);
                            retry_pause = (retry_pause * 2).min(RETRY_MAX_PAUSE);
                        }
                    }
                }
                () = tokio::time::sleep_until(stats_at), if owed && stats_known() => {
                    let asked_after = window.sent;
                    let backlog = match stats {
                        Some(stats) => bus_backlog(stats, &owner).await,
                        None => Backlog::Unknown("no statistics proxy".into()),
                    };
                    match backlog {
                        Backlog::Empty => {
                            window.acknowledge(asked_after);
                            stats_pause = STATS_FIRST_PAUSE;
                        }
                        Backlog::Pending => stats_pause = (stats_pause * 2).min(STATS_MAX_PAUSE),
                        Backlog::Gone => {
                            tracing::debug!(subscription = id, owner = %owner, "the subscriber left the bus");
                            self.close(id).await;
                            return;
                        }
                        Backlog::Unknown(why) => {
                            if !shared.stats_refused.swap(true, Ordering::Relaxed) {
                                tracing::warn!("the bus offers no per-connection statistics ({why}); only Peer.Ping replies acknowledge signals");
                            }
                        }
                    }
                    stats_at = Instant::now() + stats_pause;
                }
                () = sleep_until_some(retry_at), if retry_at.is_some() && probe.is_none() => {
                    retry_at = None;
                }
                // The slow clock, where no proof can be had: a window per Ping timeout.
                () = sleep_until_some(owed_since.map(|since| since + PING_TIMEOUT)),
                    if owed && !stats_known() =>
                {
                    window.acknowledge(window.sent);
                    owed_since = None;
                }
                () = notify.notified(), if window.in_flight() < limit => {}
            }
        }
    }

    fn log_unanswered(&self, id: u64, owner: &UniqueName<'_>, stats_known: bool) {
        if stats_known {
            tracing::warn!(
                subscription = id,
                owner = %owner,
                "the subscriber did not answer org.freedesktop.DBus.Peer.Ping within {} s: it is stalled \
                 or its D-Bus library does not implement Peer; signals are acknowledged by the bus's \
                 statistics instead (what the bus has written to its socket)",
                PING_TIMEOUT.as_secs()
            );
        } else {
            tracing::warn!(
                subscription = id,
                owner = %owner,
                "the subscriber did not answer org.freedesktop.DBus.Peer.Ping within {} s and the bus \
                 offers no statistics: sending it one window of {} signals per {} s, the rest is \
                 reported to it as Lost (queue-full); a client should answer Peer.Ping",
                PING_TIMEOUT.as_secs(),
                self.hub.delivery().in_flight,
                PING_TIMEOUT.as_secs()
            );
        }
    }

    /// Sends a batch of deliveries, events together in as few writes as the socket takes.
    /// `conn` is the bus with `owner` the destination, or a direct subscription's own
    /// connection with none.
    pub(super) async fn send_batch(
        &self,
        conn: &Connection,
        id: u64,
        emitter: &SignalEmitter<'_>,
        owner: Option<&UniqueName<'_>>,
        batch: &[crate::dispatch::Delivery],
    ) {
        let object_path = emitter.path().to_owned();
        let mut messages = Vec::with_capacity(batch.len());
        // The events among `messages` whose sources charge deliveries, each with what
        // building its signal cost: told to their sources with a share of the send, so
        // that a source holding users to a share of the daemon's time charges them for
        // it. Others are not timed.
        let mut costs = Vec::new();
        let registry = self.hub.registry();
        for delivery in batch {
            let charged = match delivery {
                Delivery::Event { record, .. } => registry
                    .get(record.source)
                    .is_some_and(|source| source.charges_deliveries()),
                _ => false,
            };
            let started = charged.then(ThreadCpu::now);
            match event_message(conn, registry, &object_path, owner, delivery) {
                Some(Ok(message)) => {
                    messages.push(message);
                    if let (Some(started), Delivery::Event { record, .. }) = (started, delivery) {
                        costs.push((record, started.since().unwrap_or_default()));
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(subscription = id, "building a signal failed: {e}");
                }
                None => {
                    self.send_all(conn, id, &mut messages, &mut costs).await;
                    if let Err(e) = emit(emitter, delivery).await {
                        tracing::warn!(subscription = id, "sending a signal failed: {e}");
                    }
                }
            }
        }
        self.send_all(conn, id, &mut messages, &mut costs).await;
    }

    /// Sends `messages`, then tells each event's source what it cost: its building, and
    /// an even part of the send when that was measured on one thread (the send may
    /// await, and the task resume on the other worker; then only the building counts).
    async fn send_all(
        &self,
        conn: &Connection,
        id: u64,
        messages: &mut Vec<Message>,
        costs: &mut Vec<(&Arc<Published>, Duration)>,
    ) {
        let started = (!costs.is_empty()).then(ThreadCpu::now);
        if let Err(e) = conn.send_all(messages).await {
            tracing::warn!(subscription = id, "sending signals failed: {e}");
        }
        messages.clear();
        let share = match (
            started.and_then(ThreadCpu::since),
            u32::try_from(costs.len()),
        ) {
            (Some(sent), Ok(n)) if n > 0 => sent / n,
            _ => Duration::ZERO,
        };
        let registry = self.hub.registry();
        for (record, built) in costs.drain(..) {
            if let Some(source) = registry.get(record.source) {
                source.delivered(record, built + share);
            }
        }
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn ping_peer(conn: Connection, owner: UniqueName<'static>) -> PingOutcome {
    let call = conn.call_method(
        Some(BusName::Unique(owner)),
        "/",
        Some("org.freedesktop.DBus.Peer"),
        "Ping",
        &(),
    );
    match tokio::time::timeout(PING_TIMEOUT, call).await {
        Ok(reply) => ping_outcome(reply.map(drop)),
        Err(_) => PingOutcome::Unanswered,
    }
}

/// What a Ping's reply says. zbus reports every error named
/// `org.freedesktop.DBus.Error.*` as [`zbus::Error::FDO`] and only other names as
/// `MethodError`.
fn ping_outcome(reply: zbus::Result<()>) -> PingOutcome {
    use zbus::fdo::Error as Fdo;
    match reply {
        Ok(()) => PingOutcome::Read,
        Err(zbus::Error::FDO(e)) => match *e {
            // From the bus: the destination is not connected.
            Fdo::ServiceUnknown(_) | Fdo::NameHasNoOwner(_) => PingOutcome::Gone,
            // From the bus: its reply timeout passed.
            Fdo::NoReply(_) | Fdo::Timeout(_) | Fdo::TimedOut(_) => PingOutcome::Unanswered,
            // From the bus: its policy or quota refused our call.
            Fdo::AccessDenied(m) | Fdo::LimitsExceeded(m) => PingOutcome::Failed(m),
            // Anything else was sent by the peer itself (a library without Peer answers
            // UnknownMethod, UnknownObject or UnknownInterface), which proves it read.
            _ => PingOutcome::Read,
        },
        Err(zbus::Error::MethodError(..)) => PingOutcome::Read,
        Err(e) => PingOutcome::Failed(e.to_string()),
    }
}

/// Asks the bus how many messages it holds for the peer.
async fn bus_backlog(stats: &StatsProxy<'_>, owner: &UniqueName<'_>) -> Backlog {
    match stats
        .get_connection_stats(BusName::Unique(owner.clone()))
        .await
    {
        Ok(connection) => match connection.outgoing_messages() {
            Some(0) => Backlog::Empty,
            Some(_) => Backlog::Pending,
            None => Backlog::Unknown("no OutgoingMessages in GetConnectionStats".into()),
        },
        Err(zbus::fdo::Error::NameHasNoOwner(_) | zbus::fdo::Error::ServiceUnknown(_)) => {
            Backlog::Gone
        }
        Err(e) => Backlog::Unknown(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::fdo::Error as Fdo;

    fn fdo(e: Fdo) -> zbus::Result<()> {
        Err(zbus::Error::FDO(Box::new(e)))
    }

    /// zbus 6 reports `org.freedesktop.DBus.Error.*` replies as `Error::FDO`; the names
    /// the bus itself sends must not be taken for the peer's answer, nor the reverse.
    #[test]
    fn ping_replies_are_read_as_zbus_reports_them() {
        assert_eq!(ping_outcome(Ok(())), PingOutcome::Read);
        assert_eq!(
            ping_outcome(fdo(Fdo::ServiceUnknown("gone".into()))),
            PingOutcome::Gone
        );
        assert_eq!(
            ping_outcome(fdo(Fdo::NameHasNoOwner("gone".into()))),
            PingOutcome::Gone
        );
        assert_eq!(
            ping_outcome(fdo(Fdo::NoReply("late".into()))),
            PingOutcome::Unanswered
        );
        assert_eq!(
            ping_outcome(fdo(Fdo::UnknownMethod("no Peer".into()))),
            PingOutcome::Read
        );
        assert_eq!(
            ping_outcome(fdo(Fdo::UnknownObject("no /".into()))),
            PingOutcome::Read
        );
        assert!(matches!(
            ping_outcome(fdo(Fdo::AccessDenied("policy".into()))),
            PingOutcome::Failed(_)
        ));
        assert!(matches!(
            ping_outcome(Err(zbus::Error::InputOutput(Arc::new(
                std::io::Error::from(std::io::ErrorKind::BrokenPipe)
            )))),
            PingOutcome::Failed(_)
        ));
    }
}

//! [`Subscription`]: a subscription that hands out only what the daemon holding it sent
//! and outlives the daemon, with its builder and the in-band [`Item`]s it hands out.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use zbus::names::OwnedUniqueName;
use zbus::{Connection, Message, MessageStream, OwnedObjectPath, OwnedVariant};

use super::{BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH, SUBSCRIPTION_INTERFACE};

/// The bus itself: the only sender whose `NameOwnerChanged` means anything. dbus-daemon
/// writes every message's sender field itself, so no client can send under this name.
const BUS_DRIVER: &str = "org.freedesktop.DBus";

/// A watch as it was granted, kept so that it can be asked for again after a restart.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    pub kind: String,
    pub tag: u64,
    pub spec: HashMap<String, OwnedVariant>,
}

impl WatchRequest {
    /// Records a granted watch in `watches`, replacing one with the same tag (as the
    /// daemon would refuse a second).
    pub(super) fn remember(
        watches: &mut Vec<WatchRequest>,
        kind: &str,
        tag: u64,
        spec: HashMap<String, OwnedVariant>,
    ) {
        watches.retain(|w| w.tag != tag);
        watches.push(WatchRequest {
            kind: kind.to_owned(),
            tag,
            spec,
        });
    }
}

/// One entry of `SetFilter`: a source and the subtype names it lets through.
pub type FilterEntry = (String, Vec<String>);

/// What [`Subscription::next`] hands out.
#[derive(Debug)]
pub enum Item {
    /// A signal of this subscription (`DeviceChanged`, `Lost`, `WatchRemoved`, …), checked
    /// to come from the daemon that holds the subscription, on its object path and
    /// interface. Decode an event with [`event`](super::event) into its source's typed struct, `Lost`
    /// and `WatchRemoved` with the `…Body` types of [`super`].
    Signal(Message),
    /// The daemon left the bus. Events that happen from now until [`Item::Restarted`] are
    /// not delivered; re-subscribing is under way.
    DaemonGone { previous_owner: OwnedUniqueName },
    /// A re-subscription attempt failed (the daemon is not back yet, or it refused); the
    /// next attempt is made after `retry_in`, or as soon as the bus says the daemon is back.
    Retrying {
        error: zbus::Error,
        retry_in: Duration,
    },
    /// The daemon restarted and the subscription was made again: an unknown number of
    /// events were lost (a `Lost` with reason [`DAEMON_RESTARTED`](super::DAEMON_RESTARTED) and no count), and
    /// sequence numbers start again at 1 on the new subscription `path`. Every watch and
    /// the filter were asked for again; those refused follow as
    /// [`Item::WatchNotRestored`] and [`Item::FilterNotRestored`].
    Restarted(Restart),
    /// A watch the restarted daemon refused (policy changed, the watched object is gone):
    /// its events no longer arrive, and it is no longer part of the subscription.
    WatchNotRestored {
        tag: u64,
        kind: String,
        error: zbus::Error,
    },
    /// The restarted daemon refused the filter: the subscription now passes every subtype.
    FilterNotRestored { error: zbus::Error },
}

/// A restart of the daemon under a [`Subscription`].
#[derive(Debug, Clone)]
pub struct Restart {
    /// The unique bus name of the daemon that held the old subscription.
    pub previous_owner: OwnedUniqueName,
    /// The unique bus name of the daemon that holds the new one.
    pub owner: OwnedUniqueName,
    /// The new subscription object; its sequence numbers start at 1.
    pub path: OwnedObjectPath,
}

/// Sets up a [`Subscription`]: `Subscription::builder(conn).queue_depth(256).watch(…)
/// .filter(…).build().await?`.
pub struct SubscriptionBuilder {
    conn: Connection,
    options: HashMap<String, OwnedVariant>,
    watches: Vec<WatchRequest>,
    filter: Option<Vec<FilterEntry>>,
    max_queued: NonZeroUsize,
    retry_first: Duration,
    retry_max: Duration,
}

impl SubscriptionBuilder {
    /// The subscription's queue depth (`queue-depth`).
    #[must_use]
    pub fn queue_depth(self, depth: u32) -> Self {
        self.option("queue-depth", OwnedVariant::from(depth))
    }

    /// Any `Subscribe` option.
    #[must_use]
    pub fn option(mut self, key: impl Into<String>, value: OwnedVariant) -> Self {
        self.options.insert(key.into(), value);
        self
    }

    /// A watch that must be granted: [`Self::build`] fails with the daemon's error if not.
    #[must_use]
    pub fn watch(
        mut self,
        kind: impl Into<String>,
        tag: u64,
        spec: HashMap<String, OwnedVariant>,
    ) -> Self {
        self.watches.push(WatchRequest {
            kind: kind.into(),
            tag,
            spec,
        });
        self
    }

    /// The subscription's filter (`SetFilter`).
    #[must_use]
    pub fn filter(mut self, filter: Vec<FilterEntry>) -> Self {
        self.filter = Some(filter);
        self
    }

    /// How many received messages zbus holds before it stops reading the connection
    /// (default 64): the connection's own queue, raised to this if it is smaller, which
    /// every subscription on the connection shares (the signals arrive without a match
    /// rule). Not reading is what makes the daemon's flow control hold events back and
    /// count them as `Lost`, so this bounds memory.
    #[must_use]
    pub fn max_queued(mut self, max: NonZeroUsize) -> Self {
        self.max_queued = max;
        self
    }

    /// The pace of re-subscription attempts while the daemon is away: `first` after the
    /// first failure, doubling up to `max` (defaults 250 ms and 8 s). An attempt is also
    /// made as soon as the bus says the name has a new owner.
    #[must_use]
    pub fn retry_delays(mut self, first: Duration, max: Duration) -> Self {
        self.retry_first = first;
        self.retry_max = max.max(first);
        self
    }

    /// Subscribes, sets the watches and the filter.
    ///
    /// # Errors
    /// The bus's or the daemon's error for `Subscribe`, the first refused watch, or the
    /// filter; nothing is left behind on the daemon then.
    pub async fn build(self) -> zbus::Result<Subscription> {
        // Listen for the name's owner before subscribing, so that no change after the
        // subscription is made can be missed.
        let owner_changes = MessageStream::for_match_rule(
            zbus::MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .sender(BUS_DRIVER)
                .path("/org/freedesktop/DBus")
                .interface(BUS_DRIVER)
                .member("NameOwnerChanged")
                .arg(0, BUS_NAME)
                .build()?,
            &self.conn,
            None,
        )
        .await?;
        let established = establish(
            &self.conn,
            &self.options,
            &self.watches,
            self.filter.as_deref(),
            self.max_queued,
            true,
        )
        .await?;
        Ok(Subscription {
            conn: self.conn,
            options: self.options,
            watches: established.watches,
            filter: self.filter,
            max_queued: self.max_queued,
            retry_first: self.retry_first,
            retry_max: self.retry_max,
            owner_changes,
            pending: established.items.into_iter().map(Ok).collect(),
            state: State::Live(Box::new(established.live)),
        })
    }
}

/// A subscription to watchqd that only hands out what the daemon holding it sent, and
/// that outlives the daemon: when the daemon restarts (the bus's `NameOwnerChanged` for
/// `org.watchq1`), it subscribes again with the same options, watches and filter and
/// says so in-band ([`Item::DaemonGone`], [`Item::Restarted`]).
///
/// Read it with [`Subscription::next`] continuously: zbus stops reading the whole
/// connection while a stream's queue is full. `next` is cancel-safe while the daemon is
/// there; a re-subscription runs inside it, and if `next` is dropped half-way through
/// one, the attempt is made again from the start by the next call (the daemon may keep
/// the unfinished subscription until the connection closes).
pub struct Subscription {
    conn: Connection,
    options: HashMap<String, OwnedVariant>,
    watches: Vec<WatchRequest>,
    filter: Option<Vec<FilterEntry>>,
    max_queued: NonZeroUsize,
    retry_first: Duration,
    retry_max: Duration,
    owner_changes: MessageStream,
    pending: VecDeque<zbus::Result<Item>>,
    state: State,
}

enum State {
    // Boxed: a Live holds a whole MessageStream, many times the size of Away.
    Live(Box<Live>),
    Away {
        previous_owner: OwnedUniqueName,
        attempts: u32,
        next_try: tokio::time::Instant,
    },
}

/// A subscription object on one daemon instance, and its signals.
struct Live {
    owner: OwnedUniqueName,
    path: OwnedObjectPath,
    signals: MessageStream,
}

impl Live {
    /// Whether `message` is one of this subscription's signals. Match rules do not keep
    /// other connections' unicast signals out, so this is the check that does.
    fn accepts(&self, message: &Message) -> bool {
        let header = message.header();
        message.message_type() == zbus::message::Type::Signal
            && header.sender().is_some_and(|s| *s == self.owner)
            && header.path().is_some_and(|p| *p == *self.path)
            && header
                .interface()
                .is_some_and(|i| i.as_str() == SUBSCRIPTION_INTERFACE)
    }

    /// Calls a method of the subscription object on the daemon that holds it, reading its
    /// signals into `items` meanwhile: signals arrive as soon as a watch exists, and a
    /// stream that is not read would stop the connection before the reply could come.
    async fn call<B>(
        &mut self,
        conn: &Connection,
        items: &mut Vec<Item>,
        method: &str,
        body: &B,
    ) -> zbus::Result<Message>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        let call = conn.call_method(
            Some(self.owner.as_str()),
            self.path.as_str(),
            Some(SUBSCRIPTION_INTERFACE),
            method,
            body,
        );
        tokio::pin!(call);
        loop {
            tokio::select! {
                biased;
                reply = &mut call => return reply,
                message = self.signals.next() => match message {
                    Some(Ok(message)) if self.accepts(&message) => items.push(Item::Signal(message)),
                    Some(_) => {}
                    // The connection is closing: the call fails on its own.
                    None => return call.await,
                },
            }
        }
    }

    /// The signals already received, without waiting.
    fn drain(&mut self, into: &mut VecDeque<zbus::Result<Item>>) {
        while let Some(Some(message)) = self.signals.next().now_or_never() {
            match message {
                Ok(message) if self.accepts(&message) => into.push_back(Ok(Item::Signal(message))),
                Ok(_) => {}
                Err(e) => into.push_back(Err(e)),
            }
        }
    }
}

/// A subscription made, and what happened while making it.
struct Established {
    live: Live,
    /// The watches granted, in the order asked.
    watches: Vec<WatchRequest>,
    /// Signals received and refusals, in the order they came.
    items: Vec<Item>,
}

/// Whether the daemon refused (its own typed errors) rather than was unreachable.
fn is_refusal(error: &zbus::Error) -> bool {
    matches!(error, zbus::Error::MethodError(name, _, _) if name.as_str().starts_with("org.watchq1.Error."))
}

/// Subscribes and asks for `watches` and `filter`. With `strict`, any refusal fails the
/// whole; without, refusals become items and the rest stands.
async fn establish(
    conn: &Connection,
    options: &HashMap<String, OwnedVariant>,
    watches: &[WatchRequest],
    filter: Option<&[FilterEntry]>,
    max_queued: NonZeroUsize,
    strict: bool,
) -> zbus::Result<Established> {
    let reply = conn
        .call_method(
            Some(BUS_NAME),
            MANAGER_PATH,
            Some(MANAGER_INTERFACE),
            "Subscribe",
            &(options,),
        )
        .await?;
    // The reply comes from the unique name that holds the subscription: from now on,
    // only that connection is believed, and calls go to it rather than to whoever owns
    // the well-known name by then.
    let owner: OwnedUniqueName = reply
        .header()
        .sender()
        .ok_or_else(|| zbus::Error::Failure("the Subscribe reply has no sender".into()))?
        .to_owned()
        .into();
    let path: OwnedObjectPath = reply.body().deserialize()?;
    // No match rule: the daemon's signals are unicast to this connection, and the bus
    // delivers those whatever the connection's rules say, while every rule a client adds
    // is one more that dbus-daemon walks for every message it routes (at 1,000
    // subscribers' rules, most of what the bus spends per signal). `Live::accepts`
    // keeps out what is not this subscription's. The connection's one queue, which this
    // stream shares with the connection's other unfiltered streams, is raised to hold
    // `max_queued`.
    if conn.max_queued() < max_queued {
        conn.clone().set_max_queued(max_queued);
    }
    let signals = MessageStream::from(conn);
    let mut live = Live {
        owner,
        path,
        signals,
    };
    let mut items = Vec::new();
    match add_all(conn, &mut live, &mut items, watches, filter, strict).await {
        Ok(granted) => Ok(Established {
            live,
            watches: granted,
            items,
        }),
        Err(e) => {
            // Best effort: the daemon may be gone, and then so is the subscription.
            let _ = live.call(conn, &mut Vec::new(), "Close", &()).await;
            Err(e)
        }
    }
}

async fn add_all(
    conn: &Connection,
    live: &mut Live,
    items: &mut Vec<Item>,
    watches: &[WatchRequest],
    filter: Option<&[FilterEntry]>,
    strict: bool,
) -> zbus::Result<Vec<WatchRequest>> {
    let mut granted = Vec::with_capacity(watches.len());
    for watch in watches {
        let body = (watch.kind.as_str(), watch.tag, &watch.spec);
        match live.call(conn, items, "AddWatch", &body).await {
            Ok(_) => granted.push(watch.clone()),
            Err(error) if !strict && is_refusal(&error) => items.push(Item::WatchNotRestored {
                tag: watch.tag,
                kind: watch.kind.clone(),
                error,
            }),
            Err(error) => return Err(error),
        }
    }
    if let Some(filter) = filter {
        match live.call(conn, items, "SetFilter", &(filter,)).await {
            Ok(_) => {}
            Err(error) if !strict && is_refusal(&error) => {
                items.push(Item::FilterNotRestored { error });
            }
            Err(error) => return Err(error),
        }
    }
    Ok(granted)
}

/// What woke [`Subscription::next`].
enum Wake {
    Signal(Option<zbus::Result<Message>>),
    OwnerChange(Option<zbus::Result<Message>>),
    Retry,
}

impl Subscription {
    /// Starts setting up a subscription on `conn` (from [`connect`](super::connect), which makes the
    /// connection answer the daemon's `Peer.Ping`).
    pub fn builder(conn: &Connection) -> SubscriptionBuilder {
        SubscriptionBuilder {
            conn: conn.clone(),
            options: HashMap::new(),
            watches: Vec::new(),
            filter: None,
            max_queued: NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN),
            retry_first: Duration::from_millis(250),
            retry_max: Duration::from_secs(8),
        }
    }

    /// The connection the subscription lives on.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The subscription object, while the daemon is there.
    pub fn path(&self) -> Option<&OwnedObjectPath> {
        match &self.state {
            State::Live(live) => Some(&live.path),
            State::Away { .. } => None,
        }
    }

    /// The unique bus name of the daemon holding the subscription, while it is there.
    pub fn owner(&self) -> Option<&OwnedUniqueName> {
        match &self.state {
            State::Live(live) => Some(&live.owner),
            State::Away { .. } => None,
        }
    }

    /// The watches granted, as they will be asked for again after a restart.
    pub fn watches(&self) -> &[WatchRequest] {
        &self.watches
    }

    fn live(
        &mut self,
    ) -> zbus::Result<(&mut Live, &Connection, &mut VecDeque<zbus::Result<Item>>)> {
        match &mut self.state {
            State::Live(live) => Ok((live, &self.conn, &mut self.pending)),
            State::Away { .. } => Err(zbus::Error::Failure(
                "watchqd is not on the bus; the subscription is being made again".into(),
            )),
        }
    }

    /// Calls a method of the subscription, keeping what arrives meanwhile for `next`.
    async fn call<B>(&mut self, method: &str, body: &B) -> zbus::Result<Message>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        let (live, conn, pending) = self.live()?;
        let mut items = Vec::new();
        let reply = live.call(conn, &mut items, method, body).await;
        pending.extend(items.into_iter().map(Ok));
        reply
    }

    /// Adds a watch (`AddWatch`); once granted, it is asked for again after a restart.
    ///
    /// # Errors
    /// The daemon's refusal (`org.watchq1.Error.*`), or the bus's error.
    pub async fn add_watch(
        &mut self,
        kind: &str,
        tag: u64,
        spec: HashMap<String, OwnedVariant>,
    ) -> zbus::Result<()> {
        self.call("AddWatch", &(kind, tag, &spec)).await?;
        WatchRequest::remember(&mut self.watches, kind, tag, spec);
        Ok(())
    }

    /// Removes a watch (`RemoveWatch`).
    ///
    /// # Errors
    /// The daemon's refusal, or the bus's error.
    pub async fn remove_watch(&mut self, tag: u64) -> zbus::Result<()> {
        self.call("RemoveWatch", &(tag,)).await?;
        self.watches.retain(|w| w.tag != tag);
        Ok(())
    }

    /// Sets the filter (`SetFilter`); it is set again after a restart.
    ///
    /// # Errors
    /// The daemon's refusal, or the bus's error.
    pub async fn set_filter(&mut self, filter: Vec<FilterEntry>) -> zbus::Result<()> {
        self.call("SetFilter", &(&filter,)).await?;
        self.filter = Some(filter);
        Ok(())
    }

    /// Ends the subscription (`Close`).
    ///
    /// # Errors
    /// The bus's error; none when the daemon is away (there is nothing to close).
    pub async fn close(mut self) -> zbus::Result<()> {
        if matches!(self.state, State::Away { .. }) {
            return Ok(());
        }
        self.call("Close", &()).await.map(|_| ())
    }

    /// The next item; `None` once the bus connection is closed.
    pub async fn next(&mut self) -> Option<zbus::Result<Item>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            let wake = match &mut self.state {
                State::Live(live) => tokio::select! {
                    message = live.signals.next() => Wake::Signal(message),
                    message = self.owner_changes.next() => Wake::OwnerChange(message),
                },
                // The bus's news first: retry knowing the latest owner.
                State::Away { next_try, .. } => tokio::select! {
                    biased;
                    message = self.owner_changes.next() => Wake::OwnerChange(message),
                    () = tokio::time::sleep_until(*next_try) => Wake::Retry,
                },
            };
            match wake {
                Wake::Signal(None) | Wake::OwnerChange(None) => return None,
                Wake::Signal(Some(Err(e))) | Wake::OwnerChange(Some(Err(e))) => {
                    return Some(Err(e))
                }
                Wake::Signal(Some(Ok(message))) => {
                    if let State::Live(live) = &self.state {
                        if live.accepts(&message) {
                            return Some(Ok(Item::Signal(message)));
                        }
                    }
                    // Anything else was sent by someone other than our daemon: dropped.
                }
                Wake::OwnerChange(Some(Ok(message))) => {
                    if let Some(change) = owner_change(&message) {
                        self.on_owner_change(change);
                    }
                }
                Wake::Retry => self.try_restore().await,
            }
        }
    }

    fn on_owner_change(&mut self, OwnerChange { old, new }: OwnerChange) {
        let now = tokio::time::Instant::now();
        match &mut self.state {
            State::Live(live) => {
                // Only our daemon losing the name ends the subscription. Changes queued
                // before we subscribed again (two restarts in a row: the name went to an
                // instance that is already gone) say nothing about the daemon we have.
                if old != live.owner.as_str() {
                    return;
                }
                // What the old daemon sent before it left is real: hand it out first.
                live.drain(&mut self.pending);
                let previous_owner = live.owner.clone();
                if new.is_none() {
                    self.pending.push_back(Ok(Item::DaemonGone {
                        previous_owner: previous_owner.clone(),
                    }));
                }
                // Try at once: the daemon may be back already, and where the bus can
                // start it (D-Bus activation) the Subscribe call does so.
                self.state = State::Away {
                    previous_owner,
                    attempts: 0,
                    next_try: now,
                };
            }
            State::Away { next_try, .. } => {
                if new.is_some() {
                    *next_try = now;
                }
            }
        }
    }

    async fn try_restore(&mut self) {
        let State::Away {
            previous_owner,
            attempts,
            ..
        } = &self.state
        else {
            return;
        };
        let (previous_owner, attempts) = (previous_owner.clone(), *attempts);
        match establish(
            &self.conn,
            &self.options,
            &self.watches,
            self.filter.as_deref(),
            self.max_queued,
            false,
        )
        .await
        {
            Ok(established) => {
                self.pending.push_back(Ok(Item::Restarted(Restart {
                    previous_owner,
                    owner: established.live.owner.clone(),
                    path: established.live.path.clone(),
                })));
                for item in &established.items {
                    if let Item::FilterNotRestored { .. } = item {
                        self.filter = None;
                    }
                }
                self.pending.extend(established.items.into_iter().map(Ok));
                self.watches = established.watches;
                self.state = State::Live(Box::new(established.live));
            }
            Err(error) => {
                let retry_in = self
                    .retry_first
                    .saturating_mul(2u32.saturating_pow(attempts.min(16)))
                    .min(self.retry_max);
                self.pending
                    .push_back(Ok(Item::Retrying { error, retry_in }));
                self.state = State::Away {
                    previous_owner,
                    attempts: attempts.saturating_add(1),
                    next_try: tokio::time::Instant::now() + retry_in,
                };
            }
        }
    }
}

/// A change of `org.watchq1`'s owner, as the bus reported it.
struct OwnerChange {
    old: String,
    /// `None`: the name has no owner now.
    new: Option<OwnedUniqueName>,
}

/// The change when `message` is a `NameOwnerChanged` for `org.watchq1` from the bus
/// itself; `None` for anything else, such as the same signal forged by another connection.
fn owner_change(message: &Message) -> Option<OwnerChange> {
    let header = message.header();
    if header.sender().map(|s| s.as_str()) != Some(BUS_DRIVER)
        || header.interface().map(|i| i.as_str()) != Some(BUS_DRIVER)
        || header.member().map(|m| m.as_str()) != Some("NameOwnerChanged")
    {
        return None;
    }
    let (name, old, new): (String, String, String) = message.body().deserialize().ok()?;
    if name != BUS_NAME {
        return None;
    }
    let new = if new.is_empty() {
        None
    } else {
        Some(zbus::names::UniqueName::try_from(new).ok()?.into())
    };
    Some(OwnerChange { old, new })
}

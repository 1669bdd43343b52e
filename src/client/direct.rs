//! [`DirectSubscription`]: a subscription opened with `Manager.SubscribeDirect`, whose
//! signals arrive on a peer-to-peer connection of its own, around the bus. Like
//! [`Subscription`](super::Subscription) it outlives the daemon, saying so with the same
//! in-band [`Item`]s, and asks for its watches and filter again after a restart.
//!
//! On that connection the daemon is the only peer, so every signal on the subscription's
//! path and interface is the daemon's: no sender to check. The bus connection that opened
//! it is kept: the daemon ends a direct subscription when its opener leaves the bus.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::time::Duration;

use futures_util::StreamExt;
use zbus::connection::{AuthMechanism, Builder};
use zbus::names::OwnedUniqueName;
use zbus::{Connection, Message, MessageStream, OwnedObjectPath, OwnedVariant};

use super::{FilterEntry, Item, ManagerProxy, Restart, WatchRequest, SUBSCRIPTION_INTERFACE};

const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(8);

/// Whether `SubscribeDirect` failed because this daemon or this bus cannot do it (a
/// daemon without the method, a connection that cannot pass fds), so that the bus path
/// is the one to use. zbus reports `org.freedesktop.DBus.Error.*` replies as
/// [`zbus::Error::FDO`].
pub fn direct_unsupported(e: &zbus::Error) -> bool {
    match e {
        zbus::Error::FDO(e) => matches!(
            **e,
            zbus::fdo::Error::UnknownMethod(_)
                | zbus::fdo::Error::UnknownInterface(_)
                | zbus::fdo::Error::NotSupported(_)
        ),
        zbus::Error::Unsupported => true,
        _ => false,
    }
}

/// One direct subscription's connection.
struct Link {
    conn: Connection,
    path: OwnedObjectPath,
    stream: MessageStream,
}

impl Link {
    async fn open(
        bus: &Connection,
        options: &HashMap<String, OwnedVariant>,
    ) -> zbus::Result<(Link, OwnedUniqueName)> {
        let manager = ManagerProxy::new(bus).await?;
        let options = options
            .iter()
            .map(|(k, v)| Ok((k.as_str(), zbus::Variant::try_from(v)?)))
            .collect::<zbus::Result<HashMap<_, _>>>()?;
        let (path, fd) = manager.subscribe_direct(options).await?;
        let owner = zbus::fdo::DBusProxy::new(bus)
            .await?
            .get_name_owner(super::BUS_NAME.try_into()?)
            .await?;
        let stream = std::os::unix::net::UnixStream::from(OwnedFd::from(fd));
        stream
            .set_nonblocking(true)
            .map_err(|e| zbus::Error::InputOutput(std::sync::Arc::new(e)))?;
        let conn = Builder::unix_stream(stream)
            .p2p()
            .auth_mechanism(AuthMechanism::Anonymous)
            .build()
            .await?;
        let stream = MessageStream::from(&conn);
        Ok((Link { conn, path, stream }, owner))
    }

    async fn call(
        &self,
        member: &str,
        body: &(impl serde::Serialize + zbus::zvariant::DynamicType),
    ) -> zbus::Result<()> {
        self.conn
            .call_method(
                None::<&str>,
                &self.path,
                Some(SUBSCRIPTION_INTERFACE),
                member,
                body,
            )
            .await
            .map(drop)
    }

    fn is_ours(&self, message: &Message) -> bool {
        let header = message.header();
        message.message_type() == zbus::message::Type::Signal
            && header
                .path()
                .is_some_and(|p| p.as_str() == self.path.as_str())
            && header
                .interface()
                .is_some_and(|i| i.as_str() == SUBSCRIPTION_INTERFACE)
    }
}

/// A direct subscription that survives restarts of the daemon: see the module doc.
pub struct DirectSubscription {
    bus: Connection,
    options: HashMap<String, OwnedVariant>,
    watches: Vec<WatchRequest>,
    filter: Option<Vec<FilterEntry>>,
    /// `None` while the daemon is away.
    link: Option<Link>,
    owner: OwnedUniqueName,
    pending: VecDeque<Item>,
    retry_in: Duration,
}

impl DirectSubscription {
    /// Opens a direct subscription on `bus` with `SubscribeDirect`'s `options`.
    ///
    /// # Errors
    /// The daemon's refusal or the bus's error; [`direct_unsupported`] tells those that
    /// mean "use the bus path".
    pub async fn open(
        bus: &Connection,
        options: HashMap<String, OwnedVariant>,
    ) -> zbus::Result<DirectSubscription> {
        let (link, owner) = Link::open(bus, &options).await?;
        Ok(DirectSubscription {
            bus: bus.clone(),
            options,
            watches: Vec::new(),
            filter: None,
            link: Some(link),
            owner,
            pending: VecDeque::new(),
            retry_in: RETRY_FIRST,
        })
    }

    /// The current subscription object, `None` while the daemon is away.
    pub fn path(&self) -> Option<&OwnedObjectPath> {
        self.link.as_ref().map(|l| &l.path)
    }

    fn link(&self) -> zbus::Result<&Link> {
        self.link
            .as_ref()
            .ok_or_else(|| zbus::Error::Failure("watchqd is away".into()))
    }

    /// Adds a watch (`AddWatch`), asked for again after a restart.
    ///
    /// # Errors
    /// The daemon's refusal, or the connection's error.
    pub async fn add_watch(
        &mut self,
        kind: &str,
        tag: u64,
        spec: HashMap<String, OwnedVariant>,
    ) -> zbus::Result<()> {
        self.link()?.call("AddWatch", &(kind, tag, &spec)).await?;
        WatchRequest::remember(&mut self.watches, kind, tag, spec);
        Ok(())
    }

    /// Replaces the filter (`SetFilter`), asked for again after a restart.
    ///
    /// # Errors
    /// The daemon's refusal, or the connection's error.
    pub async fn set_filter(&mut self, filter: Vec<FilterEntry>) -> zbus::Result<()> {
        self.link()?.call("SetFilter", &(&filter,)).await?;
        self.filter = Some(filter);
        Ok(())
    }

    /// Ends the subscription (`Close`); closing the connection would too.
    ///
    /// # Errors
    /// The connection's error.
    pub async fn close(self) -> zbus::Result<()> {
        match &self.link {
            Some(link) => link.call("Close", &()).await,
            None => Ok(()),
        }
    }

    /// The next signal of the subscription or news of the daemon; `None` never (the
    /// subscription is made again after every restart). Cancel-safe between items.
    pub async fn next(&mut self) -> Option<zbus::Result<Item>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(Ok(item));
            }
            if let Some(link) = &mut self.link {
                match link.stream.next().await {
                    Some(Ok(message)) if link.is_ours(&message) => {
                        return Some(Ok(Item::Signal(message)))
                    }
                    Some(Ok(_)) => continue,
                    // The connection ended: the daemon stopped (or closed it).
                    Some(Err(_)) | None => {
                        self.link = None;
                        self.retry_in = RETRY_FIRST;
                        return Some(Ok(Item::DaemonGone {
                            previous_owner: self.owner.clone(),
                        }));
                    }
                }
            }
            tokio::time::sleep(self.retry_in).await;
            match Link::open(&self.bus, &self.options).await {
                Ok((link, owner)) => self.restored(link, owner).await,
                Err(error) => {
                    let retry_in = self.retry_in;
                    self.retry_in = (self.retry_in * 2).min(RETRY_MAX);
                    return Some(Ok(Item::Retrying { error, retry_in }));
                }
            }
        }
    }

    /// The subscription made again: the watches and filter asked for again, and what
    /// that gave queued as items.
    async fn restored(&mut self, link: Link, owner: OwnedUniqueName) {
        self.pending.push_back(Item::Restarted(Restart {
            previous_owner: std::mem::replace(&mut self.owner, owner.clone()),
            owner,
            path: link.path.clone(),
        }));
        let mut kept = Vec::new();
        for watch in std::mem::take(&mut self.watches) {
            match link
                .call("AddWatch", &(&watch.kind, watch.tag, &watch.spec))
                .await
            {
                Ok(()) => kept.push(watch),
                Err(error) => self.pending.push_back(Item::WatchNotRestored {
                    tag: watch.tag,
                    kind: watch.kind,
                    error,
                }),
            }
        }
        self.watches = kept;
        if let Some(filter) = &self.filter {
            if let Err(error) = link.call("SetFilter", &(filter,)).await {
                self.filter = None;
                self.pending.push_back(Item::FilterNotRestored { error });
            }
        }
        self.link = Some(link);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::fdo::Error as Fdo;

    fn fdo(e: Fdo) -> zbus::Error {
        zbus::Error::FDO(Box::new(e))
    }

    /// A daemon without SubscribeDirect answers UnknownMethod, which zbus reports as
    /// `Error::FDO`; a connection without fd passing fails with `Unsupported`: those fall
    /// back to the bus. A refusal of the daemon's own does not: it would refuse
    /// Subscribe as well.
    #[test]
    fn only_a_missing_method_or_fd_passing_falls_back_to_the_bus() {
        assert!(direct_unsupported(&fdo(Fdo::UnknownMethod("old".into()))));
        assert!(direct_unsupported(&fdo(Fdo::UnknownInterface(
            "old".into()
        ))));
        assert!(direct_unsupported(&zbus::Error::Unsupported));
        assert!(!direct_unsupported(&fdo(Fdo::AccessDenied(
            "bus policy".into()
        ))));
        assert!(!direct_unsupported(&fdo(Fdo::ServiceUnknown(
            "gone".into()
        ))));
        assert!(!direct_unsupported(&zbus::Error::MethodError(
            "org.watchq1.Error.LimitExceeded"
                .try_into()
                .expect("a name"),
            None,
            zbus::message::Message::method_call("/", "M")
                .build(&())
                .expect("message"),
        )));
    }
}

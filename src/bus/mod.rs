//! The D-Bus adapter: objects, identity lookup, and delivery of outboxes as unicast
//! signals with flow control (`delivery.rs`).

mod delivery;
pub mod error;
pub mod manager;
pub mod subscription;
pub mod types;

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use zbus::fdo::DBusProxy;
use zbus::names::{BusName, UniqueName};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, Message, ObjectPath, OwnedObjectPath, OwnedVariant, Signature};

use crate::dispatch::{Delivery, Hub};
use crate::error::Error;
use crate::event::Record;
use crate::policy::identity::BusCredentials;
use crate::policy::{Authorizer, Identity, PolicyConfig, Polkit, Scope};
use crate::source::WatchSpec;
use error::BusError;
use subscription::SubscriptionObject;

pub const BUS_NAME: &str = "org.watchq1";

/// The unique name of a call's sender: who the caller is, as the bus says it.
fn sender<'h>(header: &'h zbus::message::Header<'_>) -> Result<&'h UniqueName<'h>, BusError> {
    header
        .sender()
        .ok_or_else(|| BusError::InvalidArgument("message has no sender".into()))
}

pub struct Service {
    conn: Connection,
    hub: Arc<Hub>,
    dbus: DBusProxy<'static>,
    /// Every access decision goes through here (see [`crate::policy`]).
    authorizer: Authorizer,
    /// What every subscription's deliverer shares ([`delivery`]).
    delivery: delivery::Shared,
}

impl Service {
    /// Serves the Manager object; the caller requests the name afterwards, so that no
    /// client can reach a half-built daemon.
    pub async fn serve(
        conn: &Connection,
        hub: Arc<Hub>,
        policy: PolicyConfig,
    ) -> zbus::Result<Arc<Service>> {
        let service = Arc::new(Service {
            conn: conn.clone(),
            hub,
            dbus: DBusProxy::new(conn).await?,
            authorizer: Authorizer::new(policy, Box::new(Polkit::new(conn.clone()))),
            delivery: delivery::Shared::new(conn).await,
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

    /// Authorizes and adds a watch: policy first (polkit, cached per connection), then the
    /// hub, which takes nothing but the grant policy returns.
    pub(crate) async fn add_watch(
        &self,
        id: u64,
        caller: &str,
        kind: &str,
        tag: u64,
        spec: &WatchSpec,
    ) -> Result<(), Error> {
        self.known_source(kind)?;
        let identity = self.hub.identity_of(id, caller)?;
        let planned = self.hub.plan_watch(kind, spec, &identity)?;
        let grant = self
            .authorizer
            .watch(&identity, kind, planned.scope, || {
                !self.hub.subscriptions_of(caller).is_empty()
            })
            .await?;
        self.hub.add_watch(id, grant, tag, planned).await
    }

    /// A snapshot needs what a system-wide watch of the source needs. `subscription` is
    /// (id, caller) for a subscription's own snapshot; the Manager's identifies the
    /// caller afresh.
    pub(crate) async fn snapshot(
        &self,
        sender: &UniqueName<'_>,
        source: &str,
        subscription: Option<u64>,
    ) -> Result<(u64, Vec<crate::event::Object>), BusError> {
        self.known_source(source)?;
        let identity = match subscription {
            Some(id) => self.hub.identity_of(id, sender.as_str())?,
            None => {
                let identity = self.identity(sender).await?;
                self.authorizer.subscribe(&identity)?;
                identity
            }
        };
        // A subscription that watches the source already holds grants for it, and its
        // snapshot is limited to what those watches cover (Hub::snapshot).
        let granted = subscription.is_some_and(|id| self.hub.watches_source(id, source));
        if !granted {
            self.authorizer
                .watch(&identity, source, Scope::System, || {
                    !self.hub.subscriptions_of(sender.as_str()).is_empty()
                })
                .await?;
        }
        Ok(self
            .hub
            .snapshot(source, subscription.map(|id| (id, sender.as_str())))?)
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
        let depth = subscribe_options(options)?;
        let identity = self.identity(sender).await?;
        self.authorizer.subscribe(&identity)?;
        let uid = identity.uid;
        tracing::debug!(
            owner = %sender,
            uid,
            pid = ?identity.pid,
            unit = ?identity.unit,
            session = ?identity.session,
            label = ?identity.label,
            "caller identified"
        );
        let subscribed = self.hub.subscribe(identity, depth)?;
        let id = subscribed.id;
        let path = subscription::path(id);
        self.conn
            .object_server()
            .at(
                path.as_str(),
                SubscriptionObject {
                    id,
                    service: Arc::clone(self),
                },
            )
            .await?;
        let owner = sender.to_owned();
        let service = Arc::clone(self);
        tokio::spawn(async move { service.deliver(owner, subscribed).await });
        // The owner may have left before we started watching for that.
        if !self
            .dbus
            .name_has_owner(BusName::Unique(sender.to_owned()))
            .await
            .unwrap_or(false)
        {
            self.close(id).await;
        }
        tracing::info!(subscription = id, owner = %sender, uid, "subscribed");
        OwnedObjectPath::try_from(path).map_err(BusError::ZBus)
    }

    /// Ends a subscription: state, object and delivery task.
    pub async fn close(&self, id: u64) {
        if self.hub.close(id).await {
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

/// Reads `Subscribe`'s options: only `queue-depth` (u) so far, whose range the hub
/// checks. Public so that the fuzzer runs exactly what the daemon runs.
pub fn subscribe_options(
    options: &HashMap<String, OwnedVariant>,
) -> Result<Option<usize>, BusError> {
    let mut depth = None;
    for (key, value) in options {
        match key.as_str() {
            "queue-depth" => {
                let requested = u32::try_from(value.clone()).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "option 'queue-depth' must be a u32 (D-Bus type 'u'), got '{}'",
                        value.value_signature()
                    ))
                })?;
                depth = Some(usize::try_from(requested).unwrap_or(usize::MAX));
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown Subscribe option '{other}'; known: queue-depth"
                ))
                .into())
            }
        }
    }
    Ok(depth)
}

/// An event signal as every subscriber receives it, but for the sequence number and the
/// tag that start every event signal's body; encoded once per record.
struct EventEncoding {
    member: &'static str,
    signature: Signature,
    /// Native-endian body with zero for seq and tag.
    body: Box<[u8]>,
}

/// Offsets of seq and tag in an event signal's body: the first two arguments, `tt`.
const SEQ_AT: std::ops::Range<usize> = 0..8;
const TAG_AT: std::ops::Range<usize> = 8..16;

/// An event's signal body, for the sources whose events are encoded once per record;
/// `None` for the rest, which [`emit`] sends one by one. Every arm's body starts with
/// (seq, tag).
fn encode_event(record: &Record) -> Option<EventEncoding> {
    fn encoded<B: serde::Serialize + zbus::DynamicType>(
        member: &'static str,
        body: &B,
    ) -> Option<EventEncoding> {
        let signature = body.signature();
        let leading_seq_and_tag = match &signature {
            Signature::Structure(fields) => {
                fields
                    .iter()
                    .take(2)
                    .filter(|f| **f == Signature::U64)
                    .count()
                    == 2
            }
            _ => false,
        };
        if !leading_seq_and_tag {
            tracing::error!(member, %signature, "an event signal must start with (seq, tag)");
            return None;
        }
        let context = zbus::wire::serialized::Context::new(zbus::wire::NATIVE_ENDIAN, 0);
        match zbus::wire::to_bytes(context, body) {
            Ok(data) => Some(EventEncoding {
                member,
                signature,
                body: data.bytes().into(),
            }),
            Err(e) => {
                tracing::warn!(member, "encoding an event failed: {e}");
                None
            }
        }
    }
    let (seq, tag) = (0u64, 0u64);
    match record.source {
        crate::source::devices::NAME => {
            let registry_subtype = crate::source::devices::SUBTYPES
                .get(usize::from(record.subtype))
                .copied()
                .unwrap_or("change");
            encoded(
                "DeviceChanged",
                &(
                    seq,
                    tag,
                    registry_subtype,
                    record.attr_str("subsystem").unwrap_or_default(),
                    record.object_id.as_str(),
                    types::AttrMap(&record.attributes),
                    &record.properties,
                ),
            )
        }
        crate::source::blockerr::NAME => {
            let number = |key: &str| record.attr_u64(key).unwrap_or_default();
            let narrow = |key: &str| u32::try_from(number(key)).unwrap_or(u32::MAX);
            encoded(
                "BlockError",
                &(
                    seq,
                    tag,
                    record.attr_str("device").unwrap_or_default(),
                    narrow("major"),
                    narrow("minor"),
                    number("sector"),
                    narrow("sectors"),
                    record.attr_str("operation").unwrap_or_default(),
                    record.attr_str("errno-name").unwrap_or_default(),
                    i32::try_from(number("errno")).unwrap_or(i32::MAX),
                    number("count"),
                    types::AttrMap(&record.attributes),
                ),
            )
        }
        crate::source::quota::NAME => {
            let text = |key: &str| record.attr_str(key).unwrap_or_default();
            let number = |key: &str| record.attr_u64(key).unwrap_or_default();
            let narrow = |key: &str| u32::try_from(number(key)).unwrap_or(u32::MAX);
            encoded(
                "QuotaWarning",
                &(
                    seq,
                    tag,
                    text("warning"),
                    text("kind"),
                    text("resource"),
                    text("quota-type"),
                    number("excess-id"),
                    number("caused-id"),
                    text("device"),
                    narrow("major"),
                    narrow("minor"),
                    types::AttrMap(&record.attributes),
                ),
            )
        }
        crate::source::filesystems::NAME => {
            let number = |key: &str| record.attr_u64(key).unwrap_or_default();
            let narrow = |key: &str| u32::try_from(number(key)).unwrap_or(u32::MAX);
            encoded(
                "FilesystemError",
                &(
                    seq,
                    tag,
                    crate::source::filesystems::SUBTYPES
                        .get(usize::from(record.subtype))
                        .copied()
                        .unwrap_or("error"),
                    record.attr_str("device").unwrap_or_default(),
                    narrow("major"),
                    narrow("minor"),
                    record.attr_str("fs-type").unwrap_or_default(),
                    record.attr_str("mount-point").unwrap_or_default(),
                    record.attr_str("errno-name").unwrap_or_default(),
                    i32::try_from(number("errno")).unwrap_or(i32::MAX),
                    narrow("count"),
                    number("inode"),
                    types::AttrMap(&record.attributes),
                ),
            )
        }
        crate::source::space::NAME => {
            let number = |key: &str| record.attr_u64(key).unwrap_or_default();
            encoded(
                "SpaceWarning",
                &(
                    seq,
                    tag,
                    record.attr_str("state").unwrap_or_default(),
                    crate::source::space::SUBTYPES
                        .get(usize::from(record.subtype))
                        .copied()
                        .unwrap_or("low"),
                    record.attr_str("path").unwrap_or_default(),
                    record.attr_str("mount-point").unwrap_or_default(),
                    number("available-bytes"),
                    number("total-bytes"),
                    number("threshold-bytes"),
                    types::AttrMap(&record.attributes),
                ),
            )
        }
        crate::source::mounts::NAME => {
            let text = |key: &str| record.attr_str(key).unwrap_or_default();
            let number = |key: &str| record.attr_u64(key).unwrap_or_default();
            encoded(
                "MountChanged",
                &(
                    seq,
                    tag,
                    crate::source::mounts::SUBTYPES
                        .get(usize::from(record.subtype))
                        .copied()
                        .unwrap_or("attach"),
                    number("mount-id"),
                    number("parent-id"),
                    text("mount-point"),
                    text("source"),
                    text("fs-type"),
                    text("options"),
                    types::AttrMap(&record.attributes),
                ),
            )
        }
        crate::source::keys::NAME => {
            let change = crate::source::keys::SUBTYPES
                .get(usize::from(record.subtype))
                .copied()
                .unwrap_or("unknown");
            // Serials and aux are the kernel's 32 bits; aux may be a negative errno.
            let signed = |key: &str| {
                let bits =
                    u32::try_from(record.attr_u64(key).unwrap_or_default()).unwrap_or_default();
                i32::from_ne_bytes(bits.to_ne_bytes())
            };
            encoded(
                "KeyChanged",
                &(
                    seq,
                    tag,
                    change,
                    signed("key"),
                    signed("aux"),
                    record.attr_str("type").unwrap_or_default(),
                    record.attr_str("description").unwrap_or_default(),
                    types::AttrMap(&record.attributes),
                ),
            )
        }
        _ => None,
    }
}

/// The signal for an event delivery from its record's shared encoding; `None` when the
/// delivery is no event or its source has no shared encoding.
fn event_message(
    conn: &Connection,
    path: &ObjectPath<'_>,
    owner: &UniqueName<'_>,
    delivery: &Delivery,
) -> Option<zbus::Result<Message>> {
    let Delivery::Event { seq, tag, record } = delivery else {
        return None;
    };
    let encoding = record.encoded(encode_event)?;
    let mut body = encoding.body.to_vec();
    body[SEQ_AT].copy_from_slice(&seq.to_ne_bytes());
    body[TAG_AT].copy_from_slice(&tag.to_ne_bytes());
    let mut builder =
        Message::signal(path, subscription::INTERFACE, encoding.member).destination(owner);
    if let Some(sender) = conn.unique_name() {
        builder = builder.sender(sender);
    }
    // SAFETY: `body` is a native-endian serialization (the builder's default endianness)
    // of a value of type `signature`, carrying no fds; only the two leading u64 the
    // signature starts with were overwritten with other u64 values.
    Some(unsafe { builder.build_raw_body(&body, encoding.signature.clone(), Vec::new()) })
}

/// Sends, one by one, what has no shared encoding (see [`encode_event`]).
async fn emit(emitter: &SignalEmitter<'_>, delivery: &Delivery) -> zbus::Result<()> {
    match delivery {
        Delivery::Event { record, .. } => Err(zbus::Error::Failure(format!(
            "no signal for source {}",
            record.source
        ))),
        Delivery::Lost {
            seq,
            count,
            source,
            reason,
        } => SubscriptionObject::lost(emitter, *seq, *count, source, reason.as_str()).await,
        Delivery::WatchRemoved { seq, tag, reason } => {
            SubscriptionObject::watch_removed(emitter, *seq, *tag, reason).await
        }
    }
}

//! Deliveries as signal messages. An event's body comes from its record's shared
//! encoding (made once, by its source's signal, for every subscriber; see
//! [`crate::signal`]) with the subscriber's seq and tag written in; `Lost` and
//! `WatchRemoved` are sent one by one.

use zbus::names::UniqueName;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, Message, ObjectPath};

use super::subscription::{self, SubscriptionObject};
use crate::dispatch::Delivery;
use crate::source::Registry;

/// The signal for an event delivery from its record's shared encoding; `None` when the
/// delivery is no event or its record could not be encoded. `owner` is the destination
/// on the bus; a peer-to-peer connection has none.
pub(super) fn event_message(
    conn: &Connection,
    registry: &Registry,
    path: &ObjectPath<'_>,
    owner: Option<&UniqueName<'_>>,
    delivery: &Delivery,
) -> Option<zbus::Result<Message>> {
    let Delivery::Event { seq, tag, record } = delivery else {
        return None;
    };
    let encoding = record.encoded(|record| registry.get(record.source)?.signal().encode(record))?;
    let body = encoding.body_for(*seq, *tag);
    let mut builder = Message::signal(path, subscription::INTERFACE, encoding.member);
    if let Some(owner) = owner {
        builder = builder.destination(owner);
    }
    if let Some(sender) = conn.unique_name() {
        builder = builder.sender(sender);
    }
    // SAFETY: `body` is a native-endian serialization (the builder's default endianness)
    // of a value of type `signature` carrying no fds: `EncodedSignal` is only made by
    // serializing an event signal struct with zbus, whose fields (strings, numbers,
    // string maps, variants of those) hold no fds, and `body_for` only overwrote its two
    // leading u64 (seq and tag, which `event_signal!` puts first) with other u64 values.
    Some(unsafe { builder.build_raw_body(&body, encoding.signature.clone(), Vec::new()) })
}

/// Sends, one by one, what has no shared encoding.
pub(super) async fn emit(emitter: &SignalEmitter<'_>, delivery: &Delivery) -> zbus::Result<()> {
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

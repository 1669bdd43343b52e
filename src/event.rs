//! The typed records every layer shares.
//!
//! A [`Record`] is what a source saw, once, before policy and fan-out. It carries the
//! kernel design's semantics: a source (the notification *type*), a subtype that filters
//! address as one bit of a 256-bit map, the object it concerns with the change it makes
//! to the source's object table (so snapshots and events agree), and the audience policy
//! needs to decide who may see it. Tags and sequence numbers are per subscription and are
//! added at delivery.

use std::collections::BTreeMap;

use zbus::Variant;

/// One attribute value of an object. Kept closed so every value has a fixed D-Bus type
/// that clients can rely on: a key always carries the same variant type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attr {
    Str(String),
    U64(u64),
    U32(u32),
    Bool(bool),
}

impl Attr {
    /// The value as a D-Bus variant borrowing from `self`.
    pub fn to_variant(&self) -> Variant<'_> {
        match self {
            Attr::Str(s) => Variant::from(s.as_str()),
            Attr::U64(v) => Variant::from(*v),
            Attr::U32(v) => Variant::from(*v),
            Attr::Bool(v) => Variant::from(*v),
        }
    }

    /// A JSON rendering for `watchqctl --json`, with the same typing.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Attr::Str(s) => serde_json::Value::from(s.as_str()),
            Attr::U64(v) => serde_json::Value::from(*v),
            Attr::U32(v) => serde_json::Value::from(*v),
            Attr::Bool(v) => serde_json::Value::from(*v),
        }
    }
}

impl From<&str> for Attr {
    fn from(value: &str) -> Self {
        Attr::Str(value.to_owned())
    }
}
impl From<String> for Attr {
    fn from(value: String) -> Self {
        Attr::Str(value)
    }
}
impl From<u64> for Attr {
    fn from(value: u64) -> Self {
        Attr::U64(value)
    }
}
impl From<u32> for Attr {
    fn from(value: u32) -> Self {
        Attr::U32(value)
    }
}
impl From<bool> for Attr {
    fn from(value: bool) -> Self {
        Attr::Bool(value)
    }
}

/// Named attributes, ordered so that output is stable.
pub type Attrs = BTreeMap<String, Attr>;

/// Raw key/value properties as the kernel reported them (uevent environment, …).
pub type Properties = BTreeMap<String, String>;

/// One object a source tracks (a device, a mount, …), as snapshots return it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// Stable identifier within its source (a sysfs path, a mount id, …).
    pub id: String,
    /// How many events changed this object since the daemon first saw it.
    pub changes: u64,
    pub attributes: Attrs,
    pub properties: Properties,
}

/// What an event does to its source's object table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The object exists with the record's attributes (created or changed).
    Upsert,
    /// The object is gone.
    Remove,
    /// The object table is not affected (errors, warnings).
    None,
}

/// Who may see an event, as far as the event itself can tell. The subscriber's side of
/// the decision is in [`crate::policy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Information the kernel already gives every local user (device uevents are
    /// multicast to any process that binds the uevent netlink group).
    Everyone,
    /// Only the given uid (the owner of the object) and administrators.
    Owner(u32),
    /// Administrators only.
    Administrators,
}

/// One event from one source, before fan-out.
#[derive(Clone, Debug)]
pub struct Record {
    /// The source's registered name (the notification type).
    pub source: &'static str,
    /// Index into the source's subtype names; filters test this bit.
    pub subtype: u8,
    /// The object this event concerns.
    pub object_id: String,
    pub change: Change,
    pub attributes: Attrs,
    pub properties: Properties,
    pub audience: Audience,
}

impl Record {
    /// The string value of attribute `key`, if it has one.
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key) {
            Some(Attr::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The numeric value of attribute `key` (`u` or `t`), if it has one.
    pub fn attr_u64(&self, key: &str) -> Option<u64> {
        match self.attributes.get(key) {
            Some(Attr::U64(v)) => Some(*v),
            Some(Attr::U32(v)) => Some(u64::from(*v)),
            _ => None,
        }
    }
}

/// What a running source yields.
#[derive(Debug)]
pub enum SourceMsg {
    Record(Record),
    /// The kernel dropped events (ENOBUFS, queue overflow). The source has rescanned and
    /// `objects` is the complete current state; every subscriber watching the source is told
    /// with `Lost`.
    Overflow {
        objects: Vec<Object>,
    },
    /// Events of one watched object were dropped (by the kernel, or coalesced by the
    /// source to bound what one user costs): the source listed it again, and the table
    /// changes by `upserted` (objects new or changed) and `removed` (ids gone); only the
    /// subscriptions with a watch on `object`
    /// ([`crate::source::WatchMatcher::watched_object`]) are told with
    /// `Lost(kernel-overflow)`. A difference, not the whole list: the hub applies it
    /// under the lock every subscriber's delivery waits on, so its cost must follow
    /// what changed, not the object's size (10,000 mounts took the hub 60 ms). So only
    /// a source whose own cache is what its records made of the table may send it.
    Resync {
        object: String,
        upserted: Vec<Object>,
        removed: Vec<String>,
    },
    /// The part of the source's table whose ids start with `prefix` is now exactly
    /// `objects`, and no event is delivered: a watched object (a mount namespace) came
    /// into view with its current contents, or went out of view because nobody watches
    /// it any more.
    Replace {
        prefix: String,
        objects: Vec<Object>,
    },
    /// The kernel object some watches are bound to is gone (a key destroyed, a mount
    /// namespace freed): every watch whose [`crate::source::WatchMatcher::watched_object`]
    /// is `object` ends with `WatchRemoved(reason)`.
    WatchedObjectGone {
        object: String,
        reason: String,
    },
    /// Nothing to publish, but a counter the source keeps for the metrics changed (a
    /// forged message was rejected, [`crate::source::EventSource::forged_rejected`]):
    /// whoever writes the metrics is told, so that the file does not wait for an
    /// unrelated change to show it.
    Counted,
}

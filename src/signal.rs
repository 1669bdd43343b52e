//! Event signals, each defined once by its source.
//!
//! A source declares its signal in its own folder (`src/source/<name>/signal.rs`) with
//! `event_signal!`: a struct with named fields, `seq` and `tag` first, deriving serde and
//! [`zbus::Type`]. Everything else comes from that one definition:
//!
//! - the daemon encodes a record once, for every subscriber, with [`SignalKind::encode`]
//!   (the source builds the struct from its [`Record`], [`EventSignal::from_record`]);
//! - clients decode a signal's body into the same struct (`message.body().deserialize()`),
//!   and `watchqctl` prints it with [`SignalKind::render`] (its `Display`, or JSON);
//! - the interface declares it: `event_signal!` makes the `#[zbus(signal)]` declaration
//!   from the struct's fields and doc comment, and `gather_interface!` splices every
//!   source's into the interface's impl (`bus/subscription.rs`), which names none; this
//!   module's tests check the blessed XML in `dbus/` against the structs, and
//!   `tests/interface.rs` that XML against what the daemon serves.
//!
//! [`crate::source::EventSource::signal`] is required, so the compiler refuses a source
//! without a signal.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use zbus::{Message, OwnedVariant, Signature, Str, Type, Variant};

use crate::event::{Attr, Attrs, Record};

/// What `event_signal!` derives from the struct itself.
pub trait SignalShape {
    /// The signal's member name: the struct's name.
    const MEMBER: &'static str;
    /// The name of the source whose signal it is (the `source` of `watchqctl --json`).
    const SOURCE: &'static str;
    /// The arguments' names in order: the struct's field names, `seq` and `tag` first.
    const ARGS: &'static [&'static str];
}

/// One source's event signal, as a client decodes it (the struct owning its arguments:
/// `DeviceChanged<'static>`); `event_signal!` implements it, the source its `Display`.
pub trait EventSignal:
    SignalShape + Serialize + serde::de::DeserializeOwned + Type + fmt::Display
{
    /// The same struct borrowing its text, attributes and properties from a record:
    /// what the daemon encodes, so that encoding copies nothing out of the record.
    type Borrowed<'r>: Serialize + Type;

    /// The signal for `record`, with `seq` and `tag` zero: delivery writes each
    /// subscriber's own into the shared encoding.
    fn from_record(record: &Record) -> Self::Borrowed<'_>;
}

/// How a signal's struct holds an argument whose type `event_signal!` was given (the
/// owned type, which also gives the argument's D-Bus type in the interface): borrowed
/// from the record while encoding (`Of<'r>`), owned once decoded (`Of<'static>`).
pub trait Arg: Type {
    type Of<'r>: Serialize + Type + Clone + fmt::Debug;
}

impl Arg for String {
    type Of<'r> = Cow<'r, str>;
}

impl Arg for BTreeMap<String, String> {
    type Of<'r> = Cow<'r, BTreeMap<String, String>>;
}

impl Arg for Attributes<'static> {
    type Of<'r> = Attributes<'r>;
}

macro_rules! plain_args {
    ($($ty:ty),+) => {
        $(impl Arg for $ty {
            type Of<'r> = $ty;
        })+
    };
}
plain_args!(u32, u64, i32, bool);

/// Declares a source's event signal: a struct named after the signal's member, whose
/// fields are the signal's arguments after `seq` and `tag` (which every event signal
/// starts with, and which the macro puts first so that delivery can write them into a
/// shared encoding at fixed offsets), each with the expression that takes it from a
/// record (`record` the [`Record`], `fields` its [`Fields`], under the names the
/// declaration gives them). A field is declared with its owned type (`String`, a number,
/// `crate::signal::Attributes<'static>`, `std::collections::BTreeMap<String, String>`:
/// see [`Arg`]), written as a path valid anywhere in the crate, since it is also the
/// argument's type in the interface's declaration; the struct holds `Arg::Of<'r>`, and
/// its expression makes the borrowed form. Field names are the argument names introspection shows;
/// `#[serde(rename)]` renames a field in `watchqctl --json` only (D-Bus encodes structs
/// by position).
///
/// The struct's documentation is the signal's in the interface (`dbus/`), and
/// `add_watch_doc` the source's paragraph of `AddWatch`'s (its spec keys):
/// `interface_items!`, which the macro also defines in the calling module, hands both,
/// with the `#[zbus(signal)]` declaration made from the fields (`member_fn`, the
/// member's snake-case name, names it), to `gather_interface!`, so that the bus's
/// interface declares every source's signal without naming one.
macro_rules! event_signal {
    (
        source: $source:expr,
        member_fn: $member_fn:ident,
        add_watch_doc: { $(#[doc = $spec_doc:tt])* },
        $(#[doc = $doc:tt])*
        pub struct $name:ident ($record:ident, $fields:ident) {
            $( $(#[$field_meta:meta])* pub $field:ident : $ty:ty = $value:expr ),* $(,)?
        }
    ) => {
        // The `$` of the macro this one defines cannot be written here: it is passed in.
        $crate::signal::event_signal! { @with_dollar ($)
            source: $source,
            member_fn: $member_fn,
            add_watch_doc: { $(#[doc = $spec_doc])* },
            $(#[doc = $doc])*
            pub struct $name ($record, $fields) {
                $( $(#[$field_meta])* pub $field : $ty = $value ),*
            }
        }
    };
    (
        @with_dollar ($d:tt)
        source: $source:expr,
        member_fn: $member_fn:ident,
        add_watch_doc: { $(#[doc = $spec_doc:tt])* },
        $(#[doc = $doc:tt])*
        pub struct $name:ident ($record:ident, $fields:ident) {
            $( $(#[$field_meta:meta])* pub $field:ident : $ty:ty = $value:expr ),*
        }
    ) => {
        $(#[doc = $doc])*
        #[derive(Clone, Debug, serde::Serialize, serde::Deserialize, zbus::Type)]
        pub struct $name<'r> {
            /// The subscription's sequence number of this signal.
            pub seq: u64,
            /// The tag of the watch that matched.
            pub tag: u64,
            $( $(#[$field_meta])* pub $field: <$ty as $crate::signal::Arg>::Of<'r>, )*
        }

        impl $crate::signal::SignalShape for $name<'_> {
            const MEMBER: &'static str = stringify!($name);
            const SOURCE: &'static str = $source;
            const ARGS: &'static [&'static str] = &["seq", "tag", $(stringify!($field)),*];
        }

        impl $crate::signal::EventSignal for $name<'static> {
            type Borrowed<'r> = $name<'r>;

            fn from_record($record: &$crate::event::Record) -> $name<'_> {
                let $fields = $crate::signal::Fields($record);
                $name {
                    seq: 0,
                    tag: 0,
                    $( $field: $value, )*
                }
            }
        }

        /// This source's items of the subscription interface, added to those gathered
        /// so far (see `crate::signal::gather_interface!`).
        macro_rules! interface_items {
            (
                [$d($d callback:tt)*]
                [$d($d add_watch_doc:tt)*]
                [$d($d signals:tt)*]
                $d($d rest:tt)*
            ) => {
                $crate::signal::gather_interface! {
                    [$d($d callback)*]
                    [$d($d add_watch_doc)* $(#[doc = $spec_doc])*]
                    [
                        $d($d signals)*
                        $(#[doc = $doc])*
                        #[zbus(signal)]
                        pub async fn $member_fn(
                            emitter: &zbus::object_server::SignalEmitter<'_>,
                            seq: u64,
                            tag: u64,
                            $( $field: $ty, )*
                        ) -> zbus::Result<()>;
                    ]
                    $d($d rest)*
                }
            };
        }
        pub(crate) use interface_items;
    };
}
pub(crate) use event_signal;

/// Collects the sources' items of the subscription interface and hands them to a
/// callback macro, for an interface macro (`zbus::interface`) that needs every signal
/// written out in the `impl` it reads: `[callback] [AddWatch doc] [signals]`, then the
/// paths of the `interface_items!` still to visit, each followed by `;`. Each
/// `interface_items!` adds its source's and calls this again; with none left, the
/// callback gets `add_watch_doc: [...] signals: [...]`.
/// `crate::source::with_interface_items!` starts it with every built-in source.
macro_rules! gather_interface {
    ([$($callback:tt)*] [$($add_watch_doc:tt)*] [$($signals:tt)*]) => {
        $($callback)*! {
            add_watch_doc: [$($add_watch_doc)*]
            signals: [$($signals)*]
        }
    };
    (
        [$($callback:tt)*] [$($add_watch_doc:tt)*] [$($signals:tt)*]
        $($next:ident)::+; $($rest:tt)*
    ) => {
        $($next)::+! { [$($callback)*] [$($add_watch_doc)*] [$($signals)*] $($rest)* }
    };
}
pub(crate) use gather_interface;

/// A source's signal, as the layers that do not know the source (the bus, `watchqctl`)
/// handle it.
pub struct SignalKind {
    pub member: &'static str,
    pub source: &'static str,
    pub args: &'static [&'static str],
    /// The arguments' types, as one structure.
    pub signature: &'static Signature,
    encode: fn(&Record) -> Option<EncodedSignal>,
    render: fn(&Message, bool) -> Option<String>,
}

impl SignalKind {
    pub const fn of<S: EventSignal>() -> Self {
        SignalKind {
            member: S::MEMBER,
            source: S::SOURCE,
            args: S::ARGS,
            signature: S::SIGNATURE,
            encode: encode::<S>,
            render: render::<S>,
        }
    }

    /// The record's signal, encoded once for every subscriber; `None` (logged) if zbus
    /// cannot encode it.
    pub fn encode(&self, record: &Record) -> Option<EncodedSignal> {
        (self.encode)(record)
    }

    /// `message` (a signal of this kind) as `watchqctl` prints it: its text line, or a
    /// JSON object with its arguments and `signal` and `source`; `None` when the body is
    /// not this signal's.
    pub fn render(&self, message: &Message, json: bool) -> Option<String> {
        (self.render)(message, json)
    }
}

impl fmt::Debug for SignalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignalKind")
            .field("member", &self.member)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// An event signal as every subscriber receives it, but for `seq` and `tag`; made once
/// per record.
#[derive(Debug)]
pub struct EncodedSignal {
    pub member: &'static str,
    pub signature: Signature,
    /// Native-endian body with zero for seq and tag.
    body: Box<[u8]>,
}

/// Offsets of seq and tag in an event signal's body: the struct's first two fields, `tt`
/// (a structure starts 8-aligned, at 0 in a body).
const SEQ_AT: std::ops::Range<usize> = 0..8;
const TAG_AT: std::ops::Range<usize> = 8..16;

impl EncodedSignal {
    /// The body for one subscriber: the shared encoding with its `seq` and `tag`. It is a
    /// native-endian serialization of a value of type [`Self::signature`] carrying no fds.
    pub fn body_for(&self, seq: u64, tag: u64) -> Vec<u8> {
        let mut body = self.body.to_vec();
        body[SEQ_AT].copy_from_slice(&seq.to_ne_bytes());
        body[TAG_AT].copy_from_slice(&tag.to_ne_bytes());
        body
    }
}

fn encode<S: EventSignal>(record: &Record) -> Option<EncodedSignal> {
    let signal = S::from_record(record);
    let context = zbus::wire::serialized::Context::new(zbus::wire::NATIVE_ENDIAN, 0);
    match zbus::wire::to_bytes(context, &signal) {
        // `body_for` relies on the two leading u64; event_signal! puts them there.
        Ok(data) if data.bytes().len() >= TAG_AT.end => Some(EncodedSignal {
            member: S::MEMBER,
            signature: S::SIGNATURE.clone(),
            body: data.bytes().into(),
        }),
        Ok(_) => {
            tracing::error!(
                member = S::MEMBER,
                "an event signal must start with (seq, tag)"
            );
            None
        }
        Err(e) => {
            tracing::warn!(member = S::MEMBER, "encoding an event failed: {e}");
            None
        }
    }
}

fn render<S: EventSignal>(message: &Message, json: bool) -> Option<String> {
    let signal: S = message.body().deserialize().ok()?;
    if !json {
        return Some(signal.to_string());
    }
    let mut value = serde_json::to_value(&signal).ok()?;
    let object = value.as_object_mut()?;
    object.insert("signal".into(), S::MEMBER.into());
    object.insert("source".into(), S::SOURCE.into());
    Some(value.to_string())
}

/// A signal's `attributes` (`a{sv}`): the record's typed attributes, each value in its
/// fixed variant type, in key order like the record's own map — what clients that read
/// the array in order (busctl, GDBus's iterators) have always seen. The daemon encodes
/// them borrowed from the record; a client holds what it received.
#[derive(Clone, Debug, PartialEq)]
pub enum Attributes<'r> {
    /// A record's, borrowed for encoding.
    Record(&'r Attrs),
    /// As a client decoded them.
    Received(BTreeMap<String, OwnedVariant>),
}

impl Default for Attributes<'_> {
    fn default() -> Self {
        Attributes::Received(BTreeMap::new())
    }
}

impl Type for Attributes<'_> {
    const SIGNATURE: &'static Signature = <BTreeMap<String, OwnedVariant> as Type>::SIGNATURE;
}

impl Serialize for Attributes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // JSON (`watchqctl --json`) wants plain typed values, D-Bus the variants.
        match self {
            Attributes::Record(attrs) if serializer.is_human_readable() => {
                let json: BTreeMap<&String, serde_json::Value> =
                    attrs.iter().map(|(k, v)| (k, v.to_json())).collect();
                json.serialize(serializer)
            }
            Attributes::Record(attrs) => {
                let mut map = serializer.serialize_map(Some(attrs.len()))?;
                for (key, value) in attrs.iter() {
                    map.serialize_entry(key, &value.to_variant())?;
                }
                map.end()
            }
            Attributes::Received(map) if serializer.is_human_readable() => {
                attributes_json(map).serialize(serializer)
            }
            Attributes::Received(map) => map.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Attributes<'_> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::deserialize(deserializer).map(Attributes::Received)
    }
}

impl<'r> Attributes<'r> {
    /// The record's attributes.
    pub fn of(record: &'r Record) -> Self {
        Attributes::Record(&record.attributes)
    }

    /// The string value of `key`, if it has one.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self {
            Attributes::Record(attrs) => match attrs.get(key) {
                Some(Attr::Str(s)) => Some(s),
                _ => None,
            },
            Attributes::Received(map) => map.get(key).and_then(|v| <&str>::try_from(&**v).ok()),
        }
    }

    /// `key=value` pairs in key order, without the keys in `skip`.
    pub fn text(&self, skip: &[&str]) -> String {
        match self {
            Attributes::Record(_) => attributes_text(&self.clone().into_map(), skip),
            Attributes::Received(map) => attributes_text(map, skip),
        }
    }

    /// The attributes as a client holds them.
    pub fn into_map(self) -> BTreeMap<String, OwnedVariant> {
        match self {
            Attributes::Record(attrs) => attrs
                .iter()
                .map(|(key, value)| {
                    let value = match value {
                        Attr::Str(s) => OwnedVariant::from(Str::from(s.clone())),
                        Attr::U64(v) => OwnedVariant::from(*v),
                        Attr::U32(v) => OwnedVariant::from(*v),
                        Attr::Bool(v) => OwnedVariant::from(*v),
                    };
                    (key.clone(), value)
                })
                .collect(),
            Attributes::Received(map) => map,
        }
    }
}

fn variant_json(value: &Variant<'_>) -> serde_json::Value {
    match value {
        Variant::Str(s) => serde_json::Value::from(s.as_str()),
        Variant::U64(v) => serde_json::Value::from(*v),
        Variant::U32(v) => serde_json::Value::from(*v),
        Variant::I64(v) => serde_json::Value::from(*v),
        Variant::I32(v) => serde_json::Value::from(*v),
        Variant::Bool(v) => serde_json::Value::from(*v),
        other => serde_json::Value::from(format!("{other}")),
    }
}

/// Received attributes as a JSON object of typed values, in key order.
pub fn attributes_json<'a>(
    attributes: impl IntoIterator<Item = (&'a String, &'a OwnedVariant)>,
) -> serde_json::Value {
    let sorted: BTreeMap<&String, serde_json::Value> = attributes
        .into_iter()
        .map(|(k, v)| (k, variant_json(v)))
        .collect();
    serde_json::json!(sorted)
}

/// Received attributes as `key=value` pairs in key order, without the keys in `skip`.
pub fn attributes_text<'a>(
    attributes: impl IntoIterator<Item = (&'a String, &'a OwnedVariant)>,
    skip: &[&str],
) -> String {
    let sorted: BTreeMap<&String, &OwnedVariant> = attributes.into_iter().collect();
    sorted
        .into_iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| match variant_json(v) {
            serde_json::Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A record's fields as its signal's arguments take them: absent ones are empty or zero,
/// numbers too large for a narrower argument saturate.
#[derive(Clone, Copy)]
pub struct Fields<'r>(pub &'r Record);

impl<'r> Fields<'r> {
    pub fn text(self, key: &str) -> Cow<'r, str> {
        Cow::Borrowed(self.0.attr_str(key).unwrap_or_default())
    }

    pub fn u64(self, key: &str) -> u64 {
        self.0.attr_u64(key).unwrap_or_default()
    }

    pub fn u32(self, key: &str) -> u32 {
        u32::try_from(self.u64(key)).unwrap_or(u32::MAX)
    }

    pub fn i32(self, key: &str) -> i32 {
        i32::try_from(self.u64(key)).unwrap_or(i32::MAX)
    }

    /// The record's subtype name, or `default` for a number `subtypes` does not name.
    pub fn subtype(self, subtypes: &[&'static str], default: &'static str) -> Cow<'r, str> {
        Cow::Borrowed(
            subtypes
                .get(usize::from(self.0.subtype))
                .copied()
                .unwrap_or(default),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signals the interface declares for introspection, from the contract in `dbus/`
    /// (which `tests/interface.rs` checks against what the daemon serves): member →
    /// [(name, type)].
    fn declared() -> BTreeMap<String, Vec<(String, String)>> {
        let xml = include_str!("../dbus/org.watchq1.Subscription.xml");
        let attr = |line: &str, name: &str| {
            let start = line.find(&format!("{name}=\""))? + name.len() + 2;
            let len = line[start..].find('"')?;
            Some(line[start..start + len].to_owned())
        };
        let mut signals = BTreeMap::new();
        let mut current: Option<(String, Vec<(String, String)>)> = None;
        for line in xml.lines().map(str::trim) {
            if line.starts_with("<signal ") {
                current = Some((attr(line, "name").expect("signal name"), Vec::new()));
            } else if line.starts_with("</signal>") {
                let (name, args) = current.take().expect("signal start");
                signals.insert(name, args);
            } else if let (Some((_, args)), true) = (current.as_mut(), line.starts_with("<arg ")) {
                args.push((
                    attr(line, "name").expect("arg name"),
                    attr(line, "type").expect("arg type"),
                ));
            }
        }
        signals
    }

    #[test]
    fn every_event_signal_is_declared_as_its_struct_defines_it() {
        let declared = declared();
        for kind in crate::source::CATALOGUE.iter().map(|source| source.signal) {
            let args = declared
                .get(kind.member)
                .unwrap_or_else(|| panic!("{} is not declared in the interface", kind.member));
            let names: Vec<&str> = args.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, kind.args, "{}: argument names", kind.member);
            let types: String = args.iter().map(|(_, t)| t.as_str()).collect();
            assert_eq!(
                format!("({types})"),
                kind.signature.to_string(),
                "{}: argument types",
                kind.member
            );
        }
        let events: Vec<&str> = crate::source::CATALOGUE
            .iter()
            .map(|source| source.signal.member)
            .collect();
        let undeclared: Vec<&String> = declared
            .keys()
            .filter(|m| !events.contains(&m.as_str()) && *m != "Lost" && *m != "WatchRemoved")
            .collect();
        assert!(
            undeclared.is_empty(),
            "signals declared without a source's struct: {undeclared:?}"
        );
    }

    #[test]
    fn every_source_names_its_own_signal() {
        let registry = crate::source::Registry::builtin(&crate::source::SourcesConfig::default());
        for source in registry.all() {
            let kind = source.signal();
            assert_eq!(kind.source, source.name(), "{}", kind.member);
            let listed = crate::source::CATALOGUE
                .get(source.name())
                .map(|s| s.signal);
            assert!(
                listed.is_some_and(|k| std::ptr::eq(k, kind)),
                "{}: the catalogue lists another signal for {}",
                kind.member,
                source.name()
            );
        }
    }

    /// `watchqctl --json`'s keys: the arguments, `signal` and `source`, with the renames
    /// it has always had (a mount's `mount_source`, a key's `type`).
    #[test]
    fn every_signal_renders_as_watchqctl_always_printed_it() {
        for kind in crate::source::CATALOGUE.iter().map(|source| source.signal) {
            let record = Record {
                source: kind.source,
                subtype: 0,
                object_id: "/devices/x".into(),
                change: crate::event::Change::None,
                attributes: [("name".to_owned(), Attr::from("x"))].into_iter().collect(),
                properties: BTreeMap::new(),
                audience: crate::event::Audience::Everyone,
            };
            let encoded = kind.encode(&record).expect("encoded");
            let builder = Message::signal(
                "/org/watchq1/subscription/1",
                "org.watchq1.Subscription",
                kind.member,
            );
            let body = encoded.body_for(3, 4);
            // SAFETY: as in `bus::emit`: a native-endian serialization of `signature`,
            // without fds, whose two leading u64 were overwritten.
            let message =
                unsafe { builder.build_raw_body(&body, encoded.signature.clone(), Vec::new()) }
                    .expect("message");
            let text = kind.render(&message, false).expect("text");
            assert!(text.starts_with("#3 "), "{}: {text}", kind.member);
            let json: serde_json::Value =
                serde_json::from_str(&kind.render(&message, true).expect("json")).expect("JSON");
            let mut keys: Vec<&str> = json
                .as_object()
                .expect("object")
                .keys()
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            let mut expected: Vec<&str> = kind
                .args
                .iter()
                .map(|arg| match (kind.member, *arg) {
                    ("MountChanged", "source") => "mount_source",
                    ("KeyChanged", "key_type") => "type",
                    (_, arg) => arg,
                })
                .chain(["signal", "source"])
                .collect();
            expected.sort_unstable();
            assert_eq!(keys, expected, "{}", kind.member);
            assert_eq!(json["signal"], kind.member);
            assert_eq!(json["source"], kind.source);
            assert_eq!((&json["seq"], &json["tag"]), (&3.into(), &4.into()));
            assert_eq!(json["attributes"], serde_json::json!({"name": "x"}));
        }
    }

    /// The bytes are what the hand-written tuple encoding sent before the signals became
    /// types (attributes in key order included).
    #[test]
    fn a_device_signal_encodes_to_the_bytes_of_the_former_tuple() {
        use crate::bus::types::AttrMap;
        let attributes: crate::event::Attrs = [
            ("subsystem", Attr::from("block")),
            ("name", Attr::from("loop0")),
            ("size", Attr::U64(4096)),
            ("major", Attr::U32(7)),
            ("removable", Attr::Bool(false)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let record = Record {
            source: crate::source::devices::NAME,
            subtype: 2,
            object_id: "/devices/virtual/block/loop0".into(),
            change: crate::event::Change::Upsert,
            attributes,
            properties: [("ACTION".to_owned(), "change".to_owned())].into(),
            audience: crate::event::Audience::Everyone,
        };
        let context = zbus::wire::serialized::Context::new(zbus::wire::NATIVE_ENDIAN, 0);
        let former = zbus::wire::to_bytes(
            context,
            &(
                0u64,
                0u64,
                "change",
                "block",
                record.object_id.as_str(),
                AttrMap(&record.attributes),
                &record.properties,
            ),
        )
        .expect("former");
        let encoded = crate::source::devices::signal::KIND
            .encode(&record)
            .expect("encoded");
        assert_eq!(encoded.body_for(0, 0), former.bytes());
        assert_eq!(encoded.signature.to_string(), "(ttsssa{sv}a{ss})");
    }

    #[test]
    fn seq_and_tag_are_written_into_the_shared_encoding() {
        let record = Record {
            source: crate::source::keys::NAME,
            subtype: 0,
            object_id: "7".into(),
            change: crate::event::Change::None,
            attributes: [("key".to_owned(), Attr::U64(7))].into_iter().collect(),
            properties: BTreeMap::new(),
            audience: crate::event::Audience::Everyone,
        };
        let encoded = crate::source::keys::signal::KIND
            .encode(&record)
            .expect("encoded");
        let body = encoded.body_for(41, 42);
        let context = zbus::wire::serialized::Context::new(zbus::wire::NATIVE_ENDIAN, 0);
        let data = zbus::wire::serialized::Data::new(body, context);
        let (signal, _): (crate::source::keys::signal::KeyChanged, _) =
            data.deserialize().expect("decoded");
        assert_eq!((signal.seq, signal.tag, signal.key), (41, 42, 7));
    }
}

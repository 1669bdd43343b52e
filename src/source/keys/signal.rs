//! `KeyChanged`: the keys source's signal and its part of the interface: the struct's
//! doc comment is the signal's documentation for clients, `add_watch_doc` its paragraph of
//! `AddWatch`'s (both land in `dbus/org.watchq1.Subscription.xml`).

use std::fmt;

use crate::signal::{event_signal, Attributes, Fields, SignalKind};

event_signal! {
    source: super::NAME,
    member_fn: key_changed,
    add_watch_doc: {
        /// keys: at most one of "keyring" (s: user or persistent; with "uid" (u) another
        /// user's, for administrators) or "serial" (i: a key or keyring of yours, e.g. your
        /// session keyring), and optionally "changes" (as: the change kinds wanted); by
        /// default your user keyring.
    },
    /// A key or keyring changed (the kernel's watch_queue key notification). change is
    /// the kind: instantiated, updated, linked, unlinked, cleared, revoked, invalidated,
    /// setattr; key the serial of the watched key; aux the key linked or unlinked (for
    /// linked/unlinked), the error of a negative instantiation, else 0. key_type and
    /// description describe the watched key when known ("" otherwise); attributes repeat
    /// key, aux, type, description and add owner (the key's uid).
    pub struct KeyChanged(record, fields) {
        /// The change kind (a subtype name).
        pub change: String = fields.subtype(super::SUBTYPES, "unknown"),
        /// The serial of the watched key.
        pub key: i32 = signed(fields, "key"),
        /// The key linked or unlinked, the error of a negative instantiation, else 0.
        pub aux: i32 = signed(fields, "aux"),
        /// `type` in JSON.
        #[serde(rename = "type")]
        pub key_type: String = fields.text("type"),
        pub description: String = fields.text("description"),
        pub attributes: crate::signal::Attributes<'static> = Attributes::of(record),
    }
}

pub static KIND: SignalKind = SignalKind::of::<KeyChanged>();

/// Serials and aux are the kernel's 32 bits; aux may be a negative errno.
fn signed(fields: Fields<'_>, key: &str) -> i32 {
    let bits = u32::try_from(fields.u64(key)).unwrap_or_default();
    i32::from_ne_bytes(bits.to_ne_bytes())
}

impl fmt::Display for KeyChanged<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let aux = self.aux;
        // keyctl watch's vocabulary: "<key> <change>", plus the other key of a link or
        // unlink.
        let other = match &*self.change {
            "linked" | "unlinked" => format!(" {aux}"),
            "instantiated" if aux != 0 => format!(" error {aux}"),
            _ => String::new(),
        };
        let what = if self.key_type.is_empty() {
            String::new()
        } else {
            format!("  ({} \"{}\")", self.key_type, self.description)
        };
        write!(
            f,
            "#{:<6} keys {} {}{other}{what}",
            self.seq, self.key, self.change
        )
    }
}

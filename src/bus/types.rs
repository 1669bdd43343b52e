//! Wire types of the interface. Their signatures are part of the contract in `dbus/`.

use std::borrow::Borrow;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde::Deserialize;
use zbus::{Signature, Type};

use crate::event::{Attrs, Object, Properties};

/// Attributes as `a{sv}`, each value in its fixed variant type.
pub struct AttrMap<T>(pub T);

impl<T: Borrow<Attrs>> Type for AttrMap<T> {
    const SIGNATURE: &'static Signature =
        <std::collections::HashMap<String, zbus::Variant<'static>> as Type>::SIGNATURE;
}

impl<T: Borrow<Attrs>> Serialize for AttrMap<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let attrs = self.0.borrow();
        let mut map = serializer.serialize_map(Some(attrs.len()))?;
        for (key, value) in attrs {
            map.serialize_entry(key, &value.to_variant())?;
        }
        map.end()
    }
}

/// One snapshot object: `(s id, t changes, a{sv} attributes, a{ss} properties)`.
#[derive(serde::Serialize, Type)]
pub struct SnapshotObject {
    pub id: String,
    pub changes: u64,
    pub attributes: AttrMap<Attrs>,
    pub properties: Properties,
}

impl From<Object> for SnapshotObject {
    fn from(object: Object) -> Self {
        SnapshotObject {
            id: object.id,
            changes: object.changes,
            attributes: AttrMap(object.attributes),
            properties: object.properties,
        }
    }
}

/// A source as the Manager's `Sources` property lists it:
/// `(s name, b available, s reason, as subtypes)`; an available source with a reason
/// works in a degraded mode the reason describes.
#[derive(serde::Serialize, Deserialize, Type, Clone, Debug, PartialEq, Eq)]
pub struct SourceInfo {
    pub name: String,
    pub available: bool,
    pub reason: String,
    pub subtypes: Vec<String>,
}

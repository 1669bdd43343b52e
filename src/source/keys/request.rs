//! A keys watch request as the caller sent it: parsed and checked before anything
//! touches the kernel.

use super::*;

/// A parsed watch request, before anything touched the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyWatchRequest {
    pub target: Target,
    /// Whose keyring (for `keyring`): the helper runs as this uid.
    pub uid: Option<u32>,
    pub changes: u8,
}

impl KeyWatchRequest {
    const KEYS: &'static [&'static str] = &["keyring", "serial", "uid", "changes"];

    pub fn parse(spec: &WatchSpec, requester: &Identity) -> Result<Self, Error> {
        let spec = SpecReader::new(spec, NAME, Self::KEYS)?;
        let keyring = spec.str("keyring")?;
        let serial = spec_i32(&spec, "serial")?;
        let uid = spec_u32(&spec, "uid")?;
        let target = match (keyring.as_deref(), serial) {
            (Some("user"), None) => Target::User,
            (Some("persistent"), None) => Target::Persistent,
            (Some(other), None) => {
                return Err(Error::InvalidArgument(format!(
                    "keys watch option 'keyring' is 'user' or 'persistent', got '{other}' \
                     (a session keyring is watched by its serial)"
                )))
            }
            (None, Some(serial)) if serial > 0 => Target::Serial(serial),
            (None, Some(serial)) => {
                return Err(Error::InvalidArgument(format!(
                    "keys watch option 'serial' must be a key serial (> 0), got {serial}; \
                     special ids like @s mean the daemon's keyrings, not yours"
                )))
            }
            // Nothing named: the caller's user keyring, what `watchqctl monitor keys` means.
            (None, None) => Target::User,
            (Some(_), Some(_)) => {
                return Err(Error::InvalidArgument(
                    "a keys watch names exactly one of 'keyring' (s) or 'serial' (i)".into(),
                ))
            }
        };
        if uid.is_some() && serial.is_some() {
            return Err(Error::InvalidArgument(
                "keys watch option 'uid' goes with 'keyring'; a serial is checked with your \
                 own credentials"
                    .into(),
            ));
        }
        let changes = match spec.get("changes") {
            None => ALL_CHANGES,
            Some(value) => {
                let names = Vec::<String>::try_from(value.clone()).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "keys watch option 'changes' must be a string array (D-Bus type 'as'), got '{}'",
                        value.value_signature()
                    ))
                })?;
                let mut mask = 0u8;
                for name in &names {
                    let change = KeyChange::parse(name).ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "unknown key change '{name}' in 'changes'; known: {}",
                            SUBTYPES.join(", ")
                        ))
                    })?;
                    mask |= 1 << change.subtype();
                }
                if mask == 0 {
                    return Err(Error::InvalidArgument(
                        "keys watch option 'changes' is empty: the watch would see nothing".into(),
                    ));
                }
                mask
            }
        };
        let uid = uid.filter(|uid| *uid != requester.uid);
        Ok(KeyWatchRequest {
            target,
            uid,
            changes,
        })
    }

    pub fn scope(&self, _requester: &Identity) -> Scope {
        if self.uid.is_some() {
            Scope::Others
        } else {
            Scope::Own
        }
    }
}

fn spec_i32(spec: &SpecReader<'_>, key: &str) -> Result<Option<i32>, Error> {
    spec.get(key)
        .map(|value| match &**value {
            zbus::Variant::I32(v) => Ok(*v),
            // A serial is positive: accept the unsigned and 64-bit spellings too.
            zbus::Variant::U32(v) => i32::try_from(*v).map_err(|_| out_of_range(key, value)),
            zbus::Variant::I64(v) => i32::try_from(*v).map_err(|_| out_of_range(key, value)),
            zbus::Variant::U64(v) => i32::try_from(*v).map_err(|_| out_of_range(key, value)),
            _ => Err(wrong_type(key, "i", value)),
        })
        .transpose()
}

fn spec_u32(spec: &SpecReader<'_>, key: &str) -> Result<Option<u32>, Error> {
    spec.get(key)
        .map(|value| match &**value {
            zbus::Variant::U32(v) => Ok(*v),
            zbus::Variant::I32(v) => u32::try_from(*v).map_err(|_| out_of_range(key, value)),
            zbus::Variant::U64(v) => u32::try_from(*v).map_err(|_| out_of_range(key, value)),
            zbus::Variant::I64(v) => u32::try_from(*v).map_err(|_| out_of_range(key, value)),
            _ => Err(wrong_type(key, "u", value)),
        })
        .transpose()
}

fn out_of_range(key: &str, value: &OwnedVariant) -> Error {
    Error::InvalidArgument(format!(
        "keys watch option '{key}' is out of range: {}",
        **value
    ))
}

fn wrong_type(key: &str, want: &str, value: &OwnedVariant) -> Error {
    Error::InvalidArgument(format!(
        "keys watch option '{key}' must be a number (D-Bus type '{want}'), got '{}'",
        value.value_signature()
    ))
}

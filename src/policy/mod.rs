//! Who may set which watch, and who may see which event: the one place where those
//! decisions are made. Everything here is a pure function of data the bus gave us at
//! connect time and data the event carries; nothing is read from message bodies.

use crate::error::Error;
use crate::event::Audience;

/// A caller as the bus describes it (`GetConnectionCredentials`), never as it describes
/// itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The caller's unique bus name (`:1.42`); subscriptions die with it.
    pub unique_name: String,
    pub uid: u32,
    pub pid: Option<u32>,
}

impl Identity {
    pub fn is_administrator(&self) -> bool {
        self.uid == 0
    }
}

/// Whether a subscriber may receive an event with this audience. Deny by default: a new
/// audience kind must be added here before anyone sees it.
pub fn may_see(identity: &Identity, audience: Audience) -> bool {
    match audience {
        Audience::Everyone => true,
        Audience::Owner(uid) => identity.uid == uid || identity.is_administrator(),
        Audience::Administrators => identity.is_administrator(),
    }
}

/// Whether a caller may set a watch on a source at all. Device events are information
/// the kernel already multicasts to every local process, so every caller may watch them.
pub fn authorize_watch(identity: &Identity, source: &str) -> Result<(), Error> {
    match source {
        crate::source::devices::NAME => Ok(()),
        _ if identity.is_administrator() => Ok(()),
        other => Err(Error::AccessDenied(format!(
            "watching '{other}' events requires an administrator"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32) -> Identity {
        Identity {
            unique_name: format!(":1.{uid}"),
            uid,
            pid: None,
        }
    }

    #[test]
    fn visibility_grid() {
        let (root, alice, bob) = (caller(0), caller(1000), caller(1001));
        let grid = [
            (Audience::Everyone, [true, true, true]),
            (Audience::Owner(1000), [true, true, false]),
            (Audience::Administrators, [true, false, false]),
        ];
        for (audience, expected) in grid {
            let got = [&root, &alice, &bob].map(|who| may_see(who, audience));
            assert_eq!(got, expected, "{audience:?}");
        }
    }

    #[test]
    fn anyone_may_watch_devices() {
        assert!(authorize_watch(&caller(1000), "devices").is_ok());
        assert!(matches!(
            authorize_watch(&caller(1000), "unknown-future-source"),
            Err(Error::AccessDenied(_))
        ));
        assert!(authorize_watch(&caller(0), "unknown-future-source").is_ok());
    }
}

//! The bus shim: `org.freedesktop.portal.Watchq` at `/org/freedesktop/portal/watchq`
//! and `org.freedesktop.portal.Session` on each session object. Methods parse, check
//! and delegate to [`super::session`].

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::names::{BusName, OwnedUniqueName};
use zbus::object_server::SignalEmitter;
use zbus::{interface, OwnedVariant};
use zbus::{ObjectPath, OwnedObjectPath};

use super::devices::DeviceEvent;
use super::error::PortalError;
use super::{Ending, Portal};

/// The portal object.
pub struct WatchqObject {
    pub portal: Arc<Portal>,
}

/// Kernel events a sandboxed application may have: devices appearing and going.
#[interface(name = "org.freedesktop.portal.Watchq")]
impl WatchqObject {
    /// Creates a device session for the caller and returns its object
    /// (`/org/freedesktop/portal/watchq/session/SENDER/TOKEN`, SENDER the caller's
    /// unique name without ':' and with '.' as '_'). Options: "session_handle_token"
    /// (s: letters, digits and '_', at most 64). Right after, DeviceEvents brings the
    /// current devices as "add" entries, then changes: subscribe to DeviceEvents first
    /// and match its session argument. A sandboxed app must declare the source
    /// (finish-args --add-policy=watchq.sources=devices); refused with NotAllowed.
    async fn create_session(
        &self,
        #[zbus(header)] header: Header<'_>,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<OwnedObjectPath, PortalError> {
        let sender = header
            .sender()
            .ok_or_else(|| PortalError::InvalidArgument("a call without a sender".into()))?;
        let token = session_token(&options)?;
        super::session::create(
            &self.portal,
            &OwnedUniqueName::from(sender.to_owned()),
            &token,
        )
        .await
    }

    /// Devices of a session, sent only to the session's owner: (action: add, change or
    /// remove; id: opaque, random per session, never a path; properties: vendor-id,
    /// product-id, vendor, product, class for USB devices; removable, size,
    /// media-present for removable block devices; subsystem for both). The first signal
    /// after CreateSession, and the one after Lost, hold every current device as "add".
    #[zbus(signal)]
    pub async fn device_events(
        emitter: &SignalEmitter<'_>,
        session: ObjectPath<'_>,
        events: Vec<DeviceEvent>,
    ) -> zbus::Result<()>;

    /// Events of the session were lost (the portal fell behind, or watchqd restarted):
    /// the next DeviceEvents holds every current device as "add"; forget the others.
    /// Devices still present keep their ids.
    #[zbus(signal)]
    pub async fn lost(emitter: &SignalEmitter<'_>, session: ObjectPath<'_>) -> zbus::Result<()>;

    /// The interface's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> u32 {
        1
    }
}

/// `session_handle_token`, or a fresh one.
fn session_token(options: &HashMap<String, OwnedVariant>) -> Result<String, PortalError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let mut token = None;
    for (key, value) in options {
        match key.as_str() {
            "session_handle_token" => {
                let t = String::try_from(value.clone()).map_err(|_| {
                    PortalError::InvalidArgument(
                        "option 'session_handle_token' must be a string (D-Bus type 's')".into(),
                    )
                })?;
                if t.is_empty()
                    || t.len() > 64
                    || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    return Err(PortalError::InvalidArgument(
                        "option 'session_handle_token' takes 1 to 64 letters, digits and '_'"
                            .into(),
                    ));
                }
                token = Some(t);
            }
            other => {
                return Err(PortalError::InvalidArgument(format!(
                    "unknown CreateSession option '{other}'; known: session_handle_token"
                )))
            }
        }
    }
    Ok(token.unwrap_or_else(|| {
        format!(
            "watchq{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }))
}

/// A session object.
pub struct SessionObject {
    pub portal: Arc<Portal>,
    pub path: String,
}

/// A portal session: Close ends it; Closed says the portal ended it.
#[interface(name = "org.freedesktop.portal.Session")]
impl SessionObject {
    /// Ends the session. Only its owner may.
    async fn close(&self, #[zbus(header)] header: Header<'_>) -> Result<(), PortalError> {
        let owner = self.portal.owner_of(&self.path);
        match (header.sender(), owner) {
            (Some(sender), Some(owner)) if *sender == owner => {
                self.portal.end(&self.path, Ending::Asked);
                Ok(())
            }
            _ => Err(PortalError::NotAllowed(
                "only the session's owner may close it".into(),
            )),
        }
    }

    /// The portal ended the session (watchqd refused it or went away for good).
    #[zbus(signal)]
    pub async fn closed(
        emitter: &SignalEmitter<'_>,
        details: HashMap<&str, zbus::Variant<'_>>,
    ) -> zbus::Result<()>;

    /// The interface's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> u32 {
        1
    }
}

/// An emitter for signals to `owner` alone, from `path`.
///
/// # Errors
/// When `path` is not an object path.
pub fn unicast<'a>(
    portal: &'a Portal,
    path: &'a str,
    owner: &'a OwnedUniqueName,
) -> zbus::Result<SignalEmitter<'a>> {
    Ok(SignalEmitter::new(&portal.session_bus, path)?
        .set_destination(BusName::Unique(owner.as_ref())))
}

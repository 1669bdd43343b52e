//! `org.freedesktop.portal.Error.*`, the errors every portal returns, so that an app's
//! portal code handles this portal's like the others'.

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.portal.Error")]
pub enum PortalError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The app may not have this (not declared, refused by the user, another app's
    /// session), or it could not be identified.
    NotAllowed(String),
    /// An option or argument the portal does not accept.
    InvalidArgument(String),
    /// watchqd refused or could not be reached.
    Failed(String),
}

impl From<zbus::fdo::Error> for PortalError {
    fn from(error: zbus::fdo::Error) -> Self {
        PortalError::ZBus(error.into())
    }
}

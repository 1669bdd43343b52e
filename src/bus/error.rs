//! `org.watchq1.Error.*`: the closed set of errors clients can match on.

use crate::error::Error;

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.watchq1.Error")]
pub enum BusError {
    #[zbus(error)]
    ZBus(zbus::Error),
    NotSupported(String),
    AccessDenied(String),
    InvalidArgument(String),
    LimitExceeded(String),
    NotFound(String),
    Unavailable(String),
    Sandboxed(String),
}

impl From<Error> for BusError {
    fn from(error: Error) -> Self {
        match error {
            Error::NotSupported(m) => BusError::NotSupported(m),
            Error::AccessDenied(m) => BusError::AccessDenied(m),
            Error::InvalidArgument(m) => BusError::InvalidArgument(m),
            Error::LimitExceeded(m) => BusError::LimitExceeded(m),
            Error::NotFound(m) => BusError::NotFound(m),
            Error::Unavailable(m) => BusError::Unavailable(m),
            Error::Sandboxed(m) => BusError::Sandboxed(m),
        }
    }
}

/// The D-Bus names of every error this daemon returns, for documentation and tests.
pub const ERROR_NAMES: &[&str] = &[
    "org.watchq1.Error.NotSupported",
    "org.watchq1.Error.AccessDenied",
    "org.watchq1.Error.InvalidArgument",
    "org.watchq1.Error.LimitExceeded",
    "org.watchq1.Error.NotFound",
    "org.watchq1.Error.Unavailable",
    "org.watchq1.Error.Sandboxed",
];

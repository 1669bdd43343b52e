//! The daemon's error vocabulary. Every variant maps to one `org.watchq1.Error.*` name in
//! [`crate::bus::error`]; the message is written for the person who reads it.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The kernel or this build lacks what the request needs.
    #[error("{0}")]
    NotSupported(String),
    /// Policy refused the request.
    #[error("{0}")]
    AccessDenied(String),
    /// The request is malformed: unknown names, wrong types, out-of-range values.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request would exceed a configured limit.
    #[error("{0}")]
    LimitExceeded(String),
    /// The named object (subscription, watch, …) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The caller is a sandboxed application (Flatpak, snap), which is served through the
    /// portal on the session bus, not on the system bus.
    #[error("{0}")]
    Sandboxed(String),
    /// The source exists on this kernel but could not be started just now.
    #[error("{0}")]
    Unavailable(String),
}

impl Error {
    /// The same error with its message passed through `f`.
    #[must_use]
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            Error::NotSupported(m) => Error::NotSupported(f(m)),
            Error::AccessDenied(m) => Error::AccessDenied(f(m)),
            Error::InvalidArgument(m) => Error::InvalidArgument(f(m)),
            Error::LimitExceeded(m) => Error::LimitExceeded(f(m)),
            Error::NotFound(m) => Error::NotFound(f(m)),
            Error::Sandboxed(m) => Error::Sandboxed(f(m)),
            Error::Unavailable(m) => Error::Unavailable(f(m)),
        }
    }
}

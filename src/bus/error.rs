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

/// The longest error message sent to a caller. Messages quote what the caller sent
/// (an unknown key, a pattern), and a caller may send megabytes; a person acting on the
/// error needs the start of it.
pub const MAX_MESSAGE: usize = 512;

/// `message` cut to [`MAX_MESSAGE`] bytes at a character boundary, saying how much was cut.
fn capped(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let total = message.len();
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str(&format!("… ({} of {total} bytes cut)", total - end));
    }
    message
}

impl From<Error> for BusError {
    fn from(error: Error) -> Self {
        let error = error.map_message(capped);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_at_a_character_boundary_and_say_so() {
        let long = format!("unknown key '{}'", "é".repeat(1 << 20));
        let BusError::InvalidArgument(m) = BusError::from(Error::InvalidArgument(long)) else {
            panic!("kind changed");
        };
        assert!(m.len() < MAX_MESSAGE + 64, "{} bytes", m.len());
        assert!(m.starts_with("unknown key 'éé"));
        assert!(m.ends_with("bytes cut)"), "{m}");
        let short = BusError::from(Error::NotFound("no watch with tag 7".into()));
        assert!(matches!(short, BusError::NotFound(m) if m == "no watch with tag 7"));
    }
}

//! systemd's unit naming rules, as `src/basic/unit-name.c` (systemd 252) states them:
//! which names are valid, how a template takes an instance, and how a value is escaped
//! into an instance (`systemd-escape`, `systemd-escape --path`). Pure functions over
//! strings; the tests compare them with the real `systemd-escape`.

/// A unit name is shorter than this (`UNIT_NAME_MAX`, which counts the NUL).
pub const UNIT_NAME_MAX: usize = 256;

/// Unit types, as `unit_type_from_string` knows them.
const SUFFIXES: &[&str] = &[
    "service",
    "mount",
    "swap",
    "socket",
    "target",
    "device",
    "automount",
    "timer",
    "path",
    "slice",
    "scope",
];

/// `VALID_CHARS` without the `\` that only escaping produces: characters kept as they are.
fn is_plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b':' | b'_' | b'.')
}

/// `VALID_CHARS`: what a unit name's prefix may hold.
fn is_prefix_char(byte: u8) -> bool {
    is_plain(byte) || matches!(byte, b'-' | b'\\')
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnitNameError {
    #[error("'{0}' is not a valid unit name: {1}")]
    Invalid(String, &'static str),
    #[error("'{0}' cannot be escaped as a path: it is empty, too long, or has a '..' component")]
    BadPath(String),
    #[error("an empty value cannot name an instance")]
    EmptyInstance,
}

/// A validated unit name from the configuration: a plain unit or a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnitName {
    /// `name.service`, `name@instance.service`: started as written.
    Plain(String),
    /// `name@.service`: the instance comes from each event.
    Template { prefix: String, suffix: String },
}

impl UnitName {
    /// Parses a unit name as `unit_name_is_valid(…, UNIT_NAME_PLAIN | UNIT_NAME_INSTANCE
    /// | UNIT_NAME_TEMPLATE)` accepts it.
    pub fn parse(name: &str) -> Result<UnitName, UnitNameError> {
        let invalid = |why| UnitNameError::Invalid(name.to_owned(), why);
        if name.is_empty() {
            return Err(invalid("it is empty"));
        }
        if name.len() >= UNIT_NAME_MAX {
            return Err(invalid("it has 256 characters or more"));
        }
        let (stem, suffix) = name
            .rsplit_once('.')
            .ok_or_else(|| invalid("it has no type suffix such as .service"))?;
        if !SUFFIXES.contains(&suffix) {
            return Err(invalid(
                "its suffix is not a unit type (.service, .target, …)",
            ));
        }
        let (prefix, instance) = match stem.split_once('@') {
            Some((prefix, instance)) => (prefix, Some(instance)),
            None => (stem, None),
        };
        if prefix.is_empty() {
            return Err(invalid("the part before the suffix or '@' is empty"));
        }
        if !prefix.bytes().all(is_prefix_char) {
            return Err(invalid(
                "it may hold only letters, digits and ':-_.\\' (escape other characters with systemd-escape)",
            ));
        }
        match instance {
            None => Ok(UnitName::Plain(name.to_owned())),
            Some("") => Ok(UnitName::Template {
                prefix: prefix.to_owned(),
                suffix: suffix.to_owned(),
            }),
            Some(instance) if instance.bytes().all(|b| b == b'@' || is_prefix_char(b)) => {
                Ok(UnitName::Plain(name.to_owned()))
            }
            Some(_) => Err(invalid(
                "its instance may hold only letters, digits and ':-_.\\@'",
            )),
        }
    }

    pub fn is_template(&self) -> bool {
        matches!(self, UnitName::Template { .. })
    }

    /// The unit to start for an event: the plain name, or the template with `value`
    /// escaped as its instance (`systemd-escape --template=…`, with `--path` for a value
    /// that starts with `/`).
    pub fn instantiate(&self, value: Option<&str>) -> Result<String, UnitNameError> {
        match (self, value) {
            (UnitName::Plain(name), _) => Ok(name.clone()),
            (UnitName::Template { .. }, None) => Err(UnitNameError::EmptyInstance),
            (UnitName::Template { prefix, suffix }, Some(value)) => {
                let instance = if value.starts_with('/') {
                    path_escape(value)?
                } else {
                    escape(value)
                };
                if instance.is_empty() {
                    return Err(UnitNameError::EmptyInstance);
                }
                let name = format!("{prefix}@{instance}.{suffix}");
                if name.len() >= UNIT_NAME_MAX {
                    return Err(UnitNameError::Invalid(
                        name,
                        "with its escaped instance it has 256 characters or more",
                    ));
                }
                Ok(name)
            }
        }
    }
}

impl std::fmt::Display for UnitName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnitName::Plain(name) => f.write_str(name),
            UnitName::Template { prefix, suffix } => write!(f, "{prefix}@.{suffix}"),
        }
    }
}

/// `unit_name_escape`: `/` becomes `-`; letters, digits, `:`, `_` and `.` stay, except a
/// leading `.`; every other byte (`-`, `\`, spaces, each byte of a multi-byte UTF-8
/// character) becomes `\xNN` in lowercase hex.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (i, byte) in value.bytes().enumerate() {
        if byte == b'/' {
            out.push('-');
        } else if is_plain(byte) && !(i == 0 && byte == b'.') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

/// `unit_name_path_escape`: the path simplified (`//` and `.` components dropped), its
/// leading and trailing `/` removed, then escaped; the root (or nothing) is `-`. A path
/// with a `..` component, an empty one, or one too long (`path_is_valid`: a component
/// over 255 bytes, 4096 bytes in all) is refused, as `systemd-escape --path` refuses it.
pub fn path_escape(path: &str) -> Result<String, UnitNameError> {
    if path.is_empty() || path.len() >= 4096 {
        return Err(UnitNameError::BadPath(path.to_owned()));
    }
    let mut components = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err(UnitNameError::BadPath(path.to_owned())),
            c if c.len() > 255 => return Err(UnitNameError::BadPath(path.to_owned())),
            c => components.push(c),
        }
    }
    if components.is_empty() {
        return Ok("-".to_owned());
    }
    Ok(escape(&components.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// What the real `systemd-escape` makes of `value`, or `None` when it refuses.
    fn systemd_escape(value: &str, path: bool) -> Option<String> {
        let mut command = Command::new("systemd-escape");
        if path {
            command.arg("--path");
        }
        let out = command
            .arg("--")
            .arg(value)
            .output()
            .expect("systemd-escape must be installed (the systemd package)");
        out.status
            .success()
            .then(|| String::from_utf8(out.stdout).expect("UTF-8"))
            .map(|s| s.trim_end_matches('\n').to_owned())
    }

    const TRICKY: &[&str] = &[
        "loop0",
        "sda1",
        "1-1.2:1.0",
        "usb-dev",
        "--leading-dashes",
        "a b\tc",
        ".hidden",
        "..",
        "a.b.c",
        "x\\y",
        "caf\u{e9} \u{1f4be} \u{65e5}\u{672c}",
        "with/slash/inside",
        "trailing/",
        "@at@",
        "~!#$%^&*()+={}[]|;'\",<>?",
        ":colon_and_underscore:",
        "UPPER lower 0123",
        "/",
        "//",
        "/dev/loop0",
        "/dev//disk/by-id/../x",
        "/./dev/./loop0/",
        "/devices/virtual/block/loop0",
        "/mnt/my disk/.snap",
        "/srv/caf\u{e9}-\u{1f4be}",
        "/.dotdir",
        "relative/path",
    ];

    #[test]
    fn string_escaping_equals_systemd_escape() {
        for value in TRICKY {
            let expected = systemd_escape(value, false)
                .unwrap_or_else(|| panic!("systemd-escape refused {value:?}"));
            assert_eq!(escape(value), expected, "escaping {value:?}");
        }
    }

    #[test]
    fn path_escaping_equals_systemd_escape_path() {
        let long_component = format!("/{}", "x".repeat(256));
        let mut values: Vec<&str> = TRICKY.iter().copied().filter(|v| !v.is_empty()).collect();
        values.push(&long_component);
        for value in values {
            let expected = systemd_escape(value, true);
            assert_eq!(path_escape(value).ok(), expected, "escaping path {value:?}");
        }
    }

    #[test]
    fn unit_names_are_checked_like_systemd() {
        assert_eq!(
            UnitName::parse("watchq-usb@.service"),
            Ok(UnitName::Template {
                prefix: "watchq-usb".into(),
                suffix: "service".into()
            })
        );
        assert_eq!(
            UnitName::parse("backup.target"),
            Ok(UnitName::Plain("backup.target".into()))
        );
        assert_eq!(
            UnitName::parse("getty@tty1.service"),
            Ok(UnitName::Plain("getty@tty1.service".into()))
        );
        for bad in [
            "",
            "noext",
            "thing.exe",
            "@.service",
            ".service",
            "has space.service",
            "caf\u{e9}.service",
            "inst@has space.service",
            &format!("{}.service", "a".repeat(250)),
        ] {
            assert!(UnitName::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn templates_take_the_escaped_instance() {
        let template = UnitName::parse("watchq-usb@.service").unwrap();
        assert_eq!(
            template.instantiate(Some("1-1.2")).unwrap(),
            "watchq-usb@1\\x2d1.2.service"
        );
        assert_eq!(
            template.instantiate(Some("/dev/loop0")).unwrap(),
            "watchq-usb@dev-loop0.service"
        );
        assert_eq!(
            template.instantiate(None),
            Err(UnitNameError::EmptyInstance)
        );
        assert_eq!(
            template.instantiate(Some("")),
            Err(UnitNameError::EmptyInstance)
        );
        assert!(template.instantiate(Some("/a/../b")).is_err());
        assert!(template.instantiate(Some(&"\u{e9}".repeat(60))).is_err());
        // Every instance made is a valid unit name again.
        for value in TRICKY {
            if let Ok(name) = template.instantiate(Some(value)) {
                assert!(
                    matches!(UnitName::parse(&name), Ok(UnitName::Plain(_))),
                    "{name}"
                );
            }
        }
        let plain = UnitName::parse("backup.target").unwrap();
        assert_eq!(plain.instantiate(Some("x")).unwrap(), "backup.target");
    }
}

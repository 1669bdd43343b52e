//! The devices source's watch spec, and the match of a record against it.

use super::{NAME, SUBSYSTEMS};
use crate::error::Error;
use crate::event::Record;
use crate::glob::{Pattern, MAX_NAME_PATTERN};
use crate::source::{SpecReader, WatchMatcher, WatchSpec};

/// A device watch: every given condition must hold.
///
/// Keys: `subsystem` (`block` or `usb`), `devtype` (`disk`, `partition`, `usb_device`,
/// `usb_interface`, …), `name` (the kernel name), `properties` (`a{ss}` of uevent
/// properties that must match: the kernel's, and udev's where the source follows udev,
/// `ID_FS_TYPE=ext4`, `TAGS=*:uaccess:*`). `name`, `devtype` and property values take
/// `*` and `?` wildcards, compiled once here, as `[[units]]` rules' do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeviceWatch {
    /// Uevent properties that must match, `SUBSYSTEM` and `DEVTYPE` from their keys
    /// included, sorted by key: one walk along the record's (sorted) properties checks
    /// them all, whatever their number, as every watch is checked for every event.
    required: Vec<(String, Pattern)>,
    name: Option<Pattern>,
}

impl DeviceWatch {
    const KEYS: &'static [&'static str] = &["subsystem", "devtype", "name", "properties"];
    const MAX_PROPERTIES: usize = 16;

    pub fn parse(spec: &WatchSpec) -> Result<Self, Error> {
        let spec = SpecReader::new(spec, NAME, Self::KEYS)?;
        let subsystem = spec.str("subsystem")?;
        if let Some(subsystem) = &subsystem {
            if !SUBSYSTEMS.contains(&subsystem.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "device watches cover the subsystems {}; '{subsystem}' is not one of them",
                    SUBSYSTEMS.join(", ")
                )));
            }
        }
        let properties = spec.str_map("properties")?.unwrap_or_default();
        if properties.len() > Self::MAX_PROPERTIES {
            return Err(Error::LimitExceeded(format!(
                "a device watch may match at most {} properties",
                Self::MAX_PROPERTIES
            )));
        }
        let devtype = spec.str("devtype")?;
        let mut required: Vec<(String, String)> = properties.into_iter().collect();
        required.extend(subsystem.map(|s| ("SUBSYSTEM".to_owned(), s)));
        required.extend(devtype.map(|d| ("DEVTYPE".to_owned(), d)));
        // By key, then value: equal specs compile to equal watches.
        required.sort_unstable();
        let required = required
            .into_iter()
            .map(|(key, value)| {
                let pattern = property_pattern(&key, &value)?;
                Ok((key, pattern))
            })
            .collect::<Result<_, Error>>()?;
        Ok(DeviceWatch {
            required,
            name: spec
                .str("name")?
                .map(|name| Pattern::for_name("name", &name))
                .transpose()?,
        })
    }
}

/// A property's pattern: a value without wildcards is compared whole, whatever its
/// length (a `DEVLINKS` list may be long); one with wildcards is bounded as a name
/// pattern is, since the cost of matching grows with it.
fn property_pattern(key: &str, value: &str) -> Result<Pattern, Error> {
    if value.contains(['*', '?']) && value.len() > MAX_NAME_PATTERN {
        return Err(Error::LimitExceeded(format!(
            "the pattern for property {key} may be at most {MAX_NAME_PATTERN} bytes when it \
             has wildcards, got {}",
            value.len()
        )));
    }
    Ok(Pattern::new(value))
}

/// A device's kernel name: the last component of its sysfs path (its object id).
pub(super) fn kernel_name(record: &Record) -> Option<&str> {
    record.object_id.rsplit('/').next()
}

impl WatchMatcher for DeviceWatch {
    /// A name without wildcards: the hub looks the watch up by the event's kernel name
    /// ([`crate::source::EventSource::index_key`]) instead of visiting it for every device.
    fn index_key(&self) -> Option<&str> {
        self.name.as_ref().and_then(Pattern::exact)
    }

    fn matches(&self, record: &Record) -> bool {
        record.source == NAME
            && has_all(&record.properties, &self.required)
            && self
                .name
                .as_ref()
                .is_none_or(|pattern| kernel_name(record).is_some_and(|name| pattern.matches(name)))
    }
}

/// Whether `properties` has every key of `required` (sorted by key) with a value its
/// pattern matches, in one walk along both: at most one key comparison per property and
/// per requirement.
fn has_all(properties: &crate::event::Properties, required: &[(String, Pattern)]) -> bool {
    let mut properties = properties.iter().peekable();
    'required: for (key, value) in required {
        while let Some((k, v)) = properties.peek() {
            match k.as_str().cmp(key.as_str()) {
                std::cmp::Ordering::Less => {
                    properties.next();
                }
                // Not advanced: a key may be required twice (`subsystem` and
                // `properties`), with the same value or never matching.
                std::cmp::Ordering::Equal if value.matches(v) => continue 'required,
                _ => return false,
            }
        }
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::event::{Attrs, Audience, Change};
    use crate::source::spec::spec;

    fn record(devpath: &str, props: &[(&str, &str)]) -> Record {
        Record {
            source: NAME,
            subtype: 0,
            object_id: devpath.into(),
            change: Change::Upsert,
            attributes: Attrs::new(),
            properties: props
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            audience: Audience::Everyone,
        }
    }

    #[test]
    fn watch_matches_subsystem_name_and_properties() {
        let watch = DeviceWatch::parse(&spec(&[
            ("subsystem", "block".into()),
            ("name", "loop*".into()),
        ]))
        .unwrap();
        let loop0 = record("/devices/virtual/block/loop0", &[("SUBSYSTEM", "block")]);
        let vda = record("/devices/pci/virtio/block/vda", &[("SUBSYSTEM", "block")]);
        assert!(watch.matches(&loop0));
        assert!(!watch.matches(&vda));
    }

    /// Subsystem, devtype and properties are one sorted list checked in one walk; it
    /// answers as lookups one by one would.
    #[test]
    fn watch_requires_every_property_given_and_nothing_else() {
        let props = [
            ("DEVNAME", "loop0"),
            ("DEVTYPE", "disk"),
            ("MAJOR", "7"),
            ("SUBSYSTEM", "block"),
        ];
        let loop0 = record("/devices/virtual/block/loop0", &props);
        let watch = |pairs: &[(&str, zbus::Variant<'_>)]| DeviceWatch::parse(&spec(pairs)).unwrap();
        let properties = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            zbus::Variant::from(map)
        };
        assert!(watch(&[]).matches(&loop0));
        assert!(watch(&[("devtype", "disk".into())]).matches(&loop0));
        assert!(watch(&[
            ("subsystem", "block".into()),
            ("devtype", "disk".into()),
            (
                "properties",
                properties(&[("MAJOR", "7"), ("DEVNAME", "loop0")])
            ),
        ])
        .matches(&loop0));
        // The first key, the last key, a key between two, a key past the end.
        for missing in ["A", "ZZZ", "DEVPATH", "MINOR"] {
            assert!(
                !watch(&[("properties", properties(&[("MAJOR", "7"), (missing, "x")]))])
                    .matches(&loop0),
                "{missing}"
            );
        }
        assert!(!watch(&[("properties", properties(&[("MAJOR", "8")]))]).matches(&loop0));
        assert!(!watch(&[("devtype", "partition".into())]).matches(&loop0));
        // A key given twice: both values must be the one the event has.
        assert!(watch(&[
            ("subsystem", "block".into()),
            ("properties", properties(&[("SUBSYSTEM", "block")])),
        ])
        .matches(&loop0));
        assert!(!watch(&[
            ("subsystem", "usb".into()),
            ("properties", properties(&[("SUBSYSTEM", "block")])),
        ])
        .matches(&loop0));
    }

    #[test]
    fn watch_rejects_unknown_keys_subsystems_and_types() {
        assert!(matches!(
            DeviceWatch::parse(&spec(&[("subsytem", "block".into())])),
            Err(Error::InvalidArgument(m)) if m.contains("subsytem")
        ));
        assert!(matches!(
            DeviceWatch::parse(&spec(&[("subsystem", "net".into())])),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            DeviceWatch::parse(&spec(&[("subsystem", 7u32.into())])),
            Err(Error::InvalidArgument(m)) if m.contains("'u'")
        ));
    }

    /// udev's properties, matched with the wildcards `[[units]]` rules take: the
    /// filesystem a watch names and no other; a tag inside TAGS's `:a:b:` list.
    #[test]
    fn watch_matches_udev_properties_with_wildcards() {
        let stick = |fs: &str| {
            record(
                "/devices/pci/usb2/2-1/2-1:1.0/host0/target0:0:0/0:0:0:0/block/sda",
                &[
                    (
                        "DEVLINKS",
                        "/dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_1-0:0 /dev/disk/by-label/x",
                    ),
                    ("DEVTYPE", "disk"),
                    ("ID_FS_TYPE", fs),
                    ("SUBSYSTEM", "block"),
                    ("TAGS", ":systemd:uaccess:"),
                ],
            )
        };
        let props = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            DeviceWatch::parse(&spec(&[("properties", zbus::Variant::from(map))])).unwrap()
        };
        let ext4 = props(&[("ID_FS_TYPE", "ext4")]);
        assert!(ext4.matches(&stick("ext4")));
        assert!(!ext4.matches(&stick("vfat")));
        assert!(!ext4.matches(&record(
            "/devices/virtual/block/loop0",
            &[("SUBSYSTEM", "block")]
        )));
        let ext = props(&[("ID_FS_TYPE", "ext?")]);
        assert!(ext.matches(&stick("ext4")) && ext.matches(&stick("ext2")));
        assert!(!ext.matches(&stick("exfat")));
        assert!(props(&[("TAGS", "*:uaccess:*")]).matches(&stick("ext4")));
        assert!(!props(&[("TAGS", "*:seat:*")]).matches(&stick("ext4")));
        assert!(props(&[
            ("DEVLINKS", "*/dev/disk/by-id/usb-*"),
            ("ID_FS_TYPE", "ext4")
        ])
        .matches(&stick("ext4")));
        let devtype = DeviceWatch::parse(&spec(&[("devtype", "usb_*".into())])).unwrap();
        assert!(!devtype.matches(&stick("ext4")));

        // A wildcard pattern is bounded; a whole value is not.
        let long = format!("{}*", "x".repeat(MAX_NAME_PATTERN));
        let map: HashMap<String, String> = [("DEVLINKS".to_owned(), long)].into();
        assert!(matches!(
            DeviceWatch::parse(&spec(&[("properties", zbus::Variant::from(map))])),
            Err(Error::LimitExceeded(m)) if m.contains("DEVLINKS")
        ));
        let map: HashMap<String, String> = [("DEVLINKS".to_owned(), "x".repeat(1000))].into();
        assert!(DeviceWatch::parse(&spec(&[("properties", zbus::Variant::from(map))])).is_ok());
    }
}

//! What an app may see of a device: which devices are offered at all, the fixed
//! whitelist of typed properties, and opaque per-session ids in place of sysfs paths.
//! Pure: the session feeds it watchqd's snapshot objects and `DeviceChanged` events.
//!
//! Offered: USB devices (`usb_device`, not their interfaces) and whole block disks that
//! are removable media. A loop device counts as removable media while it is attached
//! (it has a backing file and a size): the kernel says `removable=0` for every loop
//! device, yet a user attaches and detaches one like a medium (udisks' "loop setup"),
//! so attaching is its `add` and detaching its `remove` here. Partitions, fixed disks
//! and every other subsystem are never offered.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use zbus::OwnedVariant;
use zbus::Str;

/// A device's properties as an app receives them (`a{sv}`).
pub type Properties = HashMap<String, OwnedVariant>;

/// One entry of `DeviceEvents`: (action: add, change or remove; opaque id; properties).
pub type DeviceEvent = (String, String, Properties);

/// The properties offered for a device, or `None` when the device is not offered (or
/// is gone). `subsystem` and `attributes` are as watchqd sends them; `serial` says
/// whether the user granted serial numbers.
pub fn view(
    subsystem: &str,
    attributes: &BTreeMap<String, OwnedVariant>,
    serial: bool,
) -> Option<Properties> {
    let text = |key: &str| {
        attributes
            .get(key)
            .and_then(|v| <&str>::try_from(&**v).ok())
            .map(str::to_owned)
    };
    let number = |key: &str| attributes.get(key).and_then(|v| u64::try_from(&**v).ok());
    let flag = |key: &str| attributes.get(key).and_then(|v| bool::try_from(&**v).ok());
    let mut props = Properties::new();
    let put_text = |props: &mut Properties, name: &str, value: Option<String>| {
        if let Some(value) = value {
            props.insert(name.to_owned(), OwnedVariant::from(Str::from(value)));
        }
    };
    match (subsystem, text("devtype").as_deref()) {
        ("usb", Some("usb_device")) => {
            put_text(&mut props, "vendor-id", text("vendor-id"));
            put_text(&mut props, "product-id", text("product-id"));
            put_text(&mut props, "vendor", text("manufacturer"));
            put_text(&mut props, "product", text("product"));
            put_text(&mut props, "class", text("device-class"));
            if serial {
                put_text(&mut props, "serial", text("serial"));
            }
            props.insert("subsystem".to_owned(), OwnedVariant::from(Str::from("usb")));
        }
        ("block", Some("disk")) => {
            let size = number("size").unwrap_or(0);
            let attached_loop = text("loop-backing-file").is_some() && size > 0;
            let removable = flag("removable").unwrap_or(false);
            if !removable && !attached_loop {
                return None;
            }
            props.insert("removable".to_owned(), OwnedVariant::from(removable));
            props.insert("size".to_owned(), OwnedVariant::from(size));
            props.insert("media-present".to_owned(), OwnedVariant::from(size > 0));
            props.insert(
                "subsystem".to_owned(),
                OwnedVariant::from(Str::from("block")),
            );
        }
        _ => return None,
    }
    Some(props)
}

/// The devices a session has told its app about: sysfs path → opaque id. Ids are
/// random per session, so an app cannot recognise a device across sessions or tell two
/// apps' ids apart, and learns nothing of the machine's layout.
#[derive(Default)]
pub struct Known {
    ids: HashMap<String, String>,
}

impl Known {
    /// The event for a device's new state (`offered` from [`view`]; `None` after a
    /// `remove` or once it is no longer offered), updating what the app knows; `None`
    /// when the app is not to hear about it.
    pub fn update(&mut self, sys_path: &str, offered: Option<Properties>) -> Option<DeviceEvent> {
        match (offered, self.ids.get(sys_path)) {
            (Some(props), Some(id)) => Some(("change".to_owned(), id.clone(), props)),
            (Some(props), None) => {
                let id = random_id();
                self.ids.insert(sys_path.to_owned(), id.clone());
                Some(("add".to_owned(), id, props))
            }
            (None, Some(_)) => {
                let id = self.ids.remove(sys_path)?;
                Some(("remove".to_owned(), id, Properties::new()))
            }
            (None, None) => None,
        }
    }

    /// Forgets every device, for a fresh snapshot batch after a loss; the ids of
    /// devices that are still there are kept, so the app can match them again.
    pub fn resync(&mut self, offered: Vec<(String, Properties)>) -> Vec<DeviceEvent> {
        let mut events = Vec::new();
        let present: std::collections::HashSet<&String> = offered.iter().map(|(p, _)| p).collect();
        let gone: Vec<String> = self
            .ids
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for path in gone {
            events.extend(self.update(&path, None));
        }
        for (path, props) in offered {
            let id = self.ids.entry(path).or_insert_with(random_id).clone();
            events.push(("add".to_owned(), id, props));
        }
        events
    }
}

/// 128 random bits in hex, from the kernel's generator.
fn random_id() -> String {
    let mut bytes = [0u8; 16];
    // /dev/urandom never blocks once the pool is initialised at boot and never runs dry;
    // without it, time and a counter still make ids unique within the session.
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        bytes[8..].copy_from_slice(&t.to_le_bytes()[..8]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, OwnedVariant)]) -> BTreeMap<String, OwnedVariant> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    fn s(v: &str) -> OwnedVariant {
        OwnedVariant::from(Str::from(v.to_owned()))
    }

    #[test]
    fn a_usb_device_shows_only_the_whitelist_and_its_serial_only_when_granted() {
        let usb = attrs(&[
            ("devtype", s("usb_device")),
            ("vendor-id", s("0627")),
            ("product-id", s("0001")),
            ("manufacturer", s("QEMU")),
            ("product", s("QEMU USB Keyboard")),
            ("serial", s("42")),
            ("device-class", s("00")),
            ("devname", s("/dev/bus/usb/001/002")),
            ("driver", s("usb")),
        ]);
        let props = view("usb", &usb, false).unwrap();
        let mut keys: Vec<&str> = props.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "class",
                "product",
                "product-id",
                "subsystem",
                "vendor",
                "vendor-id"
            ]
        );
        assert!(view("usb", &usb, true).unwrap().contains_key("serial"));
        let interface = attrs(&[("devtype", s("usb_interface"))]);
        assert_eq!(view("usb", &interface, true), None);
    }

    #[test]
    fn block_disks_are_offered_when_removable_or_an_attached_loop() {
        let fixed = attrs(&[
            ("devtype", s("disk")),
            ("removable", OwnedVariant::from(false)),
            ("size", OwnedVariant::from(1u64 << 30)),
        ]);
        assert_eq!(view("block", &fixed, false), None);
        let detached_loop = attrs(&[
            ("devtype", s("disk")),
            ("removable", OwnedVariant::from(false)),
            ("size", OwnedVariant::from(0u64)),
        ]);
        assert_eq!(view("block", &detached_loop, false), None);
        let attached = attrs(&[
            ("devtype", s("disk")),
            ("removable", OwnedVariant::from(false)),
            ("size", OwnedVariant::from(8u64 << 20)),
            ("loop-backing-file", s("/home/me/disk.img")),
            ("devname", s("/dev/loop3")),
        ]);
        let props = view("block", &attached, false).unwrap();
        assert_eq!(props["size"], OwnedVariant::from(8u64 << 20));
        assert_eq!(props["media-present"], OwnedVariant::from(true));
        assert_eq!(props.len(), 4, "{props:?}");
        let card_reader = attrs(&[
            ("devtype", s("disk")),
            ("removable", OwnedVariant::from(true)),
            ("size", OwnedVariant::from(0u64)),
        ]);
        let props = view("block", &card_reader, false).unwrap();
        assert_eq!(props["media-present"], OwnedVariant::from(false));
        let partition = attrs(&[
            ("devtype", s("partition")),
            ("removable", OwnedVariant::from(true)),
        ]);
        assert_eq!(view("block", &partition, false), None);
    }

    #[test]
    fn ids_are_opaque_stable_while_known_and_new_after_a_removal() {
        let mut known = Known::default();
        let (action, id, _) = known
            .update("/devices/virtual/block/loop3", Some(Properties::new()))
            .unwrap();
        assert_eq!(action, "add");
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        let (action, same, _) = known
            .update("/devices/virtual/block/loop3", Some(Properties::new()))
            .unwrap();
        assert_eq!((action.as_str(), &same), ("change", &id));
        let (action, gone, props) = known.update("/devices/virtual/block/loop3", None).unwrap();
        assert_eq!((action.as_str(), &gone, props.len()), ("remove", &id, 0));
        assert!(known.update("/devices/virtual/block/loop3", None).is_none());
        let (_, again, _) = known
            .update("/devices/virtual/block/loop3", Some(Properties::new()))
            .unwrap();
        assert_ne!(again, id);
    }

    #[test]
    fn a_resync_removes_what_went_and_adds_everything_present_under_its_old_id() {
        let mut known = Known::default();
        let (_, kept, _) = known.update("/a", Some(Properties::new())).unwrap();
        let (_, went, _) = known.update("/b", Some(Properties::new())).unwrap();
        let events = known.resync(vec![
            ("/a".to_owned(), Properties::new()),
            ("/c".to_owned(), Properties::new()),
        ]);
        let summary: Vec<(&str, bool)> = events
            .iter()
            .map(|(action, id, _)| (action.as_str(), *id == kept))
            .collect();
        assert_eq!(summary, [("remove", false), ("add", true), ("add", false)]);
        assert_eq!(events[0].1, went);
    }
}

//! udev's database (`/run/udev/data`): what udevd recorded of each device it processed,
//! read into a snapshot's properties so that a device present before a watch carries the
//! same udev properties (`ID_*`, `DEVLINKS`, `TAGS`, …) as one announced on udev's group.
//!
//! One file per device, named by sd-device's device id (`device_get_device_id`):
//! `b<major>:<minor>` for a block device, `c<major>:<minor>` for another one with a node,
//! `+<subsystem>:<sysname>` for the rest (USB interfaces). Its lines, as udevd writes them
//! (`device_update_db`):
//!
//! ```text
//! S:<link below /dev>     one per link          → DEVLINKS (paths, space-separated)
//! L:<link priority>       ignored
//! W:<watch handle>        ignored
//! I:<usec initialized>                          → USEC_INITIALIZED
//! E:<KEY>=<VALUE>         one per property      → KEY
//! G:<tag>                 one per tag           → TAGS (":a:b:")
//! Q:<tag>                 one per current tag   → CURRENT_TAGS
//! V:<version>             ignored
//! ```
//!
//! Reading is best effort: a device udevd has not processed yet, or one gone meanwhile,
//! has no file and keeps the kernel's properties.

use std::fs;
use std::path::PathBuf;

use crate::event::Properties;

/// The database directory, injectable so that tests point it at a copy.
#[derive(Clone, Debug)]
pub struct UdevDb {
    dir: PathBuf,
}

impl Default for UdevDb {
    fn default() -> Self {
        UdevDb {
            dir: PathBuf::from("/run/udev/data"),
        }
    }
}

impl UdevDb {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        UdevDb { dir: dir.into() }
    }

    /// sd-device's id of a device: its database file's name.
    pub fn device_id(subsystem: &str, devpath: &str, properties: &Properties) -> Option<String> {
        let number = |key: &str| properties.get(key)?.parse::<u32>().ok();
        match (number("MAJOR"), number("MINOR")) {
            (Some(major), Some(minor)) if major != 0 => {
                let kind = if subsystem == "block" { 'b' } else { 'c' };
                Some(format!("{kind}{major}:{minor}"))
            }
            _ => {
                let sysname = devpath.rsplit('/').next().filter(|n| !n.is_empty())?;
                Some(format!("+{subsystem}:{sysname}"))
            }
        }
    }

    /// Adds what udev recorded of the device to `properties`, as its events carry it
    /// (`DEVNAME` as a path). Returns whether udev had a record of it.
    pub fn merge(&self, subsystem: &str, devpath: &str, properties: &mut Properties) -> bool {
        let Some(id) = Self::device_id(subsystem, devpath, properties) else {
            return false;
        };
        // An id is one path component: a sysname never holds '/' (the kernel turns it
        // into '!'), and the id is made from it and numbers only.
        if id.contains('/') {
            return false;
        }
        let Ok(text) = fs::read_to_string(self.dir.join(&id)) else {
            return false;
        };
        parse(&text, properties);
        if let Some(devname) = properties.get_mut("DEVNAME") {
            if !devname.starts_with('/') {
                devname.insert_str(0, "/dev/");
            }
        }
        true
    }
}

/// The properties one database file holds, added to `properties`.
pub fn parse(text: &str, properties: &mut Properties) {
    let (mut links, mut tags, mut current) = (Vec::new(), Vec::new(), Vec::new());
    for line in text.lines() {
        let Some((kind, value)) = line.split_once(':') else {
            continue;
        };
        match kind {
            "E" => {
                if let Some((key, value)) = value.split_once('=') {
                    properties.insert(key.to_owned(), value.to_owned());
                }
            }
            "S" => links.push(format!("/dev/{value}")),
            "G" => tags.push(value),
            "Q" => current.push(value),
            "I" => {
                properties.insert("USEC_INITIALIZED".to_owned(), value.to_owned());
            }
            _ => {}
        }
    }
    if !links.is_empty() {
        properties.insert("DEVLINKS".to_owned(), links.join(" "));
    }
    for (key, tags) in [("TAGS", tags), ("CURRENT_TAGS", current)] {
        if !tags.is_empty() {
            properties.insert(key.to_owned(), format!(":{}:", tags.join(":")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/run/udev/data/b8:0` as udevd wrote it for the full-OS guest's USB stick.
    const STICK: &str = "S:disk/by-id/usb-QEMU_QEMU_HARDDISK_1-0000:00:03.0-1-0:0\n\
        S:disk/by-label/watchqstick\nL:0\nI:14767960\n\
        E:ID_BUS=usb\nE:ID_SERIAL=QEMU_QEMU_HARDDISK_1-0000:00:03.0-1-0:0\n\
        E:ID_FS_TYPE=ext4\nE:ID_FS_LABEL=watchqstick\nG:systemd\nQ:systemd\nV:1\n";

    #[test]
    fn reads_properties_links_and_tags() {
        let mut properties = Properties::new();
        parse(STICK, &mut properties);
        assert_eq!(properties["ID_FS_TYPE"], "ext4");
        assert_eq!(
            properties["DEVLINKS"],
            "/dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_1-0000:00:03.0-1-0:0 /dev/disk/by-label/watchqstick"
        );
        assert_eq!(properties["TAGS"], ":systemd:");
        assert_eq!(properties["CURRENT_TAGS"], ":systemd:");
        assert_eq!(properties["USEC_INITIALIZED"], "14767960");
        assert!(!properties.contains_key("L"));
    }

    #[test]
    fn device_ids_are_sd_devices() {
        let props = |pairs: &[(&str, &str)]| -> Properties {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let numbers = props(&[("MAJOR", "8"), ("MINOR", "1")]);
        assert_eq!(
            UdevDb::device_id("block", "/devices/x/block/sda/sda1", &numbers).as_deref(),
            Some("b8:1")
        );
        let usb = props(&[("MAJOR", "189"), ("MINOR", "1")]);
        assert_eq!(
            UdevDb::device_id("usb", "/devices/x/usb1/1-1", &usb).as_deref(),
            Some("c189:1")
        );
        assert_eq!(
            UdevDb::device_id("usb", "/devices/x/usb1/1-1/1-1:1.0", &Properties::new()).as_deref(),
            Some("+usb:1-1:1.0")
        );
        let zero = props(&[("MAJOR", "0"), ("MINOR", "0")]);
        assert_eq!(
            UdevDb::device_id("usb", "/devices/x/usb1/1-1", &zero).as_deref(),
            Some("+usb:1-1")
        );
    }

    #[test]
    fn merges_the_file_of_the_device_and_only_its() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("b8:0"), STICK).unwrap();
        let db = UdevDb::new(dir.path());
        let mut sda: Properties = [("MAJOR", "8"), ("MINOR", "0"), ("DEVNAME", "sda")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert!(db.merge("block", "/devices/x/block/sda", &mut sda));
        assert_eq!(sda["ID_SERIAL"], "QEMU_QEMU_HARDDISK_1-0000:00:03.0-1-0:0");
        assert_eq!(sda["DEVNAME"], "/dev/sda");
        let mut sdb: Properties = [("MAJOR", "8"), ("MINOR", "16"), ("DEVNAME", "sdb")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert!(!db.merge("block", "/devices/x/block/sdb", &mut sdb));
        assert_eq!(
            sdb["DEVNAME"], "sdb",
            "unprocessed: the kernel's properties"
        );
    }
}

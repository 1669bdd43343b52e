//! Device attributes from sysfs, and the enumeration that seeds snapshots.
//!
//! Attribute names are part of the interface (clients read them from `a{sv}`): add keys,
//! never change the type or meaning of one.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::udev_db::UdevDb;
use crate::event::{Attr, Attrs, Object, Properties};

/// The subsystems this source reports.
pub const SUBSYSTEMS: &[&str] = &["block", "usb"];

/// sysfs, injectable so that enumeration can be pointed at a copy.
#[derive(Clone, Debug)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs {
            root: PathBuf::from("/sys"),
        }
    }
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    fn dir(&self, devpath: &str) -> PathBuf {
        self.root.join(devpath.trim_start_matches('/'))
    }

    /// Every block and USB device present now.
    pub fn scan(&self) -> io::Result<Vec<Object>> {
        self.scan_with(None)
    }

    /// Every block and USB device present now, with what `udev` recorded of each when
    /// given (the source follows udev: snapshot and events then carry the same keys).
    pub fn scan_with(&self, udev: Option<&UdevDb>) -> io::Result<Vec<Object>> {
        let mut objects = Vec::new();
        for (subsystem, listing) in [("block", "class/block"), ("usb", "bus/usb/devices")] {
            let dir = self.root.join(listing);
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                // A kernel without USB has no /sys/bus/usb: no devices, not an error.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
            };
            for entry in entries.flatten() {
                // A device removed while we list it is simply not there.
                let Ok(real) = fs::canonicalize(entry.path()) else {
                    continue;
                };
                let Ok(relative) = real.strip_prefix(&self.root) else {
                    continue;
                };
                let devpath = format!("/{}", relative.display());
                let mut properties = self.uevent_file(&devpath);
                properties
                    .entry("SUBSYSTEM".to_owned())
                    .or_insert_with(|| subsystem.to_owned());
                if let Some(udev) = udev {
                    udev.merge(subsystem, &devpath, &mut properties);
                }
                let attributes = self.attributes(&devpath, subsystem, &properties);
                objects.push(Object {
                    id: devpath,
                    changes: 0,
                    attributes,
                    properties,
                });
            }
        }
        objects.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(objects)
    }

    /// The `KEY=VALUE` lines of a device's `uevent` file, with `SUBSYSTEM` and `DEVPATH`
    /// added so that snapshot objects carry the same keys as events.
    pub fn uevent_file(&self, devpath: &str) -> Properties {
        let mut properties = Properties::new();
        if let Ok(text) = fs::read_to_string(self.dir(devpath).join("uevent")) {
            for line in text.lines() {
                if let Some((key, value)) = line.split_once('=') {
                    properties.insert(key.to_owned(), value.to_owned());
                }
            }
        }
        if let Some(subsystem) = self.link_name(devpath, "subsystem") {
            properties.insert("SUBSYSTEM".to_owned(), subsystem);
        }
        properties.insert("DEVPATH".to_owned(), devpath.to_owned());
        properties
    }

    /// The attributes a desktop wants, read now. Reads that fail (the device went away,
    /// an attribute this kernel lacks) leave the attribute out.
    pub fn attributes(&self, devpath: &str, subsystem: &str, properties: &Properties) -> Attrs {
        let mut attrs = self.static_attributes(devpath, subsystem, properties);
        if let Some(mut dir) = self.open(devpath, false) {
            dir.refresh_driver(properties, &mut attrs);
            dir.refresh_changing(subsystem, properties, &mut attrs);
        }
        attrs
    }

    /// Attributes fixed for a device's life (identity, ids, names, position). Sources
    /// cache them from `add` to `remove` so a storm of `change` events costs a few reads
    /// each instead of a dozen.
    pub fn static_attributes(
        &self,
        devpath: &str,
        subsystem: &str,
        properties: &Properties,
    ) -> Attrs {
        let dir = self.dir(devpath);
        let mut attrs = Attrs::new();
        attrs.insert("subsystem".into(), subsystem.into());
        if let Some(name) = devpath.rsplit('/').next() {
            attrs.insert("name".into(), name.into());
        }
        if let Some(devtype) = properties.get("DEVTYPE") {
            attrs.insert("devtype".into(), devtype.as_str().into());
        }
        if let Some(devname) = properties.get("DEVNAME") {
            // The kernel names the node below /dev; udev gives its whole path.
            let devname = devname.strip_prefix("/dev/").unwrap_or(devname);
            attrs.insert("devname".into(), format!("/dev/{devname}").into());
        }
        for (key, prop) in [("major", "MAJOR"), ("minor", "MINOR")] {
            if let Some(n) = properties.get(prop).and_then(|v| v.parse::<u32>().ok()) {
                attrs.insert(key.into(), n.into());
            }
        }
        match subsystem {
            "block" => block_static_attributes(&dir, &mut attrs),
            "usb" => usb_attributes(&dir, &mut attrs),
            _ => {}
        }
        attrs
    }

    /// The device's sysfs directory, held open so that re-reading its changing
    /// attributes walks one path component instead of the whole sysfs path; with
    /// `hold_files`, the changing attributes' files are held open too, so that re-reading
    /// one is a single `pread`. `None` when the device is already gone.
    pub fn open(&self, devpath: &str, hold_files: bool) -> Option<DeviceDir> {
        let fd = nix::fcntl::open(
            &self.dir(devpath),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        Some(DeviceDir {
            fd,
            files: hold_files.then(Default::default),
        })
    }

    fn link_name(&self, devpath: &str, link: &str) -> Option<String> {
        let target = fs::read_link(self.dir(devpath).join(link)).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }
}

/// The attribute files a block device's events re-read, by their index in
/// [`DeviceDir::files`].
const CHANGING: [&str; 3] = ["size", "ro", "loop/backing_file"];

/// An open sysfs device directory (`O_PATH`).
#[derive(Debug)]
pub struct DeviceDir {
    fd: OwnedFd,
    /// The files of [`CHANGING`], when held open: reading a sysfs attribute from offset 0
    /// makes the kernel produce its value afresh. A file that stops answering (the
    /// attribute was removed, as a loop device's `loop/` is on detach) is reopened at the
    /// next read.
    files: Option<[Option<OwnedFd>; 3]>,
}

impl DeviceDir {
    /// Whether this directory holds attribute files open (see [`Sysfs::open`]).
    pub fn holds_files(&self) -> bool {
        self.files.is_some()
    }

    /// Re-reads the bound driver into `attrs`: the event's `DRIVER` property, else the
    /// `driver` link. Only `add`, `bind` and `unbind` change it.
    pub fn refresh_driver(&self, properties: &Properties, attrs: &mut Attrs) {
        match properties
            .get("DRIVER")
            .cloned()
            .or_else(|| self.link_name("driver"))
        {
            Some(driver) => {
                attrs.insert("driver".into(), driver.into());
            }
            None => {
                attrs.remove("driver");
            }
        }
    }

    /// Re-reads what a `change` may alter (size, read-only, loop backing file, disk
    /// sequence) into `attrs`.
    pub fn refresh_changing(
        &mut self,
        subsystem: &str,
        properties: &Properties,
        attrs: &mut Attrs,
    ) {
        if subsystem == "block" {
            self.block_dynamic_attributes(properties, attrs);
        }
    }

    /// Reads one of [`CHANGING`] without allocating for its size (sysfs attributes are
    /// at most a page).
    fn read_trimmed(&mut self, index: usize) -> Option<String> {
        let mut buf = [0u8; 4096];
        let n = match self.files.as_mut() {
            Some(files) => {
                let held = files[index]
                    .as_ref()
                    .and_then(|fd| nix::sys::uio::pread(fd, &mut buf, 0).ok());
                match held {
                    Some(n) => n,
                    None => {
                        files[index] = None;
                        let fd = self.open_attribute(CHANGING[index])?;
                        let n = nix::sys::uio::pread(&fd, &mut buf, 0).ok()?;
                        if let Some(files) = self.files.as_mut() {
                            files[index] = Some(fd);
                        }
                        n
                    }
                }
            }
            None => {
                let fd = self.open_attribute(CHANGING[index])?;
                nix::unistd::read(&fd, &mut buf).ok()?
            }
        };
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        Some(text.trim_end_matches('\n').to_owned())
    }

    fn open_attribute(&self, name: &str) -> Option<OwnedFd> {
        nix::fcntl::openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()
    }

    fn read_u64(&mut self, index: usize) -> Option<u64> {
        self.read_trimmed(index)?.trim().parse().ok()
    }

    fn link_name(&self, name: &str) -> Option<String> {
        let target = nix::fcntl::readlinkat(&self.fd, name).ok()?;
        Some(
            Path::new(&target)
                .file_name()?
                .to_string_lossy()
                .into_owned(),
        )
    }

    fn block_dynamic_attributes(&mut self, properties: &Properties, attrs: &mut Attrs) {
        // sysfs `size` counts 512-byte sectors whatever the logical block size.
        if let Some(sectors) = self.read_u64(0) {
            attrs.insert("size".into(), sectors.saturating_mul(512).into());
        }
        if let Some(ro) = self.read_u64(1) {
            attrs.insert("read-only".into(), (ro != 0).into());
        }
        match self.read_trimmed(2) {
            Some(backing) => {
                attrs.insert("loop-backing-file".into(), backing.into());
            }
            None => {
                attrs.remove("loop-backing-file");
            }
        }
        if let Some(diskseq) = properties
            .get("DISKSEQ")
            .and_then(|v| v.parse::<u64>().ok())
        {
            attrs.insert("diskseq".into(), diskseq.into());
        }
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    Some(text.trim_end_matches('\n').to_owned())
}

fn read_u64(path: &Path) -> Option<u64> {
    read_trimmed(path)?.trim().parse().ok()
}

fn block_static_attributes(dir: &Path, attrs: &mut Attrs) {
    if let Some(removable) = read_u64(&dir.join("removable")) {
        attrs.insert("removable".into(), (removable != 0).into());
    }
    if let Some(partition) = read_u64(&dir.join("partition")).and_then(|p| u32::try_from(p).ok()) {
        attrs.insert("partition".into(), partition.into());
        if let Some(start) = read_u64(&dir.join("start")) {
            attrs.insert("partition-offset".into(), start.saturating_mul(512).into());
        }
    }
}

fn usb_attributes(dir: &Path, attrs: &mut Attrs) {
    for (key, file) in [
        ("vendor-id", "idVendor"),
        ("product-id", "idProduct"),
        ("manufacturer", "manufacturer"),
        ("product", "product"),
        ("serial", "serial"),
        ("speed", "speed"),
        ("device-class", "bDeviceClass"),
        ("interface-class", "bInterfaceClass"),
        ("interface-subclass", "bInterfaceSubClass"),
        ("interface-protocol", "bInterfaceProtocol"),
    ] {
        if let Some(value) = read_trimmed(&dir.join(file)) {
            attrs.insert(key.into(), Attr::Str(value));
        }
    }
    for (key, file) in [("busnum", "busnum"), ("devnum", "devnum")] {
        if let Some(n) = read_u64(&dir.join(file)).and_then(|n| u32::try_from(n).ok()) {
            attrs.insert(key.into(), n.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_block_and_usb_attributes_from_a_sysfs_tree() {
        let root = tempfile::tempdir().unwrap();
        let loop0 = root.path().join("devices/virtual/block/loop0");
        fs::create_dir_all(loop0.join("loop")).unwrap();
        fs::write(
            loop0.join("uevent"),
            "MAJOR=7\nMINOR=0\nDEVNAME=loop0\nDEVTYPE=disk\nDISKSEQ=3\n",
        )
        .unwrap();
        fs::write(loop0.join("size"), "16384\n").unwrap();
        fs::write(loop0.join("ro"), "0\n").unwrap();
        fs::write(loop0.join("removable"), "0\n").unwrap();
        fs::write(loop0.join("loop/backing_file"), "/tmp/disk.img\n").unwrap();
        fs::create_dir_all(root.path().join("class/block")).unwrap();
        std::os::unix::fs::symlink(&loop0, root.path().join("class/block/loop0")).unwrap();

        let kbd = root.path().join("devices/pci0000:00/usb1/1-1");
        fs::create_dir_all(&kbd).unwrap();
        fs::write(
            kbd.join("uevent"),
            "DEVTYPE=usb_device\nDRIVER=usb\nBUSNUM=001\n",
        )
        .unwrap();
        fs::write(kbd.join("idVendor"), "0627\n").unwrap();
        fs::write(kbd.join("idProduct"), "0001\n").unwrap();
        fs::write(kbd.join("product"), "QEMU USB Keyboard\n").unwrap();
        fs::write(kbd.join("busnum"), "1\n").unwrap();
        fs::write(kbd.join("devnum"), "2\n").unwrap();
        fs::write(kbd.join("speed"), "480\n").unwrap();
        fs::create_dir_all(root.path().join("bus/usb/devices")).unwrap();
        std::os::unix::fs::symlink(&kbd, root.path().join("bus/usb/devices/1-1")).unwrap();

        let sysfs = Sysfs::new(fs::canonicalize(root.path()).unwrap());
        let objects = sysfs.scan().unwrap();
        assert_eq!(objects.len(), 2);
        let block = objects
            .iter()
            .find(|o| o.id == "/devices/virtual/block/loop0")
            .unwrap();
        assert_eq!(block.attributes["size"], Attr::U64(16384 * 512));
        assert_eq!(block.attributes["devname"], Attr::Str("/dev/loop0".into()));
        assert_eq!(block.attributes["major"], Attr::U32(7));
        assert_eq!(block.attributes["read-only"], Attr::Bool(false));
        assert_eq!(
            block.attributes["loop-backing-file"],
            Attr::Str("/tmp/disk.img".into())
        );
        assert_eq!(block.attributes["diskseq"], Attr::U64(3));
        let usb = objects.iter().find(|o| o.id.ends_with("/1-1")).unwrap();
        assert_eq!(usb.attributes["vendor-id"], Attr::Str("0627".into()));
        assert_eq!(
            usb.attributes["product"],
            Attr::Str("QEMU USB Keyboard".into())
        );
        assert_eq!(usb.attributes["devnum"], Attr::U32(2));
        assert_eq!(usb.attributes["driver"], Attr::Str("usb".into()));
    }
}

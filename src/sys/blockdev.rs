//! Block device names, from `/sys/dev/block/MAJ:MIN`.

use std::fs;

/// The kernel's name of block device `major:minor` (`loop0`, `sda1`), or `None` when it
/// has none (a filesystem without a block device, or a device that is gone). Callers
/// choose their fallback: `MAJ:MIN`, or the mount source.
pub fn device_name(major: u32, minor: u32) -> Option<String> {
    fs::read_link(format!("/sys/dev/block/{major}:{minor}"))
        .ok()
        .and_then(|target| target.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// The kernel's name of a block device, or `MAJ:MIN` when it has none.
pub fn device_name_or_number(major: u32, minor: u32) -> String {
    device_name(major, minor).unwrap_or_else(|| format!("{major}:{minor}"))
}

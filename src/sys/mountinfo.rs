//! The one parser of `/proc/PID/mountinfo` (proc(5)), pure and fuzzed
//! (`fuzz/fuzz_targets/filesystems.rs`, `statmount.rs`, `quota.rs`), and the lookups the
//! sources make in it.
//!
//! A line: `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
//! SUPER_OPTIONS`, with space, tab, newline and backslash escaped as `\ooo`.

use thiserror::Error;

/// One line of `/proc/PID/mountinfo`, with octal escapes decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountinfoLine {
    pub id: u32,
    pub parent_id: u32,
    pub major: u32,
    pub minor: u32,
    pub root: String,
    pub mount_point: String,
    pub mount_options: String,
    /// Optional fields (`shared:N`, `master:N`, ...).
    pub optional: Vec<String>,
    pub fs_type: String,
    pub source: String,
    pub super_options: String,
}

impl MountinfoLine {
    /// Whether the filesystem itself (not just this mount) is read-only: `ro` in the
    /// superblock options, or ext4's `emergency_ro` (6.15+: after an error with
    /// `errors=remount-ro`, ext4 refuses writes without setting `SB_RDONLY`).
    pub fn filesystem_read_only(&self) -> bool {
        self.super_options
            .split(',')
            .any(|o| o == "ro" || o == "emergency_ro")
    }
}

/// A line the parser could not take apart: its number (from 1) and what was wrong.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("mountinfo line {line}: {why}")]
pub struct MountinfoError {
    pub line: usize,
    pub why: &'static str,
}

/// Parses a whole mountinfo file; the first malformed line is an error (for readers
/// that diff the table and must not mistake a decoder bug for an unmount).
pub fn parse(text: &str) -> Result<Vec<MountinfoLine>, MountinfoError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(index, line)| parse_line(line, index + 1))
        .collect()
}

/// Every well-formed line of a mountinfo file (a malformed line is skipped: the kernel
/// writes them, so one would be a decoder bug, not a reason to lose the others).
pub fn parse_lenient(text: &str) -> Vec<MountinfoLine> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .filter_map(|(index, line)| parse_line(line, index + 1).ok())
        .collect()
}

/// Parses line number `number` of a mountinfo file.
pub fn parse_line(line: &str, number: usize) -> Result<MountinfoLine, MountinfoError> {
    let bad = |why| MountinfoError { line: number, why };
    let mut fields = line.split(' ');
    let mut next = |why| fields.next().ok_or(bad(why));
    let id = next("no mount id")?
        .parse()
        .map_err(|_| bad("bad mount id"))?;
    let parent_id = next("no parent id")?
        .parse()
        .map_err(|_| bad("bad parent id"))?;
    let (major, minor) = next("no device")?
        .split_once(':')
        .ok_or(bad("device is not MAJ:MIN"))?;
    let major = major.parse().map_err(|_| bad("bad major"))?;
    let minor = minor.parse().map_err(|_| bad("bad minor"))?;
    let root = unescape(next("no root")?);
    let mount_point = unescape(next("no mount point")?);
    let mount_options = next("no mount options")?.to_owned();
    let mut optional = Vec::new();
    loop {
        let field = next("no separator before the filesystem type")?;
        if field == "-" {
            break;
        }
        optional.push(field.to_owned());
    }
    let fs_type = unescape(next("no filesystem type")?);
    let source = unescape(next("no source")?);
    let super_options = unescape(next("no super options")?);
    Ok(MountinfoLine {
        id,
        parent_id,
        major,
        minor,
        root,
        mount_point,
        mount_options,
        optional,
        fs_type,
        source,
        super_options,
    })
}

/// Decodes the kernel's `\ooo` escapes (space, tab, newline, backslash) in mountinfo;
/// an incomplete escape or one above `\377` stays as it is.
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            d.iter()
                .all(|c| (b'0'..=b'7').contains(c))
                .then(|| d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0')))
        });
        match (bytes[i], octal.and_then(|n| u8::try_from(n).ok())) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the filesystem on device `major:minor` is mounted: the first mount of the
/// filesystem's root, else the first mount of any of its directories.
pub fn mount_of_device(mounts: &[MountinfoLine], major: u32, minor: u32) -> Option<&MountinfoLine> {
    let mut on_device = mounts
        .iter()
        .filter(|m| m.major == major && m.minor == minor);
    let first = on_device.clone().next();
    on_device.find(|m| m.root == "/").or(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue\n\
                    37 36 0:5 / /x ro - tmpfs none ro,size=4k\n";
        let lines = parse(text).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].mount_point, "/mnt/parent dir");
        assert_eq!(lines[0].optional, ["master:1", "shared:2"]);
        assert_eq!(lines[0].super_options, "rw,errors=continue");
        assert_eq!(lines[1].fs_type, "tmpfs");
        assert!(parse("1 2 3:4 / /\n").is_err());
    }

    #[test]
    fn unescape_leaves_incomplete_escapes() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("\\777"), "\\777");
        assert_eq!(unescape("a\\134b\\0"), "a\\b\\0");
    }

    #[test]
    fn malformed_lines_are_skipped_and_read_only_superblocks_found() {
        let text = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
43 22 7:3 / /tmp/a\\040b rw,relatime - ext4 /dev/loop3 rw,errors=remount-ro,emergency_ro
44 43 7:3 /sub /tmp/a\\040b/c rw master:2 - ext4 /dev/loop3 rw
bad line
";
        let mounts = parse_lenient(text);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[1].mount_point, "/tmp/a b");
        assert!(mounts[1].filesystem_read_only());
        assert!(!mounts[0].filesystem_read_only());
        assert_eq!(mounts[2].id, 44);
    }

    #[test]
    fn the_mount_of_a_device_prefers_its_root() {
        let text = "22 1 0:21 / /proc rw - proc proc rw\n\
                    40 30 7:2 /sub /srv/bind rw - ext4 /dev/loop2 rw\n\
                    41 30 7:2 / /mnt/my\\040disk rw,relatime shared:5 - ext4 /dev/loop2 rw,usrquota\n";
        let mounts = parse_lenient(text);
        let found = mount_of_device(&mounts, 7, 2).unwrap();
        assert_eq!(
            (found.mount_point.as_str(), found.fs_type.as_str()),
            ("/mnt/my disk", "ext4")
        );
        assert!(mount_of_device(&mounts, 7, 3).is_none());
        assert!(mount_of_device(&parse_lenient("garbage\n7:2\n"), 7, 2).is_none());
        // Only a bind mount of a directory: that one.
        let bind = parse_lenient("40 30 7:2 /sub /srv/bind rw - ext4 /dev/loop2 rw\n");
        assert_eq!(
            mount_of_device(&bind, 7, 2).unwrap().mount_point,
            "/srv/bind"
        );
    }
}

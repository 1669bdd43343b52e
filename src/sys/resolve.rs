//! A watched path as the caller sees it: through the caller's root and mount namespace.
//!
//! The daemon runs in a mount namespace of its own (systemd `PrivateTmp`,
//! `PrivateMounts`), and callers may run in others (containers, `unshare -m`): `/tmp/x`
//! of a caller is not the daemon's `/tmp/x`. So a path is looked up from the caller's
//! root directory (`/proc/PID/root`, PID as the bus reported it), with
//! `RESOLVE_IN_ROOT` so that absolute symlinks and `..` stay inside that root, and the
//! filesystem is named from the caller's own mount table (`/proc/PID/mountinfo`): its
//! mount point is the one the caller sees. Both stay open in a [`Place`] for as long
//! as the filesystem is watched, so the mark can be re-armed, the filesystem `statfs`ed
//! and its unmounting noticed in the caller's namespace even after the caller exits.
//! Holding them pins the caller's root directory and mount namespace, never the
//! watched mount (which stays unmountable).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Seek};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag, OpenHow, ResolveFlag};
use nix::libc;
use nix::sys::stat::{Mode, SFlag};

use super::fanotify::{self, wire};
use super::mountinfo::{self, MountinfoLine};
use crate::error::Error;

/// Who asks for a path, as the bus identified them (never from a message body).
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    pub unique_name: &'a str,
    pub uid: u32,
    /// Supplementary groups, as the bus reported them.
    pub gids: &'a [u32],
    pub pid: Option<u32>,
}

/// A filesystem found through a caller's path, as the sources describe it in events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsInfo {
    /// The fsid key fanotify puts in events ([`wire::fsid_key`]).
    pub fsid: u64,
    pub major: u32,
    pub minor: u32,
    /// The kernel name of the block device (`loop3`), else the mount source.
    pub device: String,
    pub fs_type: String,
    /// Where the caller sees it mounted.
    pub mount_point: String,
    pub source: String,
}

impl FsInfo {
    /// A watch's object: the filesystem's device number.
    pub fn object(&self) -> String {
        format!("{}:{}", self.major, self.minor)
    }

    /// Its mount in `mounts` (any of them), if it still has one.
    pub fn mount_in<'m>(&self, mounts: &'m [MountinfoLine]) -> Option<&'m MountinfoLine> {
        mounts
            .iter()
            .find(|m| m.major == self.major && m.minor == self.minor)
    }
}

/// The caller's root directory and mount table, kept while its filesystem is watched.
#[derive(Debug)]
pub struct Place {
    root: OwnedFd,
    mountinfo: fs::File,
    /// For messages: whose namespace this is.
    pub pid: u32,
}

impl Place {
    /// The caller's root and mount table, opened by the daemon (reading another user's
    /// `/proc/PID/root` needs ptrace access, which the daemon has).
    pub fn of(requester: &Caller<'_>) -> Result<Place, Error> {
        let pid = requester.pid.ok_or_else(|| {
            Error::NotSupported(format!(
                "the bus did not report the process of {} (uid {}): a watched path is \
                 resolved in the caller's mount namespace, which needs its pid",
                requester.unique_name, requester.uid
            ))
        })?;
        let gone = |what: &str, e: &dyn std::fmt::Display| {
            Error::NotFound(format!(
                "cannot open {what} of the caller (pid {pid}) to resolve its path: {e}"
            ))
        };
        let root = nix::fcntl::open(
            format!("/proc/{pid}/root").as_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| gone("the root directory", &e))?;
        let mountinfo = fs::File::open(format!("/proc/{pid}/mountinfo"))
            .map_err(|e| gone("the mount table", &e))?;
        Ok(Place {
            root,
            mountinfo,
            pid,
        })
    }

    /// The daemon's own root and mount table: the host's mount namespace (under the
    /// unit's `PrivateMounts=`, a slave of it, so mounts and unmounts still arrive).
    pub fn own() -> io::Result<Place> {
        let root = nix::fcntl::open(
            "/",
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        Ok(Place {
            root,
            mountinfo: fs::File::open("/proc/self/mountinfo")?,
            pid: std::process::id(),
        })
    }

    /// Looks `path` up from the caller's root, without leaving it.
    pub fn open(&self, path: &Path) -> io::Result<OwnedFd> {
        match nix::fcntl::openat2(self.root.as_fd(), path, in_root()) {
            // Kernels before 5.6 lack openat2, and seccomp filters that cannot look into
            // its `struct open_how` refuse it with ENOSYS (systemd's `RestrictSUIDSGID=`
            // does, for the O_CREAT mode it would have to check).
            Err(Errno::ENOSYS) => open_in_root(self.root.as_fd(), path),
            opened => opened.map_err(io::Error::from),
        }
    }

    /// The caller's mount table now (the file is re-read from its start).
    pub fn mounts(&self) -> io::Result<Vec<MountinfoLine>> {
        let mut file = &self.mountinfo;
        file.rewind()?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        Ok(mountinfo::parse_lenient(&text))
    }

    /// An fd of `mount_point` if it still leads to the filesystem `fsid`.
    pub fn open_fs(&self, mount_point: &str, fsid: u64) -> Option<OwnedFd> {
        let fd = self.open(Path::new(mount_point)).ok()?;
        (fsid_key_of(&fd).ok()? == fsid).then_some(fd)
    }
}

/// Every filesystem on a block device mounted in `place`, once each (at its first
/// mount whose mount point still leads to it), with an fd of that mount point.
/// Filesystems without a block device of their own (tmpfs, proc, overlay, and btrfs,
/// whose mounts show an anonymous device number) are left out.
pub fn block_filesystems(place: &Place) -> io::Result<Vec<(FsInfo, OwnedFd)>> {
    let mut seen = std::collections::HashSet::new();
    let mut found = Vec::new();
    for mount in place.mounts()? {
        if mount.major == 0 || seen.contains(&(mount.major, mount.minor)) {
            continue;
        }
        let Some(device) = super::blockdev::device_name(mount.major, mount.minor) else {
            continue;
        };
        // A mount point covered by a later mount leads elsewhere: the next mount of the
        // same filesystem may still do.
        let Ok(fd) = place.open(Path::new(&mount.mount_point)) else {
            continue;
        };
        let Ok(meta) = nix::sys::stat::fstat(&fd) else {
            continue;
        };
        let dev = meta.st_dev;
        if (nix::sys::stat::major(dev), nix::sys::stat::minor(dev))
            != (u64::from(mount.major), u64::from(mount.minor))
        {
            continue;
        }
        let Ok(fsid) = fsid_key_of(&fd) else {
            continue;
        };
        seen.insert((mount.major, mount.minor));
        found.push((
            FsInfo {
                fsid,
                major: mount.major,
                minor: mount.minor,
                device,
                fs_type: mount.fs_type.clone(),
                mount_point: mount.mount_point.clone(),
                source: mount.source.clone(),
            },
            fd,
        ));
    }
    Ok(found)
}

/// An `O_PATH` lookup that stays in the directory it starts from.
fn in_root() -> OpenHow {
    OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

/// Symlinks one lookup follows before it fails with ELOOP, as the kernel's MAXSYMLINKS.
const MAX_SYMLINKS: usize = 40;

/// `RESOLVE_IN_ROOT` without openat2: a walk one component at a time, each opened with
/// `O_NOFOLLOW` from the directory before it. `..` goes back to the directory it came
/// from and never above `root`; a symlink's target is walked in its place, from `root`
/// when absolute. Magic links (`/proc/PID/fd/N`) are walked as the text they read as,
/// never jumped through. Runs with the thread's credentials, so the caller's search
/// permission is checked on every directory, as the kernel would.
fn open_in_root(root: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    if path.as_os_str().is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    // Components still to walk, the next one last.
    let mut pending: Vec<OsString> = components(path.as_os_str());
    // The directories walked so far below `root`, the current one last.
    let mut walked: Vec<OwnedFd> = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        let here = walked.last().map_or(root, |fd| fd.as_fd());
        if file_type(here)? != SFlag::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        if name == ".." {
            walked.pop();
            continue;
        }
        let fd = openat(
            here,
            name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        if file_type(fd.as_fd())? != SFlag::S_IFLNK {
            walked.push(fd);
            continue;
        }
        links += 1;
        if links > MAX_SYMLINKS {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        let target = nix::fcntl::readlinkat(&fd, "")?;
        if target.as_bytes().starts_with(b"/") {
            walked.clear();
        }
        pending.extend(components(&target));
    }
    match walked.pop() {
        Some(fd) => Ok(fd),
        None => root.try_clone_to_owned(),
    }
}

/// The names in `path` in reverse order (the first to walk last), without the empty
/// ones and `.`s that change nothing.
fn components(path: &OsStr) -> Vec<OsString> {
    path.as_bytes()
        .split(|&b| b == b'/')
        .filter(|name| !name.is_empty() && *name != b".")
        .rev()
        .map(|name| OsStr::from_bytes(name).to_owned())
        .collect()
}

/// The file type of what `fd` refers to (`S_IFDIR`, `S_IFLNK`, …).
fn file_type(fd: BorrowedFd<'_>) -> io::Result<SFlag> {
    let mode = nix::sys::stat::fstat(fd)?.st_mode;
    Ok(SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()))
}

/// The fsid key (as fanotify reports it) of the filesystem holding `fd`.
pub fn fsid_key_of(fd: &OwnedFd) -> io::Result<u64> {
    let stat = nix::sys::statfs::fstatfs(fd).map_err(io::Error::from)?;
    Ok(wire::fsid_key(fanotify::fsid_words(stat.filesystem_id())))
}

/// The mount an fd lies on, from `/proc/self/fdinfo` (works for `O_PATH` fds, unlike
/// `statx(STATX_MNT_ID)` on older libcs).
fn mount_id_of(fd: &OwnedFd) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    mount_id_in_fdinfo(&text)
        .ok_or_else(|| io::Error::other("fdinfo has no mnt_id (kernel older than 3.15)"))
}

fn mount_id_in_fdinfo(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs `f` on a thread that has taken the caller's filesystem credentials
/// (`setfsuid`, `setfsgid` and the supplementary groups the bus reported, which also
/// drops the thread's `CAP_DAC_OVERRIDE`/`CAP_DAC_READ_SEARCH`): the kernel checks the
/// caller's access, not the daemon's.
fn as_caller<T: Send + 'static>(
    requester: &Caller<'_>,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<io::Result<T>, Error> {
    let uid = requester.uid;
    let gids = requester.gids.to_vec();
    let primary = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.gid.as_raw())
        .or_else(|| gids.first().copied())
        .unwrap_or(u32::MAX);
    std::thread::Builder::new()
        .name("fs-access".into())
        .spawn(move || -> io::Result<T> {
            // Raw syscalls change this thread's credentials only (the libc wrappers
            // of setgroups would change every thread's); the thread ends right after.
            let groups: Vec<libc::gid_t> = gids;
            // SAFETY: a valid array of `groups.len()` gids.
            let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            // setfsgid/setfsuid return the previous value and cannot report failure;
            // the second call of each confirms the change.
            // SAFETY: plain integer arguments.
            unsafe {
                libc::syscall(libc::SYS_setfsgid, primary);
                libc::syscall(libc::SYS_setfsuid, uid);
            }
            // SAFETY: as above; -1 (as unsigned) only queries.
            let (now_gid, now_uid) = unsafe {
                (
                    libc::syscall(libc::SYS_setfsgid, u32::MAX),
                    libc::syscall(libc::SYS_setfsuid, u32::MAX),
                )
            };
            if now_uid != i64::from(uid) || now_gid != i64::from(primary) {
                return Err(io::Error::other("could not take the caller's credentials"));
            }
            f()
        })
        .map_err(|e| Error::Unavailable(format!("cannot start the access check: {e}")))?
        .join()
        .map_err(|_| Error::Unavailable("the access check panicked".into()))
}

/// Finds the filesystem holding `path` as `requester` sees it. With `check_access`,
/// the lookup runs with the caller's filesystem credentials, so a caller learns nothing
/// about a filesystem it could not reach itself.
pub fn resolve(
    path: &Path,
    requester: &Caller<'_>,
    check_access: bool,
) -> Result<(FsInfo, Place), Error> {
    let place = Place::of(requester)?;
    let uid = requester.uid;
    let looked_up = if check_access {
        let root = place.root.try_clone().map_err(|e| {
            Error::Unavailable(format!("cannot duplicate the caller's root fd: {e}"))
        })?;
        let lookup = Place {
            root,
            mountinfo: place.mountinfo.try_clone().map_err(|e| {
                Error::Unavailable(format!("cannot duplicate the caller's mountinfo: {e}"))
            })?,
            pid: place.pid,
        };
        let owned = path.to_owned();
        as_caller(requester, move || {
            let fd = lookup.open(&owned)?;
            // statfs too, as the caller: what `df` would need.
            fsid_key_of(&fd)?;
            Ok(fd)
        })?
    } else {
        place.open(path)
    };
    let fd = looked_up.map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR) => Error::NotFound(format!(
            "{} does not exist for uid {uid} (pid {}): {e}",
            path.display(),
            place.pid
        )),
        _ => Error::AccessDenied(format!(
            "uid {uid} (pid {}) cannot reach {}: {e}",
            place.pid,
            path.display()
        )),
    })?;
    let not_found = |what: &str, e: &dyn std::fmt::Display| {
        Error::NotFound(format!("cannot {what} {}: {e}", path.display()))
    };
    let fsid = fsid_key_of(&fd).map_err(|e| not_found("statfs", &e))?;
    let meta = nix::sys::stat::fstat(&fd).map_err(|e| not_found("stat", &e))?;
    let dev = meta.st_dev;
    let (major, minor) = (
        u32::try_from(nix::sys::stat::major(dev)).unwrap_or(u32::MAX),
        u32::try_from(nix::sys::stat::minor(dev)).unwrap_or(u32::MAX),
    );
    let mount_id = mount_id_of(&fd).map_err(|e| not_found("find the mount of", &e))?;
    let mounts = place.mounts().map_err(|e| {
        Error::Unavailable(format!(
            "cannot read the mount table of pid {}: {e}",
            place.pid
        ))
    })?;
    let mount = mounts
        .iter()
        .find(|m| u64::from(m.id) == mount_id)
        .ok_or_else(|| {
            Error::NotFound(format!(
                "mount {mount_id} holding {} is not in the mount table of pid {}",
                path.display(),
                place.pid
            ))
        })?;
    Ok((
        FsInfo {
            fsid,
            major,
            minor,
            device: super::blockdev::device_name(major, minor)
                .unwrap_or_else(|| mount.source.clone()),
            fs_type: mount.fs_type.clone(),
            mount_point: mount.mount_point.clone(),
            source: mount.source.clone(),
        },
        place,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_id_is_read_from_fdinfo() {
        let text = "pos:\t0\nflags:\t012100000\nmnt_id:\t42\nino:\t2\n";
        assert_eq!(mount_id_in_fdinfo(text), Some(42));
        assert_eq!(mount_id_in_fdinfo("pos:\t0\n"), None);
    }

    /// A tree with the traps RESOLVE_IN_ROOT defuses: symlinks and `..`s that would
    /// leave the root, a loop, a file used as a directory.
    fn hostile_tree() -> tempfile::TempDir {
        let outer = tempfile::tempdir().expect("tempdir");
        let root = outer.path();
        fs::create_dir_all(root.join("etc")).expect("mkdir etc");
        fs::create_dir_all(root.join("home/alice/small")).expect("mkdir home");
        fs::write(root.join("etc/file"), b"x").expect("write file");
        let link = |target: &str, at: &str| {
            std::os::unix::fs::symlink(target, root.join(at)).expect("symlink");
        };
        link("/etc", "absolute");
        link("../../../../etc", "home/alice/up");
        link("small/../../alice", "home/alice/self");
        link("loop-b", "loop-a");
        link("loop-a", "loop-b");
        outer
    }

    /// (device, inode) of what the lookup found, or its errno.
    fn found(opened: io::Result<OwnedFd>) -> Result<(u64, u64), i32> {
        opened
            .map(|fd| {
                let stat = nix::sys::stat::fstat(&fd).expect("fstat");
                (stat.st_dev, stat.st_ino)
            })
            .map_err(|e| e.raw_os_error().expect("an errno"))
    }

    #[test]
    fn the_walk_without_openat2_finds_what_openat2_finds() {
        let tree = hostile_tree();
        let root = nix::fcntl::open(
            tree.path(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .expect("open the root");
        let inside = |rel: &str| found(fs::File::open(tree.path().join(rel)).map(OwnedFd::from));
        let cases = [
            ("/", inside(".")),
            ("", Err(libc::ENOENT)),
            ("home/alice/small", inside("home/alice/small")),
            ("/../../etc", inside("etc")),
            ("absolute/file", inside("etc/file")),
            ("/home/alice/up/file", inside("etc/file")),
            ("home/alice/self/small/.", inside("home/alice/small")),
            ("home//alice/./small/", inside("home/alice/small")),
            ("missing", Err(libc::ENOENT)),
            ("etc/file/more", Err(libc::ENOTDIR)),
            ("etc/file/..", Err(libc::ENOTDIR)),
            ("loop-a", Err(libc::ELOOP)),
        ];
        for (path, expected) in cases {
            let walked = found(open_in_root(root.as_fd(), Path::new(path)));
            assert_eq!(walked, expected, "walk of {path:?}");
            match nix::fcntl::openat2(root.as_fd(), path, in_root()) {
                Err(Errno::ENOSYS) => {}
                by_kernel => assert_eq!(
                    found(by_kernel.map_err(io::Error::from)),
                    expected,
                    "openat2 of {path:?}"
                ),
            }
        }
    }

    #[test]
    fn a_caller_without_pid_is_refused_with_a_reason() {
        let who = Caller {
            unique_name: ":1.7",
            uid: 1000,
            gids: &[],
            pid: None,
        };
        match Place::of(&who) {
            Err(Error::NotSupported(m)) => assert!(m.contains("pid"), "{m}"),
            other => panic!("expected NotSupported, got {other:?}"),
        }
    }
}

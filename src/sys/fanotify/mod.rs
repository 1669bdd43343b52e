//! fanotify: the two syscalls ([`init`], [`mark`]) for any group, the group reporting
//! file identifiers (`FAN_REPORT_FID`) that the filesystem sources share ([`Fanotify`]),
//! its record decoder ([`wire`]), and the watch engine that runs such a group for a
//! source ([`engine`]). The mounts source and the mounts bench use [`init`] and [`mark`]
//! for their `FAN_REPORT_MNT` groups.

pub mod engine;
pub mod wire;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use nix::libc;

pub const FAN_CLOEXEC: libc::c_uint = 0x1;
pub const FAN_NONBLOCK: libc::c_uint = 0x2;
pub const FAN_CLASS_NOTIF: libc::c_uint = 0x0;
pub const FAN_UNLIMITED_QUEUE: libc::c_uint = 0x10;
pub const FAN_REPORT_FID: libc::c_uint = 0x200;
/// Mount ids in events (6.15+), with [`FAN_MARK_MNTNS`] marks.
pub const FAN_REPORT_MNT: libc::c_uint = 0x4000;
pub const FAN_MARK_ADD: libc::c_uint = 0x1;
pub const FAN_MARK_REMOVE: libc::c_uint = 0x2;
pub const FAN_MARK_FILESYSTEM: libc::c_uint = 0x100;
/// A mark on the mount namespace the dirfd (an nsfs fd) refers to (6.15+).
pub const FAN_MARK_MNTNS: libc::c_uint = 0x110;

/// `fanotify_init(flags, O_RDONLY)`. The error is the kernel's, as it is (callers test
/// for EINVAL: an older kernel rejecting a flag).
pub fn init(flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments; the result is checked.
    let fd = unsafe { libc::fanotify_init(flags, libc::O_RDONLY as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fanotify_mark(group, flags, mask, dirfd, path)`; without `path`, the object `dirfd`
/// itself refers to (a mount namespace with [`FAN_MARK_MNTNS`]). The error is the
/// kernel's, as it is.
pub fn mark(
    group: BorrowedFd<'_>,
    flags: libc::c_uint,
    mask: u64,
    dirfd: RawFd,
    path: Option<&Path>,
) -> io::Result<()> {
    let c_path = path
        .map(|path| {
            CString::new(path.as_os_str().as_bytes()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} contains a NUL byte", path.display()),
                )
            })
        })
        .transpose()?;
    // SAFETY: a fanotify fd; `dirfd` is AT_FDCWD or an fd the caller keeps open; the
    // path is NUL-terminated and outlives the call, or NULL ("the object dirfd is").
    let rc = unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            flags,
            mask,
            dirfd,
            c_path.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A notification-only fanotify group that reports file identifiers, non-blocking.
#[derive(Debug)]
pub struct Fanotify {
    fd: OwnedFd,
}

impl Fanotify {
    pub fn new() -> io::Result<Fanotify> {
        let fd =
            init(FAN_CLASS_NOTIF | FAN_REPORT_FID | FAN_CLOEXEC | FAN_NONBLOCK).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("fanotify_init(FAN_CLASS_NOTIF|FAN_REPORT_FID): {e}"),
                )
            })?;
        Ok(Fanotify { fd })
    }

    fn mark(&self, flags: libc::c_uint, mask: u64, path: &Path) -> io::Result<()> {
        mark(self.fd.as_fd(), flags, mask, libc::AT_FDCWD, Some(path))
    }

    /// Adds `mask` to the mark of the filesystem an fd lies on (an `O_PATH` fd will do:
    /// the mark goes through its `/proc/self/fd` link, which fanotify_mark accepts
    /// where it refuses the `O_PATH` fd itself).
    pub fn mark_filesystem_of(&self, mask: u64, fd: BorrowedFd<'_>) -> io::Result<()> {
        let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
        self.mark(FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, Path::new(&link))
    }

    /// Removes `mask` from the mark of the filesystem an fd lies on.
    pub fn unmark_filesystem_of(&self, mask: u64, fd: BorrowedFd<'_>) -> io::Result<()> {
        let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
        self.mark(
            FAN_MARK_REMOVE | FAN_MARK_FILESYSTEM,
            mask,
            Path::new(&link),
        )
    }

    /// Adds `mask` to the mark of the filesystem holding `path`.
    pub fn mark_filesystem(&self, mask: u64, path: &Path) -> io::Result<()> {
        self.mark(FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, path)
    }

    /// One non-blocking read into `buf` (cleared first); `WouldBlock` when empty.
    pub fn read(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        buf.clear();
        buf.resize(READ_SIZE, 0);
        let n = nix::unistd::read(&self.fd, buf).map_err(io::Error::from)?;
        buf.truncate(n);
        Ok(n)
    }
}

/// Large enough for many events (an FS error event is 56–64 bytes; a FID event with a
/// 4 KiB handle cannot exceed this either).
pub const READ_SIZE: usize = 16 * 1024;

impl AsFd for Fanotify {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A shared group as something tokio can poll: the reader and the code that adds marks
/// on a subscriber's behalf hold the same group.
#[derive(Clone, Debug)]
pub struct Shared(pub Arc<Fanotify>);

impl AsRawFd for Shared {
    fn as_raw_fd(&self) -> RawFd {
        self.0.fd.as_raw_fd()
    }
}

/// The two words of an `f_fsid`.
pub fn fsid_words(fsid: nix::sys::statfs::fsid_t) -> [i32; 2] {
    // fsid_t is two ints; nix hides its fields, so read it as the kernel laid it out.
    // SAFETY: fsid_t is a plain struct of two c_int (`__val`), 8 bytes, no padding.
    unsafe { std::mem::transmute(fsid) }
}

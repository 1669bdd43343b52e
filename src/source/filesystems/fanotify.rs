//! A fanotify group reporting file identifiers (`FAN_REPORT_FID`), shared by the sources
//! that mark whole filesystems (errors, space). Thin wrappers over the two syscalls; the
//! records are decoded in [`super::wire`].

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use nix::libc;

const FAN_CLOEXEC: libc::c_uint = 0x1;
const FAN_NONBLOCK: libc::c_uint = 0x2;
const FAN_CLASS_NOTIF: libc::c_uint = 0x0;
const FAN_REPORT_FID: libc::c_uint = 0x200;
const FAN_MARK_ADD: libc::c_uint = 0x1;
const FAN_MARK_REMOVE: libc::c_uint = 0x2;
const FAN_MARK_FILESYSTEM: libc::c_uint = 0x100;

/// A notification-only fanotify group that reports file identifiers, non-blocking.
#[derive(Debug)]
pub struct Fanotify {
    fd: OwnedFd,
}

impl Fanotify {
    pub fn new() -> io::Result<Fanotify> {
        // SAFETY: plain integer arguments; the result is checked.
        let fd = unsafe {
            libc::fanotify_init(
                FAN_CLASS_NOTIF | FAN_REPORT_FID | FAN_CLOEXEC | FAN_NONBLOCK,
                libc::O_RDONLY as libc::c_uint,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("fanotify_init(FAN_CLASS_NOTIF|FAN_REPORT_FID): {e}"),
            ));
        }
        // SAFETY: the kernel just returned this fd and nothing else owns it.
        Ok(Fanotify {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn mark(&self, flags: libc::c_uint, mask: u64, path: &Path) -> io::Result<()> {
        let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} contains a NUL byte", path.display()),
            )
        })?;
        // SAFETY: a valid fanotify fd, a NUL-terminated path that outlives the call.
        let rc = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                flags,
                mask,
                libc::AT_FDCWD,
                c_path.as_ptr(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
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

    /// Removes `mask` from the mark of the filesystem holding `path`.
    pub fn unmark_filesystem(&self, mask: u64, path: &Path) -> io::Result<()> {
        self.mark(FAN_MARK_REMOVE | FAN_MARK_FILESYSTEM, mask, path)
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

/// `f_fsid` of the filesystem holding `path`, the identifier fanotify puts in events.
pub fn fsid_of(path: &Path) -> io::Result<[i32; 2]> {
    let stat = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(fsid_words(stat.filesystem_id()))
}

/// The two words of an `f_fsid`.
pub fn fsid_words(fsid: nix::sys::statfs::fsid_t) -> [i32; 2] {
    // fsid_t is two ints; nix hides its fields, so read it as the kernel laid it out.
    // SAFETY: fsid_t is a plain struct of two c_int (`__val`), 8 bytes, no padding.
    unsafe { std::mem::transmute(fsid) }
}

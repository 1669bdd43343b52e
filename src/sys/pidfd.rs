//! Process file descriptors (`pidfd_open(2)`, Linux 5.3): a handle on one process that a
//! recycled pid cannot be mistaken for, readable once the process exits.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;

/// Opens a pidfd for `pid` (`O_CLOEXEC` is implied by the kernel).
pub fn open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: plain integers.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(ret).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process a pidfd refers to has exited (its fd polls readable), without
/// waiting. An error of `poll` is the caller's to judge: a watch keeps its namespace,
/// while an identity check fails closed.
pub fn exited(pidfd: &OwnedFd) -> io::Result<bool> {
    let mut fds = [libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd, no wait.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    if ready < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ready > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive() {
        let fd = open(std::process::id()).unwrap();
        assert!(!exited(&fd).unwrap());
    }
}

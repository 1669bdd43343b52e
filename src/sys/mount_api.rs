//! The mount API's queries: `statmount(2)` and `listmount(2)` with a namespace id
//! (Linux 6.8, namespace ids 6.11), and the nsfs ioctl `NS_GET_MNTNS_ID`. The bytes
//! `statmount` returns are decoded by the mounts source's parser
//! (`source::mounts::wire::parse_statmount`).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::libc;

const SYS_STATMOUNT: libc::c_long = 457;
const SYS_LISTMOUNT: libc::c_long = 458;
const LSMT_ROOT: u64 = u64::MAX;
const MNT_ID_REQ_SIZE_VER1: u32 = 32;
/// `_IOR(NSIO, 0x5, __u64)`: the 64-bit id of the mount namespace behind an nsfs fd.
const NS_GET_MNTNS_ID: libc::c_ulong = 0x8008_b705;
/// The largest `statmount` answer asked for (strings of one mount).
const STATMOUNT_MAX: usize = 1 << 20;

fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `struct mnt_id_req`, version 1 (with the namespace id).
#[repr(C)]
struct MntIdReq {
    size: u32,
    spare: u32,
    mnt_id: u64,
    param: u64,
    mnt_ns_id: u64,
}

/// `statmount` of mount `id` in namespace `namespace` for the fields in `mask`: the
/// kernel's `struct statmount` and its strings, as bytes. `buf` is the scratch space
/// (8-byte aligned, as the kernel needs), doubled while the kernel says it is too small.
pub fn statmount(id: u64, namespace: u64, mask: u64, buf: &mut Vec<u64>) -> io::Result<Vec<u8>> {
    let req = MntIdReq {
        size: MNT_ID_REQ_SIZE_VER1,
        spare: 0,
        mnt_id: id,
        param: mask,
        mnt_ns_id: namespace,
    };
    if buf.is_empty() {
        buf.resize(512, 0);
    }
    loop {
        let bytes = buf.len() * 8;
        // SAFETY: `req` is a valid mnt_id_req of the size it declares; `buf` is writable
        // for `bytes` bytes and 8-byte aligned as struct statmount needs.
        let ret = unsafe {
            libc::syscall(
                SYS_STATMOUNT,
                std::ptr::from_ref(&req),
                buf.as_mut_ptr(),
                bytes,
                0,
            )
        };
        match cvt(ret) {
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EOVERFLOW) && bytes < STATMOUNT_MAX => {
                buf.resize(buf.len() * 2, 0);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(buf.iter().flat_map(|w| w.to_ne_bytes()).collect())
}

/// Every mount id of a namespace (`listmount`, in chunks).
pub fn list_mounts(namespace: u64) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    let mut chunk = vec![0u64; 512];
    let mut last = 0;
    loop {
        let req = MntIdReq {
            size: MNT_ID_REQ_SIZE_VER1,
            spare: 0,
            mnt_id: LSMT_ROOT,
            param: last,
            mnt_ns_id: namespace,
        };
        // SAFETY: `req` is valid for its declared size; `chunk` holds `len` u64s.
        let ret = unsafe {
            libc::syscall(
                SYS_LISTMOUNT,
                std::ptr::from_ref(&req),
                chunk.as_mut_ptr(),
                chunk.len(),
                0,
            )
        };
        let got = usize::try_from(cvt(ret)?).unwrap_or(0);
        ids.extend_from_slice(&chunk[..got.min(chunk.len())]);
        match chunk[..got.min(chunk.len())].last() {
            Some(id) if got == chunk.len() => last = *id,
            _ => return Ok(ids),
        }
    }
}

/// Opens a namespace file (`/proc/PID/ns/mnt`), naming it on error.
pub fn open_namespace(path: &str) -> io::Result<OwnedFd> {
    let file = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    Ok(OwnedFd::from(file))
}

/// The 64-bit id of the mount namespace behind an nsfs fd.
pub fn namespace_id(ns: BorrowedFd<'_>) -> io::Result<u64> {
    let mut id = 0u64;
    // SAFETY: NS_GET_MNTNS_ID writes one u64 to the pointer, which outlives the call.
    let ret = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_MNTNS_ID, std::ptr::from_mut(&mut id)) };
    cvt(libc::c_long::from(ret))
        .map_err(|e| io::Error::new(e.kind(), format!("ioctl(NS_GET_MNTNS_ID): {e}")))?;
    Ok(id)
}

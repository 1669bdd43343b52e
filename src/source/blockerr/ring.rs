//! One perf ring per CPU on the `block_rq_error` tracepoint: `perf_event_open(2)`, the
//! mapped ring, and reading it without losing the kernel's place.

use super::*;

pub(super) fn page_size() -> io::Result<usize> {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).map_err(|_| io::Error::other("sysconf(_SC_PAGESIZE) failed"))
}

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER5` (Linux 4.1); the kernel accepts
/// any size it knows.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
}

const PERF_ATTR_SIZE_VER5: u32 = 112;
const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == PERF_ATTR_SIZE_VER5 as usize);
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_SAMPLE_TIME: u64 = 1 << 2;
const PERF_SAMPLE_CPU: u64 = 1 << 7;
const PERF_SAMPLE_RAW: u64 = 1 << 10;
const FLAG_USE_CLOCKID: u64 = 1 << 25;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// Offsets in `struct perf_event_mmap_page`.
const DATA_HEAD: usize = 1024;
const DATA_TAIL: usize = 1032;
const DATA_OFFSET: usize = 1040;
const DATA_SIZE: usize = 1048;

/// Opens the tracepoint on one CPU for every task: a sample per error, woken per sample.
pub(super) fn open_event(id: u16, cpu: u32) -> io::Result<OwnedFd> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: PERF_ATTR_SIZE_VER5,
        config: u64::from(id),
        sample_period: 1,
        sample_type: PERF_SAMPLE_TIME | PERF_SAMPLE_CPU | PERF_SAMPLE_RAW,
        flags: FLAG_USE_CLOCKID,
        wakeup_events: 1,
        clockid: libc::CLOCK_MONOTONIC,
        ..PerfEventAttr::default()
    };
    let cpu =
        libc::c_int::try_from(cpu).map_err(|_| io::Error::other("cpu number out of range"))?;
    // SAFETY: `attr` is a valid perf_event_attr whose `size` field matches its layout and
    // outlives the call; the other arguments are plain integers.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            std::ptr::from_ref(&attr),
            -1 as libc::pid_t,
            cpu,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("perf fd out of range"))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One CPU's perf event and its mapped ring.
pub(super) struct Ring {
    pub(super) fd: AsyncFd<OwnedFd>,
    base: NonNull<u8>,
    map_len: usize,
    data_offset: usize,
    data_size: usize,
}

// SAFETY: the mapping belongs to this Ring alone; it is read through `&mut self` or
// atomics, and unmapped only in Drop. Moving it to another thread is sound.
unsafe impl Send for Ring {}

impl Ring {
    pub(super) fn open(id: u16, cpu: u32, page: usize) -> io::Result<Ring> {
        let fd = open_event(id, cpu)?;
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let map_len = page * (1 + RING_PAGES);
        // SAFETY: a fresh shared mapping of the perf fd, of the size perf requires (one
        // metadata page plus a power of two of data pages); checked for failure below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        let mut ring = Ring {
            // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open and the same
            // while registered and is closed only when the AsyncFd is dropped.
            fd: unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?,
            base,
            map_len,
            data_offset: page,
            data_size: page * RING_PAGES,
        };
        // Kernels since 4.1 say where the data lives; older ones use the layout above.
        let (offset, size) = (
            ring.meta(DATA_OFFSET).load(Ordering::Relaxed),
            ring.meta(DATA_SIZE).load(Ordering::Relaxed),
        );
        if let (Ok(offset), Ok(size)) = (usize::try_from(offset), usize::try_from(size)) {
            if size > 0 && offset.checked_add(size).is_some_and(|end| end <= map_len) {
                ring.data_offset = offset;
                ring.data_size = size;
            }
        }
        Ok(ring)
    }

    fn meta(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: `offset` is one of the u64 fields of the page-aligned metadata page,
        // which stays mapped while `self` lives; AtomicU64 has u64's layout, and the
        // kernel updates these fields atomically.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    /// Appends every record the kernel published since the last call to `out`, and
    /// gives the space back. Returns false when the ring's indices are inconsistent
    /// (records were lost; the ring is reset to empty).
    pub(super) fn drain(&mut self, out: &mut Vec<u8>) -> bool {
        let head = self.meta(DATA_HEAD).load(Ordering::Acquire);
        let tail = self.meta(DATA_TAIL).load(Ordering::Relaxed);
        let size = self.data_size as u64;
        let available = head.wrapping_sub(tail);
        if available > size {
            self.meta(DATA_TAIL).store(head, Ordering::Release);
            return false;
        }
        let mut position = tail;
        let mut left = available;
        while left > 0 {
            // Both are below `data_size`, a usize.
            let start = usize::try_from(position % size).unwrap_or(0);
            let chunk = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.data_size - start);
            // SAFETY: [start, start + chunk) lies inside the data area of the mapping;
            // the kernel does not write between tail and head until we move the tail.
            let bytes = unsafe {
                std::slice::from_raw_parts(self.base.as_ptr().add(self.data_offset + start), chunk)
            };
            out.extend_from_slice(bytes);
            position += chunk as u64;
            left -= chunk as u64;
        }
        self.meta(DATA_TAIL).store(head, Ordering::Release);
        true
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `open` with this length and is not used after.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.map_len);
        }
    }
}

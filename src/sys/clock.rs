//! The calling thread's CPU time, for costs that must not grow with the machine's load
//! (a preempted thread's wall time does; its CPU time does not).

use std::time::Duration;

/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`); zero if the clock
/// cannot be read, which Linux does not refuse for the calling thread.
pub fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// The calling thread's CPU time with its id: a task that awaited in between may have
/// moved to another worker thread, whose clock says nothing of the task's work, so a
/// difference counts only when both readings were taken on one thread
/// ([`ThreadCpu::since`]).
#[derive(Clone, Copy, Debug)]
pub struct ThreadCpu {
    thread: nix::unistd::Pid,
    at: Duration,
}

thread_local! {
    /// The calling thread's id, asked of the kernel once per thread rather than per
    /// reading (`gettid` is a syscall).
    static THREAD: nix::unistd::Pid = nix::unistd::gettid();
}

fn thread() -> nix::unistd::Pid {
    THREAD.with(|thread| *thread)
}

impl ThreadCpu {
    pub fn now() -> ThreadCpu {
        ThreadCpu {
            thread: thread(),
            at: thread_cpu(),
        }
    }

    /// The CPU time used since `self`, or `None` if the caller is now on another thread.
    pub fn since(self) -> Option<Duration> {
        (thread() == self.thread).then(|| thread_cpu().saturating_sub(self.at))
    }
}

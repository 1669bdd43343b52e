//! The watch engine the filesystem sources are handlers of: one fanotify group
//! reporting file identifiers while someone watches, read together with the mount table
//! of the daemon's namespace and one deadline.
//!
//! The engine owns what every such source did the same way: the group and the
//! `/proc/self/mountinfo` fd, registered with the runtime; the state shared between the
//! reader and the watches' arm closures and holds (one lock); a generation per run, so
//! that a hold or reader of an earlier run never touches a newer run's state; the
//! `select` over the group becoming readable, mountinfo's `POLLPRI` (a mount table
//! change) and the handler's earliest deadline; draining every queued read. The
//! [`Handler`] owns the meaning: which marks, what an event is, what to do when the
//! mount table changes or a deadline passes.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::{stream, Stream};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use super::{wire, Fanotify, Shared, READ_SIZE};
use crate::error::Error;
use crate::sys::lock;

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// What a source does with its group's events. Called with the engine's lock held.
pub trait Handler: Send + 'static {
    /// What the source's stream yields.
    type Msg: Send + 'static;

    /// The source's name, for log lines and errors.
    const SOURCE: &'static str;

    /// The run's group was just made, before anything reads it: for marks the handler
    /// sets by itself rather than for a watch.
    fn started(&mut self, _group: &Fanotify) {}

    /// The events of one read of the group.
    fn read(&mut self, group: &Fanotify, events: Vec<wire::Event>, out: &mut VecDeque<Self::Msg>);

    /// After every queued read was handed to [`Handler::read`].
    fn drained(&mut self, _group: &Fanotify, _out: &mut VecDeque<Self::Msg>) {}

    /// The mount table of the daemon's namespace changed (`POLLPRI` on mountinfo).
    fn mount_table_changed(&mut self, group: &Fanotify, out: &mut VecDeque<Self::Msg>);

    /// When [`Handler::due`] should next run, if anything is pending.
    fn deadline(&self) -> Option<Instant>;

    /// The deadline passed.
    fn due(&mut self, group: &Fanotify, now: Instant, out: &mut VecDeque<Self::Msg>);
}

/// The running group and its handler, as arm closures see it.
pub struct Running<H> {
    group: Arc<Fanotify>,
    pub handler: H,
    generation: u64,
    wake: Arc<Notify>,
}

impl<H> Running<H> {
    pub fn group(&self) -> &Fanotify {
        &self.group
    }

    /// Tells the reader that the handler's deadline changed.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

struct State<H> {
    running: Option<Running<H>>,
    generation: u64,
}

/// One source's engine; cheap to clone (arm closures and holds keep a clone).
pub struct Engine<H> {
    state: Arc<Mutex<State<H>>>,
}

impl<H> Clone for Engine<H> {
    fn clone(&self) -> Self {
        Engine {
            state: Arc::clone(&self.state),
        }
    }
}

impl<H: Handler> Default for Engine<H> {
    fn default() -> Self {
        Engine::new()
    }
}

impl<H: Handler> Engine<H> {
    pub fn new() -> Self {
        Engine {
            state: Arc::new(Mutex::new(State {
                running: None,
                generation: 0,
            })),
        }
    }

    /// Starts a run with a new group and `handler`: the stream of what the handler
    /// yields. Dropping the stream ends the run and closes the group (every mark with
    /// it).
    pub fn open(&self, mut handler: H) -> io::Result<impl Stream<Item = H::Msg> + Send + 'static> {
        let group = Arc::new(Fanotify::new()?);
        handler.started(&group);
        let mountinfo = fs::File::open(MOUNTINFO)
            .map_err(|e| io::Error::new(e.kind(), format!("{MOUNTINFO}: {e}")))?;
        let wake = Arc::new(Notify::new());
        // SAFETY: the AsyncFd owns a reference to the group, so its fd stays open and
        // the same while registered.
        let fan = unsafe {
            AsyncFd::register_with_interest(Shared(Arc::clone(&group)), Interest::READABLE)
        }?;
        // SAFETY: the AsyncFd owns the File, so the fd stays open while registered.
        let mountinfo = unsafe { AsyncFd::register_with_interest(mountinfo, Interest::PRIORITY) }?;
        let mut state = lock(&self.state);
        state.generation += 1;
        let generation = state.generation;
        state.running = Some(Running {
            group,
            handler,
            generation,
            wake: Arc::clone(&wake),
        });
        drop(state);
        let reader = Reader {
            fan,
            mountinfo,
            engine: self.clone(),
            wake,
            pending: VecDeque::new(),
            buf: Vec::with_capacity(READ_SIZE),
            generation,
        };
        Ok(stream::unfold(reader, |mut reader| async move {
            let msg = reader.next().await?;
            Some((msg, reader))
        }))
    }

    /// Runs `f` on the running group and handler, with the run's generation (for a
    /// [`Hold`]); `Unavailable` when the source is not running.
    pub fn with_running<T>(
        &self,
        f: impl FnOnce(&mut Running<H>, u64) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut state = lock(&self.state);
        let running = state.running.as_mut().ok_or_else(|| {
            Error::Unavailable(format!("the {} source is not running", H::SOURCE))
        })?;
        let generation = running.generation;
        f(running, generation)
    }

    /// A watch's hold on run `generation`: `release` runs when it is dropped, if that
    /// run is still the one running (a closed group took every mark with it).
    pub fn hold(
        &self,
        generation: u64,
        release: impl FnOnce(&mut Running<H>) + Send + Sync + 'static,
    ) -> Hold<H> {
        Hold {
            engine: self.clone(),
            generation,
            release: Some(Box::new(release)),
        }
    }
}

type Release<H> = Box<dyn FnOnce(&mut Running<H>) + Send + Sync>;

/// What a watch holds in a run (see [`Engine::hold`]).
pub struct Hold<H> {
    engine: Engine<H>,
    generation: u64,
    release: Option<Release<H>>,
}

impl<H> Drop for Hold<H> {
    fn drop(&mut self) {
        let mut state = lock(&self.engine.state);
        let Some(running) = state.running.as_mut() else {
            return; // the group is closed: every mark went with it
        };
        if running.generation != self.generation {
            return;
        }
        if let Some(release) = self.release.take() {
            release(running);
        }
    }
}

struct Reader<H: Handler> {
    fan: AsyncFd<Shared>,
    mountinfo: AsyncFd<fs::File>,
    engine: Engine<H>,
    wake: Arc<Notify>,
    pending: VecDeque<H::Msg>,
    buf: Vec<u8>,
    /// The run this reader belongs to.
    generation: u64,
}

impl<H: Handler> Drop for Reader<H> {
    fn drop(&mut self) {
        // The group closes with the last Arc: make sure the state does not keep it. A
        // stream being dropped late must not end a newer run's state.
        let mut state = lock(&self.engine.state);
        if state
            .running
            .as_ref()
            .is_some_and(|r| r.generation == self.generation)
        {
            state.running = None;
        }
    }
}

impl<H: Handler> Reader<H> {
    /// Runs `f` on this run's handler; nothing when the run is over.
    fn handle(&mut self, f: impl FnOnce(&mut H, &Fanotify, &mut VecDeque<H::Msg>)) {
        let mut state = lock(&self.engine.state);
        if let Some(running) = state
            .running
            .as_mut()
            .filter(|r| r.generation == self.generation)
        {
            f(&mut running.handler, &running.group, &mut self.pending);
        }
    }

    async fn next(&mut self) -> Option<H::Msg> {
        loop {
            if let Some(msg) = self.pending.pop_front() {
                return Some(msg);
            }
            let deadline = {
                let state = lock(&self.engine.state);
                state.running.as_ref().and_then(|r| r.handler.deadline())
            };
            let due = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ready = self.fan.readable() => {
                    match ready {
                        Ok(mut guard) => guard.clear_ready(),
                        Err(e) => {
                            tracing::error!(source = H::SOURCE, "fanotify fd failed: {e}");
                            return None;
                        }
                    }
                    if !self.drain() {
                        return None;
                    }
                }
                ready = self.mountinfo.ready(Interest::PRIORITY) => {
                    match ready {
                        Ok(mut guard) => guard.clear_ready(),
                        Err(e) => {
                            tracing::error!(source = H::SOURCE, "polling {MOUNTINFO} failed: {e}");
                            return None;
                        }
                    }
                    self.handle(|handler, group, out| handler.mount_table_changed(group, out));
                }
                () = due => {
                    let now = Instant::now();
                    self.handle(|handler, group, out| handler.due(group, now, out));
                }
                () = self.wake.notified() => {}
            }
        }
    }

    /// Reads every queued event. False when the fd failed for good.
    fn drain(&mut self) -> bool {
        loop {
            let fan = Arc::clone(&self.fan.get_ref().0);
            match fan.read(&mut self.buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(source = H::SOURCE, "reading fanotify events: {e}");
                    return false;
                }
            }
            let mut events = Vec::new();
            for item in wire::events(&self.buf) {
                match item {
                    Ok(event) => events.push(event),
                    Err(e) => {
                        tracing::warn!(
                            source = H::SOURCE,
                            "dropped the rest of a fanotify read: {e}"
                        );
                        break;
                    }
                }
            }
            self.handle(|handler, group, out| handler.read(group, events, out));
        }
        self.handle(|handler, group, out| handler.drained(group, out));
        true
    }
}

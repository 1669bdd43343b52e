//! The running mounts source: one fanotify group (or, before 6.15, one mountinfo fd)
//! per watched namespace, read together with the control requests of arming watches,
//! and each namespace's mount table diffed against what was last seen.

use super::budget::{thread_cpu, Budget};
use super::describe::*;
use super::lines::reread;
use super::namespace::Namespace;
use super::resync::namespace_of;
use super::*;
use crate::sys::clock::ThreadCpu;

use std::time::Instant;

/// The shortest time between two mountinfo rereads of one namespace while fanotify
/// reports its topology (rereads serve remounts only).
pub(super) const REREAD_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// A reread of a namespace may take at most one part in this many of the time: the next
/// one waits this many times as long as the last one took.
pub(super) const REREAD_SHARE_INVERSE: u32 = 50;
/// Mounts over which a namespace's mountinfo reread is handed to a job (`job`) rather
/// than done on the reader's task: about 2 ms of work at this size, against the
/// hand-off's two thread switches and fd registrations.
const LARGE_NAMESPACE: usize = 1000;

/// How long after the last reread of a namespace the next may start, given its cost.
pub(super) fn reread_interval(last_cost: Duration) -> Duration {
    (last_cost * REREAD_SHARE_INVERSE).max(REREAD_MIN_INTERVAL)
}

pub(super) enum Wake {
    Control(Option<Control>),
    Group(u64),
    Mountinfo(u64),
    /// A coalesced mountinfo reread is due.
    Reread(u64),
    /// A throttled namespace may be read again: resync it.
    Resync(u64),
    Anchor(u64),
    /// A job is done.
    Done(Box<job::Done>),
}

pub(super) type Acknowledge = std::sync::mpsc::SyncSender<Result<u64, crate::error::Error>>;
/// Arm requests to answer once the hub applied a message, with their namespace.
pub(super) type Acks = Option<(Vec<Acknowledge>, u64)>;

pub(super) struct Reader {
    /// Whether fanotify reports attaches, detaches and moves (else the mountinfo diff).
    pub(super) fanotify: bool,
    pub(super) namespaces: HashMap<u64, Namespace>,
    pub(super) control: mpsc::UnboundedReceiver<Control>,
    /// Messages to yield, each with the arm request to answer once the hub applied it.
    pub(super) pending: VecDeque<(SourceMsg, Acks)>,
    pub(super) to_acknowledge: Acks,
    pub(super) buf: Vec<u8>,
    /// What each user's namespaces may still spend.
    pub(super) budget: Budget,
    pub(super) shared: Arc<Shared>,
    /// The namespace of the message last yielded, and the thread's CPU time then: the
    /// hub publishes it before polling again, and that is charged too.
    pub(super) last_yield: Option<(u64, ThreadCpu)>,
    /// Counts the turns at which groups are read ([`Namespace::served`]).
    pub(super) turn: u64,
    /// Jobs hand their results back here.
    pub(super) jobs_done: (
        mpsc::UnboundedSender<job::Done>,
        mpsc::UnboundedReceiver<job::Done>,
    ),
}

impl Reader {
    /// The next message, or `None` when the source failed for good.
    pub(super) async fn next(&mut self) -> Option<SourceMsg> {
        // The hub polls again only after publishing what it got: the namespace's mounts
        // are in its table now, so the watch can be taken and snapshots include them.
        if let Some((replies, namespace)) = self.to_acknowledge.take() {
            for reply in replies {
                let _ = reply.send(Ok(namespace));
            }
        }
        // The hub's publishing of the last message ran on this thread between its two
        // polls (the pump publishes before it polls again, within one poll of its task).
        if let Some((id, cost)) = self
            .last_yield
            .take()
            .and_then(|(id, then)| Some((id, then.since()?)))
        {
            self.charge(id, cost);
        }
        // What sending this source's records to subscribers cost since (see
        // `Mounts::delivered`): the fan-out's other half, on the deliverers' tasks.
        let sent = std::mem::take(&mut *lock(&self.shared.delivered));
        for (id, cost) in sent {
            self.charge(id, cost);
        }
        loop {
            if let Some((msg, ack)) = self.pending.pop_front() {
                self.to_acknowledge = ack;
                self.last_yield = namespace_of(&msg).map(|id| (id, ThreadCpu::now()));
                return Some(msg);
            }
            let wake = self.wait().await;
            if let Err(e) = self.handle(wake).await {
                tracing::error!(source = NAME, "{e}");
                return None;
            }
        }
    }

    async fn wait(&mut self) -> Wake {
        let mut waits: Vec<BoxFuture<'_, Wake>> = Vec::new();
        let control = &mut self.control;
        waits.push(async move { Wake::Control(control.recv().await) }.boxed());
        let jobs_done = &mut self.jobs_done.1;
        waits.push(
            async move {
                match jobs_done.recv().await {
                    Some(done) => Wake::Done(Box::new(done)),
                    // Never: the reader holds a sender.
                    None => std::future::pending().await,
                }
            }
            .boxed(),
        );
        // The earliest timer: a resync of a throttled namespace, or a coalesced reread.
        let due = self
            .namespaces
            .values()
            .filter(|ns| !ns.busy)
            .filter_map(|ns| match ns.throttled_until {
                Some(at) => Some((at, Wake::Resync(ns.id))),
                None => Some((ns.reread_due?, Wake::Reread(ns.id))),
            })
            .min_by_key(|(at, _)| *at);
        if let Some((at, wake)) = due {
            waits.push(
                async move {
                    tokio::time::sleep_until(at.into()).await;
                    wake
                }
                .boxed(),
            );
        }
        // `select_all` takes the first ready in this order: the least recently served
        // first, so that a namespace always ready does not keep the others waiting.
        let mut namespaces: Vec<&Namespace> = self.namespaces.values().collect();
        namespaces.sort_unstable_by_key(|ns| ns.served);
        for ns in namespaces {
            let id = ns.id;
            // A throttled namespace is not read: the kernel queues what happens in it.
            let throttled = ns.throttled_until.is_some();
            if let Some(group) = ns.group.as_ref().filter(|_| !throttled) {
                waits.push(
                    async move {
                        let _ = group.readable().await;
                        Wake::Group(id)
                    }
                    .boxed(),
                );
            }
            // A reread already due serves every change made before it.
            if let Some(mountinfo) = ns.mountinfo.as_ref().filter(|_| ns.reread_due.is_none()) {
                if !throttled {
                    waits.push(
                        async move {
                            let _ = mountinfo.ready(Interest::PRIORITY).await;
                            Wake::Mountinfo(id)
                        }
                        .boxed(),
                    );
                }
            }
            if let Some(anchor) = &ns.anchor {
                waits.push(
                    async move {
                        let _ = anchor.readable().await;
                        Wake::Anchor(id)
                    }
                    .boxed(),
                );
            }
        }
        select_all(waits).await.0
    }

    async fn handle(&mut self, wake: Wake) -> Result<(), String> {
        match wake {
            Wake::Control(None) => Err("the control channel closed".into()),
            Wake::Control(Some(control)) => {
                self.control(control);
                Ok(())
            }
            Wake::Group(id) => {
                // Reading may await (a readiness the runtime had not seen yet), and the
                // task may then resume on the other worker thread: charged only when
                // measured on one thread (in practice always: the group is readable).
                let started = ThreadCpu::now();
                let read = self.read_group(id).await;
                if let Some(cost) = started.since() {
                    self.charge(id, cost);
                }
                read
            }
            Wake::Mountinfo(id) => {
                self.mountinfo_changed(id).await;
                Ok(())
            }
            Wake::Reread(id) => {
                let started = thread_cpu();
                self.reread_mountinfo(id);
                self.charge(id, thread_cpu().saturating_sub(started));
                Ok(())
            }
            Wake::Resync(id) => {
                let started = thread_cpu();
                self.end_throttle(id);
                self.charge(id, thread_cpu().saturating_sub(started));
                Ok(())
            }
            Wake::Anchor(id) => {
                self.anchor_exited(id);
                Ok(())
            }
            Wake::Done(done) => {
                self.done(*done);
                Ok(())
            }
        }
    }

    fn control(&mut self, control: Control) {
        match control {
            Control::Arm {
                ns,
                pid,
                uid,
                anchor,
                reply,
            } => {
                let known = namespace_id(&ns)
                    .ok()
                    .filter(|id| self.namespaces.contains_key(id));
                if let Some(id) = known {
                    if let Some(entry) = self.namespaces.get_mut(&id) {
                        entry.watches += 1;
                        *entry.watchers.entry(uid).or_default() += 1;
                        // Still being listed: answered with the first request.
                        if !entry.arming.is_empty() {
                            entry.arming.push(reply);
                            return;
                        }
                    }
                    let _ = reply.send(Ok(id));
                    return;
                }
                // A namespace's first listing is work charged to the user who asks; a
                // user past their share would have it done anyway, and could have it
                // done again and again over namespaces of their own.
                let owed = (uid != 0)
                    .then(|| self.budget.owed_until(uid, Instant::now()))
                    .flatten();
                if let Some(until) = owed {
                    let _ = reply.send(Err(crate::error::Error::LimitExceeded(format!(
                        "uid {uid}'s mount namespaces have used their share of the daemon's \
                         time ({}% of one CPU, [sources.mounts] user_cpu_percent): a new \
                         namespace can be watched in {} ms",
                        self.budget.percent(),
                        until.saturating_duration_since(Instant::now()).as_millis() + 1
                    ))));
                    return;
                }
                let anchor = match register(anchor, Interest::READABLE) {
                    Ok(anchor) => anchor,
                    Err(e) => {
                        let _ = reply.send(Err(crate::error::Error::Unavailable(format!(
                            "watching pid {pid}: {e}"
                        ))));
                        return;
                    }
                };
                // Listing a namespace costs in proportion to it (100 ms at 10,000
                // mounts), and any user may ask for one, again and again: a job, charged
                // to the one who asked.
                match self.enter_namespace(&ns, Some(anchor), &format!("/proc/{pid}/mountinfo")) {
                    Ok(held) => {
                        let id = held.id;
                        if let Some(entry) = self.namespaces.get_mut(&id) {
                            entry.watchers.insert(uid, 1);
                            entry.arming.push(reply);
                        }
                        self.spawn(held, job::Work::List);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(crate::error::Error::Unavailable(format!(
                            "watching the mount namespace of pid {pid}: {e}"
                        ))));
                    }
                }
            }
            Control::Share(percent) => self.budget.set_share(percent),
            Control::Release { namespace, uid } => {
                self.budget.forget_idle(Instant::now());
                let Some(entry) = self.namespaces.get_mut(&namespace) else {
                    return;
                };
                entry.watches = entry.watches.saturating_sub(1);
                if let Some(count) = entry.watchers.get_mut(&uid) {
                    *count -= 1;
                    if *count == 0 {
                        entry.watchers.remove(&uid);
                    }
                }
                if entry.watches == 0 && entry.anchor.is_some() {
                    self.namespaces.remove(&namespace);
                    self.pending.push_back((
                        SourceMsg::Replace {
                            prefix: object_prefix(namespace),
                            objects: Vec::new(),
                        },
                        None,
                    ));
                }
            }
        }
    }

    /// Marks a namespace and opens its mountinfo, and enters it busy: its fds and an
    /// empty cache are returned for its first listing (`job::Work::List`). Marked
    /// first, so that nothing falls between the listing and the first event.
    pub(super) fn enter_namespace(
        &mut self,
        ns: &OwnedFd,
        anchor: Option<AsyncFd<OwnedFd>>,
        mountinfo_path: &str,
    ) -> io::Result<job::Held> {
        let id = namespace_id(ns)?;
        let meta = File::from(ns.try_clone()?).metadata()?;
        let group = if self.fanotify {
            let group = fanotify_group()?;
            mark(&group, ns, true).map_err(|e| {
                io::Error::new(e.kind(), format!("fanotify_mark(FAN_MARK_MNTNS): {e}"))
            })?;
            Some(group)
        } else {
            None
        };
        let mountinfo = File::open(mountinfo_path)
            .map_err(|e| io::Error::new(e.kind(), format!("{mountinfo_path}: {e}")))?;
        // Registered before the listing reads it (see `Namespace::mountinfo`).
        let for_job = mountinfo.try_clone()?;
        let mountinfo = register(mountinfo, Interest::PRIORITY)?;
        self.namespaces.insert(
            id,
            Namespace {
                id,
                inode: (meta.dev(), meta.ino()),
                group: None,
                mountinfo: Some(mountinfo),
                parked: None,
                anchor,
                mounts: HashMap::new(),
                lines: HashMap::new(),
                watches: 1,
                watchers: HashMap::new(),
                throttled_until: None,
                stale: false,
                busy: true,
                served: 0,
                arming: Vec::new(),
                reread_due: None,
                last_reread: None,
            },
        );
        Ok(job::Held {
            id,
            group,
            mountinfo: for_job,
            mounts: HashMap::new(),
            lines: HashMap::new(),
        })
    }

    /// [`Reader::enter_namespace`] with the listing done here: the daemon's own
    /// namespace, when the source opens.
    pub(super) fn add_namespace(&mut self, ns: &OwnedFd, mountinfo_path: &str) -> io::Result<()> {
        let held = self.enter_namespace(ns, None, mountinfo_path)?;
        let id = held.id;
        let done = held.run(job::Work::List);
        if let job::Outcome::Listed(Err(e)) = &done.outcome {
            self.namespaces.remove(&id);
            return Err(io::Error::other(e.clone()));
        }
        self.done(done);
        Ok(())
    }

    async fn read_group(&mut self, id: u64) -> Result<(), String> {
        self.turn += 1;
        let Some(ns) = self.namespaces.get_mut(&id) else {
            return Ok(());
        };
        ns.served = self.turn;
        let Some(group) = ns.group.as_ref() else {
            return Ok(());
        };
        // One slice per turn (see `GROUP_SLICE`); the rest stays readable for the next.
        let mut guard = group
            .readable()
            .await
            .map_err(|e| format!("fanotify group of namespace {id}: {e}"))?;
        let buf = &mut self.buf;
        let events = match guard
            .try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from))
        {
            Ok(Ok(n)) => match wire::fanotify_events(&buf[..n]) {
                Ok(parsed) => parsed,
                Err(e) => {
                    tracing::warn!(source = NAME, "malformed fanotify record: {e}");
                    Vec::new()
                }
            },
            Ok(Err(e)) => return Err(format!("reading the fanotify group of {id}: {e}")),
            Err(_would_block) => Vec::new(),
        };
        for event in events {
            if event.fd >= 0 {
                // SAFETY: the kernel installed this fd for us; closing it is ours to do.
                drop(unsafe { OwnedFd::from_raw_fd(event.fd) });
            }
            self.apply(id, event.notice);
        }
        Ok(())
    }

    fn apply(&mut self, id: u64, notice: MountNotice) {
        // The rest of a batch read before an overflow: the resync lists it all.
        if self.namespaces.get(&id).is_none_or(|ns| ns.busy) {
            return;
        }
        if notice == MountNotice::Overflow {
            self.overflowed(id);
            return;
        }
        let Some(ns) = self.namespaces.get_mut(&id) else {
            return;
        };
        let mut buf = vec![0u64; 512];
        let mut describe = |mount: u64, subtype: u8| -> Record {
            match statmount(mount, id, &mut buf) {
                Ok(described) => {
                    let attrs = attributes(&described);
                    ns.mounts.insert(mount, described);
                    record(subtype, Change::Upsert, id, mount, attrs)
                }
                Err(e) => {
                    // Already gone again: its detach follows. Say what is known.
                    tracing::debug!(source = NAME, mount, "statmount: {e}");
                    // Not in the cache, so not in the hub's table either: the table
                    // holds what the cache holds, which a resync's difference needs.
                    let mut attrs = Attrs::new();
                    attrs.insert("namespace".into(), id.into());
                    attrs.insert("mount-id".into(), mount.into());
                    record(subtype, Change::None, id, mount, attrs)
                }
            }
        };
        let msg = match notice {
            MountNotice::Attach(mount) => SourceMsg::Record(describe(mount, ATTACH)),
            MountNotice::Move(mount) => SourceMsg::Record(describe(mount, MOVE)),
            MountNotice::Detach(mount) => {
                let attrs = match ns.mounts.remove(&mount) {
                    Some(known) => attributes(&known),
                    None => {
                        let mut attrs = Attrs::new();
                        attrs.insert("namespace".into(), id.into());
                        attrs.insert("mount-id".into(), mount.into());
                        attrs
                    }
                };
                SourceMsg::Record(record(DETACH, Change::Remove, id, mount, attrs))
            }
            // Handled above.
            MountNotice::Overflow => return,
            MountNotice::Ignored { mask } => {
                tracing::debug!(source = NAME, mask, "ignored fanotify event");
                return;
            }
        };
        self.pending.push_back((msg, None));
    }

    /// The kernel dropped events of this namespace: resync it, which tells its watchers
    /// (and no one else) with `Lost`.
    fn overflowed(&mut self, id: u64) {
        tracing::warn!(
            source = NAME,
            namespace = id,
            "fanotify queue overflowed; rescanning"
        );
        self.resync(id);
    }

    /// `POLLPRI` on a namespace's mountinfo: something in it changed. Without fanotify
    /// the reread is the only way to know what, so it happens at once. With fanotify,
    /// attaches, detaches and moves come from the group, and the reread (which costs
    /// in proportion to the namespace, not to the change) is needed only for remounts:
    /// it is scheduled, at once after a quiet spell and otherwise [`reread_interval`]
    /// after the last one, and every `POLLPRI` until then is served by it.
    async fn mountinfo_changed(&mut self, id: u64) {
        let fanotify = self.fanotify;
        let Some(ns) = self.namespaces.get_mut(&id) else {
            return;
        };
        let Some(mountinfo) = &ns.mountinfo else {
            return;
        };
        match mountinfo.ready(Interest::PRIORITY).await {
            // The kernel reports `POLLPRI` once per change of the namespace's event
            // counter (the poll itself takes it in), so clearing the readiness loses
            // nothing: the next change wakes us again.
            Ok(mut guard) => guard.clear_ready_matching(Ready::PRIORITY),
            Err(e) => {
                tracing::warn!(source = NAME, namespace = id, "polling mountinfo: {e}");
                return;
            }
        }
        if !fanotify {
            self.reread_mountinfo(id);
            return;
        }
        let now = Instant::now();
        let at = match ns.last_reread {
            Some((ended, cost)) => (ended + reread_interval(cost)).max(now),
            None => now,
        };
        ns.reread_due = Some(at);
    }

    /// Rereads a namespace's mountinfo and diffs it with the cache: here for a small
    /// namespace; a large one's reread (20 ms at 10,000 mounts) is handed to a job, so
    /// that other namespaces' events do not wait behind it.
    fn reread_mountinfo(&mut self, id: u64) {
        let follow_topology = !self.fanotify;
        let Some(ns) = self.namespaces.get_mut(&id) else {
            return;
        };
        if ns.busy {
            // A job reads the same open file (one file offset): the reread follows it.
            ns.reread_due = Some(Instant::now());
            return;
        }
        ns.reread_due = None;
        if ns.lines.len() > LARGE_NAMESPACE {
            self.hand_off(id, job::Work::Reread { follow_topology });
            return;
        }
        let started = Instant::now();
        let cpu = thread_cpu();
        let Some(mountinfo) = ns.mountinfo.as_mut() else {
            return;
        };
        // Changes made from here on wake us again; those made before are in this read.
        if let Some(Ok(mut guard)) = mountinfo.ready(Interest::PRIORITY).now_or_never() {
            guard.clear_ready_matching(Ready::PRIORITY);
        }
        let records = reread(
            id,
            mountinfo.get_mut(),
            &mut ns.mounts,
            &mut ns.lines,
            follow_topology,
            || {},
        );
        self.pending
            .extend(records.into_iter().map(|r| (SourceMsg::Record(r), None)));
        ns.last_reread = Some((Instant::now(), started.elapsed()));
        self.shared
            .counters
            .reread(thread_cpu().saturating_sub(cpu));
    }

    /// The process a namespace was named by exited: another process in it takes over, or
    /// the namespace is gone for us.
    fn anchor_exited(&mut self, id: u64) {
        let Some(ns) = self.namespaces.get_mut(&id) else {
            return;
        };
        if let Some(pid) = process_in_namespace(ns.inode) {
            if let Ok(anchor) = pidfd::open(pid).and_then(|fd| register(fd, Interest::READABLE)) {
                ns.anchor = Some(anchor);
                return;
            }
        }
        self.namespaces.remove(&id);
        self.pending.push_back((
            SourceMsg::Replace {
                prefix: object_prefix(id),
                objects: Vec::new(),
            },
            None,
        ));
        self.pending.push_back((
            SourceMsg::WatchedObjectGone {
                object: namespace_object(id),
                reason: format!("namespace-gone: no process is left in mount namespace {id}"),
            },
            None,
        ));
    }
}

/// Some live process whose mount namespace is `inode`, by walking /proc.
pub(super) fn process_in_namespace(inode: (u64, u64)) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| namespace_inode(*pid).is_ok_and(|found| found == inode))
}

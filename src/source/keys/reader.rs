//! The running keys source: the notification pipe read, and its records decoded into
//! messages for the watched keys.

use super::*;

pub(super) struct Reader {
    pub(super) fd: AsyncFd<OwnedFd>,
    /// Kept open: once the write end closes, poll() reports POLLHUP for ever.
    pub(super) _write: OwnedFd,
    pub(super) shared: Arc<Shared>,
    pub(super) run: u64,
    pub(super) pending: std::collections::VecDeque<SourceMsg>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut running = lock(&self.shared.running);
        if running.as_ref().is_some_and(|r| r.run == self.run) {
            // Closing the last fd of the pipe removes every kernel watch on it.
            *running = None;
        }
    }
}

impl Reader {
    pub(super) async fn next(&mut self) -> Option<SourceMsg> {
        loop {
            if let Some(msg) = self.pending.pop_front() {
                return Some(msg);
            }
            let mut ready = match self.fd.readable().await {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::error!(source = NAME, "polling the notification pipe: {e}");
                    return None;
                }
            };
            // Read until EAGAIN: the last read also collects a pending loss record,
            // which poll() does not announce.
            let mut buf = [0u8; 4096];
            loop {
                match nix::unistd::read(self.fd.get_ref().as_fd(), &mut buf) {
                    Ok(0) => return None,
                    Ok(n) => decode(&self.shared, &buf[..n], &mut self.pending),
                    Err(nix::errno::Errno::EAGAIN) => {
                        ready.clear_ready();
                        break;
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        tracing::error!(source = NAME, "reading the notification pipe: {e}");
                        return None;
                    }
                }
            }
        }
    }
}

/// Turns the records of one read into source messages.
pub(super) fn decode(
    shared: &Shared,
    bytes: &[u8],
    pending: &mut std::collections::VecDeque<SourceMsg>,
) {
    {
        let (notes, error) = wire::parse(bytes);
        if let Some(e) = error {
            tracing::warn!(source = NAME, "malformed notification: {e}");
        }
        let mut table = lock(&shared.table);
        for note in notes {
            tracing::debug!(source = NAME, ?note, "notification");
            match note {
                Note::Key {
                    change, key, aux, ..
                } => {
                    let Some(watched) = table.info.get(&key) else {
                        // A watch released a moment ago.
                        continue;
                    };
                    pending.push_back(SourceMsg::Record(key_record(change, key, aux, watched)));
                }
                Note::Removal { object, .. } => {
                    let Some(serial) = object.and_then(|o| i32::try_from(o).ok()) else {
                        continue;
                    };
                    if let Some(count) = table.expected_removals.get_mut(&serial) {
                        if *count > 0 {
                            *count -= 1;
                            continue;
                        }
                    }
                    // The release of its holds (the hub ends their watches) tries an
                    // unwatch that fails harmlessly: the key is gone.
                    if table.info.remove(&serial).is_none() {
                        continue;
                    }
                    pending.push_back(SourceMsg::WatchedObjectGone {
                        object: serial.to_string(),
                        reason: format!(
                            "key-destroyed: key {serial} was destroyed (the kernel garbage \
                             collector removed it after its last link went, or it was \
                             invalidated or expired)"
                        ),
                    });
                }
                Note::Loss => {
                    tracing::warn!(source = NAME, "the kernel's notification queue overflowed");
                    pending.push_back(SourceMsg::Overflow {
                        objects: Vec::new(),
                    });
                }
                Note::Unknown { kind, subtype } => {
                    tracing::debug!(source = NAME, kind, subtype, "unknown notification skipped");
                }
            }
        }
    }
}

pub(super) fn key_record(change: KeyChange, key: i32, aux: u32, watched: &Watched) -> Record {
    let mut attributes = Attrs::new();
    // Serials are positive i32; aux is a serial or, for a negative instantiation, an
    // error number, so both keep the kernel's bits.
    attributes.insert(
        "key".into(),
        Attr::U32(u32::from_ne_bytes(key.to_ne_bytes())),
    );
    attributes.insert("aux".into(), Attr::U32(aux));
    attributes.insert("owner".into(), Attr::U32(watched.owner));
    if let Some(info) = &watched.info {
        attributes.insert("type".into(), Attr::Str(info.kind.clone()));
        attributes.insert("description".into(), Attr::Str(info.description.clone()));
    }
    Record {
        source: NAME,
        subtype: change.subtype(),
        object_id: key.to_string(),
        change: Change::None,
        attributes,
        properties: Default::default(),
        audience: Audience::Owner(watched.owner),
    }
}

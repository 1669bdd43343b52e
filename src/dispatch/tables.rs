//! Object tables: every object a running source reported, kept in step with its
//! records under the hub's lock, so that a snapshot and the sequence number it reports
//! agree with the events that follow it.

use std::collections::BTreeMap;

use crate::error::Error;
use crate::event::{Change, Object, Record};
use crate::policy;
use crate::source::Availability;

use super::watches::Watch;
use super::{Hub, State};

impl Hub {
    /// A consistent snapshot of a source's objects. With a subscription, the sequence is
    /// that subscription's last assigned number: apply every later event to the snapshot.
    /// Without one, it is the source's generation (records published so far).
    pub fn snapshot(
        &self,
        source_name: &str,
        subscription: Option<(u64, &str)>,
    ) -> Result<(u64, Vec<Object>), Error> {
        let index = self.registry.index_of(source_name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown source '{source_name}'; known: {}",
                self.registry.names().join(", ")
            ))
        })?;
        {
            let mut state = self.lock();
            let seq = match subscription {
                Some((id, caller)) => Self::owned(&mut state, id, caller)?.outbox.next_seq - 1,
                None => state.sources[index].generation,
            };
            let slot = &state.sources[index];
            if let Availability::Unavailable(reason) = &slot.availability {
                return Err(Error::NotSupported(format!(
                    "{source_name} is not available: {reason}"
                )));
            }
            if let Some(table) = &slot.table {
                let objects = table.values().cloned();
                let objects = match subscription {
                    Some((id, _)) => Self::covered(&state, id, index, objects),
                    None => objects.collect(),
                };
                return Ok((seq, objects));
            }
        }
        // Not running, so no event for it can be in flight: read the kernel's view
        // without holding the lock.
        let objects = self.registry.all()[index]
            .scan()
            .map_err(|e| Error::Unavailable(format!("cannot enumerate {source_name}: {e}")))?;
        let mut state = self.lock();
        let seq = match subscription {
            Some((id, caller)) => Self::owned(&mut state, id, caller)?.outbox.next_seq - 1,
            None => state.sources[index].generation,
        };
        let objects = match subscription {
            Some((id, _)) => Self::covered(&state, id, index, objects.into_iter()),
            None => objects,
        };
        Ok((seq, objects))
    }

    /// The objects a subscription's watches of a source cover ([`WatchMatcher::covers`]).
    /// A watch that does not divide the table covers all of it only if policy granted it
    /// the whole system; without a watch of the source the caller was authorized for the
    /// whole system at snapshot time (see the bus layer), and everything is returned.
    fn covered(
        state: &State,
        id: u64,
        index: usize,
        objects: impl Iterator<Item = Object>,
    ) -> Vec<Object> {
        let watches: Vec<&Watch> = state
            .subscriptions
            .get(&id)
            .map(|s| s.watches.iter().filter(|w| w.source == index).collect())
            .unwrap_or_default();
        if watches.is_empty() {
            return objects.collect();
        }
        objects
            .filter(|object| {
                watches.iter().any(|w| match w.matcher.covers(object) {
                    Some(covered) => covered,
                    None => w.grant.scope() == policy::Scope::System,
                })
            })
            .collect()
    }
}

/// Puts `objects`, a source's new listing, into `table` in place of `old` (the entries
/// it replaces, already taken out), each carrying on its change counter, one more when
/// its attributes changed.
pub(super) fn relist(
    table: &mut BTreeMap<String, Object>,
    old: &BTreeMap<String, Object>,
    objects: Vec<Object>,
) {
    for mut object in objects {
        carry_changes(old.get(&object.id), &mut object);
        table.insert(object.id.clone(), object);
    }
}

/// Puts `objects`, new or changed since the source last said, into `table`, each
/// carrying on the change counter of the entry it replaces.
pub(super) fn upsert_listed(table: &mut BTreeMap<String, Object>, objects: Vec<Object>) {
    for mut object in objects {
        carry_changes(table.get(&object.id), &mut object);
        table.insert(object.id.clone(), object);
    }
}

/// An object listed again keeps its change counter, one more when its attributes changed.
fn carry_changes(previous: Option<&Object>, object: &mut Object) {
    if let Some(previous) = previous {
        object.changes = previous.changes + u64::from(previous.attributes != object.attributes);
    }
}

/// Applies a record to its source's object table. A removal carries no attributes (the
/// object is gone from the kernel); it is completed with the last ones known.
pub(super) fn apply_to_table(table: &mut BTreeMap<String, Object>, record: &mut Record) {
    match record.change {
        Change::Upsert => {
            let object = table
                .entry(record.object_id.clone())
                .or_insert_with(|| Object {
                    id: record.object_id.clone(),
                    changes: 0,
                    attributes: Default::default(),
                    properties: Default::default(),
                });
            object.changes += 1;
            object.attributes.clone_from(&record.attributes);
            object.properties.clone_from(&record.properties);
        }
        Change::Remove => {
            if let Some(previous) = table.remove(&record.object_id) {
                for (key, value) in previous.attributes {
                    record.attributes.entry(key).or_insert(value);
                }
            }
        }
        Change::None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::testing::record;

    #[test]
    fn removal_completes_attributes_from_the_table() {
        let mut table = BTreeMap::new();
        let mut add = Record::clone(&record(0));
        add.change = Change::Upsert;
        add.attributes.insert("size".into(), 512u64.into());
        apply_to_table(&mut table, &mut add);
        assert_eq!(table["/devices/x"].changes, 1);
        let mut remove = Record::clone(&record(1));
        remove.change = Change::Remove;
        apply_to_table(&mut table, &mut remove);
        assert!(table.is_empty());
        assert_eq!(remove.attributes["size"], 512u64.into());
    }

    /// A resync's difference: objects listed again keep their change counters (one more
    /// only when their attributes changed); objects it does not name stay as they were.
    #[test]
    fn objects_listed_again_carry_their_change_counters() {
        let object = |id: &str, size: u64, changes: u64| Object {
            id: id.to_owned(),
            changes,
            attributes: [("size".to_owned(), size.into())].into_iter().collect(),
            properties: Default::default(),
        };
        let mut table: BTreeMap<String, Object> = ["a", "b", "c"]
            .into_iter()
            .map(|id| (id.to_owned(), object(id, 1, 5)))
            .collect();
        upsert_listed(
            &mut table,
            vec![object("a", 1, 0), object("b", 2, 0), object("d", 1, 0)],
        );
        let changes: Vec<(&str, u64)> =
            table.values().map(|o| (o.id.as_str(), o.changes)).collect();
        assert_eq!(changes, [("a", 5), ("b", 6), ("c", 5), ("d", 0)]);
    }
}

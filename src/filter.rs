//! Per-subscription filters, with the expressive power of the kernel's
//! `IOC_WATCH_QUEUE_SET_FILTER`: a list of (type, 256-bit subtype map) entries. With no
//! entries everything passes; with entries, an event passes when an entry names its
//! source and has its subtype's bit set.

use crate::error::Error;
use crate::source::Catalogue;

/// A set of subtypes of one source, one bit per subtype as in the kernel's
/// `subtype_filter[8]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubtypeSet([u64; 4]);

impl SubtypeSet {
    pub fn insert(&mut self, subtype: u8) {
        self.0[usize::from(subtype / 64)] |= 1 << (subtype % 64);
    }

    pub fn contains(self, subtype: u8) -> bool {
        self.0[usize::from(subtype / 64)] & (1 << (subtype % 64)) != 0
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    entries: Vec<(&'static str, SubtypeSet)>,
}

impl Filter {
    /// Most entries a filter may have; the kernel allows 16 types per queue and we have
    /// fewer sources than that, so this only stops a caller sending huge arrays.
    pub const MAX_ENTRIES: usize = 16;

    /// Builds a filter from `(source, subtype names)` pairs as a caller sent them,
    /// naming the first unknown source or subtype in the error.
    pub fn parse(sources: Catalogue<'_>, spec: &[(String, Vec<String>)]) -> Result<Self, Error> {
        if spec.len() > Self::MAX_ENTRIES {
            return Err(Error::LimitExceeded(format!(
                "a filter may have at most {} entries, got {}",
                Self::MAX_ENTRIES,
                spec.len()
            )));
        }
        let mut entries = Vec::with_capacity(spec.len());
        for (source_name, subtype_names) in spec {
            let source = sources.get(source_name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown source '{source_name}' in filter; known sources: {}",
                    sources.names().join(", ")
                ))
            })?;
            let mut set = SubtypeSet::default();
            for name in subtype_names {
                let subtype = source.subtype_index(name).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "unknown subtype '{name}' of source '{source_name}'; known: {}",
                        source.subtypes.join(", ")
                    ))
                })?;
                set.insert(subtype);
            }
            entries.push((source.name, set));
        }
        Ok(Filter { entries })
    }

    pub fn passes(&self, source: &str, subtype: u8) -> bool {
        self.entries.is_empty()
            || self
                .entries
                .iter()
                .any(|(name, set)| *name == source && set.contains(subtype))
    }

    /// The filter as `(source, subtype names)` pairs, the inverse of [`Filter::parse`].
    pub fn describe(&self, sources: Catalogue<'_>) -> Vec<(String, Vec<String>)> {
        self.entries
            .iter()
            .map(|(name, set)| {
                let subtypes = sources
                    .get(name)
                    .map(|source| {
                        source
                            .subtypes
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| u8::try_from(*i).is_ok_and(|i| set.contains(i)))
                            .map(|(_, s)| (*s).to_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                ((*name).to_owned(), subtypes)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtype_set_covers_all_256_bits() {
        let mut set = SubtypeSet::default();
        for subtype in [0u8, 63, 64, 127, 128, 255] {
            assert!(!set.contains(subtype));
            set.insert(subtype);
            assert!(set.contains(subtype));
        }
        assert!(!set.contains(1));
        assert!(!set.contains(254));
    }

    #[test]
    fn empty_filter_passes_everything() {
        assert!(Filter::default().passes("devices", 3));
    }
}

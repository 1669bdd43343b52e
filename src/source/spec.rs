//! Reading a watch specification (`a{sv}`): the only way a source gets at its keys.
//!
//! A source declares the keys it understands once and opens the spec with
//! [`SpecReader::new`], which rejects every other key before anything is read: a typo is
//! an error rather than a watch that silently matches more than the caller meant, and
//! since there is no other way to read a key, the check cannot be forgotten. Reading a
//! key the source did not declare is a bug in the source (it would reject every spec
//! that sets it): debug builds, and so the tests, panic on it.

use std::collections::HashMap;
use std::path::PathBuf;

use zbus::OwnedVariant;

use super::WatchSpec;
use crate::error::Error;

/// A watch spec whose keys were checked against what its source declared.
#[derive(Debug)]
pub struct SpecReader<'a> {
    spec: &'a WatchSpec,
    source: &'static str,
    known: &'static [&'static str],
}

impl<'a> SpecReader<'a> {
    /// Opens `spec` for `source`, which understands the keys `known`; any other key is
    /// an `InvalidArgument` naming it and the known ones.
    pub fn new(
        spec: &'a WatchSpec,
        source: &'static str,
        known: &'static [&'static str],
    ) -> Result<Self, Error> {
        let mut unknown: Vec<&str> = spec
            .keys()
            .map(String::as_str)
            .filter(|k| !known.contains(k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            return Err(Error::InvalidArgument(format!(
                "unknown {source} watch option(s) {}; known: {}",
                unknown.join(", "),
                known.join(", ")
            )));
        }
        Ok(SpecReader {
            spec,
            source,
            known,
        })
    }

    /// The raw value of a declared key, for sources with their own types and messages.
    pub fn get(&self, key: &str) -> Option<&'a OwnedVariant> {
        debug_assert!(
            self.known.contains(&key),
            "watch option '{key}' is read but not declared among {:?}",
            self.known
        );
        self.spec.get(key)
    }

    /// A string value, naming the key and expected type on error.
    pub fn str(&self, key: &str) -> Result<Option<String>, Error> {
        spec_str(self.get(key), key)
    }

    /// The `path` (s) a watch of a filesystem needs: absolute, as the caller sees it.
    pub fn filesystem_path(&self) -> Result<PathBuf, Error> {
        let path = self.str("path")?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "a {} watch needs 'path' (s): a path on the filesystem to watch",
                self.source
            ))
        })?;
        if !path.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "watch option 'path' must be absolute, got '{path}'"
            )));
        }
        Ok(PathBuf::from(path))
    }

    /// A string→string dictionary.
    pub fn str_map(&self, key: &str) -> Result<Option<HashMap<String, String>>, Error> {
        self.get(key)
            .map(|value| {
                HashMap::<String, String>::try_from(value.clone()).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "watch option '{key}' must be a string dictionary (D-Bus type 'a{{ss}}'), got '{}'",
                        value.value_signature()
                    ))
                })
            })
            .transpose()
    }
}

/// Reads a string value from a dictionary of options (a watch spec, or options the hub
/// reads), naming the key and expected type on error.
pub fn spec_str(value: Option<&OwnedVariant>, key: &str) -> Result<Option<String>, Error> {
    value
        .map(|value| {
            String::try_from(value.clone()).map_err(|_| {
                Error::InvalidArgument(format!(
                    "watch option '{key}' must be a string (D-Bus type 's'), got '{}'",
                    value.value_signature()
                ))
            })
        })
        .transpose()
}

/// A watch spec from literal pairs, for the sources' unit tests.
#[cfg(test)]
pub(crate) fn spec(pairs: &[(&str, zbus::Variant<'_>)]) -> WatchSpec {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), OwnedVariant::try_from(v.clone()).unwrap()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused_before_anything_is_read() {
        let s = spec(&[
            ("nmae", "x".into()),
            ("alpha", 1u32.into()),
            ("name", 7u32.into()),
        ]);
        let Err(Error::InvalidArgument(m)) = SpecReader::new(&s, "devices", &["name"]) else {
            panic!("unknown keys accepted");
        };
        assert_eq!(
            m,
            "unknown devices watch option(s) alpha, nmae; known: name"
        );
        let s = spec(&[("name", 7u32.into())]);
        let reader = SpecReader::new(&s, "devices", &["name", "other"]).unwrap();
        assert!(matches!(reader.str("name"), Err(Error::InvalidArgument(m)) if m.contains("'u'")));
        assert_eq!(reader.str("other"), Ok(None));
    }

    #[test]
    #[should_panic(expected = "not declared")]
    #[cfg(debug_assertions)]
    fn reading_an_undeclared_key_is_a_bug() {
        let s = spec(&[]);
        let reader = SpecReader::new(&s, "devices", &["name"]).unwrap();
        let _ = reader.get("naem");
    }
}

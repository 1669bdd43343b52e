//! Rules that start systemd units on events, as udev's `SYSTEMD_WANTS` does (`[[units]]`).
//!
//! Each rule names a source, optionally event kinds and attribute patterns, and a unit:
//! a plain name, or a template whose instance is an event attribute escaped with
//! systemd's rules. For every matching event the daemon calls
//! `org.freedesktop.systemd1.Manager.StartUnit(unit, "replace")` on its system bus
//! connection, from one task fed by a bounded queue, so that a slow or absent systemd
//! never delays delivery to subscribers: a full queue drops events and counts them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zbus::OwnedObjectPath;

use super::metrics::{self, Counters};
use super::unit_name::{UnitName, UnitNameError};
use super::{event_value, kind_of};
use crate::dispatch::{Consumed, ConsumerFeed, StatsChanged};
use crate::event::Record;
use crate::glob::Pattern;
use crate::logging::{CountLimit, LogLimit};
use crate::source::{Catalogue, Registry, WatchMatcher};

/// Events waiting for their units to be started.
pub const QUEUE: usize = 256;
/// How long one `StartUnit` call may take before it counts as failed.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One validated `[[units]]` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitRule {
    pub source: &'static str,
    /// Event kinds (the source's subtype names, as `SetFilter` takes them); empty: all.
    pub kinds: Vec<&'static str>,
    /// Attribute name → `*`/`?` pattern its value must match (compiled at load); a name
    /// no attribute has is looked up among the event's raw properties (uevent `KEY=value`).
    pub properties: BTreeMap<String, Pattern>,
    pub unit: UnitName,
    /// For a template: the attribute whose value is the instance.
    pub instance: Option<String>,
}

/// A `[[units]]` entry as the file spells it.
#[derive(Clone, Debug, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawUnitRule {
    pub source: Option<String>,
    pub kinds: Vec<String>,
    pub properties: BTreeMap<String, String>,
    pub unit: Option<String>,
    pub instance: Option<String>,
}

/// What is wrong with one rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnitRuleError {
    #[error("'source' is missing")]
    MissingSource,
    #[error("unknown source '{name}'; known: {known}")]
    UnknownSource { name: String, known: String },
    #[error("the {0} source reports only what a subscriber's watch names, so no rule can use it; rules can use: {1}")]
    NotSystemWide(&'static str, String),
    #[error("'{kind}' is not a kind of {of} event; kinds: {known}")]
    UnknownKind {
        of: &'static str,
        kind: String,
        known: String,
    },
    #[error("'unit' is missing")]
    MissingUnit,
    #[error("{0}")]
    BadUnit(#[from] UnitNameError),
    #[error("'{0}' is a template: 'instance' must name the event attribute that fills it in")]
    TemplateWithoutInstance(String),
    #[error("'{0}' is not a template (name@.service): it takes no 'instance'")]
    InstanceWithoutTemplate(String),
    #[error("an attribute name in 'properties' or 'instance' is empty")]
    EmptyAttribute,
}

impl UnitRule {
    /// Validates a rule against the sources this daemon has.
    pub fn from_raw(raw: RawUnitRule, sources: Catalogue<'_>) -> Result<UnitRule, UnitRuleError> {
        let name = raw.source.ok_or(UnitRuleError::MissingSource)?;
        let source = sources
            .get(&name)
            .ok_or_else(|| UnitRuleError::UnknownSource {
                name: name.clone(),
                known: sources.names().join(", "),
            })?;
        if !source.system_wide {
            return Err(UnitRuleError::NotSystemWide(
                source.name,
                system_wide_names(sources),
            ));
        }
        let kinds = raw
            .kinds
            .into_iter()
            .map(|kind| {
                source
                    .subtypes
                    .iter()
                    .copied()
                    .find(|k| *k == kind)
                    .ok_or_else(|| UnitRuleError::UnknownKind {
                        of: source.name,
                        kind,
                        known: source.subtypes.join(", "),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let unit_text = raw.unit.ok_or(UnitRuleError::MissingUnit)?;
        let unit = UnitName::parse(&unit_text)?;
        match (&raw.instance, unit.is_template()) {
            (None, true) => return Err(UnitRuleError::TemplateWithoutInstance(unit_text)),
            (Some(_), false) => return Err(UnitRuleError::InstanceWithoutTemplate(unit_text)),
            _ => {}
        }
        if raw.instance.as_deref() == Some("") || raw.properties.keys().any(String::is_empty) {
            return Err(UnitRuleError::EmptyAttribute);
        }
        Ok(UnitRule {
            source: source.name,
            kinds,
            properties: raw
                .properties
                .into_iter()
                .map(|(key, pattern)| {
                    let pattern = Pattern::new(&pattern);
                    (key, pattern)
                })
                .collect(),
            unit,
            instance: raw.instance,
        })
    }

    /// Whether `record`, of kind `kind`, is one this rule starts its unit for.
    pub fn matches(&self, record: &Record, kind: &str) -> bool {
        record.source == self.source
            && (self.kinds.is_empty() || self.kinds.contains(&kind))
            && self
                .properties
                .iter()
                .all(|(key, pattern)| event_value(record, key).is_some_and(|v| pattern.matches(&v)))
    }

    /// The unit to start for `record`.
    pub fn unit_for(&self, record: &Record) -> Result<String, UnitNameError> {
        let value = self
            .instance
            .as_deref()
            .and_then(|key| event_value(record, key));
        self.unit.instantiate(value.as_deref())
    }
}

/// The sources rules can use, for messages.
pub fn system_wide_names(sources: Catalogue<'_>) -> String {
    sources
        .iter()
        .filter(|s| s.system_wide)
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Systemd1Manager {
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
}

/// What the hub hands this consumer: records of one source that some rule matches.
#[derive(Debug)]
pub struct RulesMatcher {
    pub rules: Arc<[UnitRule]>,
    pub source: &'static str,
    pub subtypes: &'static [&'static str],
}

impl WatchMatcher for RulesMatcher {
    fn matches(&self, record: &Record) -> bool {
        let kind = kind_of(self.subtypes, record);
        record.source == self.source && self.rules.iter().any(|r| r.matches(record, kind))
    }
}

/// Starts units for the events in `feed` until the daemon stops.
pub async fn run(
    mut feed: ConsumerFeed,
    rules: Arc<[UnitRule]>,
    registry: Registry,
    conn: zbus::Connection,
    counters: Arc<Counters>,
    changed: Arc<StatsChanged>,
) {
    let systemd = match Systemd1ManagerProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
    {
        Ok(proxy) => proxy,
        Err(e) => {
            tracing::error!("unit rules: cannot make a proxy for systemd's manager: {e}; no unit will be started");
            std::future::pending::<()>().await;
            return;
        }
    };
    let mut failures: Vec<LogLimit> = rules.iter().map(|_| LogLimit::default()).collect();
    let mut losses = LogLimit::default();
    let mut drops = CountLimit::default();
    while let Some(entry) = feed.receiver.recv().await {
        let dropped = feed.take_dropped();
        if dropped > 0 {
            if let Some((dropped, suppressed)) = drops.add(dropped, Instant::now()) {
                tracing::warn!(
                    "unit rules: {dropped} event(s) dropped, the queue of units to start is full (systemd is slow or absent){}",
                    LogLimit::note(suppressed)
                );
            }
        }
        let (seq, record) = match entry {
            Consumed::Event { seq, record } => (seq, record),
            Consumed::Missed { source, reason } => {
                if let Some(suppressed) = losses.allow(Instant::now()) {
                    tracing::warn!(
                        source,
                        "unit rules: {source} events were missed ({reason}); units may not have been started for some{}",
                        LogLimit::note(suppressed)
                    );
                }
                continue;
            }
        };
        let subtypes = registry
            .get(record.source)
            .map_or(&[][..], |s| s.subtypes());
        let kind = kind_of(subtypes, &record);
        for (index, rule) in rules.iter().enumerate() {
            if !rule.matches(&record, kind) {
                continue;
            }
            let event = format!("{} {kind} {}", record.source, record.object_id);
            let result = match rule.unit_for(&record) {
                Ok(unit) => {
                    let call =
                        tokio::time::timeout(START_TIMEOUT, systemd.start_unit(&unit, "replace"))
                            .await;
                    match call {
                        Ok(Ok(job)) => {
                            tracing::info!(
                                rule = index,
                                seq,
                                "started unit {unit} for {event} (rule units[{index}], job {})",
                                job.as_str()
                            );
                            Ok(())
                        }
                        Ok(Err(e)) => Err(format!("cannot start unit {unit}: {e}")),
                        Err(_) => Err(format!(
                            "cannot start unit {unit}: no answer from systemd within {}s",
                            START_TIMEOUT.as_secs()
                        )),
                    }
                }
                Err(e) => Err(format!("no unit to start for {}: {e}", rule.unit)),
            };
            let family = if result.is_ok() {
                &metrics::UNIT_STARTS
            } else {
                &metrics::UNIT_FAILURES
            };
            counters.add(family, vec![index.to_string(), rule.unit.to_string()], 1);
            changed.touch();
            if let Err(message) = result {
                if let Some(suppressed) = failures[index].allow(Instant::now()) {
                    tracing::warn!(
                        rule = index,
                        seq,
                        "rule units[{index}]: {message} (for {event}){}",
                        LogLimit::note(suppressed)
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Attrs, Audience, Change};
    use crate::source::CATALOGUE;

    fn raw(source: &str, unit: &str, instance: Option<&str>) -> RawUnitRule {
        RawUnitRule {
            source: Some(source.into()),
            unit: Some(unit.into()),
            instance: instance.map(Into::into),
            ..RawUnitRule::default()
        }
    }

    fn usb_device(subtype: u8) -> Record {
        let mut attributes = Attrs::new();
        attributes.insert("subsystem".into(), "usb".into());
        attributes.insert("devtype".into(), "usb_device".into());
        attributes.insert("name".into(), "1-1.2".into());
        attributes.insert("devname".into(), "/dev/bus/usb/001/004".into());
        attributes.insert("major".into(), 189u32.into());
        Record {
            source: "devices",
            subtype,
            object_id: "/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.2".into(),
            change: Change::Upsert,
            attributes,
            properties: [("PRODUCT".to_owned(), "46d/c52b/1211".to_owned())].into(),
            audience: Audience::Everyone,
        }
    }

    #[test]
    fn a_rule_matches_source_kinds_and_attribute_patterns() {
        let mut spec = raw("devices", "watchq-usb@.service", Some("name"));
        spec.kinds = vec!["add".into()];
        spec.properties = [
            ("subsystem".to_owned(), "usb".to_owned()),
            ("devtype".to_owned(), "usb_*".to_owned()),
            ("major".to_owned(), "18?".to_owned()),
            ("PRODUCT".to_owned(), "46d/*".to_owned()),
        ]
        .into();
        let rule = UnitRule::from_raw(spec, CATALOGUE).unwrap();
        let add = usb_device(0);
        assert!(rule.matches(&add, "add"));
        assert!(!rule.matches(&add, "remove"), "a kind not listed");
        let mut other = usb_device(0);
        other
            .attributes
            .insert("devtype".into(), "partition".into());
        assert!(!rule.matches(&other, "add"), "a pattern that fails");
        let mut bare = usb_device(0);
        bare.properties.clear();
        assert!(!rule.matches(&bare, "add"), "a value the event lacks");
        let mut elsewhere = usb_device(0);
        elsewhere.source = "quota";
        assert!(!rule.matches(&elsewhere, "add"), "another source");
        assert_eq!(rule.unit_for(&add).unwrap(), "watchq-usb@1\\x2d1.2.service");

        // No kinds and no properties: every event of the source.
        let all = UnitRule::from_raw(
            raw("devices", "watchq-dev@.service", Some("devname")),
            CATALOGUE,
        )
        .unwrap();
        assert!(all.matches(&add, "add") && all.matches(&add, "unbind"));
        assert_eq!(
            all.unit_for(&add).unwrap(),
            "watchq-dev@dev-bus-usb-001-004.service"
        );
        let mut nameless = usb_device(0);
        nameless.attributes.remove("devname");
        assert_eq!(all.unit_for(&nameless), Err(UnitNameError::EmptyInstance));
        let plain = UnitRule::from_raw(raw("devices", "usb-seen.target", None), CATALOGUE).unwrap();
        assert_eq!(plain.unit_for(&nameless).unwrap(), "usb-seen.target");
    }

    #[test]
    fn bad_rules_are_typed_errors() {
        let check = |raw: RawUnitRule| UnitRule::from_raw(raw, CATALOGUE).unwrap_err();
        assert!(matches!(
            check(raw("toasters", "a.service", None)),
            UnitRuleError::UnknownSource { .. }
        ));
        assert!(matches!(
            check(raw("mounts", "a.service", None)),
            UnitRuleError::NotSystemWide("mounts", _)
        ));
        assert!(matches!(
            check(raw("devices", "a b.service", None)),
            UnitRuleError::BadUnit(_)
        ));
        assert!(matches!(
            check(raw("devices", "a.exe", None)),
            UnitRuleError::BadUnit(_)
        ));
        assert_eq!(
            check(raw("devices", "a@.service", None)),
            UnitRuleError::TemplateWithoutInstance("a@.service".into())
        );
        assert_eq!(
            check(raw("devices", "a.service", Some("name"))),
            UnitRuleError::InstanceWithoutTemplate("a.service".into())
        );
        let mut kinds = raw("devices", "a.service", None);
        kinds.kinds = vec!["explode".into()];
        assert!(matches!(check(kinds), UnitRuleError::UnknownKind { .. }));
        assert_eq!(check(RawUnitRule::default()), UnitRuleError::MissingSource);
        let mut no_unit = raw("devices", "", None);
        no_unit.unit = None;
        assert_eq!(check(no_unit), UnitRuleError::MissingUnit);
    }
}

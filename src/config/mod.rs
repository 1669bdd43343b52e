//! Configuration in two layers: [`RawConfig`] is what serde reads (every key optional,
//! unknown keys refused), [`Config`] is what the daemon runs with, validated by
//! `TryFrom`. A bad file stops the daemon at start with the file, the key and the
//! problem; nothing is read later.
//!
//! Sources, later ones winning: built-in defaults, the file (`/etc/watchqd/watchqd.toml`,
//! optional; or `--config PATH`, required), then `WATCHQD_<SECTION>__<KEY>` environment
//! variables (for example `WATCHQD_DELIVERY__IN_FLIGHT=32`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::consumers::journal::JournalConfig;
use crate::consumers::metrics::MetricsConfig;
use crate::consumers::units::{system_wide_names, RawUnitRule, UnitRule, UnitRuleError};
use crate::dispatch::{DeliveryConfig, Limits};
use crate::filter::Filter;
use crate::glob::Pattern;
use crate::policy::{PolicyConfig, Rule, Verdict};
use crate::source::devices::DevicesConfig;
use crate::source::mounts::MountsConfig;
use crate::source::{SourcesConfig, CATALOGUE};

pub const DEFAULT_PATH: &str = "/etc/watchqd/watchqd.toml";
pub const ENV_PREFIX: &str = "WATCHQD";

/// The `WATCHQD_<SECTION>__<KEY>` variables of the environment. A configuration key
/// always has a section, so a variable without `__` (`WATCHQD_VM_GUEST`, set by
/// tools around the daemon) is not configuration and is left alone; one with `__` that
/// names no key is an error like an unknown key in the file. Read as bytes: other
/// programs' variables may hold anything (`std::env::vars` panics on one that is not
/// UTF-8); one of ours that is not UTF-8 is an error naming it.
fn config_environment() -> Result<config::Map<String, String>, String> {
    let mut ours = config::Map::new();
    for (name, value) in std::env::vars_os() {
        let is_ours = name
            .as_encoded_bytes()
            .strip_prefix(ENV_PREFIX.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"_"))
            .is_some_and(|key| key.windows(2).any(|pair| pair == b"__"));
        if !is_ours {
            continue;
        }
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => {
                ours.insert(name, value);
            }
            (Ok(name), Err(_)) => return Err(format!("{name}: the value is not UTF-8")),
            (Err(name), _) => {
                return Err(format!("{}: the name is not UTF-8", name.to_string_lossy()))
            }
        }
    }
    Ok(ours)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: {message}")]
    Read { origin: String, message: String },
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: &'static str,
        message: String,
    },
    /// A `[[units]]` rule is wrong; `index` counts from 0 in file order.
    #[error("{origin}: units[{index}]: {error}")]
    UnitRule {
        origin: String,
        index: usize,
        error: UnitRuleError,
    },
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub delivery: RawDelivery,
    pub limits: RawLimits,
    pub policy: RawPolicy,
    pub sources: RawSources,
    pub units: Vec<RawUnitRule>,
    pub journal: RawJournal,
    pub metrics: RawMetrics,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    pub textfile: Option<bool>,
    pub directory: Option<PathBuf>,
    pub interval_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawJournal {
    pub events: Option<bool>,
    pub sources: Option<Vec<String>>,
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawDelivery {
    pub default_queue_depth: Option<u64>,
    pub max_queue_depth: Option<u64>,
    pub in_flight: Option<u64>,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub subscriptions_per_connection: Option<u64>,
    pub subscriptions_per_uid: Option<u64>,
    pub watches_per_subscription: Option<u64>,
    pub watches_per_uid: Option<u64>,
    pub filter_entries: Option<u64>,
    pub watch_spec_size: Option<u64>,
    pub trim_on_reload: Option<bool>,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicy {
    pub refuse_sandboxed: Option<bool>,
    pub rules: Vec<RawRule>,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawRule {
    pub label: Option<String>,
    pub app_id: Option<String>,
    pub sources: Vec<String>,
    pub verdict: Option<String>,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawSources {
    pub devices: RawDevices,
    pub mounts: RawMounts,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawMounts {
    pub user_cpu_percent: Option<u64>,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawDevices {
    pub receive_buffer: Option<u64>,
}

/// The validated configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub delivery: DeliveryConfig,
    pub limits: Limits,
    pub policy: PolicyConfig,
    pub sources: SourcesConfig,
    /// Rules that start systemd units on events (`[[units]]`), in file order.
    pub units: Vec<UnitRule>,
    pub journal: JournalConfig,
    pub metrics: MetricsConfig,
    /// Where the configuration came from, for messages.
    pub origin: String,
}

impl Config {
    /// Reads the configuration. `path` is the `--config` argument: when given, the file
    /// must exist; otherwise [`DEFAULT_PATH`] is read if present.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (file, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let origin = if file.exists() || required {
            format!("{} (and {ENV_PREFIX}_* environment)", file.display())
        } else {
            format!("built-in defaults (and {ENV_PREFIX}_* environment)")
        };
        let environment = config_environment().map_err(|message| ConfigError::Read {
            origin: origin.clone(),
            message,
        })?;
        let raw: RawConfig = config::Config::builder()
            .add_source(
                config::File::from(file.as_path())
                    .format(config::FileFormat::Toml)
                    .required(required),
            )
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(environment)),
            )
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| ConfigError::Read {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
        Config::validate(raw, origin)
    }

    /// Parses TOML text (for tests and `watchqd --check-config`).
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| ConfigError::Read {
                origin: origin.to_owned(),
                message: e.to_string(),
            })?;
        Config::validate(raw, origin.to_owned())
    }

    fn validate(raw: RawConfig, origin: String) -> Result<Config, ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            origin: origin.clone(),
            key,
            message,
        };
        let ranged =
            |key: &'static str, value: Option<u64>, default: usize, min: u64, max: u64| match value
            {
                None => Ok(default),
                Some(v) if (min..=max).contains(&v) => {
                    usize::try_from(v).map_err(|_| invalid(key, format!("{v} is too large")))
                }
                Some(v) => Err(invalid(
                    key,
                    format!("must be between {min} and {max}, got {v}"),
                )),
            };
        let defaults = Config::default();
        let max_queue_depth = ranged(
            "delivery.max_queue_depth",
            raw.delivery.max_queue_depth,
            defaults.delivery.max_queue_depth,
            1,
            1 << 20,
        )?;
        let default_queue_depth = ranged(
            "delivery.default_queue_depth",
            raw.delivery.default_queue_depth,
            defaults.delivery.default_queue_depth.min(max_queue_depth),
            1,
            max_queue_depth as u64,
        )?;
        let delivery = DeliveryConfig {
            default_queue_depth,
            max_queue_depth,
            in_flight: ranged(
                "delivery.in_flight",
                raw.delivery.in_flight,
                defaults.delivery.in_flight,
                2,
                65536,
            )?,
        };
        let limits = Limits {
            subscriptions_per_connection: ranged(
                "limits.subscriptions_per_connection",
                raw.limits.subscriptions_per_connection,
                defaults.limits.subscriptions_per_connection,
                1,
                65536,
            )?,
            subscriptions_per_uid: ranged(
                "limits.subscriptions_per_uid",
                raw.limits.subscriptions_per_uid,
                defaults.limits.subscriptions_per_uid,
                1,
                1 << 20,
            )?,
            watches_per_subscription: ranged(
                "limits.watches_per_subscription",
                raw.limits.watches_per_subscription,
                defaults.limits.watches_per_subscription,
                1,
                65536,
            )?,
            watches_per_uid: ranged(
                "limits.watches_per_uid",
                raw.limits.watches_per_uid,
                defaults.limits.watches_per_uid,
                1,
                1 << 20,
            )?,
            filter_entries: ranged(
                "limits.filter_entries",
                raw.limits.filter_entries,
                defaults.limits.filter_entries,
                1,
                Filter::MAX_ENTRIES as u64,
            )?,
            watch_spec_size: ranged(
                "limits.watch_spec_size",
                raw.limits.watch_spec_size,
                defaults.limits.watch_spec_size,
                16,
                1 << 20,
            )?,
            trim_on_reload: raw
                .limits
                .trim_on_reload
                .unwrap_or(defaults.limits.trim_on_reload),
        };
        let mut rules = Vec::with_capacity(raw.policy.rules.len());
        for rule in raw.policy.rules {
            let verdict = match rule.verdict.as_deref() {
                Some("deny") => Verdict::Deny,
                Some("permit") => Verdict::Permit,
                other => {
                    return Err(invalid(
                        "policy.rules.verdict",
                        format!("must be \"deny\" or \"permit\", got {other:?}"),
                    ))
                }
            };
            if rule.label.is_none() && rule.app_id.is_none() {
                return Err(invalid(
                    "policy.rules",
                    "every rule needs a label or an app_id to match".into(),
                ));
            }
            rules.push(Rule {
                label: rule.label.as_deref().map(Pattern::new),
                app_id: rule.app_id.as_deref().map(Pattern::new),
                sources: rule.sources,
                verdict,
            });
        }
        let policy = PolicyConfig {
            refuse_sandboxed: raw
                .policy
                .refuse_sandboxed
                .unwrap_or(defaults.policy.refuse_sandboxed),
            rules,
        };
        let sources = SourcesConfig {
            devices: DevicesConfig {
                receive_buffer: ranged(
                    "sources.devices.receive_buffer",
                    raw.sources.devices.receive_buffer,
                    defaults.sources.devices.receive_buffer,
                    4096,
                    1 << 30,
                )?,
            },
            mounts: MountsConfig {
                user_cpu_percent: u8::try_from(ranged(
                    "sources.mounts.user_cpu_percent",
                    raw.sources.mounts.user_cpu_percent,
                    usize::from(defaults.sources.mounts.user_cpu_percent),
                    1,
                    100,
                )?)
                .map_err(|e| invalid("sources.mounts.user_cpu_percent", e.to_string()))?,
            },
        };
        let units = raw
            .units
            .into_iter()
            .enumerate()
            .map(|(index, rule)| {
                UnitRule::from_raw(rule, CATALOGUE).map_err(|error| ConfigError::UnitRule {
                    origin: origin.clone(),
                    index,
                    error,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut journal = JournalConfig {
            events: raw.journal.events.unwrap_or(defaults.journal.events),
            socket: raw.journal.socket.unwrap_or(defaults.journal.socket),
            sources: Vec::new(),
        };
        for name in raw.journal.sources.unwrap_or_default() {
            let source = CATALOGUE
                .get(&name)
                .filter(|s| s.system_wide)
                .ok_or_else(|| {
                    invalid(
                        "journal.sources",
                        format!(
                            "'{name}' is not a source that reports on its own; journal records can be written for: {}",
                            system_wide_names(CATALOGUE)
                        ),
                    )
                })?;
            if !journal.sources.contains(&source.name) {
                journal.sources.push(source.name);
            }
        }
        if !journal.socket.is_absolute() {
            return Err(invalid(
                "journal.socket",
                format!("must be an absolute path, got {}", journal.socket.display()),
            ));
        }
        let metrics = MetricsConfig {
            textfile: raw.metrics.textfile.unwrap_or(defaults.metrics.textfile),
            directory: raw.metrics.directory.unwrap_or(defaults.metrics.directory),
            interval: match raw.metrics.interval_ms {
                None => defaults.metrics.interval,
                // Below 100 ms the file would be rewritten faster than anyone scrapes it.
                Some(ms @ 100..=86_400_000) => Duration::from_millis(ms),
                Some(ms) => {
                    return Err(invalid(
                        "metrics.interval_ms",
                        format!("must be between 100 and 86400000 (a day), got {ms}"),
                    ))
                }
            },
        };
        if !metrics.directory.is_absolute() {
            return Err(invalid(
                "metrics.directory",
                format!(
                    "must be an absolute path, got {}",
                    metrics.directory.display()
                ),
            ));
        }
        Ok(Config {
            delivery,
            limits,
            policy,
            sources,
            units,
            journal,
            metrics,
            origin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_default_file_equals_built_in_defaults() {
        let text = include_str!("../../config/watchqd.toml");
        let parsed = Config::from_toml(text, "config/watchqd.toml").unwrap();
        assert_eq!(
            Config {
                origin: String::new(),
                ..parsed
            },
            Config::default()
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[delivery]\nqueue_dpeth = 3\n", "t.toml").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("t.toml") && text.contains("queue_dpeth"),
            "{text}"
        );
    }

    #[test]
    fn out_of_range_value_names_the_key() {
        let err = Config::from_toml("[delivery]\nin_flight = 1\n", "t.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.toml: delivery.in_flight: must be between 2 and 65536, got 1"
        );
    }

    /// The mounts source's share per user: a percentage of one CPU, 1 to 100; anything
    /// else is refused naming the key, and a good value reaches the source's settings.
    #[test]
    fn the_share_of_one_users_mount_namespaces_is_checked() {
        for (value, expected) in [
            ("0", "must be between 1 and 100, got 0"),
            ("101", "must be between 1 and 100, got 101"),
            ("-5", "user_cpu_percent"),
            ("\"all\"", "user_cpu_percent"),
        ] {
            let text = format!("[sources.mounts]\nuser_cpu_percent = {value}\n");
            let err = Config::from_toml(&text, "t.toml").unwrap_err().to_string();
            assert!(err.contains(expected), "{value}: {err}");
            assert!(err.contains("t.toml"), "{value}: {err}");
        }
        let config =
            Config::from_toml("[sources.mounts]\nuser_cpu_percent = 25\n", "t.toml").unwrap();
        assert_eq!(config.sources.mounts.user_cpu_percent, 25);
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::from_toml("[limits]\nwatches_per_subscription = \"many\"\n", "t.toml")
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("watches_per_subscription"), "{text}");
        let err =
            Config::from_toml("[limits]\ntrim_on_reload = \"maybe\"\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("trim_on_reload"), "{err}");
        let config = Config::from_toml("[limits]\ntrim_on_reload = true\n", "t.toml").unwrap();
        assert!(config.limits.trim_on_reload);
    }

    #[test]
    fn policy_rules_are_read_and_checked() {
        let config = Config::from_toml(
            "[policy]\nrefuse_sandboxed = false\n\n[[policy.rules]]\nlabel = \"*:confined_t:*\"\nsources = [\"devices\"]\nverdict = \"deny\"\n\n[[policy.rules]]\napp_id = \"org.example.*\"\nverdict = \"permit\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(
            config.policy,
            PolicyConfig {
                refuse_sandboxed: false,
                rules: vec![
                    Rule {
                        label: Some("*:confined_t:*".into()),
                        app_id: None,
                        sources: vec!["devices".into()],
                        verdict: Verdict::Deny,
                    },
                    Rule {
                        label: None,
                        app_id: Some("org.example.*".into()),
                        sources: vec![],
                        verdict: Verdict::Permit,
                    },
                ],
            }
        );
        let err = Config::from_toml(
            "[[policy.rules]]\nlabel = \"x\"\nverdict = \"maybe\"\n",
            "t.toml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("policy.rules.verdict"), "{err}");
        let err =
            Config::from_toml("[[policy.rules]]\nverdict = \"deny\"\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("policy.rules"), "{err}");
        let err = Config::from_toml("[limits]\nfilter_entries = 17\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("limits.filter_entries"), "{err}");
    }

    #[test]
    fn the_documented_unit_rules_and_journal_section_parse() {
        // The commented examples of the shipped file, uncommented.
        let text = include_str!("../../config/watchqd.toml")
            .lines()
            .skip_while(|l| !l.starts_with("[journal]"))
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|l| {
                        l.starts_with('[')
                            || l.split_once(" = ").is_some_and(|(k, _)| {
                                k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                            })
                    })
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n")
            .replace("events = false", "events = true");
        let config = Config::from_toml(&text, "t.toml").unwrap();
        assert_eq!(config.units.len(), 3);
        assert_eq!(config.units[0].source, "devices");
        assert_eq!(config.units[0].kinds, vec!["add"]);
        assert_eq!(
            config.units[0].properties,
            [
                ("devtype".to_owned(), Pattern::new("usb_device")),
                ("subsystem".to_owned(), Pattern::new("usb"))
            ]
            .into()
        );
        assert_eq!(config.units[0].unit.to_string(), "watchq-usb@.service");
        assert_eq!(config.units[0].instance.as_deref(), Some("name"));
        assert_eq!(config.units[2].source, "block-errors");
        assert_eq!(config.units[2].instance, None);
        assert!(config.journal.events);
        assert_eq!(config.journal.sources, vec!["devices", "block-errors"]);
    }

    #[test]
    fn the_metrics_section_parses_and_is_checked() {
        let config = Config::from_toml(
            "[metrics]\ntextfile = true\ndirectory = \"/srv/prom\"\ninterval_ms = 100\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(
            config.metrics,
            MetricsConfig {
                textfile: true,
                directory: PathBuf::from("/srv/prom"),
                interval: Duration::from_millis(100),
            }
        );
        assert_eq!(
            Config::from_toml("", "t.toml").unwrap().metrics,
            MetricsConfig::default()
        );
        for (text, key) in [
            ("[metrics]\ninterval_ms = 0\n", "metrics.interval_ms"),
            ("[metrics]\ninterval_ms = 99\n", "metrics.interval_ms"),
            ("[metrics]\ndirectory = \"rel\"\n", "metrics.directory"),
        ] {
            let err = Config::from_toml(text, "t.toml").unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn a_bad_unit_rule_is_named_by_its_index() {
        let good = "[[units]]\nsource = \"devices\"\nunit = \"a.service\"\n\n";
        for (rule, problem) in [
            (
                "source = \"toasters\"\nunit = \"a.service\"",
                "unknown source 'toasters'",
            ),
            (
                "source = \"mounts\"\nunit = \"a.service\"",
                "reports only what a subscriber's watch names",
            ),
            (
                "source = \"devices\"\nunit = \"not a unit\"",
                "is not a valid unit name",
            ),
            (
                "source = \"devices\"\nunit = \"a@.service\"",
                "'instance' must name",
            ),
            (
                "source = \"devices\"\nunit = \"a.service\"\ninstance = \"name\"",
                "takes no 'instance'",
            ),
            (
                "source = \"devices\"\nkinds = [\"explode\"]\nunit = \"a.service\"",
                "'explode' is not a kind of devices event",
            ),
            ("unit = \"a.service\"", "'source' is missing"),
            ("source = \"devices\"", "'unit' is missing"),
        ] {
            let err =
                Config::from_toml(&format!("{good}[[units]]\n{rule}\n"), "t.toml").unwrap_err();
            assert!(
                matches!(err, ConfigError::UnitRule { index: 1, .. }),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(
                text.starts_with("t.toml: units[1]: ") && text.contains(problem),
                "{text}"
            );
        }
        let err = Config::from_toml(
            "[[units]]\nsource = \"devices\"\nunit = \"a.service\"\ncolour = \"red\"\n",
            "t.toml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = Config::from_toml("[journal]\nsources = [\"keys\"]\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("journal.sources"), "{err}");
        let err =
            Config::from_toml("[journal]\nsocket = \"journal.sock\"\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("journal.socket"), "{err}");
    }

    #[test]
    fn default_depth_may_not_exceed_maximum() {
        let err = Config::from_toml(
            "[delivery]\nmax_queue_depth = 8\ndefault_queue_depth = 9\n",
            "t.toml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("delivery.default_queue_depth"));
    }
}

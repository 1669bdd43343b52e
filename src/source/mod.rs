//! The contract every event source implements, and the registry of sources.
//!
//! A source is one module under `src/source/` that implements [`EventSource`] and is
//! listed once, in `builtin_sources!` below. From that one list come both the static
//! [`CATALOGUE`] (names, subtypes and reach, which configuration and filters are checked
//! against without building a source) and [`Registry::builtin`] (the live sources, which
//! the daemon builds). The core never opens a source nobody watches:
//! [`EventSource::open`] is called when the first watch on it is added, and the stream it
//! returns (with every fd it owns) is dropped when the last watch goes. The exception is
//! a source one of the daemon's own consumers names (a unit rule, journal records; see
//! [`crate::consumers`]): it is opened at start and stays open.

pub mod blockerr;
pub mod devices;
pub mod filesystems;
pub mod keys;
pub mod mounts;
pub mod quota;
pub mod space;
pub mod spec;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use zbus::OwnedVariant;

use crate::error::Error;
use crate::event::{Object, Record, SourceMsg};
use crate::policy::{Identity, Scope};
pub use spec::SpecReader;

/// A watch specification as a caller sent it: `a{sv}`.
pub type WatchSpec = HashMap<String, OwnedVariant>;

/// The records of a running source. Dropping it stops the source and closes its fds.
pub type SourceStream = Pin<Box<dyn Stream<Item = SourceMsg> + Send>>;

/// Whether a source works on this kernel, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Availability {
    Available,
    /// Works fully, by one of the means the source can use; the note says which and
    /// why (devices: udev's group because udevd runs), and `Sources` shows it.
    Via(String),
    /// Works, by a weaker means than the source's own interface (which this kernel
    /// lacks); the note says what is missing and what is lost, and `Sources` shows it.
    Degraded(String),
    Unavailable(String),
}

/// Decides whether one record concerns one watch. Built by the source from a
/// [`WatchSpec`], so the core never interprets source-specific keys.
pub trait WatchMatcher: Send + Sync + std::fmt::Debug {
    fn matches(&self, record: &Record) -> bool;

    /// The one key a record must have ([`EventSource::index_key`]) for this watch to
    /// match it, when there is one (a device name without wildcards): the hub then keeps
    /// the watch in an index and visits it only for records with that key. A watch that
    /// returns a key must never match a record whose key differs.
    fn index_key(&self) -> Option<&str> {
        None
    }

    /// The kernel object this watch is bound to, for watches that end when it goes (a
    /// key, a mount namespace): a [`SourceMsg::WatchedObjectGone`] naming it removes the
    /// watch with `WatchRemoved`.
    fn watched_object(&self) -> Option<&str> {
        None
    }

    /// For sources whose table holds the contents of several watched objects (each mount
    /// namespace's mounts): whether `object` is in what this watch covers. A
    /// subscription's snapshot then holds only objects some of its watches cover. `None`
    /// (the default) means the watch does not divide the table.
    fn covers(&self, _object: &Object) -> Option<bool> {
        None
    }
}

/// Kernel state a watch holds while it exists (a key watch, a namespace mark): dropping it
/// releases that state.
pub type WatchHold = Box<dyn Send + Sync>;

/// A watch ready to be taken: its matcher, and what it holds in the kernel.
pub struct ArmedWatch {
    pub matcher: Box<dyn WatchMatcher>,
    pub hold: Option<WatchHold>,
    /// Called once the hub holds the watch, outside its lock: from then on the watch
    /// receives what the source publishes. A source that reports a watch's initial
    /// state does it from here, never from a timer, which a loaded machine lets fire
    /// while the hub has not taken the watch yet (and the report would reach no one).
    pub installed: Option<WatchInstalled>,
}

/// See [`ArmedWatch::installed`].
pub type WatchInstalled = Box<dyn FnOnce() + Send>;

type Arm = Box<dyn FnOnce() -> Result<ArmedWatch, Error> + Send>;

/// What a source made of a watch request: the [`Scope`] policy must allow before anything
/// happens, and how to arm the watch once policy allowed it and the source runs.
///
/// Arming is separate because some watches change kernel state on the subscriber's behalf
/// (`KEYCTL_WATCH_KEY` with the subscriber's credentials, a fanotify mark on its mount
/// namespace), which must not happen for a request policy refuses. It may block briefly
/// (a helper process), so the hub runs it off the async workers and outside its lock.
pub struct PlannedWatch {
    pub scope: Scope,
    arm: Arm,
}

impl PlannedWatch {
    /// A watch that needs nothing from the kernel beyond the running source.
    pub fn ready(scope: Scope, matcher: Box<dyn WatchMatcher>) -> Self {
        PlannedWatch {
            scope,
            arm: Box::new(move || {
                Ok(ArmedWatch {
                    matcher,
                    hold: None,
                    installed: None,
                })
            }),
        }
    }

    /// A watch armed by `arm`, called after [`EventSource::open`] on the running source.
    pub fn armed_by(
        scope: Scope,
        arm: impl FnOnce() -> Result<ArmedWatch, Error> + Send + 'static,
    ) -> Self {
        PlannedWatch {
            scope,
            arm: Box::new(arm),
        }
    }

    pub fn arm(self) -> Result<ArmedWatch, Error> {
        (self.arm)()
    }
}

impl std::fmt::Debug for PlannedWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlannedWatch")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

pub trait EventSource: Send + Sync + 'static {
    /// The name clients use (`"devices"`), also the event type in filters.
    fn name(&self) -> &'static str;

    /// Subtype names; a subtype's number is its index here. Never reorder: numbers are
    /// part of the interface.
    fn subtypes(&self) -> &'static [&'static str];

    /// The source's event signal, defined in its folder (`signal.rs`) and listed in
    /// [`CATALOGUE`]: how its records are encoded for the bus.
    fn signal(&self) -> &'static crate::signal::SignalKind;

    /// Whether the open source reports every event of its kind on the system by itself
    /// (device uevents, block errors, quota warnings), so that the daemon's own consumers
    /// (unit rules, journal records) receive events with no subscriber's watch. Sources
    /// that report only what a watch names (a path, a mount namespace, a key) say no.
    fn system_wide(&self) -> bool {
        false
    }

    /// Probes the kernel. Called once at start; must not keep anything open.
    fn probe(&self) -> Availability;

    /// The source's availability now, given what [`EventSource::probe`] said at start:
    /// the same, unless the means it works by can change while it runs (devices: udev's
    /// group or the kernel's, as udevd starts or stops).
    fn availability(&self, probed: &Availability) -> Availability {
        probed.clone()
    }

    /// Named counters of what the source did that a person may want to know (shown by
    /// `watchqctl status`); none by default.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// The daemon's CPU time spent sending `record` to one subscriber (building its
    /// signal and writing it to the bus), told by the bus layer after each send. A
    /// source that holds users to a share of the daemon's time charges it to them;
    /// others ignore it.
    fn delivered(&self, _record: &Record, _cost: std::time::Duration) {}

    /// Whether this source wants [`EventSource::delivered`] told what each delivery
    /// cost. Timing one reads the thread's CPU clock on both sides (a syscall each; with
    /// a `gettid` each too, it was a tenth of what a signal cost the daemon); a source
    /// that charges no one spares every delivery of its records that.
    fn charges_deliveries(&self) -> bool {
        false
    }

    /// Validates a watch specification from `requester` (as the bus identified it; never
    /// from the message body) and says what scope it covers and how to arm it.
    fn parse_watch(&self, spec: &WatchSpec, requester: &Identity) -> Result<PlannedWatch, Error>;

    /// The current objects, read from the kernel (used for snapshots while the source is
    /// stopped, and to seed its object table when it starts).
    fn scan(&self) -> std::io::Result<Vec<Object>>;

    /// Opens the kernel interface and returns the stream of records.
    fn open(&self) -> std::io::Result<SourceStream>;

    /// The key a record is looked up by among watches that give one
    /// ([`WatchMatcher::index_key`]), for sources whose watches name objects exactly.
    fn index_key<'r>(&self, _record: &'r Record) -> Option<&'r str> {
        None
    }

    fn subtype_index(&self, name: &str) -> Option<u8> {
        subtype_number(self.subtypes(), name)
    }

    /// Applies `[sources.*]` as a reload found them: each source takes what is its own,
    /// live (an open kernel socket's buffer resized, a share changed from the next
    /// charge on). Nothing by default: a source with no settings has nothing to apply.
    fn reconfigure(&self, _config: &SourcesConfig) {}

    /// Messages dropped at the edge because they did not come from the kernel (a forged
    /// netlink message), since the daemon started; 0 for a source that cannot receive
    /// any. Read by the metrics.
    fn forged_rejected(&self) -> u64 {
        0
    }
}

/// A subtype's number: its index among the source's subtypes.
fn subtype_number(subtypes: &[&str], name: &str) -> Option<u8> {
    subtypes
        .iter()
        .position(|s| *s == name)
        .and_then(|i| u8::try_from(i).ok())
}

/// What is known of a source without building it: what configuration, filters,
/// messages and signal decoders (clients, `watchqctl`) need.
#[derive(Clone, Copy, Debug)]
pub struct SourceInfo {
    /// [`EventSource::name`].
    pub name: &'static str,
    /// [`EventSource::subtypes`].
    pub subtypes: &'static [&'static str],
    /// [`EventSource::system_wide`].
    pub system_wide: bool,
    /// [`EventSource::signal`].
    pub signal: &'static crate::signal::SignalKind,
    /// How the daemon's journal records write its events (the module's `JOURNAL`).
    pub journal: &'static JournalIds,
}

/// How the daemon's journal records (`[journal]`, [`crate::consumers`]) write a source's
/// events: each source's module has one, as `JOURNAL`.
#[derive(Clone, Copy, Debug)]
pub struct JournalIds {
    /// The `MESSAGE_ID` of each subtype (subtype, id): a fixed 128-bit id, so that a log
    /// shipper can match events without parsing text. Never change one.
    pub message_ids: &'static [(&'static str, &'static str)],
    /// The syslog priority of a subtype.
    pub priority: fn(&str) -> u8,
}

impl JournalIds {
    /// Info (6), the priority of what is neither an error nor a warning.
    pub const INFO: fn(&str) -> u8 = |_| 6;

    /// No `MESSAGE_ID`s, priority info: a source that reports only what a watch names.
    pub const NONE: JournalIds = JournalIds {
        message_ids: &[],
        priority: JournalIds::INFO,
    };

    /// The `MESSAGE_ID` of `subtype`.
    pub fn message_id(&self, subtype: &str) -> Option<&'static str> {
        self.message_ids
            .iter()
            .find(|(name, _)| *name == subtype)
            .map(|(_, id)| *id)
    }
}

/// Signals compare by member: a signal kind's functions are not comparable; the journal
/// ids are not part of what a source says of itself.
impl PartialEq for SourceInfo {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.subtypes == other.subtypes
            && self.system_wide == other.system_wide
            && self.signal.member == other.signal.member
    }
}

impl Eq for SourceInfo {}

impl SourceInfo {
    fn of(source: &dyn EventSource) -> Self {
        SourceInfo {
            name: source.name(),
            subtypes: source.subtypes(),
            system_wide: source.system_wide(),
            signal: source.signal(),
            journal: CATALOGUE
                .get(source.name())
                .map_or(&JournalIds::NONE, |known| known.journal),
        }
    }

    pub fn subtype_index(&self, name: &str) -> Option<u8> {
        subtype_number(self.subtypes, name)
    }
}

/// A list of sources as [`SourceInfo`]s, in the registry's order: the built-in
/// [`CATALOGUE`], or a [`Registry`]'s own ([`Registry::catalogue`]).
#[derive(Clone, Copy, Debug)]
pub struct Catalogue<'a>(&'a [SourceInfo]);

impl<'a> Catalogue<'a> {
    pub fn get(self, name: &str) -> Option<&'a SourceInfo> {
        self.0.iter().find(|s| s.name == name)
    }

    pub fn iter(self) -> std::slice::Iter<'a, SourceInfo> {
        self.0.iter()
    }

    pub fn names(self) -> Vec<&'static str> {
        self.0.iter().map(|s| s.name).collect()
    }
}

/// What building the sources takes from the configuration (`[sources.*]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourcesConfig {
    pub devices: devices::DevicesConfig,
    pub mounts: mounts::MountsConfig,
}

/// Makes [`CATALOGUE`], the constructor behind [`Registry::builtin`] and
/// `with_interface_items!` from one list: per source, its module (which has `NAME`,
/// `SUBTYPES`, `JOURNAL`, `signal::KIND` and `signal::interface_items!`), whether it is
/// system-wide ([`EventSource::system_wide`]; a unit test checks that the two agree) and
/// how to build it from the [`SourcesConfig`] named after `($)` (the token the macro
/// needs to write the macro it makes).
macro_rules! builtin_sources {
    (($d:tt) $config:ident; $($module:ident, system_wide: $wide:literal, $build:expr;)+) => {
        /// Every built-in source, in the order `Sources` lists them.
        pub const CATALOGUE: Catalogue<'static> = Catalogue(&[$(SourceInfo {
            name: $module::NAME,
            subtypes: $module::SUBTYPES,
            system_wide: $wide,
            signal: &$module::signal::KIND,
            journal: &$module::JOURNAL,
        }),+]);

        fn build_builtin($config: &SourcesConfig) -> Vec<Arc<dyn EventSource>> {
            vec![$(Arc::new($build)),+]
        }

        /// Hands every built-in source's items of the subscription interface (its
        /// signal's `#[zbus(signal)]` declaration and its paragraph of `AddWatch`'s
        /// documentation, both from its `signal.rs`), in catalogue order, to the macro
        /// named (see `crate::signal::gather_interface!`).
        macro_rules! with_interface_items {
            ($d($d callback:tt)*) => {
                crate::signal::gather_interface! {
                    [$d($d callback)*] [] []
                    $( crate::source::$module::signal::interface_items; )+
                }
            };
        }
        pub(crate) use with_interface_items;
    };
}

// One line per source.
builtin_sources! { ($) config;
    devices, system_wide: true, devices::Devices::new(&config.devices);
    blockerr, system_wide: true, blockerr::BlockErrors::new();
    quota, system_wide: true, quota::Quota::new();
    filesystems, system_wide: true, filesystems::Filesystems::new();
    space, system_wide: false, space::Space::new();
    mounts, system_wide: false, mounts::Mounts::with_config(&config.mounts);
    keys, system_wide: false, keys::Keys::new();
}

/// The signal kind whose member is `member`, among the built-in sources' signals (for
/// what decodes signals without a registry: clients, `watchqctl`).
pub fn signal_named(member: &str) -> Option<&'static crate::signal::SignalKind> {
    CATALOGUE
        .iter()
        .map(|source| source.signal)
        .find(|kind| kind.member == member)
}

/// The sources this daemon runs, in a fixed order.
#[derive(Clone)]
pub struct Registry {
    sources: Vec<Arc<dyn EventSource>>,
    catalogue: Vec<SourceInfo>,
}

impl Registry {
    /// Every source built into the daemon ([`CATALOGUE`]'s), built for `config`.
    pub fn builtin(config: &SourcesConfig) -> Self {
        Self::from_sources(build_builtin(config))
    }

    pub fn from_sources(sources: Vec<Arc<dyn EventSource>>) -> Self {
        let catalogue = sources.iter().map(|s| SourceInfo::of(&**s)).collect();
        Registry { sources, catalogue }
    }

    /// What these sources are, as [`CATALOGUE`] says of the built-in ones.
    pub fn catalogue(&self) -> Catalogue<'_> {
        Catalogue(&self.catalogue)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn EventSource>> {
        self.sources.iter().find(|s| s.name() == name)
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.sources.iter().position(|s| s.name() == name)
    }

    /// Hands every source the `[sources.*]` a reload read ([`EventSource::reconfigure`]).
    pub fn reconfigure(&self, config: &SourcesConfig) {
        for source in &self.sources {
            source.reconfigure(config);
        }
    }

    pub fn all(&self) -> &[Arc<dyn EventSource>] {
        &self.sources
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.sources.iter().map(|s| s.name()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The catalogue says of every built-in source what the source says of itself.
    #[test]
    fn the_catalogue_agrees_with_the_sources() {
        let registry = Registry::builtin(&SourcesConfig::default());
        assert_eq!(
            registry.catalogue().iter().as_slice(),
            CATALOGUE.iter().as_slice()
        );
    }
}

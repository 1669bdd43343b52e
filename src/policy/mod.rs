//! Who may subscribe, set which watch, and see which event: the one place where those
//! decisions are made.
//!
//! The model is data plus two pure functions, deny by default:
//! - [`decide`] rules on a request (subscribing, or watching a source at a [`Scope`]) for
//!   a caller [`Identity`], with the configuration's label and app-id [`Rule`]s. It
//!   answers allow, deny, or "ask polkit for this action"; [`WATCH_RULES`] is the table
//!   of (source, scope) → polkit action, mirrored by `polkit/org.watchq1.policy`.
//! - [`may_see`] rules on each event for each watch at publish time, from the event's
//!   [`Audience`] (the event owner), the subscriber and the [`Grant`] its watch holds.
//!   It runs for every event whatever the watch-time answer was.
//!
//! The I/O around them is in [`identity`] (who the caller is, from the bus and /proc at
//! subscribe time; never from message bodies) and [`authority`] (polkit behind a small
//! trait that fails closed, with the per-connection cache). A [`Grant`] can only be
//! made here, and the hub takes no watch without one.

pub mod authority;
pub mod flatpak_info;
pub mod identity;

use crate::error::Error;
use crate::event::Audience;
use crate::glob::Pattern;

pub use authority::{Answer, Authority, Authorizer, Polkit};
pub use identity::{Identity, Sandbox, SandboxKind};

/// The session-bus service sandboxed applications are sent to: `watchq-portal`
/// (`src/portal/`), whose well-known name this is.
pub const PORTAL_NAME: &str = "org.freedesktop.portal.Watchq";

/// What part of a source a watch covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// The caller's own objects (its keys, its mount namespace, its quota).
    Own,
    /// Objects of other users or other processes.
    Others,
    /// Everything of that kind on the system.
    System,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Own, Scope::Others, Scope::System];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Own => "own",
            Scope::Others => "others",
            Scope::System => "system",
        }
    }
}

/// One line of the watch table: who may watch `source` at `scope` is polkit's `action`.
/// `admin` says the action is meant for administrators; only a grant from such an action
/// (or root) lets a subscriber see other users' and administrators' events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchRule {
    pub source: &'static str,
    pub scope: Scope,
    pub action: &'static str,
    pub admin: bool,
}

const fn rule(source: &'static str, scope: Scope, action: &'static str, admin: bool) -> WatchRule {
    WatchRule {
        source,
        scope,
        action,
        admin,
    }
}

/// Every watch anyone but root may ask for. A (source, scope) pair that is not here is
/// refused to everyone but root. Sources that are not built yet are listed so that
/// their actions ship with the policy file from the start.
pub const WATCH_RULES: &[WatchRule] = &[
    // Device uevents are multicast by the kernel to every local process anyway.
    rule("devices", Scope::System, "org.watchq1.watch-devices", false),
    rule(
        "block-errors",
        Scope::System,
        "org.watchq1.watch-block-errors",
        true,
    ),
    rule("keys", Scope::Own, "org.watchq1.watch-own-keys", false),
    rule("keys", Scope::Others, "org.watchq1.watch-other-keys", true),
    rule("mounts", Scope::Own, "org.watchq1.watch-own-mounts", false),
    rule(
        "mounts",
        Scope::Others,
        "org.watchq1.watch-other-mounts",
        true,
    ),
    rule(
        "filesystems",
        Scope::System,
        "org.watchq1.watch-filesystems",
        true,
    ),
    rule("quota", Scope::Own, "org.watchq1.watch-own-quota", false),
    rule("quota", Scope::System, "org.watchq1.watch-all-quota", true),
    rule("space", Scope::Own, "org.watchq1.watch-space", false),
];

pub fn watch_rule(source: &str, scope: Scope) -> Option<&'static WatchRule> {
    WATCH_RULES
        .iter()
        .find(|r| r.source == source && r.scope == scope)
}

/// What a configuration rule does to a matching caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Refuse the request.
    Deny,
    /// Lift the refusal of sandboxed callers; polkit still decides every watch.
    Permit,
}

/// A configuration rule (`[[policy.rules]]`): matches callers by security label and/or
/// sandboxed app id (`*` and `?` wildcards, compiled when the configuration is loaded),
/// optionally only for some sources. The first rule that matches a request decides its
/// verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub label: Option<Pattern>,
    pub app_id: Option<Pattern>,
    /// Watch kinds the rule applies to; empty means every request, Subscribe included.
    pub sources: Vec<String>,
    pub verdict: Verdict,
}

impl Rule {
    fn matches(&self, caller: &Identity, source: Option<&str>) -> bool {
        let label = match &self.label {
            None => true,
            Some(pattern) => caller.label.as_deref().is_some_and(|l| pattern.matches(l)),
        };
        let app = match &self.app_id {
            None => true,
            Some(pattern) => caller
                .sandbox
                .as_ref()
                .and_then(|s| s.app_id.as_deref())
                .is_some_and(|a| pattern.matches(a)),
        };
        let applies =
            self.sources.is_empty() || source.is_some_and(|s| self.sources.iter().any(|r| r == s));
        label && app && applies
    }
}

/// The policy part of the configuration (`[policy]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Refuse Flatpak and snap applications (and callers whose process cannot be
    /// inspected) on the system bus, sending them to the portal.
    pub refuse_sandboxed: bool,
    pub rules: Vec<Rule>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            refuse_sandboxed: true,
            rules: Vec::new(),
        }
    }
}

/// A request as policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// Creating a subscription (and taking a snapshot through the Manager).
    Subscribe,
    /// Setting a watch on (or taking a snapshot of) `source` at `scope`.
    Watch { source: &'a str, scope: Scope },
}

impl Request<'_> {
    fn source(&self) -> Option<&str> {
        match self {
            Request::Subscribe => None,
            Request::Watch { source, .. } => Some(source),
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// A Flatpak or snap application.
    Sandboxed(String),
    /// The calling process could not be inspected, so it might be sandboxed.
    Uninspectable(String),
    /// A configuration rule said no.
    Rule(usize),
    /// No rule lets anyone but root make this request.
    RootOnly,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Allowed if polkit authorizes this action for the caller.
    Ask(&'static WatchRule),
}

/// The one decision function for requests. Order: configuration rules (which may deny
/// anyone, root included, or permit a sandboxed caller), then the refusal of sandboxed
/// callers, then root (whom polkit always authorizes), then the watch table.
pub fn decide(
    config: &PolicyConfig,
    caller: &Identity,
    request: Request<'_>,
) -> Result<Decision, Denial> {
    let verdict = config
        .rules
        .iter()
        .enumerate()
        .find(|(_, r)| r.matches(caller, request.source()));
    if let Some((index, rule)) = verdict {
        if rule.verdict == Verdict::Deny {
            return Err(Denial::Rule(index));
        }
    }
    let permitted = verdict.is_some_and(|(_, r)| r.verdict == Verdict::Permit);
    if config.refuse_sandboxed && !permitted {
        if let Some(sandbox) = &caller.sandbox {
            return Err(match sandbox.kind {
                SandboxKind::Unknown => Denial::Uninspectable(sandbox.describe()),
                SandboxKind::Flatpak | SandboxKind::Snap => Denial::Sandboxed(sandbox.describe()),
            });
        }
    }
    let Request::Watch { source, scope } = request else {
        return Ok(Decision::Allow);
    };
    if caller.uid == 0 {
        return Ok(Decision::Allow);
    }
    match watch_rule(source, scope) {
        Some(rule) => Ok(Decision::Ask(rule)),
        None => Err(Denial::RootOnly),
    }
}

/// A watch policy allowed: the only thing the hub takes a watch with. Only this module
/// makes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    caller: String,
    source: String,
    scope: Scope,
    /// Granted to root, or through an administrator action.
    elevated: bool,
    /// The policy epoch it was decided in ([`Authorizer::epoch`]): a grant from an
    /// older epoch is re-authorized.
    epoch: u64,
}

impl Grant {
    fn new(caller: &Identity, source: &str, scope: Scope, elevated: bool, epoch: u64) -> Grant {
        Grant {
            caller: caller.unique_name.clone(),
            source: source.to_owned(),
            scope,
            elevated,
            epoch,
        }
    }

    /// The policy epoch the grant was decided in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The connection it was granted to.
    pub fn caller(&self) -> &str {
        &self.caller
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }
}

/// Whether a subscriber may receive one event through one of its watches. Pure and
/// independent of how the watch was granted beyond what the grant records: an event
/// about another user, or one for administrators, needs root or an administrator
/// action covering that scope; the grant's source must be the event's.
pub fn may_see(subscriber: &Identity, grant: &Grant, source: &str, audience: Audience) -> bool {
    if grant.source != source || grant.caller != subscriber.unique_name {
        return false;
    }
    let root = subscriber.uid == 0;
    match audience {
        Audience::Everyone => true,
        Audience::Owner(uid) => {
            uid == subscriber.uid || root || (grant.elevated && grant.scope != Scope::Own)
        }
        Audience::Administrators => root || (grant.elevated && grant.scope == Scope::System),
    }
}

/// Turns a denial into the error the caller receives.
pub fn denial_error(caller: &Identity, request: Request<'_>, denial: &Denial) -> Error {
    let what = match request {
        Request::Subscribe => "subscribing".to_owned(),
        Request::Watch { source, scope } => format!("watching {source} ({} scope)", scope.as_str()),
    };
    match denial {
        Denial::Sandboxed(who) => Error::Sandboxed(format!(
            "{who}: sandboxed applications are not served on the system bus; \
             use the {PORTAL_NAME} portal on the session bus"
        )),
        Denial::Uninspectable(why) => Error::AccessDenied(format!(
            "{what} is refused: {why}; watchqd must see the caller's process to tell \
             whether it is sandboxed"
        )),
        Denial::Rule(index) => Error::AccessDenied(format!(
            "{what} is denied to uid {} by rule {} of [policy] in the configuration",
            caller.uid,
            index + 1
        )),
        Denial::RootOnly => Error::AccessDenied(format!("{what} is allowed to root only")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32) -> Identity {
        Identity::new(format!(":1.{uid}"), uid)
    }

    fn flatpak(uid: u32, app: &str) -> Identity {
        Identity {
            sandbox: Some(Sandbox {
                kind: SandboxKind::Flatpak,
                app_id: Some(app.into()),
            }),
            ..caller(uid)
        }
    }

    /// What a local user (uid 1000, not sandboxed) gets for each source at the scopes
    /// own, others and system: the polkit action asked, or `None` where only root may
    /// watch. Written out by hand, not derived from [`WATCH_RULES`] or [`watch_rule`],
    /// so that a change to either shows here.
    const USER_GRID: [(&str, [Option<&str>; 3]); 8] = [
        ("devices", [None, None, Some("org.watchq1.watch-devices")]),
        (
            "block-errors",
            [None, None, Some("org.watchq1.watch-block-errors")],
        ),
        (
            "keys",
            [
                Some("org.watchq1.watch-own-keys"),
                Some("org.watchq1.watch-other-keys"),
                None,
            ],
        ),
        (
            "mounts",
            [
                Some("org.watchq1.watch-own-mounts"),
                Some("org.watchq1.watch-other-mounts"),
                None,
            ],
        ),
        (
            "filesystems",
            [None, None, Some("org.watchq1.watch-filesystems")],
        ),
        (
            "quota",
            [
                Some("org.watchq1.watch-own-quota"),
                None,
                Some("org.watchq1.watch-all-quota"),
            ],
        ),
        ("space", [Some("org.watchq1.watch-space"), None, None]),
        ("unknown-future-source", [None, None, None]),
    ];

    /// The whole request grid with the default configuration: every source × scope ×
    /// caller kind, against the table above.
    #[test]
    fn request_grid() {
        let config = PolicyConfig::default();
        let (root, user, app, root_app) = (
            caller(0),
            caller(1000),
            flatpak(1000, "org.example.App"),
            flatpak(0, "org.example.App"),
        );
        for who in [&root, &user] {
            assert_eq!(
                decide(&config, who, Request::Subscribe),
                Ok(Decision::Allow)
            );
        }
        for who in [&app, &root_app] {
            assert!(matches!(
                decide(&config, who, Request::Subscribe),
                Err(Denial::Sandboxed(_))
            ));
        }
        for (source, actions) in USER_GRID {
            for (scope, action) in Scope::ALL.into_iter().zip(actions) {
                let request = Request::Watch { source, scope };
                assert_eq!(decide(&config, &root, request), Ok(Decision::Allow));
                for who in [&app, &root_app] {
                    assert!(matches!(
                        decide(&config, who, request),
                        Err(Denial::Sandboxed(_))
                    ));
                }
                let asked = match decide(&config, &user, request) {
                    Ok(Decision::Ask(rule)) => {
                        assert_eq!((rule.source, rule.scope), (source, scope), "{rule:?}");
                        Some(rule.action)
                    }
                    Err(Denial::RootOnly) => None,
                    other => panic!("{request:?}: {other:?}"),
                };
                assert_eq!(asked, action, "{request:?}");
            }
        }
        // What a local user is asked for, and which actions are for administrators.
        let asked: Vec<(&str, Scope, bool)> = WATCH_RULES
            .iter()
            .map(|r| (r.source, r.scope, r.admin))
            .collect();
        assert_eq!(
            asked,
            [
                ("devices", Scope::System, false),
                ("block-errors", Scope::System, true),
                ("keys", Scope::Own, false),
                ("keys", Scope::Others, true),
                ("mounts", Scope::Own, false),
                ("mounts", Scope::Others, true),
                ("filesystems", Scope::System, true),
                ("quota", Scope::Own, false),
                ("quota", Scope::System, true),
                ("space", Scope::Own, false),
            ]
        );
    }

    #[test]
    fn configuration_rules_match_label_and_app_id_first_match_wins() {
        let mut labelled = caller(1000);
        labelled.label = Some("system_u:system_r:confined_t:s0".into());
        let config = PolicyConfig {
            refuse_sandboxed: true,
            rules: vec![
                Rule {
                    label: Some("*:confined_t:*".into()),
                    app_id: None,
                    sources: vec!["devices".into()],
                    verdict: Verdict::Deny,
                },
                Rule {
                    label: None,
                    app_id: Some("org.trusted.*".into()),
                    sources: vec![],
                    verdict: Verdict::Permit,
                },
                Rule {
                    label: None,
                    app_id: Some("*".into()),
                    sources: vec![],
                    verdict: Verdict::Deny,
                },
            ],
        };
        let devices = Request::Watch {
            source: "devices",
            scope: Scope::System,
        };
        assert_eq!(decide(&config, &labelled, devices), Err(Denial::Rule(0)));
        // The rule names devices only: subscribing is still allowed.
        assert_eq!(
            decide(&config, &labelled, Request::Subscribe),
            Ok(Decision::Allow)
        );
        // No label: the label rule never matches.
        assert!(matches!(
            decide(&config, &caller(1000), devices),
            Ok(Decision::Ask(_))
        ));
        // A permitted app still goes to polkit; other apps hit the catch-all deny.
        let trusted = flatpak(1000, "org.trusted.Viewer");
        assert!(matches!(
            decide(&config, &trusted, devices),
            Ok(Decision::Ask(_))
        ));
        assert_eq!(
            decide(&config, &flatpak(1000, "org.other.App"), Request::Subscribe),
            Err(Denial::Rule(2))
        );
        // Rules can refuse root too.
        let mut confined_root = caller(0);
        confined_root.label = Some("system_u:system_r:confined_t:s0".into());
        assert_eq!(
            decide(&config, &confined_root, devices),
            Err(Denial::Rule(0))
        );
        // Sandboxed callers are served only when the configuration says so.
        let open = PolicyConfig {
            refuse_sandboxed: false,
            rules: vec![],
        };
        assert!(matches!(
            decide(&open, &flatpak(1000, "x"), devices),
            Ok(Decision::Ask(_))
        ));
    }

    /// Every subscriber × grant × audience: who sees an event.
    #[test]
    fn visibility_grid() {
        let (root, alice, bob) = (caller(0), caller(1000), caller(1001));
        let audiences = [
            Audience::Everyone,
            Audience::Owner(1000),
            Audience::Owner(1001),
            Audience::Administrators,
        ];
        // (scope, elevated) → expected visibility for [root, alice, bob] per audience.
        type Row = [[bool; 3]; 4];
        let grid: [((Scope, bool), Row); 6] = [
            (
                (Scope::Own, false),
                [
                    [true, true, true],
                    [true, true, false],
                    [true, false, true],
                    [true, false, false],
                ],
            ),
            (
                (Scope::Own, true),
                [
                    [true, true, true],
                    [true, true, false],
                    [true, false, true],
                    [true, false, false],
                ],
            ),
            (
                (Scope::Others, false),
                [
                    [true, true, true],
                    [true, true, false],
                    [true, false, true],
                    [true, false, false],
                ],
            ),
            (
                (Scope::Others, true),
                [
                    [true, true, true],
                    [true, true, true],
                    [true, true, true],
                    [true, false, false],
                ],
            ),
            (
                (Scope::System, false),
                [
                    [true, true, true],
                    [true, true, false],
                    [true, false, true],
                    [true, false, false],
                ],
            ),
            (
                (Scope::System, true),
                [
                    [true, true, true],
                    [true, true, true],
                    [true, true, true],
                    [true, true, true],
                ],
            ),
        ];
        for ((scope, elevated), rows) in grid {
            for (audience, expected) in audiences.iter().zip(rows) {
                let got = [&root, &alice, &bob].map(|who| {
                    let grant = Grant::new(who, "src", scope, elevated || who.uid == 0, 0);
                    may_see(who, &grant, "src", *audience)
                });
                assert_eq!(got, expected, "{scope:?} elevated={elevated} {audience:?}");
            }
        }
    }

    #[test]
    fn a_grant_is_bound_to_its_connection_and_source() {
        let alice = caller(1000);
        let grant = Grant::new(&alice, "devices", Scope::System, false, 0);
        assert!(may_see(&alice, &grant, "devices", Audience::Everyone));
        assert!(!may_see(&alice, &grant, "block-errors", Audience::Everyone));
        let other_connection = Identity::new(":1.9999".into(), 1000);
        assert!(!may_see(
            &other_connection,
            &grant,
            "devices",
            Audience::Everyone
        ));
    }

    /// The table and the shipped polkit file name the same actions, and the file's
    /// defaults keep administrator actions from anyone who is not authenticated as one.
    #[test]
    fn polkit_file_matches_the_table() {
        let text = include_str!("../../polkit/org.watchq1.policy");
        let actions: Vec<&str> = text
            .split("<action id=\"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .collect();
        let mut table: Vec<&str> = WATCH_RULES.iter().map(|r| r.action).collect();
        let mut listed = actions.clone();
        table.sort_unstable();
        listed.sort_unstable();
        assert_eq!(table, listed);
        for rule in WATCH_RULES {
            let block = text
                .split(&format!("<action id=\"{}\">", rule.action))
                .nth(1)
                .and_then(|s| s.split("</action>").next())
                .expect("action block");
            let yes = block.matches(">yes<").count();
            if rule.admin {
                assert_eq!(yes, 0, "{} must not default to yes", rule.action);
                assert!(block.contains("<allow_any>auth_admin</allow_any>"));
            } else {
                assert_eq!(yes, 3, "{} must default to yes", rule.action);
            }
        }
    }

    #[test]
    fn a_process_that_cannot_be_inspected_is_refused_but_not_sent_to_the_portal() {
        let mut hidden = caller(1000);
        hidden.sandbox = Some(Sandbox {
            kind: SandboxKind::Unknown,
            app_id: Some("cannot read /proc/42/cgroup".into()),
        });
        let denial = decide(&PolicyConfig::default(), &hidden, Request::Subscribe).unwrap_err();
        assert!(matches!(denial, Denial::Uninspectable(_)));
        assert!(matches!(
            denial_error(&hidden, Request::Subscribe, &denial),
            Error::AccessDenied(_)
        ));
    }

    /// Every source the daemon registers has a polkit action: a new source cannot ship
    /// without its policy (it would be root-only until then).
    #[test]
    fn every_registered_source_has_a_policy() {
        for name in crate::source::CATALOGUE.names() {
            assert!(
                WATCH_RULES.iter().any(|r| r.source == name),
                "no action for {name}"
            );
        }
    }
}

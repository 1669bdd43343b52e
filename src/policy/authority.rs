//! polkit behind a small trait, and the [`Authorizer`] that turns [`super::decide`]'s
//! answers into [`Grant`]s.
//!
//! Fails closed: polkitd unreachable, slow (beyond [`Authorizer::TIMEOUT`]), or answering
//! something unexpected means no. A challenge (`auth_admin` with no agent; watchqd never
//! asks for interaction) is a refusal. Definite answers are cached per (connection,
//! action) until the connection leaves or the policy may have changed (a reload, or
//! polkitd's `Changed` signal: [`Authorizer::set_config`], [`Authorizer::changed`]);
//! failures are not cached, so a polkitd that comes back is asked again.
//!
//! Each such change starts a new *epoch*. Every [`Grant`] records the epoch it was
//! decided in, an answer is cached only if no change happened while polkit was asked,
//! and the bus layer re-authorizes every live watch whose grant is from an older epoch.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use zbus::{Connection, Variant};

use super::{decide, denial_error, Decision, Grant, Identity, PolicyConfig, Request, Scope};
use crate::error::Error;

/// polkit's answer for one subject and action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Authorized,
    /// Authorized only after authentication, which watchqd never asks for.
    Challenge,
    NotAuthorized,
}

pub type Checked<'a> = Pin<Box<dyn Future<Output = Result<Answer, String>> + Send + 'a>>;

/// Something that answers "may this bus connection do this action?".
pub trait Authority: Send + Sync {
    /// `subject` is the caller's unique bus name.
    fn check<'a>(&'a self, subject: &'a str, action: &'a str) -> Checked<'a>;
}

/// `org.freedesktop.PolicyKit1.Authority.CheckAuthorization` with a `system-bus-name`
/// subject and no user interaction.
pub struct Polkit {
    conn: Connection,
}

impl Polkit {
    pub fn new(conn: Connection) -> Polkit {
        Polkit { conn }
    }
}

impl Authority for Polkit {
    fn check<'a>(&'a self, subject: &'a str, action: &'a str) -> Checked<'a> {
        Box::pin(async move {
            let subject_details = HashMap::from([("name", Variant::from(subject))]);
            let details: HashMap<&str, &str> = HashMap::new();
            let reply = self
                .conn
                .call_method(
                    Some("org.freedesktop.PolicyKit1"),
                    "/org/freedesktop/PolicyKit1/Authority",
                    Some("org.freedesktop.PolicyKit1.Authority"),
                    "CheckAuthorization",
                    &(
                        ("system-bus-name", subject_details),
                        action,
                        details,
                        0u32,
                        "",
                    ),
                )
                .await
                .map_err(|e| e.to_string())?;
            let (authorized, challenge, _details): (bool, bool, HashMap<String, String>) =
                reply.body().deserialize().map_err(|e| e.to_string())?;
            Ok(match (authorized, challenge) {
                (true, _) => Answer::Authorized,
                (false, true) => Answer::Challenge,
                (false, false) => Answer::NotAuthorized,
            })
        })
    }
}

/// The policy decisions of one daemon: configuration, polkit, and the cache.
pub struct Authorizer {
    authority: Box<dyn Authority>,
    state: Mutex<State>,
}

/// What changes together: the configuration, the epoch and the answers of that epoch.
struct State {
    config: Arc<PolicyConfig>,
    epoch: u64,
    cache: HashMap<(String, &'static str), Answer>,
}

impl Authorizer {
    /// The longest a watch request waits for polkit before it is refused.
    pub const TIMEOUT: Duration = Duration::from_secs(10);

    pub fn new(config: PolicyConfig, authority: Box<dyn Authority>) -> Authorizer {
        Authorizer {
            authority,
            state: Mutex::new(State {
                config: Arc::new(config),
                epoch: 0,
                cache: HashMap::new(),
            }),
        }
    }

    pub fn config(&self) -> Arc<PolicyConfig> {
        Arc::clone(&self.lock().config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current policy epoch; grants from older ones are to be re-authorized.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Takes a new configuration (a reload): a new epoch, every cached answer dropped.
    pub fn set_config(&self, config: PolicyConfig) -> u64 {
        let mut state = self.lock();
        state.config = Arc::new(config);
        state.cache.clear();
        state.epoch += 1;
        state.epoch
    }

    /// polkit's rules or actions may have changed: a new epoch, every cached answer
    /// dropped.
    pub fn changed(&self) -> u64 {
        let mut state = self.lock();
        state.cache.clear();
        state.epoch += 1;
        state.epoch
    }

    /// May this caller subscribe (or use the Manager's snapshot)?
    pub fn subscribe(&self, caller: &Identity) -> Result<(), Error> {
        let request = Request::Subscribe;
        let result = match decide(&self.config(), caller, request) {
            Ok(_) => Ok(()),
            Err(denial) => Err(denial_error(caller, request, &denial)),
        };
        log_decision(caller, "subscribe", &result);
        result
    }

    /// Authorizes a watch of `source` at `scope`, asking polkit when the table says so.
    /// `live` tells whether the caller's connection still holds state here; an answer is
    /// remembered only then (checked under the cache lock, see [`Authorizer::forget`]).
    pub async fn watch(
        &self,
        caller: &Identity,
        source: &str,
        scope: Scope,
        live: impl Fn() -> bool,
    ) -> Result<Grant, Error> {
        let result = self.judge_watch(caller, source, scope, live).await;
        let what = format!("watch {source} ({} scope)", scope.as_str());
        log_decision(caller, &what, &result);
        result
    }

    async fn judge_watch(
        &self,
        caller: &Identity,
        source: &str,
        scope: Scope,
        live: impl Fn() -> bool,
    ) -> Result<Grant, Error> {
        let request = Request::Watch { source, scope };
        let (config, epoch) = {
            let state = self.lock();
            (Arc::clone(&state.config), state.epoch)
        };
        let rule = match decide(&config, caller, request) {
            Ok(Decision::Allow) => return Ok(Grant::new(caller, source, scope, true, epoch)),
            Ok(Decision::Ask(rule)) => rule,
            Err(denial) => return Err(denial_error(caller, request, &denial)),
        };
        let key = (caller.unique_name.clone(), rule.action);
        let cached = self.lock().cache.get(&key).copied();
        let answer = match cached {
            Some(answer) => answer,
            None => {
                let checked = tokio::time::timeout(
                    Self::TIMEOUT,
                    self.authority.check(&caller.unique_name, rule.action),
                )
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {:?}", Self::TIMEOUT)));
                let answer = checked.map_err(|e| {
                    Error::AccessDenied(format!(
                        "cannot ask polkit whether uid {} may {} ({e}); refusing",
                        caller.uid, rule.action
                    ))
                })?;
                let mut state = self.lock();
                // An answer from before a change is used for this request (whose grant
                // carries the old epoch and is checked again) but not remembered.
                if live() && state.epoch == epoch {
                    state.cache.insert(key, answer);
                }
                answer
            }
        };
        match answer {
            Answer::Authorized => Ok(Grant::new(caller, source, scope, rule.admin, epoch)),
            Answer::Challenge => Err(Error::AccessDenied(format!(
                "watching {source} ({} scope) needs {}, which requires an administrator's \
                 authentication; watchqd does not ask for it: an administrator can grant \
                 the action with a polkit rule",
                scope.as_str(),
                rule.action
            ))),
            Answer::NotAuthorized => Err(Error::AccessDenied(format!(
                "polkit does not authorize uid {} for {} (watching {source}, {} scope)",
                caller.uid,
                rule.action,
                scope.as_str()
            ))),
        }
    }

    /// Forgets a connection's decisions when it leaves the bus. Callers first drop the
    /// connection's state, so that a check still in flight sees `live() == false`.
    pub fn forget(&self, unique_name: &str) {
        self.lock().cache.retain(|(name, _), _| name != unique_name);
    }

    /// Cached decisions, for tests and status.
    pub fn cached(&self) -> usize {
        self.lock().cache.len()
    }
}

/// Every decision at debug level, with the caller's security label as the daemon saw it
/// (from the bus's `LinuxSecurityLabel`, else the process's `attr/current`).
fn log_decision<T>(caller: &Identity, what: &str, result: &Result<T, Error>) {
    let label = caller.label.as_deref().unwrap_or("");
    match result {
        Ok(_) => tracing::debug!(
            caller = %caller.unique_name, uid = caller.uid, label, request = what,
            "policy: allowed"
        ),
        Err(e) => tracing::debug!(
            caller = %caller.unique_name, uid = caller.uid, label, request = what,
            "policy: refused: {e}"
        ),
    }
}

//! `watchq-portal`: the session-bus portal through which sandboxed apps (and the user's
//! own programs) get the device events they may have, `org.freedesktop.portal.Watchq`.
//!
//! One process per user, on the session bus, D-Bus activated. An app calls
//! `CreateSession`; the portal identifies it ([`app_info`]), checks what it declared,
//! subscribes to watchqd on the system bus *as the user* (so watchqd's polkit policy
//! applies to the user as to any client), and sends the app unicast `DeviceEvents`: the
//! current devices first, then changes, with opaque ids and a fixed whitelist of
//! properties ([`devices`]). The app's sessions end when it leaves the bus.
//!
//! Layers: [`interface`] is the bus shim (it parses and delegates), [`session`] runs a
//! session, [`devices`] is the pure translation; [`Portal`] holds the sessions.

pub mod app_info;
pub mod devices;
pub mod error;
pub mod interface;
pub mod permissions;
pub mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use zbus::fdo::DBusProxy;
use zbus::names::OwnedUniqueName;
use zbus::Connection;

use error::PortalError;

/// The portal's well-known name on the session bus. Under `org.freedesktop.portal.*`
/// because Flatpak's bus proxy lets every app talk to those names and no others.
pub const BUS_NAME: &str = "org.freedesktop.portal.Watchq";
/// The portal object.
pub const PATH: &str = "/org/freedesktop/portal/watchq";
/// The portal object's interface.
pub const INTERFACE: &str = "org.freedesktop.portal.Watchq";
/// Sessions one connection may hold at once: each costs a subscription on watchqd,
/// which counts them against the user's own limit too.
pub const MAX_SESSIONS_PER_CONNECTION: usize = 8;

/// Why a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Its owner called `Close`: no `Closed` signal (the owner knows).
    Asked,
    /// Its owner left the bus: nobody to tell.
    OwnerLeft,
    /// The portal ended it (watchqd refused or went away for good): `Closed` is sent.
    Ended,
}

/// A live session, as the portal keeps it.
struct Entry {
    owner: OwnedUniqueName,
    /// The app's id; "" for an unsandboxed program, which the store does not govern.
    app: String,
    stop: tokio::sync::oneshot::Sender<Ending>,
}

/// The portal's state: its two connections and the live sessions by object path.
pub struct Portal {
    pub session_bus: Connection,
    pub system_bus: Connection,
    sessions: Mutex<HashMap<String, Entry>>,
}

impl Portal {
    #[must_use]
    pub fn new(session_bus: Connection, system_bus: Connection) -> Arc<Portal> {
        Arc::new(Portal {
            session_bus,
            system_bus,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves the map itself consistent: go on.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reserves `path` for `owner` within the per-connection limit; the returned
    /// receiver tells the session's task when to end.
    ///
    /// # Errors
    /// `InvalidArgument` if the path is taken, `NotAllowed` over the limit.
    fn reserve(
        &self,
        path: &str,
        owner: &OwnedUniqueName,
        app: &str,
    ) -> Result<tokio::sync::oneshot::Receiver<Ending>, PortalError> {
        let mut sessions = self.sessions();
        if sessions.contains_key(path) {
            return Err(PortalError::InvalidArgument(format!(
                "session_handle_token already names a live session ({path})"
            )));
        }
        if sessions.values().filter(|e| e.owner == *owner).count() >= MAX_SESSIONS_PER_CONNECTION {
            return Err(PortalError::NotAllowed(format!(
                "a connection may hold {MAX_SESSIONS_PER_CONNECTION} sessions at once; close one first"
            )));
        }
        let (stop, ended) = tokio::sync::oneshot::channel();
        sessions.insert(
            path.to_owned(),
            Entry {
                owner: owner.clone(),
                app: app.to_owned(),
                stop,
            },
        );
        Ok(ended)
    }

    /// The owner of a live session.
    fn owner_of(&self, path: &str) -> Option<OwnedUniqueName> {
        self.sessions().get(path).map(|e| e.owner.clone())
    }

    /// Ends a session: its task closes the watchqd subscription and the object.
    pub fn end(&self, path: &str, ending: Ending) {
        if let Some(entry) = self.sessions().remove(path) {
            // The task may have ended on its own a moment ago: nothing left to stop.
            let _ = entry.stop.send(ending);
        }
    }

    /// Forgets a session whose task ended on its own.
    fn forget(&self, path: &str) {
        self.sessions().remove(path);
    }

    /// Ends the sessions of every connection that leaves the session bus. Runs for the
    /// portal's life.
    ///
    /// # Errors
    /// When the bus's `NameOwnerChanged` stream cannot be had or ends.
    pub async fn reap_departed(self: Arc<Self>) -> zbus::Result<()> {
        let dbus = DBusProxy::new(&self.session_bus).await?;
        let mut changes = dbus.receive_name_owner_changed().await?;
        while let Some(change) = changes.next().await {
            let Ok(args) = change.args() else { continue };
            if args.new_owner().is_some() || !args.name().starts_with(':') {
                continue;
            }
            let gone: Vec<String> = self
                .sessions()
                .iter()
                .filter(|(_, e)| e.owner.as_str() == args.name().as_str())
                .map(|(path, _)| path.clone())
                .collect();
            for path in gone {
                tracing::debug!(session = path, owner = %args.name(), "owner left the bus");
                self.end(&path, Ending::OwnerLeft);
            }
        }
        Err(zbus::Error::Failure("NameOwnerChanged stream ended".into()))
    }
}

impl Portal {
    /// Closes, with `Closed`, the sessions of every app the permission store no longer
    /// lets see devices, whenever the store says its `watchq` table changed. The
    /// signal only says when to look: anyone may send one, so the store is asked.
    /// Runs for the portal's life.
    ///
    /// # Errors
    /// When the signal stream cannot be had or ends.
    pub async fn close_revoked(self: Arc<Self>) -> zbus::Result<()> {
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(permissions::STORE)
            .interface(permissions::STORE)
            .member("Changed")
            .arg(0, permissions::TABLE)
            .build()?;
        let mut changes =
            zbus::MessageStream::for_match_rule(rule, &self.session_bus, None).await?;
        while let Some(change) = changes.next().await {
            if change.is_err() {
                continue;
            }
            let apps: std::collections::BTreeSet<String> = self
                .sessions()
                .values()
                .filter(|e| !e.app.is_empty())
                .map(|e| e.app.clone())
                .collect();
            if apps.is_empty() {
                continue;
            }
            let store = permissions::PermissionStoreProxy::new(&self.session_bus).await?;
            for app in apps {
                let answer = permissions::stored(&store, session::DEVICES, &app).await;
                if matches!(answer, Ok(permissions::Answer::Yes)) {
                    continue;
                }
                // Revoked, reset, or the store cannot say: fail closed.
                let revoked: Vec<String> = self
                    .sessions()
                    .iter()
                    .filter(|(_, e)| e.app == app)
                    .map(|(path, _)| path.clone())
                    .collect();
                for path in revoked {
                    tracing::info!(session = path, app, ?answer, "permission withdrawn");
                    self.end(&path, Ending::Ended);
                }
            }
        }
        Err(zbus::Error::Failure(
            "permission store Changed stream ended".into(),
        ))
    }
}

/// Serves the portal until a task ends: the object first, then the name, as the zbus
/// book orders it (a call that arrives with the name is served).
///
/// # Errors
/// When the name cannot be had or a bus connection fails.
pub async fn run(portal: Arc<Portal>) -> zbus::Result<()> {
    portal
        .session_bus
        .object_server()
        .at(
            PATH,
            interface::WatchqObject {
                portal: Arc::clone(&portal),
            },
        )
        .await?;
    let reaper = tokio::spawn(Arc::clone(&portal).reap_departed());
    let revoker = tokio::spawn(Arc::clone(&portal).close_revoked());
    portal.session_bus.request_name(BUS_NAME).await?;
    tracing::info!(name = BUS_NAME, "serving");
    tokio::select! {
        ended = reaper => match ended {
            Ok(result) => result,
            Err(e) => Err(zbus::Error::Failure(format!("reaper task: {e}"))),
        },
        ended = revoker => match ended {
            Ok(result) => result,
            Err(e) => Err(zbus::Error::Failure(format!("revocation task: {e}"))),
        },
        _ = terminated() => Ok(()),
    }
}

/// SIGTERM (systemd's stop) or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        // Without a SIGTERM handler the default action ends the process anyway.
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

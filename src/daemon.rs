//! The supervisor: connects, serves, owns the name, tells systemd, reloads the
//! configuration on SIGHUP, and stops cleanly when any of its tasks ends or on
//! SIGTERM/SIGINT.
//!
//! A reload speaks systemd's notify-reload protocol (`RELOADING=1` with
//! `MONOTONIC_USEC`, then `READY=1`), so `Type=notify-reload` (systemd 253) can drive
//! it; on older systemd the unit's `ExecReload=` sends SIGHUP. A configuration that
//! does not validate is refused whole: the log and `STATUS=` name the file and the key,
//! and the daemon runs on with what it had.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};
use zbus::fdo::{RequestNameFlags, RequestNameReply};

use crate::bus::{Service, BUS_NAME};
use crate::config::Config;
use crate::consumers::metrics;
use crate::dispatch::Hub;
use crate::source::{Availability, Registry};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot connect to the system bus ({address}): {source}")]
    Connect {
        address: String,
        source: zbus::Error,
    },
    #[error("cannot serve objects: {0}")]
    Serve(zbus::Error),
    #[error("cannot own the name {BUS_NAME}: {0} (is the bus policy file org.watchq1.conf installed, and is the daemon running as root?)")]
    OwnName(zbus::Error),
    #[error("the name {BUS_NAME} is already owned by another process")]
    NameTaken,
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    TaskEnded(String),
}

/// The bus address the daemon and watchqctl connect to: `DBUS_SYSTEM_BUS_ADDRESS` like
/// every system-bus client, else the standard socket.
pub fn system_bus_address() -> String {
    std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .unwrap_or_else(|_| "unix:path=/run/dbus/system_bus_socket".to_owned())
}

/// Runs the daemon with `config`, read from `path` (the `--config` argument), which a
/// reload reads again.
pub async fn run(config: Config, path: Option<PathBuf>) -> Result<(), DaemonError> {
    let address = system_bus_address();
    let conn = zbus::connection::Builder::address(address.as_str())
        .build()
        .await
        .map_err(|source| DaemonError::Connect {
            address: address.clone(),
            source,
        })?;

    // The daemon builds the sources; configuration knows them only by the catalogue.
    let registry = Registry::builtin(&config.sources);
    let hub = Hub::new(registry, config.delivery.clone(), config.limits.clone());
    let sources = hub.sources();
    // The source's name is in the message text too: journald shows MESSAGE alone, and
    // the structured SOURCE= field only to those who ask for it.
    for source in &sources {
        let name = source.name;
        match &source.availability {
            Availability::Available => tracing::info!(source = name, "source {name} available"),
            Availability::Via(note) => {
                tracing::info!(source = name, "source {name} available: {note}");
            }
            Availability::Degraded(note) => {
                tracing::warn!(source = name, "source {name} available, degraded: {note}");
            }
            Availability::Unavailable(why) => {
                tracing::warn!(source = name, "source {name} unavailable: {why}");
            }
        }
    }
    // The unit rules and the metrics consumer count into these; Manager.Metrics and
    // the text file render them with the hub's own figures.
    let counters = Arc::new(metrics::Counters::default());
    let render: crate::bus::MetricsText = {
        let (hub, counters) = (Arc::clone(&hub), Arc::clone(&counters));
        Box::new(move || counters.text(&hub).to_string())
    };
    let service = Service::serve(&conn, Arc::clone(&hub), config.policy.clone(), render)
        .await
        .map_err(DaemonError::Serve)?;
    let mut reaper = tokio::spawn(Arc::clone(&service).reap_departed());
    let mut reauthorizer = tokio::spawn(Arc::clone(&service).reauthorize_on_changes());
    let mut consumers = crate::consumers::Consumers::start(
        &config.units,
        &config.journal,
        &config.metrics,
        &counters,
        &hub,
        &conn,
    );

    // Before READY=1: from then on systemd may send SIGHUP (a reload), whose default
    // action would end the daemon.
    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let reply = conn
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
        .map_err(DaemonError::OwnName)?;
    if reply != RequestNameReply::PrimaryOwner && reply != RequestNameReply::AlreadyOwner {
        return Err(DaemonError::NameTaken);
    }
    let available = sources
        .iter()
        .filter(|s| !matches!(s.availability, Availability::Unavailable(_)))
        .count();
    let status = format!(
        "Serving {BUS_NAME}; {available} of {} sources available",
        sources.len()
    );
    tracing::info!(config = %config.origin, address = %address, "{status}");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);

    let mut watchdog = tokio::spawn(watchdog(conn.clone(), Arc::clone(&hub)));
    let mut running = Running {
        config,
        path,
        status,
        hub: Arc::clone(&hub),
        service: Arc::clone(&service),
        conn: conn.clone(),
        counters,
    };
    let result = loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM: stopping"); break Ok(()) }
            _ = interrupt.recv() => { tracing::info!("SIGINT: stopping"); break Ok(()) }
            _ = hangup.recv() => running.reload(&mut consumers).await,
            ended = &mut reaper => break Err(DaemonError::TaskEnded(format!("the connection watcher stopped: {ended:?}"))),
            ended = &mut reauthorizer => break Err(DaemonError::TaskEnded(format!("the re-authorization task stopped: {ended:?}"))),
            ended = &mut watchdog => break Err(DaemonError::TaskEnded(format!("the watchdog task stopped: {ended:?}"))),
            ended = consumers.ended() => break Err(DaemonError::TaskEnded(ended)),
        }
    };
    notify(&[NotifyState::Stopping]);
    reaper.abort();
    reauthorizer.abort();
    watchdog.abort();
    // Bounded: a wedged connection must not keep the daemon from stopping.
    if tokio::time::timeout(Duration::from_secs(2), conn.release_name(BUS_NAME))
        .await
        .is_err()
    {
        tracing::warn!("the bus did not answer ReleaseName within 2 s; stopping all the same");
    }
    result
}

/// What a reload compares with and applies to.
struct Running {
    /// The configuration in effect.
    config: Config,
    path: Option<PathBuf>,
    /// The `STATUS=` of a daemon serving normally.
    status: String,
    hub: Arc<Hub>,
    service: Arc<Service>,
    conn: zbus::Connection,
    /// What the unit rules and the metrics count into, kept across reloads.
    counters: Arc<metrics::Counters>,
}

impl Running {
    /// Reads the configuration again and applies it, each part live: `[delivery]` (for
    /// subscriptions made from now on) and `[limits]`, `[policy]` (every live watch
    /// re-authorized), `[[units]]`, `[journal]` and `[metrics]` (consumers replaced,
    /// their sources opened or closed), `[sources.*]` (each source takes its own). A
    /// configuration that does not validate changes nothing.
    async fn reload(&mut self, consumers: &mut crate::consumers::Consumers) {
        let mut reloading = vec![NotifyState::Reloading];
        reloading.extend(NotifyState::monotonic_usec_now().ok());
        notify(&reloading);
        tracing::info!("SIGHUP: reloading the configuration");
        let new = match Config::load(self.path.as_deref()) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!("reload refused, the previous configuration stays in effect: {e}");
                let status = format!(
                    "{}; reload refused: {e}; the previous configuration stays in effect",
                    self.status
                );
                notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                return;
            }
        };
        let old = &self.config;
        let mut applied = Vec::new();
        if new.sources != old.sources {
            self.hub.registry().reconfigure(&new.sources);
            applied.push("[sources]");
        }
        if new.delivery != old.delivery || new.limits != old.limits {
            self.hub
                .set_settings(new.delivery.clone(), new.limits.clone());
            applied.push("[delivery] and [limits]");
        }
        if new.limits.trim_on_reload {
            let ended = self.hub.trim_to_limits("limit-lowered").await;
            if ended > 0 {
                tracing::info!(
                    "{ended} watches over the limits ended (limits.trim_on_reload = true)"
                );
            }
        }
        if new.units != old.units || new.journal != old.journal || new.metrics != old.metrics {
            consumers
                .replace(
                    &new.units,
                    &new.journal,
                    &new.metrics,
                    &self.counters,
                    &self.hub,
                    &self.conn,
                )
                .await;
            // The consumers are replaced together; the line names the sections that
            // replaced them (tests and administrators read it).
            applied.push(if new.metrics != old.metrics {
                "[[units]], [journal] and [metrics]"
            } else {
                "[[units]] and [journal]"
            });
        }
        if new.policy != old.policy {
            applied.push("[policy]");
        }
        // Always: a reload is also how an administrator asks for every grant to be
        // checked again (group memberships, say, which polkit does not signal).
        self.service.set_policy(new.policy.clone());
        self.config = new;
        let changed = if applied.is_empty() {
            "nothing changed but policy is checked again".to_owned()
        } else {
            format!("applied {}", applied.join(", "))
        };
        tracing::info!(config = %self.config.origin, "configuration reloaded: {changed}");
        notify(&[NotifyState::Ready, NotifyState::Status(&self.status)]);
    }
}

fn notify(states: &[NotifyState<'_>]) {
    // Not running under systemd is normal; there is nothing to tell then.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Pings systemd's watchdog at half the configured interval, if one is configured, and
/// only while the daemon works: the hub's state can be taken and the bus answers. A
/// deadlock or a dead bus connection thus ends in systemd killing and restarting the
/// daemon (`Restart=on-failure`), not in a daemon that looks alive and delivers nothing.
async fn watchdog(conn: zbus::Connection, hub: Arc<Hub>) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        std::future::pending::<()>().await;
    }
    let interval = Duration::from_micros(usec / 2);
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        match healthy(&conn, &hub, interval / 2).await {
            Ok(()) => notify(&[NotifyState::Watchdog]),
            Err(why) => tracing::error!("not pinging the watchdog: {why}"),
        }
    }
}

async fn healthy(conn: &zbus::Connection, hub: &Arc<Hub>, within: Duration) -> Result<(), String> {
    // On a blocking thread: if the lock is held forever, only that thread waits.
    let hub = Arc::clone(hub);
    tokio::time::timeout(within, tokio::task::spawn_blocking(move || hub.sources()))
        .await
        .map_err(|_| format!("the hub's state was not free within {within:?}"))?
        .map_err(|e| format!("the hub check failed: {e}"))?;
    let ping = conn.call_method(
        Some("org.freedesktop.DBus"),
        "/org/freedesktop/DBus",
        Some("org.freedesktop.DBus.Peer"),
        "Ping",
        &(),
    );
    tokio::time::timeout(within, ping)
        .await
        .map_err(|_| format!("the bus did not answer a Ping within {within:?}"))?
        .map_err(|e| format!("the bus connection failed: {e}"))?;
    Ok(())
}

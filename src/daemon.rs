//! The supervisor: connects, serves, owns the name, tells systemd, and stops cleanly
//! when any of its tasks ends or on SIGTERM/SIGINT.

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

pub async fn run(config: Config) -> Result<(), DaemonError> {
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
        Box::new(move || metrics::render(&hub.stats(), &counters))
    };
    let service = Service::serve(&conn, Arc::clone(&hub), config.policy.clone(), render)
        .await
        .map_err(DaemonError::Serve)?;
    let mut reaper = tokio::spawn(Arc::clone(&service).reap_departed());
    let mut consumers = crate::consumers::Consumers::start(
        &config.units,
        &config.journal,
        &config.metrics,
        &counters,
        &hub,
        &conn,
    );

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
    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let result = tokio::select! {
        _ = terminate.recv() => { tracing::info!("SIGTERM: stopping"); Ok(()) }
        _ = interrupt.recv() => { tracing::info!("SIGINT: stopping"); Ok(()) }
        ended = &mut reaper => Err(DaemonError::TaskEnded(format!("the connection watcher stopped: {ended:?}"))),
        ended = &mut watchdog => Err(DaemonError::TaskEnded(format!("the watchdog task stopped: {ended:?}"))),
        ended = consumers.ended() => Err(DaemonError::TaskEnded(ended)),
    };
    notify(&[NotifyState::Stopping]);
    reaper.abort();
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

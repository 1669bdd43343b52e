//! `watchq-portal`: the per-user session-bus portal through which sandboxed apps get
//! the device events they may have (`org.freedesktop.portal.Watchq`; see
//! `watchqd::portal`). Started by D-Bus activation or its `systemd --user` unit.
//! Environment: `DBUS_SESSION_BUS_ADDRESS`, `DBUS_SYSTEM_BUS_ADDRESS` (optional),
//! `RUST_LOG`.

use std::process::ExitCode;

use watchqd::portal::{self, Portal};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    watchqd::logging::init("info");
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> zbus::Result<()> {
    let session_bus = zbus::Connection::session().await?;
    // As the user: watchqd's policy applies to the user, as to any of its clients.
    let system_bus = watchqd::client::connect(None).await?;
    portal::run(Portal::new(session_bus, system_bus)).await
}

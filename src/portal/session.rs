//! A session: the app identified and checked, a watchqd subscription made for it as
//! the user, and a task that turns watchqd's device events into the app's
//! `DeviceEvents`: the snapshot first, then every event numbered after it; after a loss
//! or a restart of watchqd, `Lost` and the snapshot again.

use std::collections::HashMap;
use std::sync::Arc;

use zbus::names::OwnedUniqueName;
use zbus::ObjectPath;
use zbus::{Connection, OwnedVariant};

use super::app_info::{self, AppInfo};
use super::devices::{self, DeviceEvent, Known};
use super::error::PortalError;
use super::interface::{unicast, SessionObject, WatchqObject};
use super::{Ending, Portal};
use crate::client::{self, Item, ReceivedObject, Subscription, SubscriptionProxy};
use crate::source::devices::signal::DeviceChanged;

/// The only source the portal offers so far.
pub const DEVICES: &str = "devices";

/// The session object's path for `owner` and `token`, as portals build it.
#[must_use]
pub fn path_for(owner: &str, token: &str) -> String {
    let sender = owner.trim_start_matches(':').replace('.', "_");
    format!("{}/session/{sender}/{token}", super::PATH)
}

/// Creates a session for `owner`.
///
/// # Errors
/// `NotAllowed` for an app that did not declare the source or cannot be identified, or
/// when watchqd refuses the user; `Failed` when watchqd cannot be reached.
pub async fn create(
    portal: &Arc<Portal>,
    owner: &OwnedUniqueName,
    token: &str,
) -> Result<zbus::OwnedObjectPath, PortalError> {
    let dbus = zbus::fdo::DBusProxy::new(&portal.session_bus).await?;
    let app = app_info::of_peer(&dbus, owner).await?;
    app.declared(DEVICES)?;
    let path = path_for(owner, token);
    if let AppInfo::Flatpak { app_id, .. } = &app {
        let request = path.replacen("/session/", "/request/", 1);
        super::permissions::check(&portal.session_bus, app_id, DEVICES, &request).await?;
    }
    let object_path = zbus::OwnedObjectPath::try_from(path.clone())
        .map_err(|e| PortalError::InvalidArgument(format!("session path {path}: {e}")))?;
    let stop = portal.reserve(&path, owner, app.id())?;
    let subscription = match subscribe(&portal.system_bus, &app).await {
        Ok(s) => s,
        Err(e) => {
            portal.forget(&path);
            return Err(e);
        }
    };
    let object = SessionObject {
        portal: Arc::clone(portal),
        path: path.clone(),
    };
    if let Err(e) = portal
        .session_bus
        .object_server()
        .at(path.as_str(), object)
        .await
    {
        portal.forget(&path);
        return Err(e.into());
    }
    tracing::info!(session = path, owner = %owner, app = app.id(), "session created");
    let task = Task {
        portal: Arc::clone(portal),
        path: path.clone(),
        owner: owner.clone(),
        known: Known::default(),
    };
    tokio::spawn(task.run(subscription, stop));
    Ok(object_path)
}

/// The watchqd subscription of a session: block disks and USB devices, which the
/// session narrows further ([`devices::view`]).
async fn subscribe(system: &Connection, app: &AppInfo) -> Result<Subscription, PortalError> {
    let watch = |subsystem: &str, devtype: &str| -> HashMap<String, OwnedVariant> {
        HashMap::from([
            (
                "subsystem".to_owned(),
                OwnedVariant::from(zbus::Str::from(subsystem.to_owned())),
            ),
            (
                "devtype".to_owned(),
                OwnedVariant::from(zbus::Str::from(devtype.to_owned())),
            ),
        ])
    };
    let mut builder = Subscription::builder(system)
        .watch(DEVICES, 1, watch("block", "disk"))
        .watch(DEVICES, 2, watch("usb", "usb_device"));
    if let AppInfo::Flatpak { app_id, .. } = app {
        builder = builder.option(
            "app-id",
            OwnedVariant::from(zbus::Str::from(app_id.clone())),
        );
    }
    builder.build().await.map_err(|e| match e {
        zbus::Error::MethodError(name, message, _)
            if name.as_str() == "org.watchq1.Error.AccessDenied" =>
        {
            PortalError::NotAllowed(format!(
                "watchqd refused this user: {}",
                message.unwrap_or_default()
            ))
        }
        other => PortalError::Failed(format!("watchqd: {other}")),
    })
}

/// A session's running state.
struct Task {
    portal: Arc<Portal>,
    path: String,
    owner: OwnedUniqueName,
    known: Known,
}

impl Task {
    async fn run(
        mut self,
        mut sub: Subscription,
        mut stop: tokio::sync::oneshot::Receiver<Ending>,
    ) {
        let ending = tokio::select! {
            ending = &mut stop => ending.unwrap_or(Ending::Ended),
            ending = self.serve(&mut sub) => {
                self.portal.forget(&self.path);
                ending
            }
        };
        tracing::info!(session = self.path, ?ending, "session closed");
        if let Err(e) = sub.close().await {
            tracing::debug!(session = self.path, "closing the watchqd subscription: {e}");
        }
        if ending == Ending::Ended {
            if let Ok(emitter) = unicast(&self.portal, &self.path, &self.owner) {
                let _ = SessionObject::closed(&emitter, HashMap::new()).await;
            }
        }
        let _ = self
            .portal
            .session_bus
            .object_server()
            .remove::<SessionObject, _>(self.path.as_str())
            .await;
    }

    /// Sends the snapshot, then events, until the subscription fails.
    async fn serve(&mut self, sub: &mut Subscription) -> Ending {
        let mut floor = match self.resync(sub, false).await {
            Ok(seq) => seq,
            Err(e) => {
                tracing::warn!(session = self.path, "first snapshot: {e}");
                return Ending::Ended;
            }
        };
        while let Some(item) = sub.next().await {
            let result = match item {
                Ok(Item::Signal(message)) => match client::event::<DeviceChanged>(&message) {
                    Some(Ok(event)) if event.seq > floor => self.forward(event).await,
                    Some(_) => Ok(()),
                    None if is_member(&message, "Lost") => {
                        self.resync(sub, true).await.map(|seq| floor = seq)
                    }
                    None if is_member(&message, "WatchRemoved") => return Ending::Ended,
                    None => Ok(()),
                },
                Ok(Item::Restarted(_)) => self.resync(sub, true).await.map(|seq| floor = seq),
                Ok(Item::WatchNotRestored { .. } | Item::FilterNotRestored { .. }) => {
                    return Ending::Ended
                }
                Ok(Item::DaemonGone { .. } | Item::Retrying { .. }) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::warn!(session = self.path, "ending the session: {e}");
                return Ending::Ended;
            }
        }
        Ending::Ended
    }

    /// One event to the app, if it is one the app may hear of.
    async fn forward(&mut self, event: DeviceChanged<'_>) -> zbus::Result<()> {
        let offered = if event.action == "remove" {
            None
        } else {
            devices::view(&event.subsystem, &event.attributes.into_map(), false)
        };
        match self.known.update(&event.sys_path, offered) {
            Some(entry) => self.send(vec![entry]).await,
            None => Ok(()),
        }
    }

    /// The snapshot as a batch of "add"s (after `Lost` when `lost`); returns the
    /// subscription's sequence number it is valid at. A loss numbered after the
    /// snapshot, heard while it was taken, takes another (after another `Lost`).
    async fn resync(&mut self, sub: &mut Subscription, lost: bool) -> zbus::Result<u64> {
        let mut lost = lost;
        loop {
            let (seq, objects, early) = snapshot(sub).await?;
            if lost {
                let emitter = unicast(&self.portal, super::PATH, &self.owner)?;
                WatchqObject::lost(&emitter, ObjectPath::try_from(self.path.as_str())?).await?;
            }
            let offered = objects
                .into_iter()
                .filter_map(|(id, _, attributes, _)| {
                    let subsystem = attributes
                        .get("subsystem")
                        .and_then(|v| <&str>::try_from(&**v).ok())
                        .unwrap_or_default()
                        .to_owned();
                    let attributes = attributes.into_iter().collect();
                    devices::view(&subsystem, &attributes, false).map(|props| (id, props))
                })
                .collect();
            let batch = self.known.resync(offered);
            self.send(batch).await?;
            // Events that came while the snapshot was taken: those numbered after it.
            let mut lost_since = false;
            for message in early {
                match client::event::<DeviceChanged>(&message) {
                    Some(Ok(event)) if event.seq > seq => self.forward(event).await?,
                    Some(_) => {}
                    None if is_member(&message, "Lost") => {
                        lost_since |= lost_seq(&message).is_none_or(|at| at > seq);
                    }
                    None => {}
                }
            }
            if !lost_since {
                return Ok(seq);
            }
            lost = true;
        }
    }

    async fn send(&self, events: Vec<DeviceEvent>) -> zbus::Result<()> {
        let emitter = unicast(&self.portal, super::PATH, &self.owner)?;
        WatchqObject::device_events(&emitter, ObjectPath::try_from(self.path.as_str())?, events)
            .await
    }
}

/// The sequence number a `Lost` signal carries (`seq`, `count`, `source`, `reason`).
fn lost_seq(message: &zbus::Message) -> Option<u64> {
    let body = message.body();
    body.deserialize::<(u64, u64, &str, &str)>()
        .ok()
        .map(|(seq, ..)| seq)
}

fn is_member(message: &zbus::Message, member: &str) -> bool {
    message
        .header()
        .member()
        .is_some_and(|m| m.as_str() == member)
}

/// The subscription's devices snapshot, reading its signals meanwhile (a stream not
/// read stops the connection before the reply could come); returns them too.
async fn snapshot(
    sub: &mut Subscription,
) -> zbus::Result<(u64, Vec<ReceivedObject>, Vec<zbus::Message>)> {
    let (Some(owner), Some(path)) = (sub.owner().cloned(), sub.path().cloned()) else {
        return Err(zbus::Error::Failure("watchqd is away".into()));
    };
    let proxy = SubscriptionProxy::builder(sub.connection())
        .destination(owner)
        .path(path)
        .build()
        .await?;
    let call = proxy.snapshot(DEVICES);
    tokio::pin!(call);
    let mut early = Vec::new();
    loop {
        tokio::select! {
            biased;
            reply = &mut call => {
                let (seq, objects) = reply?;
                return Ok((seq, objects, early));
            }
            item = sub.next() => match item {
                Some(Ok(Item::Signal(message))) => early.push(message),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Err(zbus::Error::Failure("subscription ended".into())),
            },
        }
    }
}

//! The user's say over each sandboxed app, kept where every portal keeps it: the
//! permission store (`org.freedesktop.impl.portal.PermissionStore`, served by
//! `xdg-permission-store`), table `watchq`, one id per source, each app's answer as
//! `["yes"]` or `["no"]`. An app the store knows nothing of is asked about through the
//! desktop's `org.freedesktop.impl.portal.Access` (its `AccessDialog`), and the answer
//! is stored. A revocation in the store closes that app's sessions at once.
//!
//! Which service shows the dialog: `$WATCHQ_PORTAL_ACCESS` (a bus name) when set,
//! otherwise the xdg-desktop-portal backend that implements `Access` for the desktop in
//! `$XDG_CURRENT_DESKTOP`, as its `.portal` files in
//! `/usr/share/xdg-desktop-portal/portals/` say (`DBusName`, `Interfaces`, `UseIn`).

use std::collections::HashMap;

use zbus::{proxy, ObjectPath, OwnedVariant};

use super::error::PortalError;
use crate::policy::flatpak_info::Keyfile;

/// The permission-store table of this portal.
pub const TABLE: &str = "watchq";
/// The store's bus name.
pub const STORE: &str = "org.freedesktop.impl.portal.PermissionStore";
const ACCESS_INTERFACE: &str = "org.freedesktop.impl.portal.Access";
const PORTALS_DIR: &str = "/usr/share/xdg-desktop-portal/portals";

#[proxy(
    interface = "org.freedesktop.impl.portal.PermissionStore",
    default_service = "org.freedesktop.impl.portal.PermissionStore",
    default_path = "/org/freedesktop/impl/portal/PermissionStore"
)]
pub trait PermissionStore {
    fn lookup(
        &self,
        table: &str,
        id: &str,
    ) -> zbus::Result<(HashMap<String, Vec<String>>, OwnedVariant)>;
    fn set_permission(
        &self,
        table: &str,
        create: bool,
        id: &str,
        app: &str,
        permissions: &[&str],
    ) -> zbus::Result<()>;
}

#[proxy(
    interface = "org.freedesktop.impl.portal.Access",
    default_path = "/org/freedesktop/portal/desktop"
)]
pub trait Access {
    #[allow(clippy::too_many_arguments)]
    fn access_dialog(
        &self,
        handle: &ObjectPath<'_>,
        app_id: &str,
        parent_window: &str,
        title: &str,
        subtitle: &str,
        body: &str,
        options: HashMap<&str, zbus::Variant<'_>>,
    ) -> zbus::Result<(u32, HashMap<String, OwnedVariant>)>;
}

/// What the store says of an app for a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Yes,
    No,
    Unknown,
}

/// The answer for `app` in a store entry's permissions: only an exact `["yes"]` is yes.
#[must_use]
pub fn answer_of(permissions: &HashMap<String, Vec<String>>, app: &str) -> Answer {
    match permissions.get(app).map(Vec::as_slice) {
        None | Some([]) => Answer::Unknown,
        Some([yes]) if yes == "yes" => Answer::Yes,
        Some(_) => Answer::No,
    }
}

/// The store's answer for `app` and `source`; an entry that does not exist is Unknown.
///
/// # Errors
/// When the store cannot be reached.
pub async fn stored(
    store: &PermissionStoreProxy<'_>,
    source: &str,
    app: &str,
) -> zbus::Result<Answer> {
    match store.lookup(TABLE, source).await {
        Ok((permissions, _)) => Ok(answer_of(&permissions, app)),
        Err(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.portal.Error.NotFound" =>
        {
            Ok(Answer::Unknown)
        }
        Err(e) => Err(e),
    }
}

/// Whether the user lets `app` have `source`: the store, or the user asked and the
/// answer stored. `handle` is the request path given to the dialog.
///
/// # Errors
/// `NotAllowed` when the answer is no, or when neither the store nor the dialog can
/// be reached (fail closed).
pub async fn check(
    session_bus: &zbus::Connection,
    app: &str,
    source: &str,
    handle: &str,
) -> Result<(), PortalError> {
    let unreachable = |what: &str, e: zbus::Error| {
        PortalError::NotAllowed(format!(
            "{what} is unreachable ({e}), so {app} cannot be allowed {source}"
        ))
    };
    let store = PermissionStoreProxy::new(session_bus)
        .await
        .map_err(|e| unreachable("the permission store", e))?;
    let answer = match stored(&store, source, app)
        .await
        .map_err(|e| unreachable("the permission store", e))?
    {
        Answer::Unknown => {
            let answer = ask(session_bus, app, source, handle)
                .await
                .map_err(|e| unreachable("the desktop's access dialog", e))?;
            if answer != Answer::Unknown {
                let word = if answer == Answer::Yes { "yes" } else { "no" };
                store
                    .set_permission(TABLE, true, source, app, &[word])
                    .await
                    .map_err(|e| unreachable("the permission store", e))?;
            }
            answer
        }
        known => known,
    };
    if answer == Answer::Yes {
        Ok(())
    } else {
        Err(PortalError::NotAllowed(format!(
            "the user has not allowed {app} to see {source} (permission store table \
             '{TABLE}', id '{source}'; `flatpak permission-reset {app}` asks again)"
        )))
    }
}

/// Asks the user through the desktop's Access dialog: response 0 is yes, 1 (the user
/// said no) is no, anything else (the dialog went away) is not an answer to store.
async fn ask(
    session_bus: &zbus::Connection,
    app: &str,
    source: &str,
    handle: &str,
) -> zbus::Result<Answer> {
    let name = access_service().ok_or_else(|| {
        zbus::Error::Failure(
            "no xdg-desktop-portal backend implements Access for this desktop".into(),
        )
    })?;
    let access = AccessProxy::builder(session_bus)
        .destination(name)
        .build()
        .await?;
    let (response, _) = access
        .access_dialog(
            &ObjectPath::try_from(handle)?,
            app,
            "",
            &format!("Allow {app} to see {source}?"),
            &format!("{app} wants to know when {source} appear and go."),
            "You can change this later in the app's permissions.",
            HashMap::new(),
        )
        .await?;
    Ok(match response {
        0 => Answer::Yes,
        1 => Answer::No,
        _ => Answer::Unknown,
    })
}

/// The bus name of the service that shows access dialogs.
fn access_service() -> Option<String> {
    if let Some(name) = std::env::var_os("WATCHQ_PORTAL_ACCESS") {
        return name.into_string().ok();
    }
    let desktops = std::env::var("XDG_CURRENT_DESKTOP").unwrap_or_default();
    let mut files: Vec<String> = std::fs::read_dir(PORTALS_DIR)
        .ok()?
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect();
    files.sort();
    access_service_in(&files, &desktops)
}

/// The `DBusName` of the first `.portal` file (in `files`' order) that implements
/// `Access` and is used in one of `desktops` (`XDG_CURRENT_DESKTOP`, `:`-separated).
#[must_use]
pub fn access_service_in(files: &[String], desktops: &str) -> Option<String> {
    let wanted: Vec<String> = desktops
        .split(':')
        .filter(|d| !d.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    let parsed: Vec<Keyfile> = files
        .iter()
        .filter_map(|f| Keyfile::parse(f).ok())
        .collect();
    for desktop in &wanted {
        for file in &parsed {
            let implements = file
                .list("portal", "Interfaces")
                .is_some_and(|i| i.iter().any(|i| i == ACCESS_INTERFACE));
            let used = file
                .list("portal", "UseIn")
                .is_some_and(|u| u.iter().any(|u| u.eq_ignore_ascii_case(desktop)));
            if implements && used {
                return file.string("portal", "DBusName");
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_exact_yes_is_yes() {
        let permissions = HashMap::from([
            ("org.a".to_owned(), vec!["yes".to_owned()]),
            ("org.b".to_owned(), vec!["no".to_owned()]),
            ("org.c".to_owned(), vec!["yes".to_owned(), "no".to_owned()]),
            ("org.d".to_owned(), vec![]),
        ]);
        assert_eq!(answer_of(&permissions, "org.a"), Answer::Yes);
        assert_eq!(answer_of(&permissions, "org.b"), Answer::No);
        assert_eq!(answer_of(&permissions, "org.c"), Answer::No);
        assert_eq!(answer_of(&permissions, "org.d"), Answer::Unknown);
        assert_eq!(answer_of(&permissions, "org.e"), Answer::Unknown);
    }

    #[test]
    fn the_access_backend_is_the_one_used_in_the_current_desktop() {
        let gnome = "[portal]\nDBusName=org.freedesktop.impl.portal.desktop.gnome\n\
            Interfaces=org.freedesktop.impl.portal.Access;org.freedesktop.impl.portal.Account;\n\
            UseIn=gnome\n"
            .to_owned();
        let gtk = "[portal]\nDBusName=org.freedesktop.impl.portal.desktop.gtk\n\
            Interfaces=org.freedesktop.impl.portal.FileChooser;org.freedesktop.impl.portal.Access;\n\
            UseIn=gnome;unity;xfce\n"
            .to_owned();
        let wlr = "[portal]\nDBusName=org.freedesktop.impl.portal.desktop.wlr\n\
            Interfaces=org.freedesktop.impl.portal.Screenshot;\nUseIn=wlroots;sway\n"
            .to_owned();
        let files = [gnome, gtk, wlr];
        assert_eq!(
            access_service_in(&files, "ubuntu:GNOME").as_deref(),
            Some("org.freedesktop.impl.portal.desktop.gnome")
        );
        assert_eq!(
            access_service_in(&files, "XFCE").as_deref(),
            Some("org.freedesktop.impl.portal.desktop.gtk")
        );
        assert_eq!(access_service_in(&files, "sway"), None);
        assert_eq!(access_service_in(&files, ""), None);
    }
}

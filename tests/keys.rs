//! Keys on the host, whose kernel has no watch_queue (BRIEF section 2): the daemon says
//! so, with the reason, and refuses key watches with NotSupported. What keys do on a
//! kernel that has it is in tests/guest_keys.rs.

mod common;
#[path = "common/keyctl.rs"]
mod keyctl;

use std::collections::HashMap;

use common::sources::source_info;
use common::*;
use zbus::Variant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_without_watch_queue_reports_keys_unavailable_and_refuses_watches() {
    // The premise: this kernel lacks CONFIG_WATCH_QUEUE. If that changes, this test must
    // change with it rather than pass for the wrong reason.
    let errno = keyctl::notification_pipe()
        .err()
        .and_then(|e| e.raw_os_error());
    assert!(
        errno == Some(nix::libc::ENOPKG),
        "pipe2(O_NOTIFICATION_PIPE) on the host: {errno:?} (None: it succeeded): this test \
         expects a kernel without CONFIG_WATCH_QUEUE (ENOPKG)"
    );

    let daemon = Daemon::start();
    let sub = Subscriber::new(&daemon).await;
    let keys = source_info(&sub.conn, "keys").await;
    assert!(!keys.available, "{keys:?}");
    assert!(
        keys.reason
            .contains("kernel built without CONFIG_WATCH_QUEUE"),
        "{keys:?}"
    );
    assert_eq!(
        keys.subtypes,
        [
            "instantiated",
            "updated",
            "linked",
            "unlinked",
            "cleared",
            "revoked",
            "invalidated",
            "setattr"
        ]
    );

    for spec in [
        HashMap::from([("keyring", Variant::from("user"))]),
        HashMap::from([("serial", Variant::from(12345i32))]),
        HashMap::new(),
    ] {
        match sub.proxy.add_watch("keys", 1, spec).await {
            Err(zbus::Error::MethodError(name, Some(message), _)) => {
                assert_eq!(name.as_str(), "org.watchq1.Error.NotSupported");
                assert!(
                    message.contains("kernel built without CONFIG_WATCH_QUEUE"),
                    "{message}"
                );
            }
            other => panic!("AddWatch(keys) on the host: expected NotSupported, got {other:?}"),
        }
    }
    // Nothing was started for it.
    assert!(sub.proxy.watches().await.expect("Watches").is_empty());
    assert!(
        !daemon.log_text().contains("source started"),
        "{}",
        daemon.log_text()
    );
}

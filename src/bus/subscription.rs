//! `org.watchq1.Subscription` at `/org/watchq1/subscription/N`: only its owner may call it.

// Signals carry their whole payload as arguments, and the interface macro generates
// code from them outside the impl block, so the allowance has to be module-wide.
#![allow(clippy::too_many_arguments)]

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::names::UniqueName;
use zbus::object_server::SignalEmitter;
use zbus::{interface, OwnedVariant};

use super::error::BusError;
use super::types::SnapshotObject;
use super::Service;

pub const PATH_PREFIX: &str = "/org/watchq1/subscription";
/// The interface below, for signals built by hand (see `super::emit`).
pub const INTERFACE: &str = "org.watchq1.Subscription";

pub fn path(id: u64) -> String {
    format!("{PATH_PREFIX}/{id}")
}

pub struct SubscriptionObject {
    pub(super) id: u64,
    pub(super) service: Arc<Service>,
    /// For a direct subscription (`Manager.SubscribeDirect`), the unique name of the bus
    /// connection that opened it. Its object is served only on its own peer-to-peer
    /// connection, whose messages carry no sender the bus vouches for (a peer may write
    /// any sender field it likes): every call that reaches it is its holder's, and acts
    /// as the opener, with the identity fixed when it was opened.
    pub(super) direct: Option<UniqueName<'static>>,
}

impl SubscriptionObject {
    /// Who the call acts for: the bus's sender, or for a direct subscription its opener
    /// (whatever the message says).
    fn caller<'a>(&'a self, header: &'a Header<'_>) -> Result<&'a UniqueName<'a>, BusError> {
        match &self.direct {
            Some(opener) => Ok(opener),
            None => super::sender(header),
        }
    }

    fn check_owner(&self, header: Option<&Header<'_>>) -> Result<(), BusError> {
        // Local reads (no header) come from the daemon itself.
        let Some(header) = header else { return Ok(()) };
        let caller = self.caller(header)?.as_str();
        match self.service.hub.owner_of(self.id) {
            Some(owner) if owner == caller => Ok(()),
            Some(_) => Err(BusError::AccessDenied(format!(
                "subscription {} belongs to another connection",
                self.id
            ))),
            None => Err(BusError::NotFound(format!(
                "subscription {} is closed",
                self.id
            ))),
        }
    }
}

// The interface macro reads every signal from the impl it is given, so the sources'
// signals (each declared in its own folder) are spliced in here: see
// `crate::signal::gather_interface`.
macro_rules! subscription_interface {
    (add_watch_doc: [$(#[doc = $add_watch_doc:tt])*] signals: [$($signals:tt)*]) => {
    /// One client's subscription. Every signal is sent only to the owner. Every signal
    /// carries a sequence number: it grows by one per signal, except that Lost(seq, count)
    /// stands for count numbers when count > 0.
    #[interface(name = "org.watchq1.Subscription")]
    impl SubscriptionObject {
        /// Adds a watch. kind names a source (see the Manager's Sources property); tag is
        /// echoed in every event the watch matches and must be unique in this subscription;
        /// spec holds the source's match keys, per source:
        $(#[doc = $add_watch_doc])*
        async fn add_watch(
            &self,
            #[zbus(header)] header: Header<'_>,
            kind: &str,
            tag: u64,
            spec: HashMap<String, OwnedVariant>,
        ) -> Result<(), BusError> {
            let caller = self.caller(&header)?.as_str();
            // Whose it is comes first: a stranger learns nothing from argument errors.
            self.check_owner(Some(&header))?;
            Ok(self
                .service
                .add_watch(self.id, caller, kind, tag, &spec)
                .await?)
        }

        /// Removes the watch with this tag.
        async fn remove_watch(
            &self,
            #[zbus(header)] header: Header<'_>,
            tag: u64,
        ) -> Result<(), BusError> {
            let caller = self.caller(&header)?.as_str();
            // Whose it is comes first: a stranger learns nothing from argument errors.
            self.check_owner(Some(&header))?;
            Ok(self.service.hub.remove_watch(self.id, caller, tag).await?)
        }

        /// Replaces the filter: a list of (source, subtype names). An event passes when some
        /// entry names its source and subtype. An empty list passes everything. Lost and
        /// WatchRemoved are never filtered.
        async fn set_filter(
            &self,
            #[zbus(header)] header: Header<'_>,
            filter: Vec<(String, Vec<String>)>,
        ) -> Result<(), BusError> {
            let caller = self.caller(&header)?.as_str();
            // Whose it is comes first: a stranger learns nothing from argument errors.
            self.check_owner(Some(&header))?;
            Ok(self.service.hub.set_filter(self.id, caller, &filter)?)
        }

        /// Current objects of a source and the sequence number they are valid at: apply
        /// every event with a higher number, and none with a lower one.
        #[zbus(out_args("seq", "objects"))]
        async fn snapshot(
            &self,
            #[zbus(header)] header: Header<'_>,
            source: &str,
        ) -> Result<(u64, Vec<SnapshotObject>), BusError> {
            let caller = self.caller(&header)?;
            self.check_owner(Some(&header))?;
            let (seq, objects) = self.service.snapshot(caller, source, Some(self.id)).await?;
            Ok((seq, objects.into_iter().map(SnapshotObject::from).collect()))
        }

        /// Ends the subscription: its watches are removed and the object disappears.
        async fn close(&self, #[zbus(header)] header: Header<'_>) -> Result<(), BusError> {
            let caller = self.caller(&header)?.as_str();
            self.check_owner(Some(&header))?;
            tracing::debug!(subscription = self.id, caller, "closed by its owner");
            self.service.close(self.id).await;
            Ok(())
        }

        /// Events kept for the subscriber before newer ones are dropped and counted.
        #[zbus(property(emits_changed_signal = "const"))]
        fn queue_depth(&self, #[zbus(header)] header: Option<Header<'_>>) -> Result<u32, BusError> {
            self.check_owner(header.as_ref())?;
            Ok(u32::try_from(self.service.hub.queue_depth(self.id)).unwrap_or(u32::MAX))
        }

        /// The watches: (tag, source).
        #[zbus(property(emits_changed_signal = "false"))]
        fn watches(
            &self,
            #[zbus(header)] header: Option<Header<'_>>,
        ) -> Result<Vec<(u64, String)>, BusError> {
            self.check_owner(header.as_ref())?;
            Ok(self
                .service
                .hub
                .watches(self.id)
                .into_iter()
                .map(|w| (w.tag, w.source.to_owned()))
                .collect())
        }

        /// The filter as SetFilter took it.
        #[zbus(property(emits_changed_signal = "false"))]
        fn filter(
            &self,
            #[zbus(header)] header: Option<Header<'_>>,
        ) -> Result<Vec<(String, Vec<String>)>, BusError> {
            self.check_owner(header.as_ref())?;
            Ok(self.service.hub.filter(self.id))
        }

        // Each source's event signal, from its folder.
        $($signals)*

        /// Events were lost. reason "queue-full": the daemon dropped count events of this
        /// subscription (sequence numbers seq to seq+count-1) because they were not read in
        /// time. reason "kernel-overflow": the kernel dropped an unknown number of source's
        /// events (count is 0); take a new snapshot.
        #[zbus(signal)]
        pub async fn lost(
            emitter: &SignalEmitter<'_>,
            seq: u64,
            count: u64,
            source: &str,
            reason: &str,
        ) -> zbus::Result<()>;

        /// The watch with this tag ended without being asked to; reason says why, first
        /// word first: its object or source went away, `policy-changed` (policy no
        /// longer allows it), `limit-lowered` (a reload lowered a limit it was over).
        #[zbus(signal)]
        pub async fn watch_removed(
            emitter: &SignalEmitter<'_>,
            seq: u64,
            tag: u64,
            reason: &str,
        ) -> zbus::Result<()>;
        }
    };
}
pub(crate) use subscription_interface;

crate::source::with_interface_items!(crate::bus::subscription::subscription_interface);

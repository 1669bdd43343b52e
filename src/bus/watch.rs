//! Adding a watch and taking a snapshot: the caller's identity, policy's grant, then the
//! hub. The order matters: nothing reaches the hub (or the kernel) before policy allowed it.

use zbus::names::UniqueName;

use super::error::BusError;
use super::Service;
use crate::error::Error;
use crate::policy::{Grant, Identity, Scope};
use crate::source::WatchSpec;

impl Service {
    /// Authorizes and adds a watch: policy first (polkit, cached per connection), then the
    /// hub, which takes nothing but the grant policy returns.
    pub(crate) async fn add_watch(
        &self,
        id: u64,
        caller: &str,
        kind: &str,
        tag: u64,
        spec: &WatchSpec,
    ) -> Result<(), Error> {
        self.known_source(kind)?;
        let identity = self.hub.identity_of(id, caller)?;
        let planned = self.hub.plan_watch(kind, spec, &identity)?;
        let grant = self.authorize_watch(&identity, kind, planned.scope).await?;
        let epoch = grant.epoch();
        self.hub.add_watch(id, grant, tag, planned).await?;
        // Policy changed while this watch was being decided and armed: the pass that
        // re-authorized the others may have missed it, so it is checked again.
        if epoch < self.authorizer.epoch() {
            self.policy_changed.notify_one();
        }
        Ok(())
    }

    /// The one authorization of a watch, for `AddWatch` and for re-authorization after a
    /// policy change ([`super::reauthorize`]): policy's decision, polkit asked when the
    /// table says so (cached per connection while it holds subscriptions).
    pub(crate) async fn authorize_watch(
        &self,
        identity: &Identity,
        kind: &str,
        scope: Scope,
    ) -> Result<Grant, Error> {
        let caller = identity.unique_name.as_str();
        self.authorizer
            .watch(identity, kind, scope, || {
                !self.hub.subscriptions_of(caller).is_empty()
            })
            .await
    }

    /// A snapshot needs what a system-wide watch of the source needs. `subscription` is
    /// (id, caller) for a subscription's own snapshot; the Manager's identifies the
    /// caller afresh.
    pub(crate) async fn snapshot(
        &self,
        sender: &UniqueName<'_>,
        source: &str,
        subscription: Option<u64>,
    ) -> Result<(u64, Vec<crate::event::Object>), BusError> {
        self.known_source(source)?;
        let identity = match subscription {
            Some(id) => self.hub.identity_of(id, sender.as_str())?,
            None => {
                let identity = self.identity(sender).await?;
                self.authorizer.subscribe(&identity)?;
                identity
            }
        };
        // A subscription that watches the source already holds grants for it, and its
        // snapshot is limited to what those watches cover (Hub::snapshot).
        let granted = subscription.is_some_and(|id| self.hub.watches_source(id, source));
        if !granted {
            self.authorizer
                .watch(&identity, source, Scope::System, || {
                    !self.hub.subscriptions_of(sender.as_str()).is_empty()
                })
                .await?;
        }
        Ok(self
            .hub
            .snapshot(source, subscription.map(|id| (id, sender.as_str())))?)
    }
}

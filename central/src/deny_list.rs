//! The deny list's interface, which both of central's stores implement: revoking a site (a
//! repeated revoke keeps the first entry), reinstating it, and reading the list. With several
//! central nodes (once `serve` runs on PostgreSQL) the site's live session may be on another
//! node: the PostgreSQL store tells every node of each revocation
//! (`pg::PgStore::revocations`), for each node to close the session it holds.

use std::future::Future;

use crate::event_log::{LogReadError, blocking};
use crate::store::{RevokedSite, Store};

/// The deny list of central's store.
pub trait DenyList: Send + Sync {
    /// Puts `site` on the list durably, or returns its existing entry unchanged.
    fn revoke_site(
        &self,
        site: &str,
        reason: String,
    ) -> impl Future<Output = Result<RevokedSite, LogReadError>> + Send;

    /// Takes `site` off the list; returns the entry it had, if any.
    fn reinstate_site(
        &self,
        site: &str,
    ) -> impl Future<Output = Result<Option<RevokedSite>, LogReadError>> + Send;

    /// The entry of `site`, if it is revoked.
    fn revoked_site(
        &self,
        site: &str,
    ) -> impl Future<Output = Result<Option<RevokedSite>, LogReadError>> + Send;

    /// Every revoked site, sorted by id.
    fn revoked_sites(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, RevokedSite)>, LogReadError>> + Send;
}

impl DenyList for Store {
    async fn revoke_site(&self, site: &str, reason: String) -> Result<RevokedSite, LogReadError> {
        Store::revoke_site(self, site, reason)
            .await
            .map_err(|e| LogReadError(e.to_string()))
    }

    async fn reinstate_site(&self, site: &str) -> Result<Option<RevokedSite>, LogReadError> {
        Store::reinstate_site(self, site)
            .await
            .map_err(|e| LogReadError(e.to_string()))
    }

    async fn revoked_site(&self, site: &str) -> Result<Option<RevokedSite>, LogReadError> {
        let (s, site) = (self.clone(), site.to_string());
        blocking(move || Store::revoked_site(&s, &site)).await
    }

    async fn revoked_sites(&self) -> Result<Vec<(String, RevokedSite)>, LogReadError> {
        let s = self.clone();
        blocking(move || Store::revoked_sites(&s)).await
    }
}

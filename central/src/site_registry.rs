//! The site registry's interface, which both of central's stores implement: when each site was
//! first and last heard from, with its high-water mark, for the fleet view. An upload counts as
//! contact as well as a Hello.

use std::future::Future;

use crate::event_log::{LogReadError, blocking};
use crate::store::{Store, StoredSite};

/// The site records of central's store.
pub trait SiteRegistry: Send + Sync {
    /// Records that `site` was heard from now (creating its record on first contact).
    fn touch_site(&self, site: &str) -> impl Future<Output = Result<(), LogReadError>> + Send;

    /// Every site that ever connected or uploaded, sorted by id.
    fn sites(&self) -> impl Future<Output = Result<Vec<StoredSite>, LogReadError>> + Send;
}

impl SiteRegistry for Store {
    async fn touch_site(&self, site: &str) -> Result<(), LogReadError> {
        Store::touch_site(self, site)
            .await
            .map_err(|e| LogReadError(e.to_string()))
    }

    async fn sites(&self) -> Result<Vec<StoredSite>, LogReadError> {
        let s = self.clone();
        blocking(move || Store::sites(&s)).await
    }
}

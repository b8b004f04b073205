//! Certificate renewal over the sync connection (protocol 4): when the renewal is due (a pure
//! rule on the certificate's dates and the wall clock), a new key and signing request made here;
//! central's certificate checked, installed, and used for the next connection. I/O side: files
//! and key generation run on the blocking pool.

use std::time::Duration;

use super::clock::clock_sane;
use super::{SyncClient, client_config};
use crate::store::now_ms;
use crate::tls::{self, CertInfo, RenewalRequest};

/// How often a live session checks whether the certificate is due for renewal (the first check
/// is at the session's start).
pub const RENEW_CHECK: Duration = Duration::from_secs(3_600);

/// Whether a renewal is due at `now_unix`: renewal is on (`renew_before` > 0), the clock can be
/// trusted with certificate dates, and the certificate expires within `renew_before`.
pub fn renewal_due(cert: &CertInfo, renew_before: Duration, now_unix: i64) -> bool {
    let before = i64::try_from(renew_before.as_secs()).unwrap_or(i64::MAX);
    before > 0 && clock_sane(now_unix, Some(cert)).is_ok() && cert.not_after - now_unix <= before
}

impl SyncClient {
    /// A new key and signing request when the certificate expires within `[sync]
    /// renew_before_days` (and the clock is sane); `None` when no renewal is due.
    pub(super) async fn renewal_request(&self) -> Option<RenewalRequest> {
        let cert = self.cert.as_ref()?;
        if !renewal_due(cert, self.settings.renew_before, now_ms() / 1000) {
            return None;
        }
        let site = self.site.clone();
        match tokio::task::spawn_blocking(move || tls::new_renewal_request(&site)).await {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot make a certificate signing request");
                self.link
                    .update_certificate(|c| c.last_error = Some(e.to_string()));
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "certificate signing request task failed");
                None
            }
        }
    }

    /// Checks and installs a renewed certificate, then uses it for the next connections (this
    /// one goes on: its TLS session is already established). Failures are logged and kept in
    /// the health; the old certificate stays in use.
    pub(super) async fn install_certificate(
        &mut self,
        request: Option<RenewalRequest>,
        chain_pem: String,
    ) {
        let Some(request) = request else {
            tracing::warn!("central sent a certificate that was not asked for; ignored");
            return;
        };
        let (ca, cert, key, site) = (
            self.settings.ca_cert.clone(),
            self.settings.cert.clone(),
            self.settings.key.clone(),
            self.site.clone(),
        );
        let installed = tokio::task::spawn_blocking(move || {
            let info = tls::check_renewed(&ca, &site, &request, &chain_pem, now_ms() / 1000)
                .map_err(|e| e.to_string())?;
            tls::install_renewed(&cert, &key, &chain_pem, &request.key_pem)
                .map_err(|e| format!("cannot write the renewed certificate: {e}"))?;
            Ok::<_, String>(info)
        })
        .await
        .unwrap_or_else(|e| Err(format!("renewal task failed: {e}")));
        let result = installed.and_then(|info| {
            let cfg = client_config(&self.settings)
                .map_err(|e| format!("the renewed certificate cannot be loaded: {e}"))?;
            Ok((info, cfg))
        });
        match result {
            Ok((info, cfg)) => {
                self.client_config = cfg;
                tracing::info!(
                    not_after = %crate::store::rfc3339_millis(info.not_after.saturating_mul(1000)),
                    "installed the renewed site certificate; the next connection uses it"
                );
                self.link.update_certificate(|c| {
                    c.not_after = Some(info.not_after);
                    c.renewed_at_ms = Some(now_ms());
                    c.renewals += 1;
                    c.last_error = None;
                });
                self.cert = Some(info);
            }
            Err(e) => {
                tracing::error!(error = %e, "certificate renewal failed; keeping the current certificate");
                self.link.update_certificate(|c| c.last_error = Some(e));
            }
        }
    }
}

//! What the API's handlers share: the store handle, the site, the link to central and the
//! allowance top-up. Plain state; the I/O is in the values it holds.

use std::sync::Arc;

use crate::link::LinkState;
use crate::store::Store;
use crate::topup::TopUp;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub site: String,
    /// Whether the sync session with central is up and when central was last heard from (set by
    /// the sync task).
    pub link: Arc<LinkState>,
    /// Asks central for more allowance while an order waits; `None`: never ask.
    pub topup: Option<TopUp>,
    pub max_body_bytes: usize,
}

//! Escrow of allowances on PostgreSQL: a pool's `granted` never exceeds its `total`, whichever
//! nodes grant at once. A grant locks the pool's row, takes what is free (at most what was
//! asked), updates the row conditionally on `granted + got <= total` and adds to the site's
//! holding, in one transaction; a return gives units back the same way.

use super::{PgError, PgStore};

/// A pool's figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolFigures {
    pub total: i64,
    pub granted: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum EscrowError {
    #[error("quantity must be positive, got {0}")]
    Quantity(i64),
    #[error("no pool {0:?}")]
    NoPool(String),
    #[error(transparent)]
    Db(#[from] PgError),
}

impl From<tokio_postgres::Error> for EscrowError {
    fn from(e: tokio_postgres::Error) -> Self {
        EscrowError::Db(e.into())
    }
}

impl PgStore {
    /// Sets a pool's total (the ERP's ATP). Lowering it below what is granted is allowed: no
    /// grant is made until returns bring `granted` below the total again.
    pub async fn set_pool_total(&self, pool: &str, total: i64) -> Result<(), EscrowError> {
        if total < 0 {
            return Err(EscrowError::Quantity(total));
        }
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO pools (pool, total) VALUES ($1, $2) \
                 ON CONFLICT (pool) DO UPDATE SET total = EXCLUDED.total",
                &[&pool, &total],
            )
            .await?;
        Ok(())
    }

    /// Grants `site` up to `want` units of `pool`: what is free, at most `want`. Returns the
    /// units granted (0 when none are free).
    pub async fn grant(&self, pool: &str, site: &str, want: i64) -> Result<i64, EscrowError> {
        if want <= 0 {
            return Err(EscrowError::Quantity(want));
        }
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(PgError::from)?;
        // The pool's row lock serializes grants of one pool across nodes: a second grant waits
        // here and then reads what the first one left.
        let Some(row) = txn
            .query_opt(
                "SELECT total, granted FROM pools WHERE pool = $1 FOR UPDATE",
                &[&pool],
            )
            .await?
        else {
            return Err(EscrowError::NoPool(pool.to_string()));
        };
        let (total, granted): (i64, i64) = (row.get(0), row.get(1));
        let got = want.min(total - granted).max(0);
        if got == 0 {
            return Ok(0);
        }
        // Conditional as well: the update refuses to pass the total even if the lock above
        // were ever dropped.
        let updated = txn
            .execute(
                "UPDATE pools SET granted = granted + $2 WHERE pool = $1 AND granted + $2 <= total",
                &[&pool, &got],
            )
            .await?;
        if updated != 1 {
            return Ok(0);
        }
        txn.execute(
            "INSERT INTO holdings (pool, site, held) VALUES ($1, $2, $3) \
             ON CONFLICT (pool, site) DO UPDATE SET held = holdings.held + EXCLUDED.held",
            &[&pool, &site, &got],
        )
        .await?;
        let committed = super::commit(txn, self.commit_limit()).await;
        super::settle(client, committed)?;
        Ok(got)
    }

    /// Units `site` gives back to `pool` (at most what it holds). Returns the units returned.
    pub async fn give_back(&self, pool: &str, site: &str, qty: i64) -> Result<i64, EscrowError> {
        if qty <= 0 {
            return Err(EscrowError::Quantity(qty));
        }
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(PgError::from)?;
        // Locks in the order grants take them, pool then holding, so the two never deadlock.
        if txn
            .query_opt("SELECT 1 FROM pools WHERE pool = $1 FOR UPDATE", &[&pool])
            .await?
            .is_none()
        {
            return Err(EscrowError::NoPool(pool.to_string()));
        }
        let held: Option<i64> = txn
            .query_opt(
                "SELECT held FROM holdings WHERE pool = $1 AND site = $2 FOR UPDATE",
                &[&pool, &site],
            )
            .await?
            .map(|r| r.get(0));
        let back = held.unwrap_or(0).min(qty);
        if back > 0 {
            txn.execute(
                "UPDATE holdings SET held = held - $3 WHERE pool = $1 AND site = $2",
                &[&pool, &site, &back],
            )
            .await?;
            txn.execute(
                "UPDATE pools SET granted = granted - $2 WHERE pool = $1",
                &[&pool, &back],
            )
            .await?;
        }
        let committed = super::commit(txn, self.commit_limit()).await;
        super::settle(client, committed)?;
        Ok(back)
    }

    /// A pool's figures, `None` if there is no such pool.
    pub async fn pool_figures(&self, pool: &str) -> Result<Option<PoolFigures>, EscrowError> {
        let client = self.client().await?;
        Ok(client
            .query_opt("SELECT total, granted FROM pools WHERE pool = $1", &[&pool])
            .await?
            .map(|r| PoolFigures {
                total: r.get(0),
                granted: r.get(1),
            }))
    }

    /// What each site holds of `pool`.
    pub async fn holdings(&self, pool: &str) -> Result<Vec<(String, i64)>, EscrowError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT site, held FROM holdings WHERE pool = $1 ORDER BY site",
                &[&pool],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }
}

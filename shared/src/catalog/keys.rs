//! The wrapped master key, by holder name.

use sqlx::Row;

use super::{Catalog, db, now_ms};
use crate::error::Error;
use crate::format::crypto::{KdfParams, WrappedKey};

impl Catalog {
    pub async fn user_key(&self, name: &str) -> Result<Option<WrappedKey>, Error> {
        let row = sqlx::query(
            "SELECT key_id, kdf_salt, kdf_m_kib, kdf_t_cost, kdf_p_cost, wrapped_key FROM users WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading the key"))?;
        Ok(row.map(|r| WrappedKey {
            key_id: r.get(0),
            salt: r.get(1),
            kdf: KdfParams {
                m_kib: r.get::<i64, _>(2) as u32,
                t_cost: r.get::<i64, _>(3) as u32,
                p_cost: r.get::<i64, _>(4) as u32,
            },
            wrapped: r.get(5),
        }))
    }

    /// Stores (or replaces, for a passphrase change) the wrapped key of `name`.
    pub async fn put_user_key(&self, name: &str, key: &WrappedKey) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO users (name, key_id, kdf_salt, kdf_m_kib, kdf_t_cost, kdf_p_cost, wrapped_key, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (name) DO UPDATE SET key_id = excluded.key_id, kdf_salt = excluded.kdf_salt, \
             kdf_m_kib = excluded.kdf_m_kib, kdf_t_cost = excluded.kdf_t_cost, kdf_p_cost = excluded.kdf_p_cost, \
             wrapped_key = excluded.wrapped_key",
        )
        .bind(name)
        .bind(&key.key_id)
        .bind(&key.salt)
        .bind(i64::from(key.kdf.m_kib))
        .bind(i64::from(key.kdf.t_cost))
        .bind(i64::from(key.kdf.p_cost))
        .bind(&key.wrapped)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(db("storing the key"))?;
        Ok(())
    }
}

/// An owner key as the catalog records it: sealed by the installation key.
#[derive(Clone, Debug)]
pub struct OwnerKeyRow {
    pub key_id: String,
    pub owner: String,
    pub sealed: Vec<u8>,
}

impl Catalog {
    /// Owner keys, first recorded first: all of them, or one owner's (its first is the key its
    /// new data is sealed with).
    pub async fn owner_keys(&self, owner: Option<&str>) -> Result<Vec<OwnerKeyRow>, Error> {
        let rows = match owner {
            Some(o) => sqlx::query(
                "SELECT key_id, owner, sealed FROM owner_keys WHERE owner = $1 ORDER BY id",
            )
            .bind(o),
            None => sqlx::query("SELECT key_id, owner, sealed FROM owner_keys ORDER BY id"),
        }
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading owner keys"))?;
        Ok(rows
            .into_iter()
            .map(|r| OwnerKeyRow {
                key_id: r.get(0),
                owner: r.get(1),
                sealed: r.get(2),
            })
            .collect())
    }

    /// Records an owner key (already stored in storage); a key recorded before is kept.
    ///
    /// The insert runs under the write lock so that ids are handed out in commit order: every
    /// host takes an owner's *first* key (lowest id), and on PostgreSQL an identity value
    /// taken outside the lock can commit after a higher one, letting two hosts that create a
    /// key at once each see their own as the first.
    pub async fn add_owner_key(&self, key: &OwnerKeyRow) -> Result<(), Error> {
        let mut tx = crate::catalog::begin_write(&self.pool)
            .await
            .map_err(db("recording an owner key"))?;
        sqlx::query(
            "INSERT INTO owner_keys (key_id, owner, sealed, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (key_id) DO NOTHING",
        )
        .bind(&key.key_id)
        .bind(&key.owner)
        .bind(&key.sealed)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(db("recording an owner key"))?;
        tx.commit().await.map_err(db("recording an owner key"))
    }
}

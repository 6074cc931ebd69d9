//! Opening the shared SQLite file, the same way the worker does (WAL, busy timeout, foreign
//! keys, migrations): one code path, in the shared catalog module.

use anyhow::Context;
use storinator_shared::catalog::Pool;

pub async fn open(url: &str) -> anyhow::Result<Pool> {
    storinator_shared::catalog::open_pool(url)
        .await
        .with_context(|| format!("opening the database (DATABASE_URL {url})"))
}

//! Embedded migrations, run at start-up before the store is used.
//!
//! diesel's migration harness is synchronous (the async one needs a multi-threaded tokio
//! runtime, which actix's per-thread runtimes are not), so migrations run on a thread of their
//! own and the caller awaits the result.

use diesel::Connection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::StoreError;

const POSTGRES: EmbeddedMigrations = embed_migrations!("../../migrations/postgres");
const SQLITE: EmbeddedMigrations = embed_migrations!("../../migrations/sqlite");

/// Migrations of one PostgreSQL database run one at a time, whichever process starts them.
const MIGRATION_LOCK: &str = "SELECT pg_advisory_lock(7263010452)::text";

pub enum Target {
    Postgres(String),
    Sqlite(String),
}

pub async fn run(target: Target) -> Result<(), StoreError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("migrations".into())
        .spawn(move || {
            let _ = tx.send(run_blocking(target));
        })
        .map_err(|e| StoreError::Migration(format!("cannot start the migration thread: {e}")))?;
    rx.await
        .map_err(|_| StoreError::Migration("the migration thread panicked".into()))?
}

fn run_blocking(target: Target) -> Result<(), StoreError> {
    let failed = |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Migration(e.to_string());
    match target {
        Target::Sqlite(path) => {
            let mut conn = diesel::SqliteConnection::establish(&path)
                .map_err(|e| StoreError::Unavailable(format!("opening {path}: {e}")))?;
            conn.run_pending_migrations(SQLITE).map_err(failed)?;
        }
        Target::Postgres(url) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| StoreError::Migration(e.to_string()))?;
            runtime.block_on(async move {
                use diesel_async::{
                    AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl,
                };
                let mut conn = AsyncPgConnection::establish(&url)
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                // Pods sharing one database start together: one migrates at a time (the
                // others then find nothing pending). Held by this session until it closes.
                diesel::sql_query(MIGRATION_LOCK)
                    .execute(&mut conn)
                    .await
                    .map_err(|e| StoreError::Migration(e.to_string()))?;
                // On a worker thread, where the harness may block in place.
                tokio::spawn(async move {
                    let mut harness = AsyncMigrationHarness::new(conn);
                    harness
                        .run_pending_migrations(POSTGRES)
                        .map(|_| ())
                        .map_err(failed)
                })
                .await
                .map_err(|e| StoreError::Migration(e.to_string()))?
            })?;
        }
    }
    Ok(())
}

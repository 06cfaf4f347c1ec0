//! The embedded default's files: each service keeps its own SQLite database (its tables and its
//! `_sqlx_migrations` record) in a file of the data directory, in WAL mode so that readers never
//! wait for the writer.

use std::{path::Path, sync::Arc, time::Duration};

use c2m_runtime::health::{Probe, ProbeFuture};
use sqlx::{
    SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions},
};

/// A time as the embedded files keep it: microseconds since the Unix epoch (exact, ordered,
/// compared as integers).
pub fn micros(at: chrono::DateTime<chrono::Utc>) -> i64 {
    at.timestamp_micros()
}

/// A time the files kept ([`micros`]).
pub fn time(us: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// Now, as the files keep times.
pub fn now() -> i64 {
    micros(chrono::Utc::now())
}

/// A span in microseconds, for adding to a kept time (at most `i64::MAX`).
pub fn span(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// How long a write waits for the file's write lock before it fails busy.
const BUSY: Duration = Duration::from_secs(5);

/// Opens (creating it if need be) a service's file.
pub async fn open(path: &Path) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(BUSY);
    SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
}

/// A probe that passes while the file answers.
pub fn probe(pool: SqlitePool, name: &str) -> Arc<dyn Probe> {
    Arc::new(SqliteProbe {
        pool,
        name: format!("sqlite:{name}"),
    })
}

struct SqliteProbe {
    pool: SqlitePool,
    name: String,
}

impl Probe for SqliteProbe {
    fn name(&self) -> &str {
        &self.name
    }

    fn check(&self) -> ProbeFuture<'_> {
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

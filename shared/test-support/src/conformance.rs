//! One storage suite run against both backends: the [`conformance!`](crate::conformance) macro,
//! and [`Kept`], what a suite's backend keeps alive and reads its tables through.

use c2m_storage::ServiceDb;
use sqlx::migrate::Migrator;

use crate::TestDatabase;

/// A suite's database, kept for as long as its backend lives: a PostgreSQL database of the test's
/// own, or a SQLite file in a directory of its own.
pub enum Kept {
    Postgres {
        db: Box<ServiceDb>,
        _database: TestDatabase,
    },
    Sqlite {
        pool: sqlx::SqlitePool,
        _dir: tempfile::TempDir,
    },
}

impl Kept {
    /// A new database with `schema` migrated: the service's handle on it, and what keeps it.
    pub async fn postgres(schema: &'static str, migrator: &'static Migrator) -> (ServiceDb, Self) {
        let database = TestDatabase::create().await;
        let db = database.migrated(schema, migrator).await;
        (
            db.clone(),
            Self::Postgres {
                db: Box::new(db),
                _database: database,
            },
        )
    }

    /// A new SQLite file named `file`, opened as the embedded default opens it (not yet migrated:
    /// the store migrates it).
    pub async fn sqlite(file: &str) -> (sqlx::SqlitePool, Self) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pool = c2m_storage::sqlite::open(&dir.path().join(file))
            .await
            .expect("opens");
        (pool.clone(), Self::Sqlite { pool, _dir: dir })
    }

    /// A `SELECT count(*) …` of the backend's own tables.
    pub async fn count(&self, sql: &'static str) -> i64 {
        match self {
            Self::Postgres { db, .. } => sqlx::query_scalar(sql).fetch_one(db.pool()).await,
            Self::Sqlite { pool, .. } => sqlx::query_scalar(sql).fetch_one(pool).await,
        }
        .expect("counts")
    }
}

/// One storage suite, run against both backends. In a module that defines `Backend` (with
/// `async fn postgres() -> Backend` and `async fn sqlite() -> Backend`) and one
/// `async fn name(b: &Backend)` per test, `conformance!(name, …)` makes `on_postgres::name` and
/// `on_sqlite::name`, each a test of its own on a backend of its own.
#[macro_export]
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&super::Backend::postgres().await).await;
                }
            )*
        }
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&super::Backend::sqlite().await).await;
                }
            )*
        }
    };
}

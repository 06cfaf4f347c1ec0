//! One PostgreSQL schema per service, migrated from the service's own `migrations/` folder.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use c2m_runtime::{Probe, ProbeFuture};
use serde::{Deserialize, Serialize};
use sqlx::{
    Connection, PgConnection, PgPool,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// `[database]`: where the services keep their state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// A PostgreSQL URL. Every service uses its own schema in this database. Empty: `c2m dev`
    /// keeps its data in SQLite files (`embedded.data_dir`); `c2m serve` needs one.
    pub url: String,
    /// Connections per service pool.
    pub max_connections: u32,
    /// Milliseconds to wait for a connection before the request fails.
    pub acquire_timeout_ms: u64,
    /// Apply pending migrations when a service starts. When off, a service with pending
    /// migrations stays NOT_SERVING until `c2m migrate` has run.
    pub migrate_on_start: bool,
    /// Create the database named in `url` when it does not exist (needs the CREATEDB privilege).
    pub create_database: bool,
    /// A database of its own for one service (`[database.reporting] url = …`, or
    /// `C2M_DATABASE__REPORTING__URL`): its schema, migrations and pools go there; the other
    /// services keep `url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff: Option<ServiceDatabase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing: Option<ServiceDatabase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_gateway: Option<ServiceDatabase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<ServiceDatabase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reporting: Option<ServiceDatabase>,
}

/// `[database.<service>]`: where one service's schema lives instead of `database.url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDatabase {
    pub url: String,
}

impl DatabaseSettings {
    /// Whether any service has a PostgreSQL database to use (`url`, or one of its own).
    pub fn is_set(&self) -> bool {
        !self.url.is_empty() || self.overrides().next().is_some()
    }

    /// The settings the service owning `schema` connects with: its own `url` when it has one.
    pub fn for_schema(&self, schema: &str) -> DatabaseSettings {
        let own = self.overrides().find(|(name, _)| *name == schema);
        DatabaseSettings {
            url: own.map_or_else(|| self.url.clone(), |(_, db)| db.url.clone()),
            handoff: None,
            routing: None,
            channel_gateway: None,
            config: None,
            reporting: None,
            ..self.clone()
        }
    }

    /// Each service given a database of its own: (its schema, where).
    pub fn overrides(&self) -> impl Iterator<Item = (&'static str, &ServiceDatabase)> {
        [
            ("handoff", &self.handoff),
            ("routing", &self.routing),
            ("channel_gateway", &self.channel_gateway),
            ("config", &self.config),
            ("reporting", &self.reporting),
        ]
        .into_iter()
        .filter_map(|(schema, db)| db.as_ref().map(|db| (schema, db)))
    }

    /// Every URL a service connects to, `url` first, each once.
    pub fn urls(&self) -> Vec<&str> {
        let mut urls = vec![self.url.as_str()];
        for (_, db) in self.overrides() {
            if !urls.contains(&db.url.as_str()) {
                urls.push(&db.url);
            }
        }
        urls
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            max_connections: 10,
            acquire_timeout_ms: 3_000,
            migrate_on_start: true,
            create_database: true,
            handoff: None,
            routing: None,
            channel_gateway: None,
            config: None,
            reporting: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database url: {0}")]
    Url(#[source] sqlx::Error),
    #[error("cannot create schema {schema}: {source}")]
    Schema {
        schema: &'static str,
        source: sqlx::Error,
    },
    #[error("cannot create database {name}: {source}")]
    CreateDatabase { name: String, source: sqlx::Error },
    #[error("cannot migrate schema {schema}: {source}")]
    Migrate {
        schema: &'static str,
        source: sqlx::migrate::MigrateError,
    },
    #[error("cannot read the migrations of schema {schema}: {source}")]
    Pending {
        schema: &'static str,
        source: sqlx::Error,
    },
    #[error("schema {schema} has {count} pending migration(s): run `c2m migrate`")]
    NotMigrated { schema: &'static str, count: usize },
}

/// Connections of a service's batch pool: a service has at most two batched statements on its
/// hot path, and each runs one statement at a time.
const BATCH_CONNECTIONS: u32 = 2;

/// A service's database: a pool confined to its schema, and the migrations that shape it.
#[derive(Debug, Clone)]
pub struct ServiceDb {
    pool: PgPool,
    /// For batched statements only (see [`ServiceDb::batch_pool`]).
    batch_pool: PgPool,
    schema: &'static str,
    migrator: &'static Migrator,
    migrate_on_start: bool,
    /// Set when the database may be created: the options to reach it, for the maintenance database.
    create_database: Option<PgConnectOptions>,
    migrated: Arc<AtomicBool>,
}

impl ServiceDb {
    /// Builds the pool without connecting: a service starts (NOT_SERVING) while PostgreSQL is down,
    /// and its health probe connects and migrates once it is up. Fails only on a malformed URL.
    pub fn connect_lazy(
        settings: &DatabaseSettings,
        schema: &'static str,
        migrator: &'static Migrator,
    ) -> Result<Self, DbError> {
        let options: PgConnectOptions = settings.url.parse().map_err(DbError::Url)?;
        let options = options
            .options([("search_path", schema)])
            .application_name(&format!("c2m-{schema}"));
        let create_database = settings.create_database.then(|| options.clone());
        let batch_pool = PgPoolOptions::new()
            .max_connections(BATCH_CONNECTIONS)
            .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
            .test_before_acquire(false)
            .connect_lazy_with(
                options
                    .clone()
                    .options([("plan_cache_mode", "force_generic_plan")]),
            );
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
            // No ping before every checkout: that is a round trip per query on the hot path. A
            // connection PostgreSQL dropped fails its next query and is discarded, and the health
            // probe reports the database meanwhile.
            .test_before_acquire(false)
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            batch_pool,
            schema,
            migrator,
            migrate_on_start: settings.migrate_on_start,
            create_database,
            migrated: Arc::default(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Connections for batched statements (`crate::batch`), which take their rows as arrays.
    /// PostgreSQL sees a constant array's exact length, so by default it finds a plan made for
    /// that length cheaper than the generic one and plans such a statement afresh on every call,
    /// which costs more than running it. On these connections it plans each statement once
    /// (`plan_cache_mode = force_generic_plan`); the statements are written so that the generic
    /// plan probes the tables' keys row by row, however small the tables were when it was made.
    /// A statement that cannot be (an `UPDATE … FROM` the arrays, which PostgreSQL may plan as a
    /// scan of a table that was empty then) runs with `persistent(false)`: planned for each call,
    /// as the table is now, since a kept plan is only remade when the table is analyzed.
    pub fn batch_pool(&self) -> &PgPool {
        &self.batch_pool
    }

    /// Whether this process has seen the schema migrated (it has run or checked the migrations).
    pub fn is_migrated(&self) -> bool {
        self.migrated.load(Ordering::Acquire)
    }

    /// Waits until the schema is migrated (the health probe migrates it), polling every 100 ms:
    /// background work that starts with the server waits here rather than fail and log against
    /// tables that do not exist yet. False when `shutdown` came first.
    pub async fn until_migrated(&self, shutdown: &tokio_util::sync::CancellationToken) -> bool {
        while !self.is_migrated() {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            }
        }
        true
    }

    pub fn schema(&self) -> &'static str {
        self.schema
    }

    /// Creates the schema if needed and applies pending migrations. Safe to run from several
    /// replicas at once: sqlx serialises migrators with an advisory lock, and a lost race to
    /// create the schema is retried once.
    pub async fn migrate(&self) -> Result<(), DbError> {
        let create = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", self.schema);
        let mut attempt = 0;
        loop {
            match sqlx::raw_sql(sqlx::AssertSqlSafe(create.clone()))
                .execute(&self.pool)
                .await
            {
                Ok(_) => break,
                // Two replicas creating the schema at once: one wins with a unique violation.
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() && attempt == 0 => {
                    attempt += 1;
                }
                // invalid_catalog_name: the database itself is missing.
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some("3D000")
                        && attempt == 0
                        && self.create_database.is_some() =>
                {
                    attempt += 1;
                    self.create_database().await?;
                }
                Err(source) => {
                    return Err(DbError::Schema {
                        schema: self.schema,
                        source,
                    });
                }
            }
        }
        self.migrator
            .run(&self.pool)
            .await
            .map_err(|source| DbError::Migrate {
                schema: self.schema,
                source,
            })?;
        self.migrated.store(true, Ordering::Release);
        tracing::info!(schema = self.schema, "migrations applied");
        Ok(())
    }

    async fn create_database(&self) -> Result<(), DbError> {
        let Some(options) = &self.create_database else {
            return Ok(());
        };
        let name = options.get_database().unwrap_or("postgres").to_owned();
        let create = async {
            let mut admin =
                PgConnection::connect_with(&options.clone().database("postgres")).await?;
            let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(&mut admin)
                .await
        };
        match create.await {
            Ok(_) => {
                tracing::info!(database = %name, "database created");
                Ok(())
            }
            // duplicate_database: another service or replica created it first.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(()),
            Err(source) => Err(DbError::CreateDatabase { name, source }),
        }
    }

    /// How many of this service's migrations the database has not applied yet.
    pub async fn pending_migrations(&self) -> Result<usize, DbError> {
        let applied: Vec<i64> = sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        .or_else(|e| match &e {
            // No migration table yet: nothing applied.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(Vec::new()),
            _ => Err(e),
        })
        .map_err(|source| DbError::Pending {
            schema: self.schema,
            source,
        })?;
        Ok(self
            .migrator
            .iter()
            .filter(|m| m.migration_type.is_up_migration() && !applied.contains(&m.version))
            .count())
    }

    /// The health probe: migrated (or migrating now, when `migrate_on_start`) and answering.
    pub fn probe(&self) -> Arc<dyn Probe> {
        Arc::new(DbProbe {
            db: self.clone(),
            name: format!("postgres:{}", self.schema),
        })
    }

    async fn check(&self) -> Result<(), DbError> {
        if !self.migrated.load(Ordering::Acquire) {
            if self.migrate_on_start {
                self.migrate().await?;
            } else {
                let count = self.pending_migrations().await?;
                if count > 0 {
                    return Err(DbError::NotMigrated {
                        schema: self.schema,
                        count,
                    });
                }
                self.migrated.store(true, Ordering::Release);
            }
        }
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|source| DbError::Pending {
                schema: self.schema,
                source,
            })?;
        Ok(())
    }
}

struct DbProbe {
    db: ServiceDb,
    name: String,
}

impl Probe for DbProbe {
    fn name(&self) -> &str {
        &self.name
    }

    fn check(&self) -> ProbeFuture<'_> {
        Box::pin(async move { self.db.check().await.map_err(|e| e.to_string()) })
    }
}

/// A storage failure as the gRPC status a caller should see: UNAVAILABLE (retry) when the database
/// cannot be reached, INTERNAL otherwise. Logged here, with the detail the caller does not get.
pub fn db_status(service: &'static str, error: sqlx::Error) -> tonic::Status {
    match error {
        // A connection that broke mid-conversation (PostgreSQL ended the session between two
        // messages: sqlx reports it as a protocol error) is as gone as one that never opened.
        e @ (sqlx::Error::PoolTimedOut
        | sqlx::Error::Io(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed) => {
            tracing::warn!(service, error = %e, "storage unavailable");
            tonic::Status::unavailable(format!("{service} storage unavailable, retry"))
        }
        // PostgreSQL going away or not there yet: a restart, a failover, a connection cut.
        sqlx::Error::Database(e) if e.code().as_deref().is_some_and(transient) => {
            tracing::warn!(service, error = %e, "storage unavailable");
            tonic::Status::unavailable(format!("{service} storage unavailable, retry"))
        }
        e => {
            tracing::error!(service, error = %e, "storage failed");
            tonic::Status::internal(format!("{service} storage failed"))
        }
    }
}

/// SQLSTATEs that say PostgreSQL is (for now) not there, rather than that the statement is wrong:
/// connection exceptions (class 08), a shutdown or a crash ending the session, a server still
/// starting (57P01–57P03), and a lack of resources (class 53).
fn transient(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("53") || matches!(code, "57P01" | "57P02" | "57P03")
}

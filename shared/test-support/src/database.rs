use c2m_storage::{DatabaseSettings, ServiceDb};
use sqlx::{Connection, PgConnection};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database of its own for one test, dropped (with its connections) when this is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    admin_url: String,
    url: String,
}

impl TestDatabase {
    /// Creates an empty database on the test server. Panics, saying how to fix it, when the server
    /// cannot be reached: a test must never pass by skipping.
    pub async fn create() -> Self {
        let admin_url =
            std::env::var("C2M_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        Self::create_on(admin_url).await
    }

    /// Creates an empty database on the server at `admin_url` (one of the test's own).
    pub async fn create_on(admin_url: String) -> Self {
        let name = format!("c2m_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach PostgreSQL at {admin_url} ({e}); start it, or set C2M_TEST_DATABASE_URL, \
                 or run the tests through tests/run, which starts a throwaway server"
            )
        });
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let mut url = url::Url::parse(&admin_url).expect("the admin URL is a URL");
        url.set_path(&name);
        Self {
            name,
            admin_url,
            url: url.to_string(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Settings for services under test: this database, small pools.
    pub fn settings(&self) -> DatabaseSettings {
        DatabaseSettings {
            url: self.url.clone(),
            max_connections: 4,
            create_database: false,
            ..DatabaseSettings::default()
        }
    }

    /// A service's schema in this database, migrated.
    pub async fn migrated(
        &self,
        schema: &'static str,
        migrator: &'static sqlx::migrate::Migrator,
    ) -> ServiceDb {
        let db = ServiceDb::connect_lazy(&self.settings(), schema, migrator)
            .unwrap_or_else(|e| panic!("settings for {}: {e}", self.name));
        db.migrate()
            .await
            .unwrap_or_else(|e| panic!("cannot migrate {schema} in {}: {e}", self.name));
        db
    }

    /// A connection to this database, for assertions.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.name))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = self.admin_url.clone();
        // Drop runs inside the test's runtime, which must not block on itself: use a thread of
        // its own with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await?;
                anyhow::Ok(())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("warning: test database {} not dropped: {e}", self.name);
        }
    }
}

//! Assembling roles into running servers: the same code serves one role (`c2m serve <role>`),
//! all of them on one address (`c2m dev`), or in-process for tests.

use c2m_proto::v1::{
    channel_gateway_service_server::ChannelGatewayServiceServer,
    config_service_server::ConfigServiceServer,
    conversation_service_server::ConversationServiceServer,
    handoff_service_server::HandoffServiceServer, reporting_service_server::ReportingServiceServer,
    routing_service_server::RoutingServiceServer,
};
use c2m_runtime::{
    CancellationToken, Component, ServeError,
    auth::TokenKey,
    peers::{LocalPeers, Peer, PeerSettings, Peers},
    server,
};
use c2m_storage::{
    Coordination, InProcess, RedisCoordination, RedisHandle, RedisSettings, ServiceDb,
    postgres::DbError, redis::RedisError,
};
use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, task::JoinHandle};

use crate::{config::Config, role::Role};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(
        "redis.url is empty: Handoff and Routing can share counters and leases in memory only when both run in this process"
    )]
    NoRedis,
    #[error(
        "the server was not SERVING within a minute: the log says which dependency is not ready"
    )]
    NotServing,
    #[error("setting up the demo: {0}")]
    Demo(#[from] crate::client::ClientError),
    #[error("cannot keep data in {path} (embedded.data_dir, or --data-dir): {reason}")]
    Embedded { path: String, reason: String },
    #[error(
        "database.url is empty: `c2m migrate` applies PostgreSQL's migrations (the embedded files migrate themselves)"
    )]
    NoDatabase,
    #[error("cannot use PostgreSQL at {url} (database.url): {reason}")]
    Database { url: String, reason: String },
    #[error("invalid redis url: {0}")]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("invalid peer url: {0}")]
    Peer(#[from] tonic::transport::Error),
    #[error(
        "auth.token_secret is empty: set it (C2M_AUTH__TOKEN_SECRET) to the secret every replica shares"
    )]
    NoTokenSecret,
    #[error(transparent)]
    Gateway(#[from] c2m_channel_gateway::GatewayError),
    #[error("cannot build the http client for webhooks: {0}")]
    Http(reqwest::Error),
    #[error("cannot listen for webhooks on {addr}: {source}")]
    Webhooks {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The gRPC services for `roles`, each with its own store: its schema's pool on PostgreSQL, or,
/// with no database configured, its SQLite file under `embedded.data_dir`. Roles that use Redis
/// share one connection (made on first use, so roles without Redis never open one). The channel
/// gateway's webhook listener is `webhooks` when given (bound beforehand), else `listen.webhooks`.
pub async fn components(
    roles: &[Role],
    config: &Config,
    mut webhooks: Option<std::net::TcpListener>,
) -> Result<Vec<Component>, AppError> {
    if config.auth.token_secret.is_empty() {
        return Err(AppError::NoTokenSecret);
    }
    let key = TokenKey::new(config.auth.token_secret.as_bytes());
    let coordination = coordination(roles, &config.redis)?;
    // Roles that share this process call each other directly; the rest over the network.
    let local = LocalPeers::new(std::time::Duration::from_millis(config.peers.timeout_ms));
    let peers = |name| {
        Ok::<_, AppError>(Peers::new(&config.peers, key.clone(), name)?.with_local(local.clone()))
    };
    let db = |role: Role| {
        let (schema, migrator) = role.schema();
        ServiceDb::connect_lazy(&config.database.for_schema(schema), schema, migrator)
    };
    let files = embedded(config).then_some(config.embedded.data_dir.as_path());
    let mut components = Vec::new();
    for &role in roles {
        let file = match files {
            Some(dir) => Some(open_file(dir, role.schema().0).await?),
            None => None,
        };
        let embedding = |error: &dyn std::fmt::Display| AppError::Embedded {
            path: files.map(|d| d.display().to_string()).unwrap_or_default(),
            reason: error.to_string(),
        };
        match role {
            Role::Handoff => {
                let (coordination, peers) = (coordination.clone(), peers("handoff")?);
                let service = match file {
                    Some(pool) => c2m_handoff::Service::embedded(
                        pool,
                        coordination,
                        peers,
                        key.clone(),
                        &config.handoff,
                    )
                    .await
                    .map_err(|e| embedding(&e))?,
                    None => c2m_handoff::Service::new(
                        db(role)?,
                        coordination,
                        peers,
                        key.clone(),
                        &config.handoff,
                    ),
                };
                local.register(Peer::Handoff, HandoffServiceServer::new(service.clone()));
                components.push(service.into_component());
            }
            Role::Routing => {
                let (coordination, peers) = (coordination.clone(), peers("routing")?);
                let timeout = std::time::Duration::from_millis(config.peers.timeout_ms);
                let service = match file {
                    Some(pool) => c2m_routing::Service::embedded(
                        pool,
                        coordination,
                        peers,
                        key.clone(),
                        &config.routing,
                        timeout,
                    )
                    .await
                    .map_err(|e| embedding(&e))?,
                    None => c2m_routing::Service::new(
                        db(role)?,
                        coordination,
                        peers,
                        key.clone(),
                        &config.routing,
                        timeout,
                    ),
                };
                // Both of the role's services, as a network peer would answer them.
                local.register(
                    Peer::Routing,
                    tonic::service::Routes::new(RoutingServiceServer::new(service.clone()))
                        .add_service(ConversationServiceServer::new(service.clone())),
                );
                components.extend(service.into_components());
            }
            Role::ChannelGateway => {
                let addr = config.listen.webhooks;
                let listener = webhooks
                    .take()
                    .map_or_else(|| std::net::TcpListener::bind(addr), Ok)
                    .and_then(|l| {
                        l.set_nonblocking(true)?;
                        TcpListener::from_std(l)
                    })
                    .map_err(|source| AppError::Webhooks { addr, source })?;
                let (peers, settings) = (peers("channel-gateway")?, config.channel_gateway.clone());
                let service = match file {
                    Some(pool) => {
                        c2m_channel_gateway::Service::embedded(pool, peers, key.clone(), settings)
                            .await?
                    }
                    None => {
                        c2m_channel_gateway::Service::new(db(role)?, peers, key.clone(), settings)?
                    }
                };
                local.register(
                    Peer::ChannelGateway,
                    ChannelGatewayServiceServer::new(service.clone()),
                );
                components.push(service.into_component(listener));
            }
            Role::Config => {
                let peers = peers("config")?;
                let service = match file {
                    Some(pool) => {
                        c2m_config::Service::embedded(pool, key.clone(), peers, &config.webhooks)
                            .await
                            .map_err(|e| embedding(&e))?
                    }
                    None => {
                        c2m_config::Service::new(db(role)?, key.clone(), peers, &config.webhooks)
                            .map_err(AppError::Http)?
                    }
                };
                local.register(Peer::Config, ConfigServiceServer::new(service.clone()));
                components.push(service.into_component());
            }
            Role::Reporting => {
                let peers = peers("reporting")?;
                let service = match file {
                    Some(pool) => c2m_reporting::Service::embedded(
                        pool,
                        key.clone(),
                        peers,
                        &config.reporting,
                    )
                    .await
                    .map_err(|e| embedding(&e))?,
                    None => c2m_reporting::Service::new(
                        db(role)?,
                        key.clone(),
                        peers,
                        &config.reporting,
                    ),
                };
                local.register(
                    Peer::Reporting,
                    ReportingServiceServer::new(service.clone()),
                );
                components.push(service.into_component());
            }
        }
    }
    Ok(components)
}

/// Whether the services keep their data in SQLite files (`embedded.data_dir`): no database is
/// configured.
pub fn embedded(config: &Config) -> bool {
    !config.database.is_set()
}

/// Opens (creating the directory and the file if need be) the SQLite file of `schema`'s service.
async fn open_file(dir: &std::path::Path, schema: &str) -> Result<sqlx::SqlitePool, AppError> {
    let path = dir.join(format!("{schema}.db"));
    let refused = |reason: String| AppError::Embedded {
        path: path.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| refused(e.to_string()))?;
    c2m_storage::sqlite::open(&path)
        .await
        .map_err(|e| refused(e.to_string()))
}

/// Where Handoff and Routing coordinate: the Redis at `redis.url`, or, with none, this process's
/// memory, which is exact only when every role that uses it is in this process.
fn coordination(roles: &[Role], redis: &RedisSettings) -> Result<Arc<dyn Coordination>, AppError> {
    if redis.is_set() {
        return Ok(Arc::new(RedisCoordination::new(RedisHandle::new(redis)?)));
    }
    let needs = [Role::Handoff, Role::Routing];
    if needs.iter().any(|r| !roles.contains(r)) && needs.iter().any(|r| roles.contains(r)) {
        return Err(AppError::NoRedis);
    }
    Ok(Arc::new(InProcess::new()))
}

/// Serves `roles` on `listener` until `shutdown` is cancelled and the server has drained. When
/// `roles` is every role (`c2m dev`), the services call each other at this listener's address,
/// whatever `[peers]` says.
pub async fn serve(
    listener: TcpListener,
    roles: &[Role],
    config: &Config,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    serve_with(listener, None, roles, config, shutdown).await
}

/// [`serve`], with the channel gateway's webhook listener bound beforehand.
pub async fn serve_with(
    listener: TcpListener,
    webhooks: Option<std::net::TcpListener>,
    roles: &[Role],
    config: &Config,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let mut config = config.clone();
    if Role::ALL.iter().all(|r| roles.contains(r)) {
        let here = listener.local_addr().map_err(ServeError::from)?;
        let timeout_ms = config.peers.timeout_ms;
        config.peers = PeerSettings {
            timeout_ms,
            ..PeerSettings::all_at(&format!("http://{here}"))
        };
    }
    let components = components(roles, &config, webhooks).await?;
    server::run(listener, components, &config.server, shutdown).await?;
    Ok(())
}

/// `c2m dev --demo`: serves every role like [`serve`], and once the whole server is SERVING sets
/// up the demo account through its own API and prints the commands that use it. A demo that
/// cannot be set up stops the server.
pub async fn serve_demo(
    listener: TcpListener,
    config: &Config,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let addr = listener.local_addr().map_err(ServeError::from)?;
    let server = serve(listener, &Role::ALL, config, shutdown.clone());
    tokio::pin!(server);
    let url = format!("http://{addr}");
    let demo = async {
        until_serving(&url).await?;
        let key = TokenKey::new(config.auth.token_secret.as_bytes());
        let demo = crate::client::set_up_demo(&url, &key).await?;
        println!("{}", demo.instructions(&url));
        Ok::<_, AppError>(())
    };
    tokio::select! {
        result = &mut server => return result,
        done = demo => {
            if let Err(error) = done {
                shutdown.cancel();
                let _ = server.await;
                return Err(error);
            }
        }
    }
    server.await
}

/// Waits (up to a minute) until the server at `url` reports every service SERVING.
async fn until_serving(url: &str) -> Result<(), AppError> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let serving = async {
            let channel = tonic::transport::Channel::from_shared(url.to_owned())
                .ok()?
                .connect()
                .await
                .ok()?;
            let answer = HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
                .ok()?;
            Some(answer.into_inner().status == ServingStatus::Serving as i32)
        };
        if serving.await == Some(true) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(AppError::NotServing);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Applies the pending migrations of `roles`, one schema after another.
pub async fn migrate(roles: &[Role], config: &Config) -> Result<(), AppError> {
    if !config.database.is_set() {
        return Err(AppError::NoDatabase);
    }
    for &role in roles {
        let (schema, migrator) = role.schema();
        let db = ServiceDb::connect_lazy(&config.database.for_schema(schema), schema, migrator)?;
        db.migrate().await?;
        db.pool().close().await;
    }
    Ok(())
}

/// A server running in the background of this process.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), AppError>>,
}

impl Running {
    /// Where it listens (the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, for tonic clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts it down as SIGTERM would and waits until it has drained.
    pub async fn stop(mut self) -> Result<(), AppError> {
        self.shutdown.cancel();
        match (&mut self.task).await {
            Ok(result) => result,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Binds `addr` and serves `roles` there in the background: the in-process mesh that tests and
/// embedders use.
pub async fn spawn(addr: SocketAddr, roles: &[Role], config: Config) -> std::io::Result<Running> {
    spawn_on(TcpListener::bind(addr).await?, roles, config)
}

/// [`spawn`] on a listener bound beforehand (to know every server's address before configuring
/// their peers).
pub fn spawn_on(listener: TcpListener, roles: &[Role], config: Config) -> std::io::Result<Running> {
    spawn_with(listener, None, roles, config)
}

/// [`spawn_on`], with the channel gateway's webhook listener bound beforehand too (so a test
/// knows its address without picking a port that something else may take meanwhile).
pub fn spawn_with(
    listener: TcpListener,
    webhooks: Option<std::net::TcpListener>,
    roles: &[Role],
    config: Config,
) -> std::io::Result<Running> {
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let roles = roles.to_vec();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { serve_with(listener, webhooks, &roles, &config, shutdown).await }
    });
    Ok(Running {
        addr,
        shutdown,
        task,
    })
}

/// `c2m dev` without secrets configured: makes up the ones missing, and logs an operator token
/// signed with the token secret (nobody could sign one otherwise). On the embedded default they
/// are kept in the data directory (`secrets.toml`, readable by its owner only) and read back by
/// the next run, which then reads the credentials and consumer ids this one stored; on
/// PostgreSQL they last for the run.
pub fn make_up_dev_secrets(config: &mut Config) -> std::io::Result<()> {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use c2m_runtime::auth::{Role as AuthRole, TokenKey};

    let kept = embedded(config).then(|| config.embedded.data_dir.join("secrets.toml"));
    let stored = match &kept {
        Some(path) => read_secrets(path)?,
        None => Default::default(),
    };
    // What the data directory holds after this: what it held, and what is made up now. A secret
    // that is configured is used, and never written there.
    let mut keep = StoredSecrets::default();
    let mut made_up = false;
    if config.channel_gateway.credentials_key.is_empty() {
        let key = match stored.credentials_key {
            Some(key) => key,
            None => {
                made_up = true;
                STANDARD.encode(ephemeral_secret()?)
            }
        };
        config.channel_gateway.credentials_key = key.clone();
        keep.credentials_key = Some(key);
        if kept.is_none() {
            tracing::warn!(
                "channel_gateway.credentials_key is not set: provider credentials stored in this run cannot be read after it"
            );
        }
    }
    if config.auth.token_secret.is_empty() {
        let secret = match stored.token_secret {
            Some(secret) => secret,
            None => {
                made_up = true;
                ephemeral_secret()?
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            }
        };
        config.auth.token_secret = secret.clone();
        keep.token_secret = Some(secret);
        let token = TokenKey::new(config.auth.token_secret.as_bytes()).user_token(
            "dev-operator",
            AuthRole::Operator,
            None,
            std::time::Duration::from_secs(24 * 3600),
        );
        match &kept {
            Some(path) => tracing::info!(
                secrets = %path.display(),
                "auth.token_secret is not set: using the data directory's; operator token (24 h): {token}"
            ),
            None => tracing::warn!(
                "auth.token_secret is not set: using a secret made up for this run; operator token (24 h): {token}"
            ),
        }
    }
    if let Some(path) = kept
        && made_up
    {
        write_secrets(&path, &keep)?;
    }
    Ok(())
}

/// The secrets a data directory keeps, where it keeps them.
#[derive(Debug, Default)]
struct StoredSecrets {
    token_secret: Option<String>,
    credentials_key: Option<String>,
}

fn read_secrets(path: &std::path::Path) -> std::io::Result<StoredSecrets> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StoredSecrets::default()),
        Err(e) => return Err(e),
    };
    let value = |name: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == name).then(|| value.trim().trim_matches('"').to_owned())
        })
    };
    Ok(StoredSecrets {
        token_secret: value("token_secret").filter(|v| !v.is_empty()),
        credentials_key: value("credentials_key").filter(|v| !v.is_empty()),
    })
}

fn write_secrets(path: &std::path::Path, secrets: &StoredSecrets) -> std::io::Result<()> {
    use std::io::Write;

    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    writeln!(
        file,
        "# Made up by `c2m dev` for this data directory: the token secret signs its tokens and\n\
         # keys its consumer ids; the credentials key seals provider credentials. Keep it with\n\
         # the data, and private. A configured secret is used instead, and not written here."
    )?;
    for (name, value) in [
        ("token_secret", &secrets.token_secret),
        ("credentials_key", &secrets.credentials_key),
    ] {
        if let Some(value) = value {
            writeln!(file, "{name} = \"{value}\"")?;
        }
    }
    Ok(())
}

/// `c2m dev` listens on loopback only, its webhooks included, unless told otherwise: the default
/// `listen.webhooks` (every interface, for a container) becomes `127.0.0.1` on the same port.
pub fn keep_dev_local(config: &mut Config) {
    let everywhere = crate::config::ListenSettings::default().webhooks;
    if config.listen.webhooks == everywhere {
        config
            .listen
            .webhooks
            .set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
}

/// How long `c2m dev` gives PostgreSQL to answer before it gives up and says why.
const DATABASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects to `database.url` once, trying for up to 10 s, so that `c2m dev` says at start-up,
/// in one error, why it cannot serve (rather than serving nothing and logging why).
pub async fn check_database(settings: &c2m_storage::DatabaseSettings) -> Result<(), AppError> {
    for url in settings.urls() {
        check_one_database(url, settings.create_database).await?;
    }
    Ok(())
}

async fn check_one_database(url: &str, create_database: bool) -> Result<(), AppError> {
    use sqlx::{Connection, postgres::PgConnectOptions};

    let shown = c2m_storage::mask_password(url);
    let refused = |reason: String| AppError::Database {
        url: shown.clone(),
        reason,
    };
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| refused(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + DATABASE_WAIT;
    let backoff = c2m_runtime::backoff::Backoff::new(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(1),
    );
    let mut retry = 0;
    loop {
        let pause = backoff.delay(retry);
        retry += 1;
        let attempt = tokio::time::timeout_at(deadline, sqlx::PgConnection::connect_with(&options));
        let error = match attempt.await {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
                return Ok(());
            }
            Ok(Err(error)) => error,
            Err(_) => return Err(refused(format!("no answer within {DATABASE_WAIT:?}"))),
        };
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        match code.as_deref() {
            // invalid_password, invalid_authorization_specification: waiting will not help.
            Some("28P01" | "28000") => {
                return Err(refused(format!(
                    "{error}. PostgreSQL refused the login: put the password in the URL \
                     (postgres://user:password@host/db, or C2M_DATABASE__URL), or let the user \
                     in without one from 127.0.0.1 in pg_hba.conf (Debian's default asks for a \
                     password); deploy/with-backends starts a throwaway PostgreSQL that needs none"
                )));
            }
            // invalid_catalog_name: the login worked and the database is missing, which each
            // service creates at start when `database.create_database` allows.
            Some("3D000") if create_database => return Ok(()),
            Some("3D000") => {
                return Err(refused(format!(
                    "{error}. Create it (createdb), set database.create_database = true, or \
                     point database.url at one that exists"
                )));
            }
            _ if tokio::time::Instant::now() + pause >= deadline => {
                return Err(refused(format!(
                    "{error} (tried for {DATABASE_WAIT:?}). Start PostgreSQL, or run c2m \
                     through deploy/with-backends, which starts a throwaway one"
                )));
            }
            _ => {
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// 32 random bytes: a secret for one `c2m dev` run.
pub fn ephemeral_secret() -> std::io::Result<[u8; 32]> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedded_in(dir: &std::path::Path) -> Config {
        let mut config = Config::default();
        config.embedded.data_dir = dir.to_owned();
        config
    }

    /// The data directory keeps the secrets `c2m dev` made up, and a restart reads them back; a
    /// configured secret is used and never written there.
    #[test]
    fn made_up_secrets_are_kept_with_the_data_and_configured_ones_are_not() {
        let dir = tempfile::tempdir().expect("a data directory");
        let configured = "a-configured-secret-of-at-least-32-characters";
        let mut first = embedded_in(dir.path());
        first.auth.token_secret = configured.to_owned();
        make_up_dev_secrets(&mut first).expect("made up");
        assert_eq!(first.auth.token_secret, configured);
        assert!(!first.channel_gateway.credentials_key.is_empty());
        let written = std::fs::read_to_string(dir.path().join("secrets.toml")).expect("written");
        assert!(!written.contains(configured), "{written}");
        assert!(written.contains(&first.channel_gateway.credentials_key));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("secrets.toml"))
                .expect("there")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // Restarted with nothing configured: the key read back, a token secret made up and kept.
        let mut second = embedded_in(dir.path());
        make_up_dev_secrets(&mut second).expect("made up");
        assert_eq!(
            second.channel_gateway.credentials_key,
            first.channel_gateway.credentials_key
        );
        assert!(second.auth.token_secret.len() >= 32);
        assert_ne!(second.auth.token_secret, configured);
        let mut third = embedded_in(dir.path());
        make_up_dev_secrets(&mut third).expect("read back");
        assert_eq!(third.auth.token_secret, second.auth.token_secret);
        assert_eq!(
            third.channel_gateway.credentials_key,
            first.channel_gateway.credentials_key
        );
    }
}

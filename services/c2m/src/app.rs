//! Assembling roles into running servers: the same code serves one role (`c2m serve <role>`),
//! all of them on one address (`c2m dev`), or in-process for tests.

use c2m_runtime::{CancellationToken, Component, ServeError, server};
use c2m_storage::{RedisHandle, ServiceDb, postgres::DbError, redis::RedisError};
use tokio::net::TcpListener;

use crate::{config::Config, role::Role};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("invalid redis url: {0}")]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The gRPC services for `roles`, each with its own schema pool; roles that use Redis share one
/// connection (made on first use, so roles without Redis never open one).
pub fn components(roles: &[Role], config: &Config) -> Result<Vec<Component>, AppError> {
    let redis = RedisHandle::new(&config.redis)?;
    let db = |role: Role| {
        let (schema, migrator) = role.schema();
        ServiceDb::connect_lazy(&config.database, schema, migrator)
    };
    roles
        .iter()
        .map(|&role| {
            Ok(match role {
                Role::Handoff => {
                    c2m_handoff::Service::new(db(role)?, redis.clone()).into_component()
                }
                Role::Routing => {
                    c2m_routing::Service::new(db(role)?, redis.clone()).into_component()
                }
                Role::ChannelGateway => {
                    c2m_channel_gateway::Service::new(db(role)?).into_component()
                }
                Role::Config => c2m_config::Service::new(db(role)?).into_component(),
                Role::Reporting => c2m_reporting::Service::new(db(role)?).into_component(),
            })
        })
        .collect()
}

/// Serves `roles` on `listener` until `shutdown` is cancelled and the server has drained.
pub async fn serve(
    listener: TcpListener,
    roles: &[Role],
    config: &Config,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let components = components(roles, config)?;
    server::run(listener, components, &config.server, shutdown).await?;
    Ok(())
}

/// Applies the pending migrations of `roles`, one schema after another.
pub async fn migrate(roles: &[Role], config: &Config) -> Result<(), AppError> {
    for &role in roles {
        let (schema, migrator) = role.schema();
        let db = ServiceDb::connect_lazy(&config.database, schema, migrator)?;
        db.migrate().await?;
        db.pool().close().await;
    }
    Ok(())
}

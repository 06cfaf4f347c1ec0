//! The five service roles one `c2m` binary can run.

use std::net::SocketAddr;

use sqlx::migrate::Migrator;

use crate::config::ListenSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Role {
    Handoff,
    Routing,
    ChannelGateway,
    Config,
    Reporting,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Handoff,
        Role::Routing,
        Role::ChannelGateway,
        Role::Config,
        Role::Reporting,
    ];

    /// The name used on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Role::Handoff => "handoff",
            Role::Routing => "routing",
            Role::ChannelGateway => "channel-gateway",
            Role::Config => "config",
            Role::Reporting => "reporting",
        }
    }

    /// Where `c2m serve <role>` listens.
    pub fn listen(self, listen: &ListenSettings) -> SocketAddr {
        match self {
            Role::Handoff => listen.handoff,
            Role::Routing => listen.routing,
            Role::ChannelGateway => listen.channel_gateway,
            Role::Config => listen.config,
            Role::Reporting => listen.reporting,
        }
    }

    /// The PostgreSQL schema the role owns and the migrations that shape it.
    pub fn schema(self) -> (&'static str, &'static Migrator) {
        match self {
            Role::Handoff => (c2m_handoff::SCHEMA, &c2m_handoff::MIGRATOR),
            Role::Routing => (c2m_routing::SCHEMA, &c2m_routing::MIGRATOR),
            Role::ChannelGateway => (c2m_channel_gateway::SCHEMA, &c2m_channel_gateway::MIGRATOR),
            Role::Config => (c2m_config::SCHEMA, &c2m_config::MIGRATOR),
            Role::Reporting => (c2m_reporting::SCHEMA, &c2m_reporting::MIGRATOR),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

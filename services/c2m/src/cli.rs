//! Command-line interface.

use std::{net::SocketAddr, path::PathBuf};

use c2m_runtime::LogFormat;
use clap::{Parser, Subcommand};

use crate::{
    config::{DatabaseOverrides, EmbeddedOverrides, Overrides, RedisOverrides, TelemetryOverrides},
    role::Role,
};

/// c2m: deflect callers from a voice queue to messaging.
#[derive(Debug, Parser)]
#[command(name = "c2m", version)]
pub struct Cli {
    /// A TOML configuration file. Environment variables (`C2M_…`) and flags override it.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// PostgreSQL URL (`database.url`).
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Redis URL (`redis.url`).
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Log format (`telemetry.log_format`).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one service.
    Serve {
        role: Role,
        /// Address to listen on (`listen.<role>`).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Run all five services in one process, on one address.
    Dev {
        /// Address to listen on (`listen.dev`).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Once serving, set up a `demo` account on the sandbox and print the commands that
        /// deflect a caller and show the funnel.
        #[arg(long)]
        demo: bool,
        /// Where to keep the data when no database is configured (`embedded.data_dir`).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Deflect one caller, as an IVR does (CreateHandoff), and print the handoff.
    Handoff {
        /// Where c2m serves.
        #[arg(long, default_value = DEFAULT_SERVER, value_name = "URL")]
        server: String,
        /// The account's API key (`c2m_…`).
        #[arg(long, value_name = "KEY")]
        key: String,
        #[arg(long, value_name = "ID")]
        account: String,
        /// The handoff configuration.
        #[arg(long, value_name = "ID")]
        handoff_config: String,
        /// The caller's number, E.164.
        #[arg(long, value_name = "E164")]
        phone: String,
        /// A template variable (repeat for several).
        #[arg(long = "var", value_name = "NAME=VALUE", value_parser = variable)]
        variables: Vec<(String, String)>,
        /// The idempotency key; a new one when not given.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
    },
    /// Print an account's funnel over the last hours (GetFunnel), or over time with `--by`
    /// (GetFunnelSeries).
    Funnel {
        #[arg(long, default_value = DEFAULT_SERVER, value_name = "URL")]
        server: String,
        /// A token of the account (`c2m token --role viewer --account …`).
        #[arg(long, value_name = "TOKEN")]
        token: String,
        #[arg(long, value_name = "ID")]
        account: String,
        #[arg(long, value_enum, default_value = "channel")]
        group_by: crate::client::GroupBy,
        /// How many hours back from now.
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..=8760))]
        hours: u32,
        /// A line per hour, day or week (the handoffs attempted in it, with all their stages).
        #[arg(long, value_enum, value_name = "BUCKET")]
        by: Option<crate::client::Bucket>,
        /// With `--by`: the IANA time zone of the days and weeks; the account's when not given.
        #[arg(long, value_name = "TZ")]
        time_zone: Option<String>,
    },
    /// Reports for people who live in spreadsheets.
    Report {
        #[command(subcommand)]
        report: Report,
    },
    /// Apply pending database migrations and exit.
    Migrate {
        /// The services to migrate; all of them when none is named.
        roles: Vec<Role>,
    },
    /// Print the effective configuration, with secrets masked, and exit.
    Config,
    /// Print a signed token for the console or an operator (needs `auth.token_secret`).
    Token {
        /// `operator` acts on every account; `admin`, `editor`, `viewer` and `agent` on
        /// `--account`.
        #[arg(long, value_enum)]
        role: TokenRole,
        /// The account an admin, editor, viewer or agent belongs to.
        #[arg(long, value_name = "ID")]
        account: Option<String>,
        /// An agent's skill (repeat for several): the conversations it may see and answer.
        /// None: every skill.
        #[arg(long = "skill", value_name = "SKILL")]
        skills: Vec<String>,
        /// Who the token is for, as the audit log will name them.
        #[arg(long, default_value = "cli")]
        subject: String,
        /// Hours until the token expires: 1 to 8760 (a year).
        #[arg(long, default_value_t = 12)]
        ttl_hours: u64,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum Report {
    /// Write every handoff attempted in a period (ExportTransactions), a row per handoff with
    /// each stage's time, as CSV or JSON lines, to a file or stdout.
    Export {
        #[arg(long, default_value = DEFAULT_SERVER, value_name = "URL")]
        server: String,
        /// A token of the account (`c2m token --role viewer --account …`).
        #[arg(long, value_name = "TOKEN")]
        token: String,
        #[arg(long, value_name = "ID")]
        account: String,
        /// The start: a date (UTC midnight, e.g. 2026-12-01) or an RFC 3339 time; a day before
        /// `--to` when not given.
        #[arg(long, value_name = "WHEN", value_parser = when)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// The end (not included), as `--from`; now when not given.
        #[arg(long, value_name = "WHEN", value_parser = when)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long, value_enum, default_value = "csv")]
        format: crate::client::ExportFormat,
        /// The file to write; stdout when not given.
        #[arg(long, value_name = "PATH")]
        output: Option<PathBuf>,
    },
}

/// A date (its UTC midnight) or an RFC 3339 time.
fn when(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc());
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&chrono::Utc))
        .map_err(|_| "a date (2026-12-01) or an RFC 3339 time (2026-12-01T09:00:00Z)".to_owned())
}

/// Where `c2m handoff` and `c2m funnel` call by default: `c2m dev`'s address.
const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

fn variable(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .filter(|(name, _)| !name.is_empty())
        .ok_or_else(|| "a template variable is NAME=VALUE".to_owned())
}

/// Runs `c2m handoff` or `c2m funnel`: None for any other command.
pub fn call(command: &Command) -> Option<std::process::ExitCode> {
    use crate::client::{self, Deflect};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let answer = match command {
        Command::Handoff {
            server,
            key,
            account,
            handoff_config,
            phone,
            variables,
            idempotency_key,
        } => runtime.block_on(client::handoff(Deflect {
            server,
            api_key: key,
            account_id: account,
            handoff_config_id: handoff_config,
            consumer_phone: phone,
            variables,
            idempotency_key: idempotency_key.as_deref(),
        })),
        Command::Funnel {
            server,
            token,
            account,
            group_by,
            hours,
            by: None,
            ..
        } => runtime.block_on(client::funnel(server, token, account, *group_by, *hours)),
        Command::Funnel {
            server,
            token,
            account,
            group_by,
            hours,
            by: Some(bucket),
            time_zone,
        } => runtime.block_on(client::funnel_series(
            server,
            token,
            account,
            *group_by,
            *hours,
            (*bucket, time_zone.as_deref().unwrap_or_default()),
        )),
        Command::Report {
            report:
                Report::Export {
                    server,
                    token,
                    account,
                    from,
                    to,
                    format,
                    output,
                },
        } => runtime.block_on(client::export(
            client::Export {
                server,
                token,
                account_id: account,
                from: *from,
                to: *to,
                format: *format,
            },
            output.as_deref(),
        )),
        _ => return None,
    };
    Some(match answer {
        Ok(text) => {
            print!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("c2m: {error}");
            std::process::ExitCode::FAILURE
        }
    })
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TokenRole {
    Operator,
    Admin,
    Editor,
    Viewer,
    Agent,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl Cli {
    /// The flags that override configuration.
    pub fn overrides(&self) -> Overrides {
        let mut overrides = Overrides {
            database: self
                .database_url
                .clone()
                .map(|url| DatabaseOverrides { url }),
            redis: self.redis_url.clone().map(|url| RedisOverrides { url }),
            telemetry: self.log_format.map(|format| TelemetryOverrides {
                log_format: match format {
                    LogFormatArg::Text => LogFormat::Text,
                    LogFormatArg::Json => LogFormat::Json,
                },
            }),
            listen: None,
            embedded: None,
        };
        match self.command {
            Command::Serve {
                role,
                listen: Some(addr),
            } => overrides = overrides.listen(&role.name().replace('-', "_"), addr),
            Command::Dev {
                listen,
                ref data_dir,
                ..
            } => {
                if let Some(addr) = listen {
                    overrides = overrides.listen("dev", addr);
                }
                if let Some(dir) = data_dir {
                    overrides.embedded = Some(EmbeddedOverrides {
                        data_dir: dir.clone(),
                    });
                }
            }
            _ => {}
        }
        overrides
    }
}

/// Why `c2m token` would not sign: its exit code (64: configuration, 2: usage) and message.
#[derive(Debug)]
pub struct TokenRefused {
    pub code: u8,
    pub message: &'static str,
}

/// The longest a `c2m token` may live.
const MAX_TTL_HOURS: u64 = 24 * 365;

/// `c2m token`: a token for `role` signed with `auth.token_secret`.
pub fn mint_token(
    config: &crate::Config,
    role: TokenRole,
    account: Option<&str>,
    skills: &[String],
    subject: &str,
    ttl_hours: u64,
) -> Result<String, TokenRefused> {
    use c2m_runtime::auth::{Role, TokenKey};

    let refuse = |code, message| Err(TokenRefused { code, message });
    if config.auth.token_secret.is_empty() {
        return refuse(
            64,
            "invalid configuration: `auth.token_secret` must be set to sign tokens",
        );
    }
    let role = match role {
        TokenRole::Operator => Role::Operator,
        TokenRole::Admin => Role::Admin,
        TokenRole::Editor => Role::Editor,
        TokenRole::Viewer => Role::Viewer,
        TokenRole::Agent => Role::Agent,
    };
    if !skills.is_empty() && role != Role::Agent {
        return refuse(
            2,
            "--skill limits an agent token: drop it, or use --role agent",
        );
    }
    match (role, account) {
        (Role::Operator, Some(_)) => {
            return refuse(2, "an operator token is for every account: drop --account");
        }
        (_, Some(account)) if !c2m_runtime::ids::is_slug(account) => {
            return refuse(
                2,
                "--account is not an account id (3 to 64 lowercase letters, digits and dashes)",
            );
        }
        (Role::Operator, None) | (_, Some(_)) => {}
        (_, None) => return refuse(2, "an admin, editor, viewer or agent token needs --account"),
    }
    if !(1..=MAX_TTL_HOURS).contains(&ttl_hours) {
        return refuse(2, "--ttl-hours must be 1 to 8760 (a year)");
    }
    if subject.trim().is_empty() || subject.len() > 128 {
        return refuse(2, "--subject must be 1 to 128 characters");
    }
    let key = TokenKey::new(config.auth.token_secret.as_bytes());
    let ttl = std::time::Duration::from_secs(ttl_hours * 3600);
    Ok(match account {
        Some(account) if role == Role::Agent => key.agent_token(subject, account, skills, ttl),
        _ => key.user_token(subject, role, account, ttl),
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Clap's own checks: no two arguments share a name (a subcommand's `--config` would shadow
    /// the global configuration file's, and panic at parse time).
    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}

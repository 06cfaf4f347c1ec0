use std::process::ExitCode;

use c2m::{
    Config, Role, app,
    cli::{Cli, Command, TokenRole},
};
use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};

use c2m_runtime::{
    CancellationToken,
    auth::{Role as AuthRole, TokenKey},
    shutdown, telemetry,
};
use clap::Parser;

/// mimalloc rather than the system allocator: about 8% more handoffs per second through the mesh
/// (`cargo bench -p c2m-e2e --bench handoff`), where many small buffers come and go per call.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for configuration errors (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), &cli.overrides()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("c2m: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Token {
        role,
        account,
        skills,
        subject,
        ttl_hours,
    } = &cli.command
    {
        return print_token(
            &config,
            *role,
            account.as_deref(),
            skills,
            subject,
            *ttl_hours,
        );
    }
    if let Command::Serve { role, .. } = &cli.command {
        if config.auth.token_secret.is_empty() {
            eprintln!(
                "c2m: invalid configuration: `auth.token_secret` must be set for `c2m serve` (C2M_AUTH__TOKEN_SECRET), the same for every role"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        if *role == Role::ChannelGateway && config.channel_gateway.credentials_key.is_empty() {
            eprintln!(
                "c2m: invalid configuration: `channel_gateway.credentials_key` must be set for `c2m serve channel-gateway` (base64 of 32 random bytes)"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("c2m: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("c2m: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, mut config: Config) -> anyhow::Result<()> {
    let (roles, addr, name) = match command {
        Command::Serve { role, .. } => (vec![role], role.listen(&config.listen), role.name()),
        Command::Dev { .. } => (Role::ALL.to_vec(), config.listen.dev, "dev"),
        Command::Migrate { roles } => {
            let _telemetry = telemetry::init(&config.telemetry, "c2m-migrate")?;
            let roles = if roles.is_empty() {
                Role::ALL.to_vec()
            } else {
                roles
            };
            app::migrate(&roles, &config).await?;
            return Ok(());
        }
        Command::Token { .. } => return Ok(()),
        Command::Config => {
            print!("{}", config.to_masked_toml());
            return Ok(());
        }
    };
    let _telemetry = telemetry::init(&config.telemetry, &format!("c2m-{name}"))?;
    if name == "dev" && config.channel_gateway.credentials_key.is_empty() {
        config.channel_gateway.credentials_key = BASE64.encode(app::ephemeral_secret()?);
        tracing::warn!(
            "channel_gateway.credentials_key is not set: provider credentials stored in this run cannot be read after it"
        );
    }
    if name == "dev" && config.auth.token_secret.is_empty() {
        config.auth.token_secret = app::ephemeral_secret()?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let token = TokenKey::new(config.auth.token_secret.as_bytes()).user_token(
            "dev-operator",
            AuthRole::Operator,
            None,
            Duration::from_secs(24 * 3600),
        );
        tracing::warn!(
            "auth.token_secret is not set: using a secret made up for this run; operator token (24 h): {token}"
        );
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let token = CancellationToken::new();
    tokio::spawn(shutdown::cancel_on_signal(token.clone()));
    app::serve(listener, &roles, &config, token).await?;
    Ok(())
}

fn print_token(
    config: &Config,
    role: TokenRole,
    account: Option<&str>,
    skills: &[String],
    subject: &str,
    ttl_hours: u64,
) -> ExitCode {
    if config.auth.token_secret.is_empty() {
        eprintln!("c2m: invalid configuration: `auth.token_secret` must be set to sign tokens");
        return ExitCode::from(EXIT_CONFIG);
    }
    let role = match role {
        TokenRole::Operator => AuthRole::Operator,
        TokenRole::Admin => AuthRole::Admin,
        TokenRole::Editor => AuthRole::Editor,
        TokenRole::Viewer => AuthRole::Viewer,
        TokenRole::Agent => AuthRole::Agent,
    };
    if !skills.is_empty() && role != AuthRole::Agent {
        eprintln!("c2m: --skill limits an agent token: drop it, or use --role agent");
        return ExitCode::from(2);
    }
    match (role, account) {
        (AuthRole::Operator, Some(_)) => {
            eprintln!("c2m: an operator token is for every account: drop --account");
            return ExitCode::from(2);
        }
        (AuthRole::Operator, None) | (_, Some(_)) => {}
        (_, None) => {
            eprintln!("c2m: an admin, editor, viewer or agent token needs --account");
            return ExitCode::from(2);
        }
    }
    let key = TokenKey::new(config.auth.token_secret.as_bytes());
    let ttl = Duration::from_secs(ttl_hours * 3600);
    let token = match account {
        Some(account) if role == AuthRole::Agent => key.agent_token(subject, account, skills, ttl),
        _ => key.user_token(subject, role, account, ttl),
    };
    println!("{token}");
    ExitCode::SUCCESS
}

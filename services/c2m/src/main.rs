//! `c2m`: parse the command line, load the configuration, start telemetry, run the command.
//! Everything else is the library's (`c2m::app`, `c2m::config`, `c2m::cli`).

use std::process::ExitCode;

use c2m::{
    Config, Role, app,
    cli::{Cli, Command, mint_token},
};
use c2m_runtime::{CancellationToken, shutdown, telemetry};
use clap::Parser;

/// mimalloc rather than the system allocator: about 8% more handoffs per second through the mesh
/// (`cargo bench -p c2m-e2e --bench handoff`), where many small buffers come and go per call.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for configuration errors (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(exit) = c2m::cli::call(&cli.command) {
        return exit;
    }
    for warning in Config::unused_variables(
        std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()),
    ) {
        eprintln!("c2m: warning: {warning}");
    }
    let config = match Config::load(cli.config.as_deref(), &cli.overrides()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("c2m: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match &cli.command {
        Command::Token {
            role,
            account,
            skills,
            subject,
            ttl_hours,
        } => {
            return match mint_token(
                &config,
                *role,
                account.as_deref(),
                skills,
                subject,
                *ttl_hours,
            ) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(refused) => {
                    eprintln!("c2m: {}", refused.message);
                    ExitCode::from(refused.code)
                }
            };
        }
        Command::Serve { role, .. } => {
            if let Err(error) = config.check_serve(*role) {
                eprintln!("c2m: {error}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
        _ => {}
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
            // Once, on stderr, where the logs go too.
            eprintln!("c2m: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, mut config: Config) -> anyhow::Result<()> {
    let (roles, addr, name, demo) = match command {
        Command::Serve { role, .. } => {
            let addr = role.listen(&config.listen);
            (vec![role], addr, role.name(), false)
        }
        Command::Dev { demo, .. } => (Role::ALL.to_vec(), config.listen.dev, "dev", demo),
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
        Command::Token { .. }
        | Command::Handoff { .. }
        | Command::Funnel { .. }
        | Command::Report { .. } => return Ok(()),
        Command::Config => {
            print!("{}", config.to_masked_toml());
            return Ok(());
        }
    };
    let _telemetry = telemetry::init(&config.telemetry, &format!("c2m-{name}"))?;
    if name == "dev" {
        app::make_up_dev_secrets(&mut config)?;
        app::keep_dev_local(&mut config);
        if app::embedded(&config) {
            tracing::info!(
                data_dir = %config.embedded.data_dir.display(),
                "no database.url: keeping the data in SQLite files (set database.url and redis.url for PostgreSQL and Redis)"
            );
        } else {
            app::check_database(&config.database).await?;
        }
    }
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let key = format!("listen.{}", name.replace('-', "_"));
        anyhow::anyhow!("cannot listen on {addr}: {e} (set {key}, or --listen, to another address)")
    })?;
    let token = CancellationToken::new();
    tokio::spawn(shutdown::cancel_on_signal(token.clone()));
    if demo {
        app::serve_demo(listener, &config, token).await?;
    } else {
        app::serve(listener, &roles, &config, token).await?;
    }
    Ok(())
}

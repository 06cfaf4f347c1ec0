//! The `c2m` binary as an operator runs it: configuration layering and errors (exit 64), the
//! effective configuration with secrets masked, SIGTERM, and trace export.

mod support;

use support::{dev::Dev, otlp};

use std::{process::Output, time::Duration};

use c2m_runtime::auth::{Role as AuthRole, TokenKey};
use c2m_test_support::{TestDatabase, TestRedis, eventually};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use support::dev::C2M;

/// Runs `c2m args…` to completion with `envs` added to a clean `C2M_*` environment.
fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = std::process::Command::new(C2M);
    for (key, _) in std::env::vars() {
        if key.starts_with("C2M_") || key.starts_with("OTEL_") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    command
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("c2m runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    std::fs::write(file.path(), text).expect("writes");
    file
}

#[test]
fn a_config_file_that_is_not_toml_exits_64_naming_the_file() {
    let file = config_file("[server\ngrace_period_secs = ");
    let path = file.path().to_str().expect("utf-8 path");
    let output = run(&["--config", path, "config"], &[]);
    assert_eq!(output.status.code(), Some(64), "{}", stderr(&output));
    assert!(stderr(&output).contains(path), "{}", stderr(&output));
    assert!(output.stdout.is_empty());
}

#[test]
fn a_missing_config_file_exits_64_naming_the_file() {
    let output = run(&["--config", "/nonexistent/c2m.toml", "dev"], &[]);
    assert_eq!(output.status.code(), Some(64), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("cannot read configuration file /nonexistent/c2m.toml"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_value_of_the_wrong_type_names_its_key_and_file() {
    let file = config_file("[server]\ngrace_period_secs = \"soon\"\n");
    let path = file.path().to_str().expect("utf-8 path");
    let output = run(&["--config", path, "dev"], &[]);
    assert_eq!(output.status.code(), Some(64), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("server.grace_period_secs"), "{message}");
    assert!(message.contains(path), "{message}");
}

#[test]
fn an_unknown_key_is_refused_not_ignored() {
    let file = config_file("[server]\ngrace_periods = 3\n");
    let output = run(
        &["--config", file.path().to_str().expect("utf-8"), "dev"],
        &[],
    );
    assert_eq!(output.status.code(), Some(64), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("grace_periods"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_bad_environment_value_names_its_key() {
    let output = run(&["dev"], &[("C2M_SERVER__CONCURRENCY_LIMIT", "lots")]);
    assert_eq!(output.status.code(), Some(64), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("server.concurrency_limit"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn values_are_validated_before_anything_is_bound() {
    let cases = [
        (
            "C2M_DATABASE__URL",
            "mysql://root@localhost/c2m",
            "database.url",
        ),
        ("C2M_REDIS__URL", "not a url", "redis.url"),
        (
            "C2M_DATABASE__REPORTING__URL",
            "mysql://db/c2m",
            "database.reporting.url",
        ),
        (
            "C2M_SERVER__CONCURRENCY_LIMIT",
            "0",
            "server.concurrency_limit",
        ),
        (
            "C2M_TELEMETRY__LOG_FILTER",
            "info,=[",
            "telemetry.log_filter",
        ),
        ("C2M_LISTEN__DEV", "localhost", "listen.dev"),
        // Not below peers.timeout_ms (5000): Handoff would stop waiting before the send's answer.
        (
            "C2M_CHANNEL_GATEWAY__PROVIDER_TIMEOUT_MS",
            "5000",
            "channel_gateway.provider_timeout_ms",
        ),
        (
            "C2M_HANDOFF__UNCONFIRMED_FALLBACK_MS",
            "0",
            "handoff.unconfirmed_fallback_ms",
        ),
    ];
    for (var, value, key) in cases {
        let output = run(&["dev"], &[(var, value)]);
        assert_eq!(
            output.status.code(),
            Some(64),
            "{var}={value}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(key),
            "{var}={value}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn flags_beat_environment_beat_file_beat_defaults_and_secrets_are_masked() {
    let file = config_file(
        r#"
[database]
url = "postgres://file:filesecret@db/file"
max_connections = 3

[redis]
url = "redis://:redissecret@cache:6379"

[server]
grace_period_secs = 7

[telemetry]
log_filter = "debug"
"#,
    );
    let output = run(
        &[
            "--config",
            file.path().to_str().expect("utf-8"),
            "--database-url",
            "postgres://flag:flagsecret@db/flag",
            "config",
        ],
        &[
            ("C2M_DATABASE__URL", "postgres://env:envsecret@db/env"),
            ("C2M_SERVER__GRACE_PERIOD_SECS", "9"),
            (
                "C2M_TEST_DATABASE_URL",
                "postgres://ignored@db/not-configuration",
            ),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed = String::from_utf8(output.stdout).expect("utf-8");
    for secret in ["filesecret", "envsecret", "flagsecret", "redissecret"] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    let effective: toml::Table = printed.parse().expect("prints TOML");
    let get = |section: &str, key: &str| effective[section][key].clone();
    assert_eq!(
        get("database", "url").as_str(),
        Some("postgres://flag:*****@db/flag")
    );
    assert_eq!(get("database", "max_connections").as_integer(), Some(3));
    assert_eq!(
        get("redis", "url").as_str(),
        Some("redis://:*****@cache:6379")
    );
    assert_eq!(get("server", "grace_period_secs").as_integer(), Some(9));
    assert_eq!(get("telemetry", "log_filter").as_str(), Some("debug"));
    assert_eq!(
        get("server", "request_timeout_ms").as_integer(),
        Some(10_000)
    );
    assert_eq!(get("listen", "dev").as_str(), Some("127.0.0.1:50051"));
}

async fn serving(channel: &Channel, service: &str) -> bool {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

#[tokio::test]
async fn sigterm_reports_not_serving_drains_and_exits_0() {
    let (db, redis) = (TestDatabase::create().await, TestRedis::new().await);
    let mut dev = Dev::start(&db, &redis, &[]).await;
    let channel = dev.channel().await;
    eventually("the mesh to be SERVING", Duration::from_secs(15), || {
        serving(&channel, "")
    })
    .await;

    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: "c2m.v1.HandoffService".to_owned(),
        })
        .await
        .expect("watch starts")
        .into_inner();
    let first = watch.next().await.expect("an update").expect("ok");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    dev.sigterm();
    let next = watch.next().await.expect("an update").expect("ok");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    assert_eq!(dev.exit_code(Duration::from_secs(10)).await, Some(0));

    let messages = dev.messages();
    let ready: Vec<&String> = messages
        .iter()
        .filter(|m| m.starts_with("ready: every service is SERVING"))
        .collect();
    assert_eq!(ready.len(), 1, "one ready line: {messages:?}");
    for expected in [
        "SIGTERM received, shutting down",
        "draining in-flight requests",
    ] {
        assert!(
            messages.iter().any(|m| m == expected),
            "{expected:?} not in {messages:?}"
        );
    }
}

#[tokio::test]
async fn traces_are_exported_over_otlp_and_continue_the_callers_trace() {
    let (db, redis) = (TestDatabase::create().await, TestRedis::new().await);
    let collector = otlp::Collector::start().await;
    let mut dev = Dev::start(
        &db,
        &redis,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "c2m-under-test"),
        ],
    )
    .await;
    let channel = dev.channel().await;

    // A caller already inside a trace calls a health check.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .expect("ascii"),
    );
    HealthClient::new(channel.clone())
        .check(request)
        .await
        .expect("health answers");

    // Shutdown flushes the exporter.
    dev.sigterm();
    assert_eq!(dev.exit_code(Duration::from_secs(10)).await, Some(0));

    let spans = collector.spans().await;
    let span = spans
        .iter()
        .find(|s| s.name == "grpc.health.v1.Health/Check" && hex(&s.trace_id) == trace_id)
        .unwrap_or_else(|| panic!("no health check span in trace {trace_id}: {spans:#?}"));
    assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
    assert!(
        collector
            .service_names()
            .await
            .contains(&"c2m-under-test".to_owned()),
        "resource carries OTEL_SERVICE_NAME"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn c2m_token_signs_with_the_configured_secret() {
    let secret = "a-secret-of-at-least-thirty-two-characters";
    let output = run(
        &[
            "token",
            "--role",
            "viewer",
            "--account",
            "acme",
            "--subject",
            "ada",
        ],
        &[("C2M_AUTH__TOKEN_SECRET", secret)],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let token = String::from_utf8(output.stdout).expect("utf-8");
    let claims = TokenKey::new(secret.as_bytes())
        .verify(token.trim(), std::time::SystemTime::now())
        .expect("verifies with the same secret");
    assert_eq!(claims.role, AuthRole::Viewer);
    assert_eq!(claims.account_id.as_deref(), Some("acme"));
    assert_eq!(claims.sub, "ada");

    let no_secret = run(&["token", "--role", "operator"], &[]);
    assert_eq!(no_secret.status.code(), Some(64));
    let no_account = run(
        &["token", "--role", "admin"],
        &[("C2M_AUTH__TOKEN_SECRET", secret)],
    );
    assert_eq!(no_account.status.code(), Some(2), "{}", stderr(&no_account));
    for (args, names) in [
        (["--account", "Acme Corp", "--ttl-hours", "12"], "--account"),
        (["--account", "acme", "--ttl-hours", "0"], "--ttl-hours"),
        (
            ["--account", "acme", "--ttl-hours", "100000"],
            "--ttl-hours",
        ),
    ] {
        let mut argv = vec!["token", "--role", "admin"];
        argv.extend(args);
        let refused = run(&argv, &[("C2M_AUTH__TOKEN_SECRET", secret)]);
        assert_eq!(refused.status.code(), Some(2), "{args:?}");
        assert!(stderr(&refused).contains(names), "{}", stderr(&refused));
        assert!(refused.stdout.is_empty(), "{args:?}: nothing signed");
    }
}

#[test]
fn environment_variables_that_set_nothing_are_named_with_the_likely_one() {
    let output = run(
        &["config"],
        &[
            ("C2M_DATABASE_URL", "postgres://elsewhere/c2m"),
            ("C2M_DATABSE__URL", "postgres://elsewhere/c2m"),
            ("C2M_CHANNEL_GATEWAY_PUBLIC_URL", "https://c2m.example.com"),
            ("C2M_HANDOFF__REPLICAS", "3"),
            ("C2M_TEST_DATABASE_URL", "not ours"),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let stderr = stderr(&output);
    assert!(
        stderr.contains("C2M_DATABASE_URL sets no configuration key and is ignored (did you mean C2M_DATABASE__URL?)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("C2M_CHANNEL_GATEWAY_PUBLIC_URL sets no configuration key and is ignored (did you mean C2M_CHANNEL_GATEWAY__PUBLIC_URL?)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("C2M_DATABSE__URL sets no configuration key")
            && stderr.contains("sections: listen, database,"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 3, "only the three: {stderr}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("replicas = 3"),
        "a variable that sets a key still does"
    );
}

#[test]
fn serve_refuses_to_start_without_shared_secrets() {
    let output = run(&["serve", "config", "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr(&output).contains("auth.token_secret"),
        "{}",
        stderr(&output)
    );
    let output = run(
        &["serve", "channel-gateway", "--listen", "127.0.0.1:0"],
        &[(
            "C2M_AUTH__TOKEN_SECRET",
            "a-secret-of-at-least-thirty-two-characters",
        )],
    );
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr(&output).contains("channel_gateway.credentials_key"),
        "{}",
        stderr(&output)
    );
    // Replicas of Handoff and Routing share limits and leases: only through Redis.
    for role in ["handoff", "routing"] {
        let output = run(
            &["serve", role, "--listen", "127.0.0.1:0"],
            &[(
                "C2M_AUTH__TOKEN_SECRET",
                "a-secret-of-at-least-thirty-two-characters",
            )],
        );
        assert_eq!(output.status.code(), Some(64), "{role}");
        assert!(
            stderr(&output).contains("redis.url"),
            "{role}: {}",
            stderr(&output)
        );
    }
}

#[tokio::test]
async fn dev_says_once_why_it_cannot_use_the_database_and_exits() {
    let db = TestDatabase::create().await;
    let (base, _) = db.url().rsplit_once('/').expect("a database in the url");
    let absent = format!("{base}/c2m_absent_{}", std::process::id());
    let output = run(
        &["dev", "--listen", "127.0.0.1:0"],
        &[
            ("C2M_DATABASE__URL", absent.as_str()),
            ("C2M_DATABASE__CREATE_DATABASE", "false"),
            ("C2M_LISTEN__WEBHOOKS", "127.0.0.1:0"),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let stderr = stderr(&output);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cannot use PostgreSQL"))
        .collect();
    assert_eq!(lines.len(), 1, "said once: {stderr}");
    assert!(
        lines[0].contains("(database.url)") && lines[0].contains("create_database"),
        "{stderr}"
    );
}

/// `c2m dev --demo` prints two commands; run as printed (as the README says), they deflect a
/// caller through the sandbox and show the funnel that handoff made, replied to included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_prints_commands_that_deflect_a_caller_and_show_the_funnel() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let db = TestDatabase::create().await;
    let mut command = tokio::process::Command::new(support::dev::C2M);
    for (key, _) in std::env::vars() {
        if key.starts_with("C2M_") || key.starts_with("OTEL_") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    let mut dev = command
        .args(["dev", "--demo", "--listen", "127.0.0.1:0"])
        .env("C2M_DATABASE__URL", db.url())
        .env("C2M_LISTEN__WEBHOOKS", "127.0.0.1:0")
        .env("C2M_CHANNEL_GATEWAY__PUBLIC_URL", "http://127.0.0.1:1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("c2m dev starts");
    let mut lines = BufReader::new(dev.stdout.take().expect("piped")).lines();
    let commands = tokio::time::timeout(Duration::from_secs(60), async {
        let mut commands = Vec::new();
        while let Some(line) = lines.next_line().await.expect("reads") {
            if let Some(command) = line.trim().strip_prefix("cargo run -q --release -- ") {
                commands.push(command.to_owned());
                if commands.len() == 2 {
                    return commands;
                }
            }
        }
        panic!("c2m dev --demo ended before printing two commands")
    })
    .await
    .expect("the demo's commands within a minute");
    // As a shell would split them (the one quoted value is the topic).
    let argv = |command: &str| -> Vec<String> {
        let (head, quoted) = command
            .split_once("--var topic=\"")
            .unwrap_or((command, ""));
        let mut argv: Vec<String> = head.split_whitespace().map(str::to_owned).collect();
        if !quoted.is_empty() {
            argv.push("--var".to_owned());
            argv.push(format!("topic={}", quoted.trim_end_matches('"')));
        }
        argv
    };
    let run_printed = |command: &str| {
        let argv = argv(command);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        run(&argv, &[])
    };
    let handoff = run_printed(&commands[0]);
    assert_eq!(handoff.status.code(), Some(0), "{}", stderr(&handoff));
    let handoff = String::from_utf8(handoff.stdout).expect("utf-8");
    assert!(handoff.contains("status      SENT"), "{handoff}");
    assert!(handoff.contains("channel     SMS"), "{handoff}");
    // The sandbox posts its webhooks to this run's own public URL: here, nowhere, so the
    // funnel shows what the handoff itself counted.
    eventually(
        "the funnel to count the handoff",
        Duration::from_secs(10),
        || {
            let funnel = run_printed(&commands[1]);
            let text = String::from_utf8_lossy(&funnel.stdout).into_owned();
            async move {
                funnel.status.code() == Some(0)
                    && text
                        .lines()
                        .any(|l| l.split_whitespace().eq(["ATTEMPTED", "1"]))
                    && text.lines().any(|l| l.split_whitespace().eq(["SENT", "1"]))
            }
        },
    )
    .await;
    // The same funnel by day, in a time zone named on the command line: one line, today's.
    let by_day = format!("{} --by day --time-zone Europe/Paris", commands[1]);
    let series = run_printed(&by_day);
    assert_eq!(series.status.code(), Some(0), "{}", stderr(&series));
    let text = String::from_utf8(series.stdout).expect("utf-8");
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0][0], "Europe/Paris", "{text}");
    // Paris is one or two hours ahead of UTC: its day is UTC's, or the next.
    let today = chrono::Utc::now().date_naive();
    let days = [today, today + chrono::Duration::days(1)].map(|d| d.to_string());
    assert!(
        days.contains(&lines[1][0].to_owned()),
        "a Paris day: {text}"
    );
    // day, channel, attempted, sent.
    assert_eq!(lines[1][1..4], ["CHANNEL_SMS", "1", "1"], "{text}");

    // The handoff exported for a spreadsheet (to a file) and as JSON lines (to stdout).
    let export = commands[1]
        .replace("funnel", "report export")
        .replace("--group-by channel", "");
    let dir = tempfile::tempdir().expect("a directory");
    let csv_path = dir.path().join("handoffs.csv");
    let to_file = format!("{export} --output {}", csv_path.display());
    let written = run_printed(&to_file);
    assert_eq!(written.status.code(), Some(0), "{}", stderr(&written));
    assert!(String::from_utf8_lossy(&written.stdout).starts_with("exported 1 handoffs to "));
    let csv = std::fs::read_to_string(&csv_path).expect("the file");
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2, "a header and the handoff: {csv}");
    let column = |name: &str| {
        let i = rows[0].iter().position(|c| *c == name).expect(name);
        rows[1][i]
    };
    assert!(column("handoff_id").starts_with("ho-"), "{csv}");
    assert_eq!(column("handoff_config_id"), "billing");
    assert_eq!(column("channel"), "SMS");
    assert!(column("attempted_at") <= column("sent_at") && !column("sent_at").is_empty());
    let jsonl = run_printed(&format!("{export} --format jsonl"));
    assert_eq!(jsonl.status.code(), Some(0), "{}", stderr(&jsonl));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&jsonl.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["handoffId"].as_str(), Some(column("handoff_id")));
    dev.start_kill().expect("stops");
}

/// What `c2m config` prints can be used as a file: with the secrets given again through their
/// variables it is the same configuration; with only the masks, c2m refuses, naming the key.
#[test]
fn c2m_configs_output_feeds_back_with_its_secrets_given_again() {
    let secrets = [
        (
            "C2M_AUTH__TOKEN_SECRET",
            "a-secret-of-at-least-thirty-two-characters",
        ),
        (
            "C2M_DATABASE__URL",
            "postgres://c2m:hunter2@db.internal:5432/c2m",
        ),
    ];
    let printed = run(&["config"], &secrets);
    assert_eq!(printed.status.code(), Some(0), "{}", stderr(&printed));
    let text = String::from_utf8(printed.stdout).expect("utf-8");
    assert!(
        !text.contains("hunter2") && !text.contains("thirty-two"),
        "{text}"
    );
    let file = config_file(&text);
    let path = file.path().to_str().expect("utf-8 path");

    let again = run(&["--config", path, "config"], &secrets);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(String::from_utf8(again.stdout).expect("utf-8"), text);

    // Each mask left in place is refused, naming its key.
    let masked = run(&["--config", path, "config"], &[]);
    assert_eq!(masked.status.code(), Some(64));
    let error = stderr(&masked);
    assert!(error.contains("`database.url` holds the mask"), "{error}");
    let masked = run(&["--config", path, "config"], &secrets[1..]);
    assert_eq!(masked.status.code(), Some(64));
    let error = stderr(&masked);
    assert!(
        error.contains("`auth.token_secret` holds the mask"),
        "{error}"
    );
}

/// `c2m serve` runs replicas, which share PostgreSQL: without `database.url` it says so, naming
/// the key, rather than keeping its data in a file no other replica sees.
#[test]
fn serve_refuses_to_start_without_a_database() {
    let output = run(
        &["serve", "config", "--listen", "127.0.0.1:0"],
        &[(
            "C2M_AUTH__TOKEN_SECRET",
            "a-secret-of-at-least-thirty-two-characters",
        )],
    );
    assert_eq!(output.status.code(), Some(64), "{}", stderr(&output));
    let stderr = stderr(&output);
    assert!(
        stderr.contains("`database.url` must be set for `c2m serve config`")
            && stderr.contains("only `c2m dev` keeps its data in SQLite files"),
        "{stderr}"
    );
    let migrate = run(&["migrate"], &[]);
    assert_ne!(migrate.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&migrate.stderr).contains("database.url is empty"),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
}

//! `cargo bench -p c2m-e2e --bench handoff`: CreateHandoff through the whole mesh — five separate
//! servers, PostgreSQL, Redis, the Twilio emulator — and, in the same run, a bare tonic unary
//! server as the denominator, and a skeleton of the mesh (the handoff's four calls, with nothing
//! behind them) for what the calls alone allow. Prints figures, CPU per handoff among them;
//! asserts nothing.
//!
//! Knobs (environment): C2M_BENCH_CALLERS (64), C2M_BENCH_ACCOUNTS (8), C2M_BENCH_SECONDS (10),
//! C2M_BENCH_RATE (1000, the fixed arrival rate of the latency phase; `half`: half what the
//! closed loop achieved in the same run), C2M_BENCH_FIXED_SECONDS (the fixed-rate phase's length,
//! C2M_BENCH_SECONDS unless set: 600 with `half` is the soak #20 asks for; a phase of a minute or
//! more prints a line every C2M_BENCH_REPORT_SECONDS, 30), C2M_BENCH_TOPOLOGY
//! (`separate`, `dev` for every role in one server calling the others in process, or `embedded`
//! for `c2m dev` with nothing configured: SQLite files and no Redis),
//! C2M_BENCH_WORKERS (2, the runtime's worker threads, which the servers and the callers share),
//! C2M_BENCH_PHASES (`closed,fixed,echo,skeleton`: which phases run, e.g. `fixed` alone while
//! profiling the latency phase), C2M_BENCH_PROVIDER_LATENCY (`none`; `fixed:<ms>` or
//! `lognormal:<median ms>:<p99 ms>`, e.g. `lognormal:150:600` for Twilio-like answers: the
//! emulator takes that long to answer each send, after warm-up).

/// The allocator the `c2m` binary ships with, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "cpu.rs"]
mod cpu;
#[allow(dead_code)]
#[path = "../grpc.rs"]
mod grpc;
#[allow(dead_code)]
#[path = "../story.rs"]
mod story;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use c2m_proto::v1::{
    self as pb, HandoffStatus,
    handoff_service_client::HandoffServiceClient,
    handoff_service_server::{HandoffService, HandoffServiceServer},
};
use c2m_runtime::auth::Role as AuthRole;
use c2m_test_support::RedisServer;
use cpu::Cpu;
use story::{Options, Story, Topology, authed, handoff_request, onboard, token};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether the phase `name` is among C2M_BENCH_PHASES (all of them when it is unset).
fn phase(name: &str) -> bool {
    std::env::var("C2M_BENCH_PHASES")
        .map_or(true, |phases| phases.split(',').any(|p| p.trim() == name))
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Accounts {
    keys: Vec<(String, String)>,
    next: AtomicU64,
}

impl Accounts {
    /// A fresh request (new consumer, new idempotency key) for the next account in turn.
    fn request(&self) -> (pb::CreateHandoffRequest, &str) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (account, key) = &self.keys[(n as usize) % self.keys.len()];
        let phone = format!("+1{}", 2_000_000_000 + n);
        (handoff_request(account, &phone, &format!("bench-{n}")), key)
    }
}

/// One handoff's latency, or the error it got (an overloaded mesh times out or sheds load).
async fn handoff_once(
    client: &mut HandoffServiceClient<Channel>,
    accounts: &Accounts,
) -> Result<Duration, tonic::Code> {
    let (request, key) = accounts.request();
    let started = Instant::now();
    let answer = client
        .create_handoff(authed(request, key))
        .await
        .map_err(|s| s.code())?;
    let took = started.elapsed();
    let status = answer.into_inner().handoff.expect("handoff").status;
    assert_eq!(
        status,
        HandoffStatus::Sent as i32,
        "every bench handoff sends"
    );
    Ok(took)
}

/// Sorted latencies of the successes, and how many failed.
fn split(results: Vec<Result<Duration, tonic::Code>>) -> (Vec<Duration>, usize) {
    let failed = results.iter().filter(|r| r.is_err()).count();
    let mut ok: Vec<Duration> = results.into_iter().filter_map(Result::ok).collect();
    ok.sort();
    (ok, failed)
}

/// `callers` loops for `seconds`; (sorted latencies of successes, failures).
async fn closed_loop(
    client: &HandoffServiceClient<Channel>,
    accounts: &Arc<Accounts>,
    callers: u64,
    seconds: u64,
) -> (Vec<Duration>, usize) {
    let until = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let mut client = client.clone();
            let accounts = accounts.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    latencies.push(handoff_once(&mut client, &accounts).await);
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("caller"));
    }
    split(all)
}

/// Latencies in fixed memory: exact below 1,024 µs, then 64 bins per power of two, so a
/// percentile is read at most 1.6 % low. A ten-minute soak then measures the servers' memory,
/// not its own bookkeeping.
#[derive(Clone)]
struct Latencies {
    bins: Vec<u64>,
    count: u64,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            bins: vec![0; 1024 + 54 * 64],
            count: 0,
        }
    }
}

impl Latencies {
    fn bin(us: u64) -> usize {
        if us < 1024 {
            return us as usize;
        }
        let power = 63 - u64::from(us.leading_zeros());
        1024 + ((power - 10) * 64 + ((us >> (power - 6)) - 64)) as usize
    }

    /// The smallest latency of a bin.
    fn floor(bin: usize) -> u64 {
        if bin < 1024 {
            return bin as u64;
        }
        let (power, offset) = (10 + (bin - 1024) / 64, (bin - 1024) % 64);
        ((64 + offset) as u64) << (power - 6)
    }

    fn record(&mut self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let last = self.bins.len() - 1;
        self.bins[Self::bin(us).min(last)] += 1;
        self.count += 1;
    }

    fn at(&self, q: f64) -> Duration {
        let rank = ((self.count.max(1) - 1) as f64 * q).round() as u64;
        let mut seen = 0;
        for (bin, n) in self.bins.iter().enumerate() {
            seen += n;
            if seen > rank {
                return Duration::from_micros(Self::floor(bin));
            }
        }
        Duration::ZERO
    }
}

/// What the fixed-rate phase's handoffs recorded as they ended: in the whole phase, and since
/// the sampler's last line.
#[derive(Default)]
struct Outcomes {
    ok: Latencies,
    failed: usize,
    window: Latencies,
    window_failed: usize,
}

impl Outcomes {
    fn record(&mut self, outcome: Result<Duration, tonic::Code>) {
        match outcome {
            Ok(took) => {
                self.ok.record(took);
                self.window.record(took);
            }
            Err(_) => {
                self.failed += 1;
                self.window_failed += 1;
            }
        }
    }
}

/// One handoff started every 1/rate s for `seconds`, whatever the answers; (completions per
/// second, latencies of successes, failures). Each handoff records its outcome in
/// `outcomes` as it ends, and `in_flight` counts those still waiting.
async fn open_loop(
    client: &HandoffServiceClient<Channel>,
    accounts: &Arc<Accounts>,
    rate: u64,
    seconds: u64,
    in_flight: &Arc<AtomicU64>,
    outcomes: &Arc<std::sync::Mutex<Outcomes>>,
) -> (f64, Latencies, usize) {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    // Not a JoinHandle per handoff: a finished task's memory stays until it is joined.
    let handoffs = tokio_util::task::TaskTracker::new();
    for _ in 0..rate * seconds {
        ticker.tick().await;
        let mut client = client.clone();
        let accounts = accounts.clone();
        let in_flight = in_flight.clone();
        let outcomes = outcomes.clone();
        handoffs.spawn(async move {
            in_flight.fetch_add(1, Ordering::Relaxed);
            let outcome = handoff_once(&mut client, &accounts).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            outcomes.lock().expect("outcomes").record(outcome);
        });
    }
    handoffs.close();
    handoffs.wait().await;
    let elapsed = started.elapsed().as_secs_f64();
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    let achieved = (outcomes.ok.count as f64 + outcomes.failed as f64) / elapsed;
    (achieved, outcomes.ok, outcomes.failed)
}

/// The same closed loop against a bare tonic unary service (health Check, no layers).
async fn echo_baseline(callers: u64, seconds: u64) -> f64 {
    let (url, server) = echo_server().await;
    let channel = grpc::channel(&url).await;
    let count = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let mut client = HealthClient::new(channel.clone());
            let count = count.clone();
            tokio::spawn(async move {
                while Instant::now() < until {
                    client
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .expect("echo answers");
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("caller");
    }
    server.abort();
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// A Handoff that makes a handoff's calls and does nothing else: the IVR's call to it, a unary
/// call to a "Routing" and one to a "Gateway" (bare tonic servers), and an HTTP/1.1 POST to a
/// "provider" (a bare axum route), one after the other as a handoff makes them. No database, no
/// Redis, no logic. Its throughput is what the mesh's shape allows on this machine, and its
/// ratio to the echo the best the handoff's could be.
#[derive(Clone)]
struct Skeleton {
    routing: HealthClient<Channel>,
    gateway: HealthClient<Channel>,
    http: reqwest::Client,
    provider: String,
}

#[tonic::async_trait]
impl HandoffService for Skeleton {
    async fn create_handoff(
        &self,
        _request: tonic::Request<pb::CreateHandoffRequest>,
    ) -> Result<tonic::Response<pb::CreateHandoffResponse>, tonic::Status> {
        let ask = || HealthCheckRequest {
            service: String::new(),
        };
        self.routing.clone().check(ask()).await?;
        self.gateway.clone().check(ask()).await?;
        self.http
            .post(&self.provider)
            .body("To=%2B14155550123&Body=hello")
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?
            .bytes()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        Ok(tonic::Response::new(pb::CreateHandoffResponse {
            handoff: Some(pb::Handoff {
                status: HandoffStatus::Sent as i32,
                ..Default::default()
            }),
        }))
    }

    async fn check_eligibility(
        &self,
        _request: tonic::Request<pb::CheckEligibilityRequest>,
    ) -> Result<tonic::Response<pb::CheckEligibilityResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("skeleton"))
    }

    async fn get_handoff(
        &self,
        _request: tonic::Request<pb::GetHandoffRequest>,
    ) -> Result<tonic::Response<pb::GetHandoffResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("skeleton"))
    }

    async fn flush_deflections(
        &self,
        _request: tonic::Request<pb::FlushDeflectionsRequest>,
    ) -> Result<tonic::Response<pb::FlushDeflectionsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("skeleton"))
    }
}

/// A listener on a free loopback port, and its address.
async fn listen() -> (tokio::net::TcpListener, std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// Serves a bare health service (the echo) on a free port; its URL and server task.
async fn echo_server() -> (String, tokio::task::JoinHandle<()>) {
    let (listener, addr) = listen().await;
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("echo serves");
    });
    (format!("http://{addr}"), server)
}

/// The closed loop against [`Skeleton`]: handoffs per second.
async fn skeleton(accounts: &Arc<Accounts>, callers: u64, seconds: u64) -> f64 {
    let (routing_url, routing) = echo_server().await;
    let (gateway_url, gateway) = echo_server().await;
    let (provider_listener, provider_addr) = listen().await;
    let provider = tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/messages",
            axum::routing::post(|| async { r#"{"sid":"SM0","status":"queued"}"# }),
        );
        axum::serve(provider_listener, app)
            .await
            .expect("provider serves");
    });
    let front = Skeleton {
        routing: HealthClient::new(grpc::channel(&routing_url).await),
        gateway: HealthClient::new(grpc::channel(&gateway_url).await),
        http: reqwest::Client::new(),
        provider: format!("http://{provider_addr}/messages"),
    };
    let (front_listener, front_addr) = listen().await;
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(HandoffServiceServer::new(front))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                front_listener,
            ))
            .await
            .expect("skeleton serves");
    });
    let client = HandoffServiceClient::new(grpc::channel(&format!("http://{front_addr}")).await);
    let (done, failed) = closed_loop(&client, accounts, callers, seconds).await;
    assert_eq!(failed, 0, "the skeleton answers every call");
    for task in [routing, gateway, provider, server] {
        task.abort();
    }
    done.len() as f64 / seconds as f64
}

/// `cmdstat_<name>` calls from INFO commandstats.
async fn command_calls(redis: &RedisServer) -> std::collections::HashMap<String, u64> {
    let client = redis::Client::open(redis.url()).expect("url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .expect("info");
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

fn main() {
    let callers = knob("C2M_BENCH_CALLERS", 64);
    let account_count = knob("C2M_BENCH_ACCOUNTS", 8);
    let seconds = knob("C2M_BENCH_SECONDS", 10);
    let half = std::env::var("C2M_BENCH_RATE").is_ok_and(|r| r == "half");
    let mut rate = knob("C2M_BENCH_RATE", 1000);
    let fixed_seconds = knob("C2M_BENCH_FIXED_SECONDS", seconds);
    // `separate` (the default): five servers calling each other over gRPC, as five Deployments
    // do; `dev`: all roles in one server calling each other in process, as `c2m dev` does.
    let topology = std::env::var("C2M_BENCH_TOPOLOGY").unwrap_or_default();
    let embedded = topology == "embedded";
    let one_process = embedded || topology == "dev";
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(knob("C2M_BENCH_WORKERS", 2) as usize)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let redis = RedisServer::start();
        let data = tempfile::tempdir().expect("a data directory");
        let backends = if embedded {
            Options::embedded(data.path())
        } else {
            Options {
                redis_url: Some(redis.url()),
                db_max_connections: Some(16),
                ..Options::default()
            }
        };
        let story = Story::start_with(
            if one_process {
                Topology::Dev
            } else {
                Topology::Separate
            },
            Options {
                // Probes as often as a deployment's (the tests' 50 ms would be load of its own).
                health_interval_ms: Some(2_000),
                ..backends
            },
        )
        .await;
        let mut keys = Vec::new();
        for a in 0..account_count {
            let account = format!("bench-{a}");
            let key = onboard(&story, &account).await;
            story
                .config()
                .await
                .update_account_settings(authed(
                    pb::UpdateAccountSettingsRequest {
                        account_id: account.clone(),
                        settings: Some(pb::AccountSettings {
                            deflection_enabled: true,
                            rate_limit_per_second: 100_000,
                            ..Default::default()
                        }),
                    },
                    &token(AuthRole::Admin, Some(&account)),
                ))
                .await
                .expect("limit raised");
            keys.push((account, key));
        }
        let accounts = Arc::new(Accounts {
            keys,
            next: AtomicU64::new(0),
        });
        let client = story.handoff().await;
        // Warm caches, pools and the script cache (Handoff has not read the accounts yet, so it
        // reads them with the raised limits).
        closed_loop(&client, &accounts, callers, 2).await;

        let topology = if embedded {
            "one process (c2m dev, embedded: SQLite files, no Redis)"
        } else if one_process {
            "one process (c2m dev)"
        } else {
            "five separate servers"
        };
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!("c2m handoff benchmark: {topology}, {callers} callers, {account_count} accounts, {seconds} s per phase, {cores} cores");
        let latency = std::env::var("C2M_BENCH_PROVIDER_LATENCY").unwrap_or_else(|_| "none".into());
        let provider = c2m_test_support::Latency::parse(&latency).unwrap_or_else(|| {
            panic!("C2M_BENCH_PROVIDER_LATENCY={latency}: none, fixed:<ms> or lognormal:<median ms>:<p99 ms>")
        });
        story.twilio.set_latency(provider);
        // Counted, not kept: the soak measures the servers' memory, not the emulator's record.
        story.twilio.keep_only_counts();
        println!("  provider latency (Twilio's emulator): {latency}");
        let mut throughput = None;
        if phase("closed") {
            let before = command_calls(&redis).await;
            let cpu_before = Cpu::now();
            let (latencies, failed) = closed_loop(&client, &accounts, callers, seconds).await;
            let cpu_after = Cpu::now();
            let done = latencies.len();
            let after = command_calls(&redis).await;
            let delta = |name: &str| {
                after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
            };
            let scripts = delta("evalsha") + delta("eval");
            let all_commands: u64 = after
                .iter()
                .map(|(name, calls)| calls - before.get(name).copied().unwrap_or(0))
                .sum::<u64>()
                - delta("info")
                - delta("ping");
            let achieved = done as f64 / seconds as f64;
            throughput = Some(achieved);
            if half {
                // The soak's rate: half the capacity just measured.
                rate = (achieved / 2.0).round() as u64;
            }
            println!("  closed loop: {achieved:.0} handoffs/s ({done} handoffs, {failed} failed)");
            println!(
                "    latency p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms",
                ms(percentile(&latencies, 0.50)),
                ms(percentile(&latencies, 0.99)),
                ms(percentile(&latencies, 0.999))
            );
            println!("    {}", cpu_before.report(&cpu_after, done + failed));
            println!(
                "  redis: {:.3} round trips (EVALSHA/EVAL) per handoff; {:.2} commands per handoff counting those run inside the script",
                scripts as f64 / done as f64,
                all_commands as f64 / done as f64
            );
        }
        if phase("fixed") {
            let cpu_before = Cpu::now();
            // Sampled every 10 ms while the phase runs: handoffs the IVRs wait on, and the
            // PostgreSQL connections of the run's database that are in a statement or a
            // transaction (none may be held across a provider's answer).
            let in_flight = Arc::new(AtomicU64::new(0));
            let sampling = tokio_util::sync::CancellationToken::new();
            let outcomes = Arc::new(std::sync::Mutex::new(Outcomes::default()));
            let sampler = tokio::spawn(sample(
                in_flight.clone(),
                (!embedded).then(|| story.db.url().to_owned()),
                outcomes.clone(),
                // A line per half minute in a long phase, to see a trend.
                Some(knob("C2M_BENCH_REPORT_SECONDS", 30)).filter(|_| fixed_seconds >= 60),
                sampling.clone(),
            ));
            let database = (!embedded).then(|| story.db.url().to_owned());
            let scans_before = table_scans(database.as_deref()).await;
            let accepted_before = story.twilio.accepted();
            let (achieved, fixed, failed) = open_loop(
                &client,
                &accounts,
                rate,
                fixed_seconds,
                &in_flight,
                &outcomes,
            )
            .await;
            sampling.cancel();
            let samples = sampler.await.expect("the sampler");
            let answered = fixed.count as usize + failed;
            let cpu = cpu_before.report(&Cpu::now(), answered);
            println!(
                "  fixed rate {rate}/s (completed {achieved:.0}/s, {failed} failed): p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms",
                ms(fixed.at(0.50)),
                ms(fixed.at(0.99)),
                ms(fixed.at(0.999))
            );
            println!("    {cpu}");
            println!(
                "    Twilio's emulator accepted {} messages for these {} handoffs ({} answered SENT)",
                story.twilio.accepted() - accepted_before,
                answered,
                fixed.count
            );
            println!("    {samples}");
            // A statement that scans a table grows with it: the soak's first suspect. Scans count
            // too when they read no rows: a table of dead rows (no vacuum) costs its pages.
            let scans_after = table_scans(database.as_deref()).await;
            let mut scanned: Vec<(&String, TableScans)> = scans_after
                .iter()
                .map(|(table, after)| {
                    let before = scans_before.get(table).copied().unwrap_or_default();
                    (
                        table,
                        TableScans {
                            scans: after.scans - before.scans,
                            rows: after.rows - before.rows,
                            dead: after.dead,
                        },
                    )
                })
                .filter(|(_, delta)| delta.scans > 0)
                .collect();
            scanned.sort_by_key(|(_, delta)| (-delta.rows, -delta.scans));
            if !scanned.is_empty() {
                println!("    sequential scans per handoff, and the rows they read (dead rows at the end):");
            }
            for (table, delta) in scanned.into_iter().take(4) {
                let per = |n: i64| n as f64 / answered.max(1) as f64;
                println!(
                    "      {:8.3} scans, {:10.1} rows  {table} ({} dead)",
                    per(delta.scans),
                    per(delta.rows),
                    delta.dead
                );
            }
        }
        let echo = if phase("echo") {
            Some(echo_baseline(callers, seconds).await)
        } else {
            None
        };
        if let Some(echo) = echo {
            println!("  bare tonic unary echo, same callers: {echo:.0} calls/s");
            if let Some(throughput) = throughput {
                println!("  ratio handoff/echo: {:.3}", throughput / echo);
            }
        }
        if phase("skeleton") {
            let shape = skeleton(&accounts, callers, seconds).await;
            print!("  skeleton (the handoff's four calls, nothing behind them): {shape:.0} calls/s");
            if let Some(echo) = echo {
                print!(", ratio to echo {:.3}", shape / echo);
            }
            if let Some(throughput) = throughput {
                print!("; handoff/skeleton {:.3}", throughput / shape);
            }
            println!();
        }
        let (rss, peak) = (status_kb("VmRSS:"), status_kb("VmHWM:"));
        println!(
            "  this process (servers and callers): RSS {} MB, peak {} MB",
            rss / 1024,
            peak / 1024
        );
        story.stop().await;
        drop(redis);
    });
}

/// A sampled quantity's mean and maximum, in fixed memory.
#[derive(Default, Clone, Copy)]
struct Gauge {
    sum: u64,
    n: u64,
    max: u64,
}

impl Gauge {
    fn add(&mut self, value: u64) {
        self.sum += value;
        self.n += 1;
        self.max = self.max.max(value);
    }

    fn mean(&self) -> f64 {
        self.sum as f64 / self.n.max(1) as f64
    }
}

/// What the fixed-rate phase's sampler saw.
struct Samples {
    in_flight: Gauge,
    /// This process's resident memory (kB) once a second, with the seconds since the start.
    rss_kb: Vec<(u64, u64)>,
    /// Busy PostgreSQL connections (`None`: no PostgreSQL in this run).
    connections: Option<Gauge>,
    /// How often each statement was seen running, by what it was doing (`cpu` or the wait event):
    /// a sampling profile of PostgreSQL's time, with the number of samples.
    statements: std::collections::HashMap<(String, String), u64>,
    ticks: u64,
}

impl std::fmt::Display for Samples {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "in flight: mean {:.1}, max {}",
            self.in_flight.mean(),
            self.in_flight.max
        )?;
        match &self.connections {
            Some(busy) => write!(
                f,
                "; PostgreSQL connections busy: mean {:.1}, max {}",
                busy.mean(),
                busy.max
            ),
            None => write!(f, "; no PostgreSQL"),
        }?;
        // Growth: the last sample against the first a minute in (or the first, in a short run).
        let mb = |kb: u64| kb as f64 / 1024.0;
        let minute = self.rss_kb.iter().find(|(at, _)| *at >= 60);
        if let (Some((from, first)), Some((to, last))) =
            (minute.or(self.rss_kb.first()), self.rss_kb.last())
        {
            write!(
                f,
                "\n    RSS at {from} s {:.0} MB, at {to} s {:.0} MB: {:+.1} %",
                mb(*first),
                mb(*last),
                (*last as f64 / (*first).max(1) as f64 - 1.0) * 100.0
            )?;
        }
        if !self.statements.is_empty() {
            let mut seen: Vec<_> = self.statements.iter().collect();
            seen.sort_by(|a, b| b.1.cmp(a.1));
            write!(
                f,
                "\n    PostgreSQL's statements seen running (connections on average, of {} samples):",
                self.ticks
            )?;
            for ((doing, statement), n) in seen.into_iter().take(12) {
                write!(
                    f,
                    "\n      {:5.2} {doing:<24} {statement}",
                    *n as f64 / self.ticks.max(1) as f64
                )?;
            }
        }
        Ok(())
    }
}

/// Samples the handoffs in flight and, given the run's database, its busy connections and what
/// they run, every 10 ms until `stop`. Given `every`, prints a line per that many seconds: the
/// handoffs that ended in it, their p50 and p99, and the state now.
async fn sample(
    in_flight: Arc<AtomicU64>,
    database: Option<String>,
    outcomes: Arc<std::sync::Mutex<Outcomes>>,
    every: Option<u64>,
    stop: tokio_util::sync::CancellationToken,
) -> Samples {
    use sqlx::Connection;

    let mut watcher = match &database {
        Some(url) => Some(
            sqlx::PgConnection::connect(url)
                .await
                .expect("the sampler connects"),
        ),
        None => None,
    };
    let mut samples = Samples {
        rss_kb: Vec::new(),
        in_flight: Gauge::default(),
        connections: watcher.as_ref().map(|_| Gauge::default()),
        statements: std::collections::HashMap::new(),
        ticks: 0,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let started = std::time::Instant::now();
    // The second the last window's line was printed, and the busy connections since.
    let (mut window_start, mut window_busy) = (0, Gauge::default());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return samples,
            _ = tick.tick() => {}
        }
        let second = started.elapsed().as_secs();
        if samples.rss_kb.last().is_none_or(|(at, _)| *at < second) {
            samples.rss_kb.push((second, status_kb("VmRSS:")));
        }
        samples.in_flight.add(in_flight.load(Ordering::Relaxed));
        samples.ticks += 1;
        if let (Some(watcher), Some(busy)) = (watcher.as_mut(), samples.connections.as_mut()) {
            let running: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT state, coalesce(wait_event_type || ':' || wait_event, 'cpu'), \
                        left(regexp_replace(query, '\\s+', ' ', 'g'), 110) \
                 FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> pg_backend_pid() AND state IN ('active', 'idle in transaction')",
            )
            .fetch_all(&mut *watcher)
            .await
            .expect("pg_stat_activity");
            busy.add(running.len() as u64);
            window_busy.add(running.len() as u64);
            for (state, doing, statement) in running {
                let doing = if state == "active" { doing } else { state };
                *samples.statements.entry((doing, statement)).or_default() += 1;
            }
        }
        if every.is_some_and(|e| second >= window_start + e) {
            let (ok, failed) = {
                let mut outcomes = outcomes.lock().expect("outcomes");
                let failed = std::mem::take(&mut outcomes.window_failed);
                (std::mem::take(&mut outcomes.window), failed)
            };
            println!(
                "    [{second:>4} s] ended {:.0}/s, {failed} failed; p50 {:.0} ms, p99 {:.0} ms; in flight {}; PostgreSQL busy {:.1}; RSS {} MB",
                (ok.count as f64 + failed as f64) / (second - window_start).max(1) as f64,
                ms(ok.at(0.5)),
                ms(ok.at(0.99)),
                in_flight.load(Ordering::Relaxed),
                window_busy.mean(),
                status_kb("VmRSS:") / 1024
            );
            (window_start, window_busy) = (second, Gauge::default());
        }
    }
}

/// A table's sequential scans and the rows they read so far, and its dead rows now.
#[derive(Default, Clone, Copy)]
struct TableScans {
    scans: i64,
    rows: i64,
    dead: i64,
}

/// [`TableScans`] per table of the run's database.
async fn table_scans(database: Option<&str>) -> std::collections::HashMap<String, TableScans> {
    use sqlx::Connection;

    let Some(url) = database else {
        return Default::default();
    };
    let mut connection = sqlx::PgConnection::connect(url)
        .await
        .expect("connects for table statistics");
    sqlx::query_as::<_, (String, i64, i64, i64)>(
        "SELECT schemaname || '.' || relname, seq_scan, seq_tup_read, n_dead_tup \
         FROM pg_stat_user_tables",
    )
    .fetch_all(&mut connection)
    .await
    .expect("pg_stat_user_tables")
    .into_iter()
    .map(|(table, scans, rows, dead)| (table, TableScans { scans, rows, dead }))
    .collect()
}

/// A line of /proc/self/status in kB (0 where there is none).
fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

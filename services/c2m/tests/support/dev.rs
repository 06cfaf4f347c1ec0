//! A `c2m dev` process on an ephemeral port, logging JSON to a channel: started, stopped with
//! SIGTERM or killed with SIGKILL the way an operator (or a crash) would.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use c2m_test_support::{TestDatabase, TestRedis, free_port};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

pub const C2M: &str = env!("CARGO_BIN_EXE_c2m");

pub struct Dev {
    pub child: Child,
    pub logs: mpsc::UnboundedReceiver<serde_json::Value>,
    pub addr: SocketAddr,
}

impl Dev {
    /// `c2m dev` on an ephemeral port.
    pub async fn start(db: &TestDatabase, redis: &TestRedis, extra: &[(&str, &str)]) -> Self {
        Self::launch(&["dev", "--listen", "127.0.0.1:0"], db, redis, extra).await
    }

    /// `c2m serve <role>` on `listen` (its peers named in `extra`).
    pub async fn serve(
        role: &str,
        listen: &str,
        db: &TestDatabase,
        redis: &TestRedis,
        extra: &[(&str, &str)],
    ) -> Self {
        Self::launch(&["serve", role, "--listen", listen], db, redis, extra).await
    }

    async fn launch(
        args: &[&str],
        db: &TestDatabase,
        redis: &TestRedis,
        extra: &[(&str, &str)],
    ) -> Self {
        let backends = [
            ("C2M_DATABASE__URL", db.url().to_owned()),
            ("C2M_REDIS__URL", redis.url().to_owned()),
            ("C2M_REDIS__KEY_PREFIX", redis.prefix().to_owned()),
        ];
        Self::launch_on(args, &backends, extra).await
    }

    /// `c2m dev` on an ephemeral port with nothing configured: its data in SQLite files under
    /// `data_dir`, no Redis.
    #[allow(dead_code)]
    pub async fn embedded(data_dir: &std::path::Path, extra: &[(&str, &str)]) -> Self {
        let dir = [(
            "C2M_EMBEDDED__DATA_DIR",
            data_dir.to_str().expect("a UTF-8 path").to_owned(),
        )];
        Self::launch_on(&["dev", "--listen", "127.0.0.1:0"], &dir, extra).await
    }

    async fn launch_on(args: &[&str], backends: &[(&str, String)], extra: &[(&str, &str)]) -> Self {
        let mut command = Command::new(C2M);
        for (key, _) in std::env::vars() {
            if key.starts_with("C2M_") || key.starts_with("OTEL_") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        let mut child = command
            .args(args)
            .args(["--log-format", "json"])
            .envs(backends.iter().map(|(k, v)| (*k, v.as_str())))
            .env("C2M_SERVER__HEALTH_INTERVAL_MS", "50")
            .env("C2M_SERVER__GRACE_PERIOD_SECS", "2")
            .env("C2M_LISTEN__WEBHOOKS", "127.0.0.1:0")
            .envs(extra.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("c2m starts");
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let (tx, mut logs) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "fields": { "message": line } }));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        let addr = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let line = logs.recv().await.expect("c2m exited before serving");
                if line["fields"]["message"] == "serving" {
                    let addr = line["fields"]["addr"].as_str().expect("addr field");
                    return addr.parse::<SocketAddr>().expect("an address");
                }
            }
        })
        .await
        .expect("c2m logs `serving` within 20 s");
        Self { child, logs, addr }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connects")
    }

    /// Waits until every c2m service reports SERVING (its schema migrated, its backends up).
    pub async fn until_serving(&self) -> Channel {
        self.until_serving_only(&[
            "c2m.v1.HandoffService",
            "c2m.v1.RoutingService",
            "c2m.v1.ChannelGatewayService",
            "c2m.v1.ConfigService",
            "c2m.v1.ReportingService",
        ])
        .await
    }

    /// Waits until `services` report SERVING.
    pub async fn until_serving_only(&self, services: &[&'static str]) -> Channel {
        let channel = self.channel().await;
        let services = services.to_vec();
        c2m_test_support::eventually("every service serving", Duration::from_secs(20), || {
            let channel = channel.clone();
            let services = services.clone();
            async move {
                for service in services {
                    let status = HealthClient::new(channel.clone())
                        .check(HealthCheckRequest {
                            service: service.to_owned(),
                        })
                        .await
                        .map(|r| r.into_inner().status);
                    if status.ok() != Some(ServingStatus::Serving as i32) {
                        return false;
                    }
                }
                true
            }
        })
        .await;
        channel
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// A crash: the process ends at once, whatever it was doing.
    pub async fn kill9(mut self) {
        self.signal("-KILL");
        self.child.wait().await.expect("reaped");
    }

    /// Waits up to `deadline` for the process to exit; its exit code.
    pub async fn exit_code(&mut self, deadline: Duration) -> Option<i32> {
        tokio::time::timeout(deadline, self.child.wait())
            .await
            .expect("c2m exits in time")
            .expect("wait works")
            .code()
    }

    /// Every log message seen so far.
    pub fn messages(&mut self) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(line) = self.logs.try_recv() {
            seen.push(
                line["fields"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        seen
    }
}

/// The five roles as separate `c2m serve` processes, each knowing the others by address: the
/// addresses are chosen before any process starts (each must know the others'), and kept across
/// a restart.
pub struct Mesh {
    /// handoff, routing, channel-gateway, config, reporting: `None` once killed.
    pub servers: Vec<Option<Dev>>,
    /// A channel to each, in the same order.
    pub channels: Vec<Channel>,
    addrs: Vec<String>,
    env: Vec<(&'static str, String)>,
}

const ROLES: [(&str, &str); 5] = [
    ("handoff", "c2m.v1.HandoffService"),
    ("routing", "c2m.v1.RoutingService"),
    ("channel-gateway", "c2m.v1.ChannelGatewayService"),
    ("config", "c2m.v1.ConfigService"),
    ("reporting", "c2m.v1.ReportingService"),
];

impl Mesh {
    /// Every role started and serving, with `env` besides the peers' addresses.
    pub async fn start(
        db: &TestDatabase,
        redis: &TestRedis,
        mut env: Vec<(&'static str, String)>,
    ) -> Self {
        let addrs: Vec<String> = ROLES
            .iter()
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        for (key, addr) in [
            "C2M_PEERS__HANDOFF",
            "C2M_PEERS__ROUTING",
            "C2M_PEERS__CHANNEL_GATEWAY",
            "C2M_PEERS__CONFIG",
            "C2M_PEERS__REPORTING",
        ]
        .into_iter()
        .zip(&addrs)
        {
            env.push((key, format!("http://{addr}")));
        }
        let mut mesh = Self {
            servers: Vec::new(),
            channels: Vec::new(),
            addrs,
            env,
        };
        for (i, (_, service)) in ROLES.iter().enumerate() {
            let server = mesh.serve(i, db, redis).await;
            mesh.channels
                .push(server.until_serving_only(&[service]).await);
            mesh.servers.push(Some(server));
        }
        mesh
    }

    async fn serve(&self, i: usize, db: &TestDatabase, redis: &TestRedis) -> Dev {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Dev::serve(ROLES[i].0, &self.addrs[i], db, redis, &env).await
    }

    /// Role `i` killed with SIGKILL.
    pub async fn kill(&mut self, i: usize) {
        self.servers[i].take().expect("running").kill9().await;
    }

    /// Role `i` started again on its address (after [`Mesh::kill`]), and serving.
    pub async fn start_again(&mut self, i: usize, db: &TestDatabase, redis: &TestRedis) {
        let server = self.serve(i, db, redis).await;
        server.until_serving_only(&[ROLES[i].1]).await;
        self.servers[i] = Some(server);
    }

    /// Every role stopped with SIGTERM, each given `deadline` to exit.
    pub async fn stop(&mut self, deadline: Duration) {
        for server in self.servers.iter_mut().flatten() {
            server.sigterm();
        }
        for server in self.servers.iter_mut().flatten() {
            assert_eq!(server.exit_code(deadline).await, Some(0));
        }
    }
}

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use c2m_storage::RedisSettings;

use crate::wait::free_port;

const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// A key prefix of its own for one test on the shared Redis; its keys are deleted when dropped.
#[derive(Debug)]
pub struct TestRedis {
    url: String,
    prefix: String,
}

impl TestRedis {
    /// Panics, saying how to fix it, when the test Redis cannot be reached.
    pub async fn new() -> Self {
        let url = std::env::var("C2M_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        let client = redis::Client::open(url.as_str())
            .unwrap_or_else(|e| panic!("C2M_TEST_REDIS_URL {url} is not a redis URL: {e}"));
        let ping = async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        };
        if let Err(e) = ping.await {
            panic!(
                "cannot reach Redis at {url} ({e}); start it, or set C2M_TEST_REDIS_URL, \
                 or run the tests through tests/run, which starts a throwaway server"
            );
        }
        Self {
            url,
            prefix: format!("c2mtest-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Settings for services under test: this Redis, this test's prefix.
    pub fn settings(&self) -> RedisSettings {
        RedisSettings {
            url: self.url.clone(),
            key_prefix: self.prefix.clone(),
            ..RedisSettings::default()
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let cleanup = || -> redis::RedisResult<()> {
            let client = redis::Client::open(self.url.as_str())?;
            let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", self.prefix))
                .query(&mut connection)?;
            if !keys.is_empty() {
                redis::cmd("DEL").arg(keys).exec(&mut connection)?;
            }
            Ok(())
        };
        if let Err(e) = cleanup() {
            eprintln!("warning: redis keys under {} not deleted: {e}", self.prefix);
        }
    }
}

/// A `redis-server` process of the test's own, for tests that stop and restart Redis. Killed when
/// dropped.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Child,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts `redis-server` on `port` (e.g. the port of one that was stopped) and waits until it
    /// answers. Panics when `redis-server` is not installed or does not come up within 10 s.
    pub fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (is it installed?): {e}"));
        let server = Self { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = redis::Client::open(server.url()).expect("a valid url");
        loop {
            let up = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if up.is_ok() {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not answer within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server and waits for it to exit.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of the test's own: three primaries on loopback (`redis-server
/// --cluster-enabled yes`), their slots assigned by `redis-cli --cluster create`, ready
/// (`cluster_state:ok` on every node) when `start` returns. Killed, and its files removed, when
/// dropped.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<(u16, Child)>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    /// Panics, saying why, when `redis-server`/`redis-cli` are missing or the cluster does not
    /// form within 20 s.
    pub fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("c2m-cluster-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a directory for the cluster's files");
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..3 {
            let port = cluster_port();
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .arg("--cluster-config-file")
                .arg(cluster.dir.join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(&cluster.dir)
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start redis-server (is it installed?): {e}"));
            cluster.nodes.push((port, child));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for url in cluster.nodes() {
            let client = redis::Client::open(url.as_str()).expect("a valid url");
            while client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_err()
            {
                assert!(
                    Instant::now() < deadline,
                    "{url} did not answer within 20 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|(port, _)| format!("127.0.0.1:{port}")),
            )
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli (is it installed?): {e}"));
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        for url in cluster.nodes() {
            let client = redis::Client::open(url.as_str()).expect("a valid url");
            loop {
                let info = client
                    .get_connection_with_timeout(Duration::from_millis(200))
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c));
                if info.is_ok_and(|i| i.contains("cluster_state:ok")) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{url}: the cluster did not form within 20 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// Every node's URL.
    pub fn nodes(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(port, _)| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// Settings for services under test: this cluster, `prefix`.
    pub fn settings(&self, prefix: &str) -> RedisSettings {
        RedisSettings {
            url: String::new(),
            cluster_nodes: self.nodes(),
            key_prefix: prefix.to_owned(),
            ..RedisSettings::default()
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port for a cluster node: it and its cluster bus (the port + 10000) free, both below the
/// kernel's ephemeral range.
fn cluster_port() -> u16 {
    for _ in 0..200 {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 10_000) as u16;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

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
        Self::start_with(3, 0)
    }

    /// Three primaries, each with a replica that takes over when it dies.
    pub fn start_with_replicas() -> Self {
        Self::start_with(6, 1)
    }

    fn start_with(nodes: usize, replicas: usize) -> Self {
        let dir =
            std::env::temp_dir().join(format!("c2m-cluster-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a directory for the cluster's files");
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..nodes {
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
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli (is it installed?): {e}"));
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        cluster.until_ok(deadline);
        if replicas > 0 {
            cluster.until_replicated(deadline);
        }
        cluster
    }

    /// Waits until every primary has its replicas online (their first sync done), by
    /// `deadline`: only then can a replica take over.
    fn until_replicated(&self, deadline: Instant) {
        for url in self.nodes() {
            let client = redis::Client::open(url.as_str()).expect("a valid url");
            loop {
                let info = client
                    .get_connection_with_timeout(Duration::from_millis(200))
                    .and_then(|mut c| {
                        redis::cmd("INFO")
                            .arg("replication")
                            .query::<String>(&mut c)
                    });
                let ready = info.is_ok_and(|i| {
                    i.contains("role:slave")
                        || (i.contains("connected_slaves:1") && i.contains("state=online"))
                });
                if ready {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{url}: replicas not online in time"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Waits until every live node says `cluster_state:ok`, by `deadline`.
    fn until_ok(&self, deadline: Instant) {
        for url in self.nodes() {
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
                    "{url}: the cluster was not ok in time"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The port of the primary that serves `key` now.
    pub fn primary_of(&self, key: &str) -> u16 {
        let url = &self.nodes()[0];
        let client = redis::Client::open(url.as_str()).expect("a valid url");
        let mut connection = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("connects");
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut connection)
            .expect("a slot");
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut connection)
            .expect("the nodes");
        // `<id> <ip:port@bus> <flags> <primary> <ping> <pong> <epoch> <link> <slot ranges…>`
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (low, high) = range.split_once('-').unwrap_or((range, range));
                matches!(
                    (low.parse::<u16>(), high.parse::<u16>()),
                    (Ok(l), Ok(h)) if l <= slot && slot <= h
                )
            });
            if serves {
                let address = fields[1].split('@').next().unwrap_or_default();
                return address
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("a port");
            }
        }
        panic!("no primary serves slot {slot}")
    }

    /// Kills the node on `port` (SIGKILL) and waits until the cluster is ok without it (its
    /// replica promoted), within 30 s.
    pub fn kill_and_fail_over(&mut self, port: u16) {
        let at = self
            .nodes
            .iter()
            .position(|(p, _)| *p == port)
            .expect("a node of this cluster");
        let (_, mut child) = self.nodes.remove(at);
        let _ = child.kill();
        let _ = child.wait();
        // The others agree it failed (`fail`, not just suspected: `fail?`), then a replica
        // holds its slots and the cluster is ok again.
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = redis::Client::open(self.nodes()[0].as_str()).expect("a valid url");
        loop {
            let nodes = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("CLUSTER").arg("NODES").query::<String>(&mut c));
            let failed = nodes.is_ok_and(|nodes| {
                nodes.lines().any(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    fields.len() > 2
                        && fields[1].starts_with(&format!("127.0.0.1:{port}@"))
                        && fields[2].split(',').any(|flag| flag == "fail")
                })
            });
            if failed {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {port} not marked failed in time"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.until_ok(deadline);
    }

    /// Starts moving the slot of `key` from its primary to another one, as `redis-cli --cluster
    /// reshard` does, and stops half-way: the target imports the slot, the source migrates it,
    /// and the slot's first key (by name) has moved while the others have not. Until
    /// [`SlotMigration::finish`], a command on the moved key is answered `ASK` by the source,
    /// and one on several keys split between the two `TRYAGAIN`.
    pub fn start_migrating(&self, key: &str) -> SlotMigration {
        let source = self.primary_of(key);
        let target = self
            .primaries()
            .into_iter()
            .find(|port| *port != source)
            .expect("another primary");
        let connect = |port: u16| {
            redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .expect("a valid url")
                .get_connection_with_timeout(Duration::from_secs(2))
                .expect("connects")
        };
        let (mut from, mut to) = (connect(source), connect(target));
        let id = |c: &mut redis::Connection| -> String {
            redis::cmd("CLUSTER").arg("MYID").query(c).expect("an id")
        };
        let (source_id, target_id) = (id(&mut from), id(&mut to));
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut from)
            .expect("a slot");
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&source_id)
            .exec(&mut to)
            .expect("importing");
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&target_id)
            .exec(&mut from)
            .expect("migrating");
        let migration = SlotMigration {
            slot,
            source,
            target,
            target_id,
            ports: self.nodes.iter().map(|(port, _)| *port).collect(),
        };
        let mut keys = migration.keys_left();
        keys.sort();
        if let Some(first) = keys.first() {
            migration.migrate(std::slice::from_ref(first));
        }
        migration
    }

    /// The ports of the primaries serving slots now.
    fn primaries(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .map(|(port, _)| *port)
            .filter(|port| {
                let info = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                    .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
                    .and_then(|mut c| {
                        redis::cmd("INFO")
                            .arg("replication")
                            .query::<String>(&mut c)
                    });
                info.is_ok_and(|i| i.contains("role:master"))
            })
            .collect()
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

/// A slot half-way from one primary to another (see [`RedisCluster::start_migrating`]).
#[derive(Debug)]
pub struct SlotMigration {
    pub slot: u16,
    pub source: u16,
    pub target: u16,
    target_id: String,
    ports: Vec<u16>,
}

impl SlotMigration {
    fn connect(port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("a valid url")
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("connects")
    }

    /// The slot's keys still on the source.
    pub fn keys_left(&self) -> Vec<String> {
        redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(self.slot)
            .arg(1000)
            .query(&mut Self::connect(self.source))
            .expect("the slot's keys")
    }

    fn migrate(&self, keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(self.target)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(keys)
            .exec(&mut Self::connect(self.source))
            .expect("migrated");
    }

    /// Moves the slot's other keys and gives the slot to the target on every node.
    pub fn finish(self) {
        self.migrate(&self.keys_left());
        for port in [self.target, self.source]
            .into_iter()
            .chain(self.ports.iter().copied())
        {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(self.slot)
                .arg("NODE")
                .arg(&self.target_id)
                .exec(&mut Self::connect(port))
                .expect("the slot given");
        }
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

//! A PostgreSQL server of the test's own, for tests that crash and restart it: a cluster made by
//! `initdb` in a temporary directory and run by `pg_ctl` on a free port. PostgreSQL refuses to run
//! as root, so under root its programs run as the `postgres` user (`runuser`).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::free_port;

/// A throwaway PostgreSQL cluster; stopped, and its files removed, when dropped.
#[derive(Debug)]
pub struct PostgresServer {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// Under root: the user its programs run as.
    user: Option<&'static str>,
    _dir: tempfile::TempDir,
}

impl PostgresServer {
    /// `initdb` and a start on a free port, waiting until it takes connections. Panics, saying
    /// what is missing, when PostgreSQL's programs are not installed.
    pub fn start() -> Self {
        let bin = pg_bin().unwrap_or_else(|| {
            panic!("initdb and pg_ctl are needed (Debian: apt install postgresql)")
        });
        let user = is_root().then_some("postgres");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("a data directory");
        if let Some(user) = user {
            for path in [dir.path(), data.as_path()] {
                run(Command::new("chown").arg(user).arg(path), "chown");
            }
        }
        let server = Self {
            bin,
            data,
            port: free_port(),
            user,
            _dir: dir,
        };
        let initdb = server.bin.join("initdb");
        run(
            server.command(&initdb).arg("-D").arg(&server.data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ]),
            "initdb",
        );
        server.up();
        server
    }

    /// The server's administrative URL (database `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server the way a crash does (`pg_ctl stop -m immediate`: every process quits at
    /// once, nothing is flushed or checkpointed), and starts it again on the same port, through
    /// crash recovery. Returns once it takes connections again.
    pub fn crash_and_restart(&self) {
        self.crash();
        self.start_again();
    }

    /// Stops the server the way a crash does (see [`crash_and_restart`](Self::crash_and_restart)),
    /// leaving it down.
    pub fn crash(&self) {
        self.down();
    }

    /// Starts a crashed server again, through crash recovery; returns once it takes connections.
    pub fn start_again(&self) {
        self.up();
    }

    fn up(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.data.display()
        );
        run(
            self.command(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-t", "60", "-l"])
                .arg(self.data.join("server.log"))
                .args(["-o", &options, "start"]),
            "pg_ctl start",
        );
    }

    fn down(&self) {
        run(
            self.command(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"]),
            "pg_ctl stop",
        );
    }

    fn command(&self, program: &Path) -> Command {
        let mut command = match self.user {
            Some(user) => {
                let mut runuser = Command::new("runuser");
                runuser.args(["-u", user, "--"]).arg(program);
                runuser
            }
            None => Command::new(program),
        };
        command.stdout(Stdio::null());
        command
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let _ = self
            .command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `command`, panicking with its output when it fails.
fn run(command: &mut Command, what: &str) {
    let output = command
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Where `initdb` and `pg_ctl` are: on the PATH, or Debian's newest `/usr/lib/postgresql/*/bin`.
fn pg_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>());
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .collect();
    debian.sort_by_key(|dir| {
        dir.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    on_path
        .chain(debian.into_iter().rev())
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

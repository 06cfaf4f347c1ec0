//! CPU time from /proc, for the benches' figures.

/// CPU seconds used so far, from /proc (Linux; zeros elsewhere): by this process (the servers,
/// the callers, the emulator), by PostgreSQL's and Redis's processes on this machine, and by the
/// whole machine.
#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    pub this: f64,
    pub postgres: f64,
    pub redis: f64,
    pub machine_busy: f64,
    pub machine_all: f64,
}

impl Cpu {
    pub fn now() -> Self {
        // The kernel's clock ticks; 100 a second on every Linux this runs on.
        const HZ: f64 = 100.0;
        let times = |stat: &str| -> Option<(String, f64)> {
            let comm = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?.to_owned();
            let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
            let ticks =
                fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
            Some((comm, ticks / HZ))
        };
        let mut cpu = Cpu {
            this: std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|s| times(&s))
                .map_or(0.0, |(_, t)| t),
            postgres: 0.0,
            redis: 0.0,
            machine_busy: 0.0,
            machine_all: 0.0,
        };
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some((comm, t)) = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|s| times(&s))
            else {
                continue;
            };
            match comm.as_str() {
                "postgres" => cpu.postgres += t,
                "redis-server" => cpu.redis += t,
                _ => {}
            }
        }
        if let Some(line) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
        {
            let ticks: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|t| t.parse().ok())
                .collect();
            cpu.machine_all = ticks.iter().sum::<f64>() / HZ;
            // idle and iowait are the 4th and 5th.
            cpu.machine_busy =
                cpu.machine_all - ticks.get(3..5).map_or(0.0, |t| t.iter().sum()) / HZ;
        }
        cpu
    }

    /// Per handoff between `self` and `later`, and how busy the machine was.
    pub fn report(&self, later: &Cpu, handoffs: usize) -> String {
        let per = |a: f64, b: f64| (b - a) * 1000.0 / handoffs.max(1) as f64;
        format!(
            "cpu per handoff: {:.2} ms this process (servers, callers, emulator), {:.2} ms postgres, {:.2} ms redis; machine {:.0}% busy",
            per(self.this, later.this),
            per(self.postgres, later.postgres),
            per(self.redis, later.redis),
            100.0 * (later.machine_busy - self.machine_busy)
                / (later.machine_all - self.machine_all).max(f64::EPSILON)
        )
    }
}

//! CPU time of node processes, from `/proc/PID/stat` (Linux), for the
//! benchmarks: on a shared machine, the CPU a node spent on a workload
//! varies less than the wall time the workload took.

use std::sync::OnceLock;
use std::time::Duration;

/// Clock ticks per second of /proc's CPU times.
pub fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = std::process::Command::new("getconf").arg("CLK_TCK").output().expect("getconf CLK_TCK");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("CLK_TCK is a number")
    })
}

/// utime + stime of process `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces) start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')').expect("stat has a command").1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// utime + stime of process `pid`.
pub fn cpu_time(pid: u32) -> Duration {
    Duration::from_secs_f64(cpu_ticks(pid) as f64 / clock_ticks() as f64)
}

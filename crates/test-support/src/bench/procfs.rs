//! What /proc tells about a node process.

/// Resident memory of a process, in KiB (0 if unreadable).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_string)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used so far (0 if unreadable).
pub fn cpu_secs(pid: u32) -> f64 {
    stat_of(&format!("/proc/{pid}/stat")).map_or(0.0, |(_, secs)| secs)
}

/// CPU seconds each of a process's threads has used so far, summed by thread name (a name
/// is at most 15 characters; threads of one pool share theirs).
pub fn thread_cpu_secs(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut by_name = std::collections::BTreeMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for task in tasks.flatten() {
        if let Some((name, secs)) = stat_of(&format!("{}/stat", task.path().display())) {
            *by_name.entry(name).or_insert(0.0) += secs;
        }
    }
    by_name
}

/// CPU seconds used so far by every process named `name` (a database server's processes).
pub fn processes_cpu_secs(name: &str) -> f64 {
    let procs = std::fs::read_dir("/proc").into_iter().flatten();
    procs
        .flatten()
        .filter(|p| {
            p.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|p| stat_of(&format!("{}/stat", p.path().display())))
        .filter(|(comm, _)| comm == name)
        .map(|(_, secs)| secs)
        .sum()
}

/// Busy and idle jiffies of the whole machine so far (`/proc/stat`'s first line; iowait
/// counts as idle).
pub fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    (at(0) + at(1) + at(2) + at(5) + at(6) + at(7), at(3) + at(4))
}

/// A `stat` file's command name and CPU seconds (user + system).
fn stat_of(path: &str) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(').map_or("", |(_, n)| n).to_string();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime, fields 14 and 15 of the stat line, counted after the command's ')';
    // in clock ticks of 1/100 s.
    Some((name, (ticks(11) + ticks(12)) / 100.0))
}

//! What a demo cluster (`cargo xtask demo`) leaves on the machine, recorded so that
//! `cargo xtask demo --down` can remove it: the namespaces, pin directories and files it made,
//! and the processes it started (agents, the bgp demo's router BIRD, etcd) by pid and start
//! time. One record per demo run, in a state directory (default `/run/weft-demo`, on tmpfs: gone
//! after a reboot, as everything it lists). Teardown touches only what a record lists, checks each process is still the one
//! the demo started, and accepts only names the harness makes; it is idempotent.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;

pub const DEFAULT_STATE_DIR: &str = "/run/weft-demo";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordedProcess {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot): with the pid, identifies the
    /// process even after its pid is reused.
    pub start_time: u64,
    /// `/proc/<pid>/exe` when the demo started it.
    pub exe: PathBuf,
    /// What it is ("weft-agent on node-0", "etcd").
    pub what: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DemoRecord {
    pub demo_pid: u32,
    /// Agents first, etcd last (teardown order).
    pub processes: Vec<RecordedProcess>,
    /// Pods first, then nodes, then the underlay.
    pub namespaces: Vec<String>,
    pub pins: Vec<PathBuf>,
    pub files: Vec<PathBuf>,
}

/// A process's start time, if it exists (a zombie counts as gone).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is parenthesised and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is index 19.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn process(pid: u32, what: String) -> Option<RecordedProcess> {
    Some(RecordedProcess {
        pid,
        start_time: start_time(pid)?,
        exe: std::fs::read_link(format!("/proc/{pid}/exe")).ok()?,
        what,
    })
}

impl DemoRecord {
    /// Everything `cluster` has made so far.
    pub fn of(cluster: &Cluster) -> Self {
        let mut record = Self {
            demo_pid: std::process::id(),
            ..Default::default()
        };
        for node in &cluster.nodes {
            if let Some(agent) = &node.agent
                && let Some(p) = process(agent.pid(), format!("weft-agent on {}", node.name))
            {
                record.processes.push(p);
            }
            for pod in &node.pods {
                record.namespaces.push(pod.ns.name.clone());
            }
        }
        if let Some(router) = &cluster.router {
            if let Some(pid) = router.pid()
                && let Some(p) = process(pid, "BIRD on the underlay router".into())
            {
                record.processes.push(p);
            }
            record.files.push(router.dir.clone());
        }
        if let Some(pid) = cluster.etcd.pid()
            && let Some(p) = process(pid, "etcd".into())
        {
            record.processes.push(p);
        }
        for node in &cluster.nodes {
            record.namespaces.push(node.ns.name.clone());
            record.pins.push(node.pins.path.clone());
            record.files.push(node.dir.clone());
        }
        record.namespaces.push(cluster.underlay.name.clone());
        record.files.push(cluster.net_conf.clone());
        record.files.extend(cluster.etcd.files());
        record
    }

    fn path(state_dir: &Path, demo_pid: u32) -> PathBuf {
        state_dir.join(format!("{demo_pid}.json"))
    }

    /// Writes (or rewrites) this demo's record, atomically.
    pub fn save(&self, state_dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let path = Self::path(state_dir, self.demo_pid);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Removes this demo's record (a demo that tore itself down leaves none).
    pub fn forget(state_dir: &Path, demo_pid: u32) {
        let _ = std::fs::remove_file(Self::path(state_dir, demo_pid));
    }

    /// Every record in `state_dir`, with its path.
    pub fn load_all(state_dir: &Path) -> Result<Vec<(PathBuf, Self)>> {
        let entries = match std::fs::read_dir(state_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", state_dir.display())),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            let record: Self = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a demo record", path.display()))?;
            out.push((path, record));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Removes everything listed; what is already gone counts as removed. Returns a line per
    /// thing removed. Fails (keeping the record for another try) if anything could not be.
    pub fn tear_down(&self) -> Result<Vec<String>> {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for p in &self.processes {
            match stop_process(p) {
                Ok(true) => done.push(format!("stopped {} (pid {})", p.what, p.pid)),
                Ok(false) => {}
                Err(e) => failed.push(format!("{} (pid {}): {e:#}", p.what, p.pid)),
            }
        }
        for ns in &self.namespaces {
            if !harness_name(ns) {
                failed.push(format!(
                    "namespace {ns:?}: not a name the demo makes; left alone"
                ));
                continue;
            }
            if !Path::new("/run/netns").join(ns).exists() {
                continue;
            }
            let out = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output()?;
            if out.status.success() {
                done.push(format!("deleted namespace {ns}"));
            } else {
                failed.push(format!(
                    "namespace {ns}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        let pin_root = Path::new("/sys/fs/bpf");
        for pin in &self.pins {
            remove_path(pin, &[pin_root], "pins", &mut done, &mut failed);
        }
        let tmp = std::env::temp_dir();
        let file_roots = [tmp.as_path(), Path::new("/dev/shm")];
        for file in &self.files {
            remove_path(file, &file_roots, "file", &mut done, &mut failed);
        }
        if !failed.is_empty() {
            bail!("could not remove: {}", failed.join("; "));
        }
        Ok(done)
    }
}

/// Names `netns::unique_name` makes: a short prefix, the demo's pid, a counter.
fn harness_name(name: &str) -> bool {
    name.starts_with('w')
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Removes `path` if it lies directly in one of `roots` and is named `weft-*` (what the
/// harness makes); anything else in a record is refused.
fn remove_path(
    path: &Path,
    roots: &[&Path],
    what: &str,
    done: &mut Vec<String>,
    failed: &mut Vec<String>,
) {
    let named = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("weft-"));
    if !named || !roots.iter().any(|r| path.parent() == Some(*r)) {
        failed.push(format!(
            "{what} {}: not a path the demo makes; left alone",
            path.display()
        ));
        return;
    }
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Ok(()) => done.push(format!("removed {what} {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => failed.push(format!("{what} {}: {e}", path.display())),
    }
}

/// Stops a recorded process if it still runs (same pid, same start time, same program):
/// SIGTERM, then SIGKILL after 5 s. Returns whether it was running.
fn stop_process(p: &RecordedProcess) -> Result<bool> {
    use nix::{
        sys::signal::{Signal, kill},
        unistd::Pid,
    };
    // A rebuilt binary shows as "<path> (deleted)": still the program the demo started.
    let same = || {
        start_time(p.pid) == Some(p.start_time)
            && std::fs::read_link(format!("/proc/{}/exe", p.pid)).is_ok_and(|e| {
                let e = e.to_string_lossy();
                e.strip_suffix(" (deleted)").unwrap_or(&e) == p.exe.to_string_lossy()
            })
    };
    if !same() {
        return Ok(false);
    }
    let pid = Pid::from_raw(p.pid as i32);
    kill(pid, Signal::SIGTERM).context("SIGTERM")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if start_time(p.pid) != Some(p.start_time) {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(pid, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if start_time(p.pid) != Some(p.start_time) {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("still running after SIGKILL")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_this_process() {
        let t = start_time(std::process::id()).expect("this process exists");
        assert!(t > 0);
        assert_eq!(start_time(std::process::id()), Some(t));
    }

    #[test]
    fn refuses_what_the_demo_does_not_make() {
        let record = DemoRecord {
            demo_pid: 1,
            namespaces: vec!["../../etc".into()],
            pins: vec!["/sys/fs/bpf/weft".into()],
            files: vec!["/etc/passwd".into(), "/tmp/../etc/weft-x".into()],
            ..Default::default()
        };
        let err = format!("{:#}", record.tear_down().unwrap_err());
        for refused in [
            "../../etc",
            "/sys/fs/bpf/weft:",
            "/etc/passwd",
            "/tmp/../etc",
        ] {
            assert!(err.contains(refused), "{refused} not refused: {err}");
        }
        assert!(Path::new("/etc/passwd").exists());
    }
}

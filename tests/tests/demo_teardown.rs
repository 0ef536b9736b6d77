//! `cargo xtask demo --keep` then `cargo xtask demo --down` (the xtask runs `weft-demo` with
//! the same flags): the kept cluster leaves namespaces, pins, agents, etcd and files behind;
//! `--down` removes all of them, is idempotent, and kills no process it did not start.
//!
//! What the demo made is found independently of its record, by the names the harness gives
//! (`<prefix><demo pid>-<n>`) and by the processes whose command line names them.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use weft_tests::{
    cluster::bin_dir,
    demo::{DemoRecord, RecordedProcess, start_time},
};

/// Everything on the machine that carries the demo's pid in its name.
#[derive(Debug, Default, PartialEq, Eq)]
struct Leftovers {
    namespaces: BTreeSet<String>,
    pins: BTreeSet<PathBuf>,
    files: BTreeSet<PathBuf>,
    /// pid and command line of processes whose command line names one of the above.
    processes: BTreeSet<(u32, String)>,
}

impl Leftovers {
    fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.pins.is_empty()
            && self.files.is_empty()
            && self.processes.is_empty()
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn find_leftovers(demo_pid: u32) -> Leftovers {
    // netns::unique_name: `<prefix><pid % 100000>-<n>`.
    let tag = format!("{}-", demo_pid % 100_000);
    let made = |name: &str, prefixes: &[&str]| {
        prefixes
            .iter()
            .any(|p| name.strip_prefix(p).is_some_and(|r| r.starts_with(&tag)))
    };
    let mut found = Leftovers::default();
    for name in names_in(Path::new("/run/netns")) {
        if made(&name, &["wul", "wn", "wp"]) {
            found.namespaces.insert(name);
        }
    }
    for name in names_in(Path::new("/sys/fs/bpf")) {
        if made(&name, &["weft-test-node-"]) {
            found.pins.insert(Path::new("/sys/fs/bpf").join(name));
        }
    }
    let tmp = std::env::temp_dir();
    for name in names_in(&tmp) {
        if made(&name, &["weft-node-", "weft-net-conf-"]) {
            found.files.insert(tmp.join(name));
        }
    }
    for name in names_in(Path::new("/dev/shm")) {
        if made(&name, &["weft-etcd-"]) {
            found.files.insert(Path::new("/dev/shm").join(name));
        }
    }
    let needles: Vec<String> = found
        .pins
        .iter()
        .chain(found.files.iter())
        .map(|p| p.display().to_string())
        .collect();
    for entry in names_in(Path::new("/proc")) {
        let Ok(pid) = entry.parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // Zombies hold nothing but their pid.
        if start_time(pid).is_some() && needles.iter().any(|n| cmdline.contains(n.as_str())) {
            found.processes.insert((pid, cmdline.trim().to_string()));
        }
    }
    found
}

fn demo(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin_dir().join("weft-demo"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running weft-demo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Tears the demo down whatever happens to the test.
struct DownOnDrop(PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = demo(&["--down", "--state-dir", self.0.to_str().unwrap()]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn keep_then_down_leaves_nothing_behind() {
    let state_dir =
        std::env::temp_dir().join(format!("weft-demo-state-test-{}", std::process::id()));
    let state = state_dir.to_str().unwrap().to_string();
    let _guard = DownOnDrop(state_dir.clone());

    let child = Command::new(bin_dir().join("weft-demo"))
        .args([
            "--keep",
            "--nodes",
            "2",
            "--pods",
            "1",
            "--state-dir",
            &state,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting weft-demo --keep");
    let demo_pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "weft-demo --keep failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One teardown command, on a line of its own.
    let teardown: Vec<&str> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("--down"))
        .collect();
    assert_eq!(
        teardown,
        ["cargo xtask demo --down"],
        "the kept demo must print exactly one teardown command:\n{stdout}"
    );

    // What it left: the underlay, 2 nodes and 2 pods; 2 pin directories; node directories,
    // the net-conf, etcd's data and log; 2 agents and etcd, still running.
    let kept = find_leftovers(demo_pid);
    assert_eq!(kept.namespaces.len(), 5, "namespaces: {kept:?}");
    assert_eq!(kept.pins.len(), 2, "pins: {kept:?}");
    assert!(
        kept.files
            .iter()
            .any(|f| f.starts_with("/dev/shm") && f.is_dir()),
        "etcd's data in /dev/shm: {kept:?}"
    );
    assert_eq!(kept.files.len(), 2 + 1 + 2, "files: {kept:?}");
    let agents = kept
        .processes
        .iter()
        .filter(|(_, c)| c.contains("weft-agent"))
        .count();
    let etcd = kept
        .processes
        .iter()
        .filter(|(_, c)| c.contains("etcd") && !c.contains("weft-agent"))
        .count();
    assert_eq!((agents, etcd), (2, 1), "processes: {kept:?}");

    // The record lists exactly that.
    let records = DemoRecord::load_all(&state_dir).unwrap();
    assert_eq!(records.len(), 1, "one record: {records:?}");
    let record = &records[0].1;
    assert_eq!(record.demo_pid, demo_pid);
    assert_eq!(
        record.namespaces.iter().cloned().collect::<BTreeSet<_>>(),
        kept.namespaces
    );
    assert_eq!(
        record.pins.iter().cloned().collect::<BTreeSet<_>>(),
        kept.pins
    );
    assert_eq!(
        record.files.iter().cloned().collect::<BTreeSet<_>>(),
        kept.files
    );
    assert_eq!(
        record
            .processes
            .iter()
            .map(|p| p.pid)
            .collect::<BTreeSet<_>>(),
        kept.processes
            .iter()
            .map(|(p, _)| *p)
            .collect::<BTreeSet<_>>()
    );

    // A record naming a live process that is not the one it started (its pid reused: another
    // start time) must not get it killed.
    let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
    let decoy = DemoRecord {
        demo_pid: 1,
        processes: vec![RecordedProcess {
            pid: bystander.id(),
            start_time: start_time(bystander.id()).unwrap() + 1,
            exe: "/usr/bin/sleep".into(),
            what: "a reused pid".into(),
        }],
        ..Default::default()
    };
    decoy.save(&state_dir).unwrap();

    let (ok, text) = demo(&["--down", "--state-dir", &state]);
    assert!(ok, "weft-demo --down failed:\n{text}");
    let left = find_leftovers(demo_pid);
    assert!(
        left.is_empty(),
        "left behind after --down: {left:?}\n{text}"
    );
    assert!(
        !state_dir.exists() || names_in(&state_dir).is_empty(),
        "records left: {:?}",
        names_in(&state_dir)
    );
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "--down killed a process the demo did not start"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();

    // Idempotent.
    let (ok, text) = demo(&["--down", "--state-dir", &state]);
    assert!(ok, "a second --down failed:\n{text}");
    assert!(text.contains("no demo to tear down"), "{text}");
}

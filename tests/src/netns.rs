//! Network namespaces created by the harness, removed when dropped.
//!
//! Code runs inside a namespace on a dedicated thread that `setns`es only its network
//! namespace (not `ip netns exec`, which remounts sysfs and hides bpffs pins).
use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique name for this process: `<prefix>-<pid>-<n>`; short enough for interface names.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}-{n}", std::process::id() % 100_000)
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd} {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip` with arguments given as one string (split on whitespace).
pub fn ip(args: &str) -> String {
    let args: Vec<&str> = args.split_whitespace().collect();
    run("ip", &args)
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a namespace named `<prefix><pid>-<n>` with loopback up.
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        ip(&format!("netns add {name}"));
        let ns = Self { name };
        ns.ip("link set lo up");
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &str) -> String {
        ip(&format!("-n {} {args}", self.name))
    }

    /// Runs a program inside the namespace with `ip netns exec` (fine for tools that need no
    /// bpffs: ping, sysctl, ethtool, bridge).
    pub fn exec(&self, cmd: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, cmd];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Like `exec`, returning success instead of panicking.
    pub fn exec_ok(&self, cmd: &str, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")]);
    }

    /// Runs `f` on a thread whose network namespace is this one, and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Spawns `f` on a thread inside the namespace without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// ifindex of an interface in this namespace.
    pub fn ifindex(&self, ifname: &str) -> u32 {
        let out = self.ip(&format!("-o link show dev {ifname}"));
        out.split(':')
            .next()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ifindex for {ifname} in {}: {out}", self.name))
    }

    /// MAC address of an interface in this namespace.
    pub fn mac(&self, ifname: &str) -> [u8; 6] {
        let out = self.ip(&format!("-o link show dev {ifname}"));
        let hex = out
            .split("link/ether ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no MAC for {ifname} in {}: {out}", self.name));
        parse_mac(hex)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its interfaces (and their peers elsewhere).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Moves the calling thread into the network namespace at `path` (the agent's helper).
pub fn enter(path: &str) {
    weft_agent::ns::enter(std::path::Path::new(path)).unwrap_or_else(|e| panic!("{e:#}"));
}

pub use weft_agent::mac::format_mac;

/// `weft_agent::mac::parse_mac` for test input that must be valid.
pub fn parse_mac(s: &str) -> [u8; 6] {
    weft_agent::mac::parse_mac(s).unwrap_or_else(|| panic!("bad MAC {s}"))
}

/// Creates a veth pair `a` in `ns_a` and `b` in `ns_b` (both up).
pub fn veth_pair(ns_a: &Netns, a: &str, ns_b: &Netns, b: &str) {
    ns_a.ip(&format!(
        "link add {a} type veth peer name {b} netns {}",
        ns_b.name
    ));
    ns_a.ip(&format!("link set {a} up"));
    ns_b.ip(&format!("link set {b} up"));
}

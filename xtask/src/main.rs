//! `cargo xtask`: the project's entry points. `test` and `demo` and `bench` first make sure the
//! machine has what they need (installing only what is missing, so a prepared machine pays a
//! second), then build and run.
mod bootstrap;
mod dist;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "weft's build, test, demo and benchmark entry points"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install prerequisites, build everything, run every test (needs root).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// A three-node weft cluster in network namespaces: connectivity matrix, CLI view, teardown.
    Demo {
        /// Leave the cluster running and print how to enter a pod.
        #[arg(long, conflicts_with = "down")]
        keep: bool,
        /// Remove everything kept (or interrupted) demos left: namespaces, pins, the agents and
        /// etcd (by their recorded pids), files. Idempotent.
        #[arg(long)]
        down: bool,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods: usize,
        /// vxlan, ipip, host-gw or bgp (bgp: two underlay subnets joined by a router running
        /// BIRD as a route reflector).
        #[arg(long, default_value = "vxlan")]
        backend: String,
    },
    /// weft's datapath, CNI plugin and agent measured side by side with the kernel's and the
    /// reference plugins; writes target/bench/report.json.
    Bench {
        /// Shorter runs.
        #[arg(long)]
        quick: bool,
        /// Only these parts (repeatable): datapath, cni, agent, policy, netpol.
        #[arg(long, value_parser = ["datapath", "cni", "agent", "policy", "netpol"])]
        only: Vec<String>,
    },
    /// The release tarball: stripped release binaries, the CNI conflist, the manifest, the
    /// Dockerfile and the docs, in target/dist/.
    Dist,
    /// NetworkPolicy truth tables: runs case files (tests/netpol/*.json format) against a
    /// 3-node weft cluster in network namespaces; a line per case, a JSON report, non-zero exit
    /// on any wrong probe.
    Netpol {
        /// Where the report goes.
        #[arg(long, default_value = "target/netpol/report.json")]
        report: String,
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Only install the prerequisites.
    Bootstrap,
    /// Only the formatting and lint checks that `test` runs first.
    Lint,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Bootstrap => bootstrap::run(),
        Cmd::Dist => dist::run().map(drop),
        Cmd::Lint => {
            bootstrap::run()?;
            lint()
        }
        Cmd::Test { cargo_args } => {
            require_root("tests create network namespaces and load BPF programs")?;
            bootstrap::run()?;
            lint()?;
            cargo(&[
                "build",
                "--workspace",
                "--exclude",
                "node-ebpf",
                "--bins",
                "--tests",
            ])?;
            // The release tarball, for the tests that unpack it and run what it ships.
            dist::run()?;
            // Doc tests are left out: the crates have none, and their empty "0 passed" lines
            // would close the output.
            let mut args = vec![
                "test",
                "--workspace",
                "--exclude",
                "node-ebpf",
                "--lib",
                "--bins",
                "--tests",
            ];
            let extra: Vec<&str> = cargo_args.iter().map(String::as_str).collect();
            if !extra.is_empty() {
                args.push("--");
                args.extend(extra);
            }
            let validate = bootstrap::kubernetes_validate();
            cargo_test_with_summary(&args, &[("KUBERNETES_VALIDATE", validate.as_os_str())])
        }
        Cmd::Demo { down: true, .. } => {
            require_root("tearing the demo down deletes network namespaces and pins")?;
            // The demo's own build command: after a demo, nothing to rebuild.
            cargo(&["build", "--workspace", "--exclude", "node-ebpf", "--bins"])?;
            run_bin("debug", "weft-demo", &["--down"])
        }
        Cmd::Demo {
            keep,
            down: false,
            nodes,
            pods,
            backend,
        } => {
            require_root("the demo creates network namespaces and loads BPF programs")?;
            bootstrap::run()?;
            cargo(&["build", "--workspace", "--exclude", "node-ebpf", "--bins"])?;
            let nodes = nodes.to_string();
            let pods = pods.to_string();
            let mut args = vec!["--nodes", &nodes, "--pods", &pods, "--backend", &backend];
            if keep {
                args.push("--keep");
            }
            run_bin("debug", "weft-demo", &args)
        }
        Cmd::Netpol { report, files } => {
            require_root("the runner creates network namespaces and loads BPF programs")?;
            bootstrap::run()?;
            cargo(&["build", "--workspace", "--exclude", "node-ebpf", "--bins"])?;
            // Relative paths are the caller's: cargo runs xtask from the invocation directory.
            let cwd = std::env::current_dir()?;
            let abs = |p: &str| cwd.join(p).display().to_string();
            let mut args = vec!["--report".to_string(), abs(&report)];
            args.extend(files.iter().map(|f| abs(f)));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_bin("debug", "weft-netpol", &args)
        }
        Cmd::Bench { quick, only } => {
            require_root("benchmarks create network namespaces and load BPF programs")?;
            bootstrap::run()?;
            cargo(&["build", "--workspace", "--exclude", "node-ebpf", "--bins"])?;
            // bench-agent runs the release agent beside it.
            cargo(&[
                "build",
                "--release",
                "-p",
                "weft-agent",
                "-p",
                "weft-node",
                "-p",
                "weft-tests",
                "--bins",
            ])?;
            bench(quick, &only)
        }
    }
}

/// Formatting and lints gate the tests: `cargo fmt --check`, clippy with warnings denied for
/// the host crates, and for node-ebpf on the BPF target as aya's own xtask does (nightly,
/// `-Z build-std=core`).
fn lint() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "node-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // `rustup run`: $CARGO is the stable toolchain's cargo, which knows no `+nightly`.
    let args = [
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--package",
        "node-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ];
    eprintln!("xtask: rustup {}", args.join(" "));
    let status = Command::new("rustup")
        .args(args)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .current_dir(workspace_root())
        .status()
        .context("running rustup")?;
    if !status.success() {
        bail!("clippy of node-ebpf failed ({status})");
    }
    Ok(())
}

fn require_root(why: &str) -> Result<()> {
    if !nix_is_root() {
        bail!("run as root: {why}");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and closes with one line that sums every
/// test binary's result: `weft: N passed, N failed`.
fn cargo_test_with_summary(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
    use std::io::{BufRead as _, Write as _};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let mut child = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    let mut out = std::io::stdout();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        writeln!(out, "{line}")?;
        // "test result: ok. 12 passed; 0 failed; 0 ignored; ..."
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    println!("weft: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn run_bin(profile: &str, name: &str, args: &[&str]) -> Result<()> {
    let path = workspace_root().join("target").join(profile).join(name);
    let status = Command::new(&path)
        .args(args)
        .status()
        .with_context(|| format!("running {}", path.display()))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

/// Runs a bench binary that prints one JSON object on stdout.
fn bench_json(name: &str, args: &[&str]) -> Result<serde_json::Value> {
    let path = workspace_root().join("target/release").join(name);
    eprintln!("xtask: {name} {}", args.join(" "));
    let out = Command::new(&path)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    if !out.status.success() {
        bail!("{name} failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{name} printed no JSON object"))
}

fn bench(quick: bool, only: &[String]) -> Result<()> {
    let q: &[&str] = if quick { &["--quick"] } else { &[] };
    let part = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let mut report = serde_json::Map::new();
    if part("datapath") {
        let datapath = bench_json("bench-datapath", q)?;
        if let serde_json::Value::Object(map) = datapath {
            report.extend(map);
        }
    }
    // The CNI figures are over 200 pods either way (the minimum).
    if part("cni") {
        report.insert("cni".into(), bench_json("bench-cni", &["--pods", "200"])?);
    }
    if part("agent") {
        report.insert("agent".into(), bench_json("bench-agent", &[])?);
    }
    if part("policy") {
        report.insert("policy".into(), bench_json("bench-policy", &[])?);
    }
    if part("netpol") {
        report.insert("netpol".into(), bench_json("bench-netpol", q)?);
    }
    let report = serde_json::Value::Object(report);
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    // A partial run does not overwrite the full report.
    let file = if only.is_empty() {
        "report.json".to_string()
    } else {
        format!("report-{}.json", only.join("-"))
    };
    std::fs::write(dir.join(&file), serde_json::to_vec_pretty(&report)?)?;
    print_table(&report);
    println!("\nreport: {}", dir.join(&file).display());
    Ok(())
}

fn print_table(report: &serde_json::Value) {
    for (section, title) in [
        (
            "datapath",
            "datapath, MTU-sized frames on the wire (what a real network carries)",
        ),
        (
            "datapath_veth",
            "datapath, ideal veth offloads (64 KB super-packets on the wire)",
        ),
    ] {
        let Some(rows) = report[section].as_object() else {
            continue;
        };
        println!("\n{title}");
        println!(
            "{:<16} {:>15} {:>7} {:>15} {:>7} {:>8} {:>8} {:>12} {:>12}",
            "contestant",
            "TCP Gb/s",
            "ratio",
            "UDP64 kpps",
            "ratio",
            "RTT p50",
            "RTT p99",
            "CPU% TCP 2G",
            "CPU% UDP 30k"
        );
        // Medians over the rounds with [min-max]; ratios are the medians of the per-round ratios
        // to the kernel's contestant (`baseline`).
        for (name, v) in rows {
            let fig = |k: &str, digits: usize| match v[k].as_f64() {
                Some(m) => format!(
                    "{m:.digits$} [{:.digits$}-{:.digits$}]",
                    v[format!("{k}_min")].as_f64().unwrap_or(m),
                    v[format!("{k}_max")].as_f64().unwrap_or(m)
                ),
                None => "-".into(),
            };
            let ratio = |k: &str| match v[format!("{k}_ratio")].as_f64() {
                Some(r) => format!("{r:.2}x"),
                None => "-".into(),
            };
            let cpu = |k: &str| match v[k].as_f64() {
                Some(c) => match v[format!("{k}_ratio")].as_f64() {
                    Some(r) => format!("{c:.1} {r:.2}x"),
                    None => format!("{c:.1}"),
                },
                None => "-".into(),
            };
            println!(
                "{:<16} {:>15} {:>7} {:>15} {:>7} {:>6.0}us {:>6.0}us {:>12} {:>12}",
                name,
                fig("tcp_gbps", 2),
                ratio("tcp_gbps"),
                fig("udp64_kpps", 0),
                ratio("udp64_kpps"),
                v["rtt_p50_us"].as_f64().unwrap_or(f64::NAN),
                v["rtt_p99_us"].as_f64().unwrap_or(f64::NAN),
                cpu("tcp_cpu_pct_at_2g"),
                cpu("udp64_cpu_pct_at_30k"),
            );
        }
    }
    if let Some(progs) = report["prog_ns"].as_object() {
        println!(
            "\nper-program cost (BPF_PROG_TEST_RUN, median ns per packet: gross, and net of the ARP baseline {})",
            report["prog_ns_baseline"]
        );
        for (name, ns) in progs {
            println!(
                "  {name:<32} {:>7.1} {:>7.1}",
                ns.as_f64().unwrap_or(f64::NAN),
                report["prog_ns_net"][name].as_f64().unwrap_or(f64::NAN)
            );
        }
        // weft monitor: off must cost nothing (within the noise of two off series), on is the
        // price of one event per packet.
        let get = |k: String| report["prog_ns_monitor"][&k].as_f64();
        println!(
            "\nweft monitor, from_pod (ns per packet, interquartile means of interleaved rounds)"
        );
        for (label, case) in [
            ("forwarded (vxlan)", "from_pod_vxlan_encap"),
            ("dropped (spoofed)", "from_pod_spoofed_drop"),
        ] {
            if let (Some(off), Some(off_b), Some(on)) = (
                get(format!("{case}_monitor_off")),
                get(format!("{case}_monitor_off_b")),
                get(format!("{case}_monitor_on")),
            ) {
                // Two monitors: each event written into both slots' rings.
                let two = get(format!("{case}_monitor_on_2"))
                    .map(|two| format!("  two monitors {two:>7.1} (+{:.1})", two - off))
                    .unwrap_or_default();
                println!(
                    "  {label:<20} off {off:>7.1} (again {off_b:.1}: noise {:.1})  on {on:>7.1} (+{:.1} per event){two}",
                    (off - off_b).abs(),
                    on - off
                );
            }
        }
    }
    if let Some(n) = report["netpol"].as_object() {
        println!(
            "\nNetworkPolicy (goals: verdict flat within 10%, +25 ns forwarding, change p99 < 500 ms, RSS < 150 MiB, identity p99 < 1 s)"
        );
        let v = &n["verdict_prog_ns"];
        println!(
            "  new-flow verdict, ns: 1 rule {}, 100 rules {}, 10,000 rules {} (spread {}%; no policy {})",
            v["rules_1"],
            v["rules_100"],
            v["rules_10000"],
            v["spread_pct"],
            v["new_flow_no_policy"]
        );
        let f = &n["forwarding_prog_ns"];
        println!(
            "  established flow, ns: with policy {}, without {} (+{})",
            f["established_with_policy"], f["established_no_policy"], f["overhead_ns"]
        );
        for (k, what) in [
            (
                "change_enforced_ms",
                "policy change -> enforced on 3 nodes, ms",
            ),
            (
                "identity_propagation_ms",
                "new pod's identity on the other nodes, ms",
            ),
        ] {
            println!(
                "  {what}: p50 {} p99 {} max {}",
                n[k]["p50"], n[k]["p99"], n[k]["max"]
            );
        }
        println!(
            "  agent at {} pods and {} policies: RSS {} MiB (peak {} MiB)",
            n["agent"]["pods"],
            n["agent"]["policies"],
            n["agent"]["rss_mib"],
            n["agent"]["rss_peak_mib"]
        );
    }
    if let Some(hooks) = report["decap_hooks"].as_object() {
        println!(
            "\ndecapsulation hooks: {}",
            serde_json::Value::Object(hooks.clone())
        );
    }
    for key in ["cni", "agent", "policy"] {
        if !report[key].is_null() {
            println!("\n{key}: {}", report[key]);
        }
    }
}

//! `cargo xtask demo`: a three-node weft cluster in network namespaces on this machine (etcd,
//! real agents, pods created through the real CNI plugin), its measured connectivity matrix,
//! the operator CLI's view of one node, then teardown (or `--keep`).
//!
//! `--backend bgp`: the nodes sit on two underlay subnets joined by a router namespace that runs
//! BIRD as a route reflector; every node's agent runs BIRD and peers with the router's address
//! on its subnet. The demo prints the sessions (the router's and every node's), the matrix, and
//! the datapath's encapsulation counters, which must stay at zero.
//!
//! Everything a demo makes is recorded as soon as it exists (see `weft_tests::demo`), so that
//! `--down` removes what a kept or interrupted demo left, and nothing else.
use std::{io::Write as _, path::PathBuf, time::Instant};

use weft_common::{DropReason, Stat};
use weft_tests::{
    cluster::{Cluster, ClusterOptions, bin_dir},
    demo::{DEFAULT_STATE_DIR, DemoRecord},
};

struct Args {
    keep: bool,
    down: bool,
    nodes: usize,
    pods: usize,
    backend: String,
    state_dir: PathBuf,
}

const USAGE: &str = "usage: weft-demo [--keep] [--nodes N] [--pods N] [--backend vxlan|ipip|host-gw|bgp] [--state-dir DIR]\n       weft-demo --down [--state-dir DIR]";

fn parse_args() -> Args {
    let mut args = Args {
        keep: false,
        down: false,
        nodes: 3,
        pods: 2,
        backend: "vxlan".into(),
        state_dir: PathBuf::from(DEFAULT_STATE_DIR),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--keep" => args.keep = true,
            "--down" => args.down = true,
            "--state-dir" => args.state_dir = it.next().expect("--state-dir DIR").into(),
            "--nodes" => args.nodes = it.next().and_then(|v| v.parse().ok()).expect("--nodes N"),
            "--pods" => args.pods = it.next().and_then(|v| v.parse().ok()).expect("--pods N"),
            "--backend" => args.backend = it.next().expect("--backend vxlan|ipip|host-gw|bgp"),
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    if args.keep && args.down {
        eprintln!("--keep and --down exclude each other\n{USAGE}");
        std::process::exit(2);
    }
    args
}

/// `--down`: removes what every recorded demo left. Idempotent: nothing recorded, nothing to do.
fn down(state_dir: &std::path::Path) -> i32 {
    let records = match DemoRecord::load_all(state_dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weft-demo --down: {e:#}");
            return 1;
        }
    };
    if records.is_empty() {
        println!(
            "no demo to tear down (no record in {})",
            state_dir.display()
        );
        return 0;
    }
    let mut status = 0;
    for (path, record) in records {
        println!("tearing down the demo started by pid {}", record.demo_pid);
        match record.tear_down() {
            Ok(done) => {
                for line in done {
                    println!("  {line}");
                }
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => {
                eprintln!("  {e:#}\n  (record kept in {})", path.display());
                status = 1;
            }
        }
    }
    if status == 0 {
        let _ = std::fs::remove_dir(state_dir);
        println!("done: nothing of the demo is left");
    }
    status
}

fn record(cluster: &Cluster, state_dir: &std::path::Path) {
    if let Err(e) = DemoRecord::of(cluster).save(state_dir) {
        eprintln!("weft-demo: cannot record the demo for `cargo xtask demo --down`: {e:#}");
        std::process::exit(1);
    }
}

fn step<T>(what: &str, f: impl FnOnce() -> T) -> T {
    print!("  {what} ... ");
    std::io::stdout().flush().unwrap();
    let start = Instant::now();
    let out = f();
    println!("done ({:.1} s)", start.elapsed().as_secs_f64());
    out
}

fn main() {
    let args = parse_args();
    if args.down {
        std::process::exit(down(&args.state_dir));
    }
    let started = Instant::now();
    println!(
        "weft demo: {} nodes, {} pods per node, backend {}\n",
        args.nodes, args.pods, args.backend
    );
    let bgp = args.backend == "bgp";
    let options = ClusterOptions {
        nodes: args.nodes,
        backend: args.backend.clone(),
        two_subnets: bgp,
        route_reflector: bgp,
        backend_extra: if bgp {
            serde_json::json!({"Mesh": false, "Peers": Cluster::route_reflector_peers()})
        } else {
            serde_json::Value::Null
        },
        ..Default::default()
    };
    let what = if bgp {
        format!(
            "two underlay subnets, a router running BIRD as route reflector, etcd and {} nodes running weft-agent (and BIRD)",
            args.nodes
        )
    } else {
        format!("underlay, etcd and {} nodes running weft-agent", args.nodes)
    };
    let mut cluster = step(&what, || Cluster::new(options));
    record(&cluster, &args.state_dir);
    if bgp {
        step(
            "BGP: every node learns every other node's pod subnet",
            || cluster.wait_bgp_converged(std::time::Duration::from_secs(60)),
        );
        print_bgp(&cluster);
    }
    step(
        &format!(
            "{} pods through the weft-cni plugin",
            args.nodes * args.pods
        ),
        || {
            for node in 0..cluster.nodes.len() {
                for _ in 0..args.pods {
                    cluster.add_pod(node);
                    record(&cluster, &args.state_dir);
                }
            }
        },
    );
    for node in &cluster.nodes {
        let pods: Vec<String> = node.pods.iter().map(|p| p.ip.to_string()).collect();
        let subnet = weft_agent::subnet_env::SubnetEnv::read(&node.subnet_file())
            .map(|s| s.subnet.to_string())
            .unwrap_or_else(|_| "?".into());
        println!(
            "    {:<8} underlay {:<16} pods {:<18} {}",
            node.name,
            node.ip,
            subnet,
            pods.join(", ")
        );
    }
    let probes = step(
        "measuring the connectivity matrix (ping, 3 echoes per pair)",
        || cluster.connectivity_matrix(),
    );

    // The matrix: sources down, destinations across, average RTT in ms.
    // Pods in node order, then the nodes themselves.
    let mut dests: Vec<String> = cluster
        .all_pods()
        .iter()
        .map(|(i, p)| format!("{}/{}", cluster.nodes[*i].name, p.ip))
        .collect();
    let sources = dests.clone();
    dests.extend(cluster.nodes.iter().map(|n| n.name.clone()));
    let sources: Vec<String> = sources
        .into_iter()
        .chain(cluster.nodes.iter().map(|n| n.name.clone()))
        .collect();
    let short = |s: &str| s.rsplit('/').next().unwrap_or(s).to_string();
    println!(
        "\nconnectivity matrix (average RTT in µs over 3 pings; rows send, columns answer):\n"
    );
    print!("{:>22}", "");
    for d in &dests {
        print!(" {:>12}", short(d));
    }
    println!();
    for s in &sources {
        print!("{:>22}", s);
        for d in &dests {
            let cell = match probes.iter().find(|p| &p.from == s && &p.to == d) {
                Some(p) => match p.rtt_ms {
                    Some(rtt) => format!("{:.0}", rtt * 1000.0),
                    None => "FAIL".into(),
                },
                None => "-".into(),
            };
            print!(" {cell:>12}");
        }
        println!();
    }
    let ok = probes.iter().filter(|p| p.ok).count();
    let mut encapsulated = 0;
    if bgp {
        println!(
            "\ndatapath counters (no tunnel anywhere: the encapsulation counters stay at zero):\n"
        );
        println!(
            "  {:<8} {:>12} {:>12} {:>12} {:>14}",
            "node", "vxlan_encap", "ipip_encap", "bgp_forward", "no_bgp_route"
        );
        for node in &cluster.nodes {
            let maps = node.maps();
            let stat = |s| maps.stat_count(s).unwrap_or(0);
            let (vx, ipip) = (stat(Stat::VxlanEncap), stat(Stat::IpipEncap));
            encapsulated += vx + ipip;
            println!(
                "  {:<8} {:>12} {:>12} {:>12} {:>14}",
                node.name,
                vx,
                ipip,
                stat(Stat::BgpForward),
                maps.drop_count(DropReason::NoBgpRoute).unwrap_or(0)
            );
        }
    }

    let cli = bin_dir().join("weft");
    if cli.exists() {
        let node = &cluster.nodes[0];
        println!(
            "\n`weft` on {} (weft status, weft routes, weft drops):\n",
            node.name
        );
        for sub in ["status", "routes", "drops"] {
            let out = std::process::Command::new(&cli)
                .args([
                    "--pin-root",
                    &node.pins.path.display().to_string(),
                    "--bird-socket",
                    &node.bird_socket().display().to_string(),
                    sub,
                ])
                .output();
            match out {
                Ok(out) => print!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => println!("(could not run weft: {e})"),
            }
            println!();
        }
    }

    println!(
        "summary: {ok}/{} probes answered, {} nodes, {} pods, {:.1} s",
        probes.len(),
        cluster.nodes.len(),
        cluster.nodes.len() * args.pods,
        started.elapsed().as_secs_f64()
    );
    if args.keep {
        println!("\nthe cluster stays up (--keep). Enter a pod's network namespace:");
        for node in &cluster.nodes {
            for pod in &node.pods {
                println!(
                    "  ip netns exec {} sh    # {} on {}",
                    pod.ns.name, pod.ip, node.name
                );
            }
        }
        println!(
            "nodes: {}",
            cluster
                .nodes
                .iter()
                .map(|n| n.ns.name.clone())
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!(
            "agent pids: {}",
            cluster
                .nodes
                .iter()
                .filter_map(|n| n.agent.as_ref().map(|a| a.pid().to_string()))
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!(
            "pins: {}",
            cluster
                .nodes
                .iter()
                .map(|n| n.pins.path.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!(
            "etcd pid: {}",
            cluster
                .etcd
                .pid()
                .map(|p| p.to_string())
                .unwrap_or_default()
        );
        println!("\ntear everything down (namespaces, pins, agents, etcd and its data):\n");
        println!("  cargo xtask demo --down");
        std::mem::forget(cluster);
        return;
    }
    step("tearing down", || drop(cluster));
    DemoRecord::forget(&args.state_dir, std::process::id());
    if ok != probes.len() || encapsulated > 0 {
        std::process::exit(1);
    }
}

/// The BGP sessions: the router's (BIRD's own view) and each node's (`weft status`).
fn print_bgp(cluster: &Cluster) {
    if let Some(router) = &cluster.router {
        println!(
            "\nroute reflector on the router (birdc show protocols), {} sessions established:\n",
            router.established()
        );
        for line in router.birdc("show protocols").lines() {
            println!("    {line}");
        }
    }
    let cli = bin_dir().join("weft");
    for node in &cluster.nodes {
        let out = std::process::Command::new(&cli)
            .args([
                "--pin-root",
                &node.pins.path.display().to_string(),
                "--bird-socket",
                &node.bird_socket().display().to_string(),
                "status",
            ])
            .output();
        let Ok(out) = out else { continue };
        let text = String::from_utf8_lossy(&out.stdout);
        println!("\n{} ({}), `weft status` BGP lines:", node.name, node.ip);
        for line in text.lines().skip_while(|l| !l.starts_with("bgp")) {
            println!("    {line}");
        }
    }
}

//! ADD and DEL latency of weft-cni against the reference `bridge` + `host-local` plugins, in
//! one run, each in its own node namespace, each call exec'd as a runtime execs it. Prints one
//! JSON object on stdout:
//! `{"weft":{"add_p50_ms":..,"add_p99_ms":..,"del_p50_ms":..,"del_p99_ms":..},"reference":{..},"pods":N}`.
//!
//! Usage: `bench-cni [--pods N]` (default 200). Needs root and the built `weft-cni`.
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_tests::{
    cni::{Call, CniNode, REFERENCE_PLUGINS, TempDir},
    netns::Netns,
};

const WARMUP: usize = 3;

fn parse_args() -> usize {
    let mut args = std::env::args().skip(1);
    let mut pods = 200;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--pods" => {
                let v = args.next().unwrap_or_default();
                pods = v.parse().unwrap_or_else(|_| {
                    eprintln!("--pods needs a positive number, got {v:?}");
                    std::process::exit(2)
                });
            }
            "-h" | "--help" => {
                eprintln!("usage: bench-cni [--pods N]   (default 200)");
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown argument {other:?}; usage: bench-cni [--pods N]");
                std::process::exit(2);
            }
        }
    }
    if pods == 0 {
        eprintln!("--pods must be at least 1");
        std::process::exit(2);
    }
    pods
}

/// A subnet of 10.244.0.0/16 with room for `pods` + warm-up pods.
fn subnet_for(pods: usize, third_octet: u8) -> String {
    let needed = pods + WARMUP + 3;
    let mut prefix = 24u8;
    while prefix > 16 && (1usize << (32 - prefix)) < needed {
        prefix -= 1;
    }
    let block = 1u32 << (24 - prefix.min(24));
    let third = (u32::from(third_octet) / block) * block;
    format!("10.244.{third}.0/{prefix}")
}

fn timed(node: &Netns, call: &Call) -> Duration {
    let start = Instant::now();
    let out = call.run(node);
    let took = start.elapsed();
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        eprintln!("{} {took:?}: {}", call.command, out.stderr);
    }
    if !out.success {
        panic!(
            "{} {} failed: {} {}",
            call.plugin.display(),
            call.command,
            out.stdout,
            out.stderr
        );
    }
    took
}

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    (samples[idx].as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

fn summary(mut adds: Vec<Duration>, mut dels: Vec<Duration>) -> Value {
    json!({
        "add_p50_ms": percentile(&mut adds, 0.50),
        "add_p99_ms": percentile(&mut adds, 0.99),
        "del_p50_ms": percentile(&mut dels, 0.50),
        "del_p99_ms": percentile(&mut dels, 0.99),
    })
}

type MakeCall<'a> = Box<dyn Fn(&str, &str, &str) -> Call + 'a>;

/// One contestant: its node namespace and how to build a call.
struct Contestant<'a> {
    node: &'a Netns,
    make: MakeCall<'a>,
    sandboxes: Vec<Netns>,
    adds: Vec<Duration>,
    dels: Vec<Duration>,
}

/// ADDs every pod, then DELs every pod, alternating between the contestants call by call so
/// both see the same machine load; warm-up calls are not counted.
fn run(contestants: &mut [Contestant], pods: usize) {
    for c in contestants.iter_mut() {
        c.sandboxes = (0..pods + WARMUP).map(|_| Netns::new("wbp")).collect();
    }
    for command in ["ADD", "DEL"] {
        eprintln!("{} x {command}", pods + WARMUP);
        for i in 0..pods + WARMUP {
            for c in contestants.iter_mut() {
                let call = (c.make)(command, &format!("bench-{i}"), &c.sandboxes[i].path());
                let took = timed(c.node, &call);
                if i >= WARMUP {
                    if command == "ADD" {
                        c.adds.push(took);
                    } else {
                        c.dels.push(took);
                    }
                }
            }
        }
    }
}

fn main() {
    let pods = parse_args();
    let weft_node = CniNode::new(&subnet_for(pods, 0), 1450);
    let weft_conf = weft_node.conf("1.1.0");
    let ref_node = Netns::new("wbr");
    ref_node.sysctl("net.ipv4.ip_forward", "1");
    let dir = TempDir::new("weft-bench-ref-");
    let ref_conf = json!({
        "cniVersion": "1.0.0",
        "name": "refnet",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": false,
        "mtu": 1450,
        "ipam": {
            "type": "host-local",
            "subnet": subnet_for(pods, 0),
            "dataDir": dir.path.join("host-local"),
        }
    });
    let bridge = std::path::Path::new(REFERENCE_PLUGINS).join("bridge");
    let mut contestants = [
        Contestant {
            node: &weft_node.ns,
            make: Box::new(|cmd, cid, netns| {
                weft_node.call(cmd, &weft_conf).attachment(cid, Some(netns))
            }),
            sandboxes: Vec::new(),
            adds: Vec::new(),
            dels: Vec::new(),
        },
        Contestant {
            node: &ref_node,
            make: Box::new(|cmd, cid, netns| {
                Call::new(&bridge, cmd, &ref_conf).attachment(cid, Some(netns))
            }),
            sandboxes: Vec::new(),
            adds: Vec::new(),
            dels: Vec::new(),
        },
    ];
    run(&mut contestants, pods);
    let [weft, reference] = contestants;
    let out = json!({
        "weft": summary(weft.adds, weft.dels),
        "reference": summary(reference.adds, reference.dels),
        "pods": pods,
    });
    println!("{out}");
}

//! Policy compiler benchmark (`cargo xtask bench` runs it; run it from a release build): prints
//! ONE JSON object on stdout. No root, no kernel: the compiler and the emulated maps.
//!
//! World: 10,000 pods in 100 namespaces on 100 nodes (this node has 100 of them), 1,000
//! NetworkPolicies (10 per namespace) with pod selectors, namespace selectors, ipBlocks with
//! excepts, numeric, ranged and named ports, ingress and egress.
//!
//! - `build_ms`, `build_writes`: compiling everything from nothing, and the plan's writes;
//! - `classes`, `rulesets`, `rule_entries`: the compiled size;
//! - `<event>_us_{p50,max}`: compile and diff of one event, for a local and a remote pod
//!   relabel, a pod added and removed, a namespace relabel, a policy changed and removed;
//! - `rss_mib`, `rss_peak_mib`: this process's resident memory after the build and the events
//!   (the compiler's state plus the emulated maps, which the agent does not keep).
use std::{collections::BTreeMap, net::Ipv4Addr, time::Instant};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};
use weft_agent::policy::{
    compile::{Capacities, Compiler, Plan},
    emulate::EmulatedMaps,
    model::{NamedPort, PodRecord, Policy, Protocol, World},
};

const PODS: usize = 10_000;
const NAMESPACES: usize = 100;
const NODES: usize = 100;
const POLICIES_PER_NS: usize = 10;
const APPS: [&str; 10] = [
    "web", "api", "db", "cache", "queue", "auth", "search", "mail", "batch", "proxy",
];

fn pod(i: usize, relabel: usize) -> PodRecord {
    let ns = i % NAMESPACES;
    let node = (i / NAMESPACES) % NODES;
    PodRecord {
        namespace: format!("ns-{ns}"),
        name: format!("pod-{i}"),
        labels: [
            (
                "app".to_string(),
                APPS[(i / 7 + relabel) % APPS.len()].to_string(),
            ),
            (
                "tier".to_string(),
                ["fe", "be"][(i + relabel) % 2].to_string(),
            ),
            ("pod".to_string(), format!("pod-{i}")),
        ]
        .into(),
        ip: Some(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(10, 244, 0, 0))
                + (node as u32) * 256
                + (i % NAMESPACES) as u32
                + 2,
        )),
        node: format!("node-{node}"),
        host_network: false,
        ports: vec![
            NamedPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8000 + (i % 3) as u16,
            },
            NamedPort {
                name: "metrics".into(),
                protocol: Protocol::Tcp,
                port: 9090,
            },
        ],
    }
}

fn world() -> World {
    let mut w = World::default();
    for n in 0..NAMESPACES {
        w.namespaces.insert(
            format!("ns-{n}"),
            [
                ("team".to_string(), format!("team-{}", n % 10)),
                ("kubernetes.io/metadata.name".to_string(), format!("ns-{n}")),
            ]
            .into(),
        );
    }
    for n in 0..NODES {
        w.nodes.insert(
            format!("node-{n}"),
            vec![Ipv4Addr::new(
                192,
                168,
                (n / 250) as u8,
                (n % 250) as u8 + 1,
            )],
        );
    }
    for i in 0..PODS {
        w.upsert_pod(pod(i, 0));
    }
    w
}

fn policy(ns: usize, k: usize, variant: usize) -> Policy {
    let app = APPS[(k + variant) % APPS.len()];
    let other = APPS[(k + 3 + variant) % APPS.len()];
    let spec = match k % 5 {
        0 => json!({"podSelector": {"matchLabels": {"app": app}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": other}}}], "ports": [{"port": "http"}]}]}),
        1 => json!({"podSelector": {"matchLabels": {"app": app}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", (ns + k) % 10)}},
                                   "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["fe"]}]}}],
                         "ports": [{"port": 8000, "endPort": 8100}, {"port": 9090}]}]}),
        2 => {
            json!({"podSelector": {"matchLabels": {"tier": "be"}}, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": format!("10.244.{}.0/24", (ns + k) % NODES), "except": [format!("10.244.{}.0/28", (ns + k) % NODES)]}}]}],
            "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}, {"to": [{"podSelector": {"matchLabels": {"app": other}}}]}]})
        }
        3 => json!({"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", k % 10)}}}], "ports": [{"port": "metrics"}]}]}),
        _ => {
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [app]}]},
            "ingress": [{"from": [{"podSelector": {}}]}, {"ports": [{"port": 443 + variant as i32}]}]})
        }
    };
    let np: NetworkPolicy =
        serde_json::from_value(json!({"metadata": {"name": format!("pol-{k}"), "namespace": format!("ns-{ns}")}, "spec": spec}))
            .expect("policy");
    Policy::from_api(&np, "default").expect("valid")
}

fn rss() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn time_events(
    c: &mut Compiler,
    maps: &mut EmulatedMaps,
    n: usize,
    mut event: impl FnMut(&mut Compiler, usize) -> Plan,
) -> (f64, f64, usize) {
    let mut us = Vec::new();
    let mut writes = 0;
    for i in 0..n {
        let t = Instant::now();
        let plan = event(c, i);
        us.push(t.elapsed().as_secs_f64() * 1e6);
        writes += plan.writes.len();
        let report = c.apply(&plan, maps);
        assert!(report.is_clean(), "{report:?}");
    }
    us.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    (us[us.len() / 2], us[us.len() - 1], writes / n)
}

fn main() {
    let w = world();
    let policies: Vec<Policy> = (0..NAMESPACES)
        .flat_map(|ns| (0..POLICIES_PER_NS).map(move |k| policy(ns, k, 0)))
        .collect();
    let node = "node-0";
    let t = Instant::now();
    let (mut c, plan) = Compiler::build(node, w, policies);
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut maps = EmulatedMaps::new(Capacities::default());
    let report = c.apply(&plan, &mut maps);
    assert!(report.is_clean(), "{report:?}");
    if std::env::var("BENCH_POLICY_DEBUG").is_ok() {
        debug_counts(&plan, &maps);
    }
    let (classes, rulesets, rules) = c.stats();
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    out.insert("pods".into(), json!(PODS));
    out.insert("policies".into(), json!(NAMESPACES * POLICIES_PER_NS));
    out.insert("build_ms".into(), json!(build_ms));
    out.insert("build_writes".into(), json!(plan.writes.len()));
    out.insert("classes".into(), json!(classes));
    out.insert("rulesets".into(), json!(rulesets));
    out.insert("rule_entries".into(), json!(rules));
    drop(plan);
    let mut record = |name: &str, r: (f64, f64, usize)| {
        out.insert(format!("{name}_us_p50"), json!(r.0));
        out.insert(format!("{name}_us_max"), json!(r.1));
        out.insert(format!("{name}_writes_avg"), json!(r.2));
    };
    // pods 0, 100, 200, ... are on node-0 (local); pod 1 is on node-0? (i / 100) % 100 == 0 for
    // i < 100: pods 0-99 are local.
    record(
        "local_pod_relabel",
        time_events(&mut c, &mut maps, 50, |c, i| {
            c.upsert_pod(pod(i, 1 + i % 3))
        }),
    );
    record(
        "remote_pod_relabel",
        time_events(&mut c, &mut maps, 50, |c, i| {
            c.upsert_pod(pod(5000 + i * 17, 1 + i % 3))
        }),
    );
    record(
        "pod_add",
        time_events(&mut c, &mut maps, 50, |c, i| {
            let mut p = pod(PODS + i, 0);
            p.ip = Some(Ipv4Addr::new(10, 245, 0, i as u8 + 1));
            c.upsert_pod(p)
        }),
    );
    record(
        "pod_remove",
        time_events(&mut c, &mut maps, 50, |c, i| {
            c.remove_pod(
                &format!("ns-{}", (PODS + i) % NAMESPACES),
                &format!("pod-{}", PODS + i),
            )
        }),
    );
    record(
        "namespace_relabel",
        time_events(&mut c, &mut maps, 20, |c, i| {
            c.upsert_namespace(
                &format!("ns-{i}"),
                [("team".to_string(), format!("team-{}", (i + 5) % 10))].into(),
            )
        }),
    );
    record(
        "policy_change",
        time_events(&mut c, &mut maps, 50, |c, i| {
            c.upsert_policy(policy(i % NAMESPACES, i % POLICIES_PER_NS, 1 + i))
        }),
    );
    record(
        "policy_remove",
        time_events(&mut c, &mut maps, 20, |c, i| {
            c.remove_policy(&format!("ns-{}", i * 3), "pol-0")
        }),
    );
    let (rss, peak) = rss();
    out.insert("rss_mib".into(), json!(rss));
    out.insert("rss_peak_mib".into(), json!(peak));
    let (classes, rulesets, rules) = c.stats();
    out.insert("classes_after".into(), json!(classes));
    out.insert("rulesets_after".into(), json!(rulesets));
    out.insert("rule_entries_after".into(), json!(rules));
    println!("{}", serde_json::to_string(&out).expect("json"));
}
#[allow(dead_code)]
fn debug_counts(plan: &Plan, maps: &EmulatedMaps) {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for w in &plan.writes {
        let k = match w {
            weft_agent::policy::compile::MapWrite::NsDefault { .. } => "ns",
            weft_agent::policy::compile::MapWrite::PortBlock { .. } => "block",
            weft_agent::policy::compile::MapWrite::Rule { .. } => "rule",
            weft_agent::policy::compile::MapWrite::Cidr { .. } => "cidr",
            weft_agent::policy::compile::MapWrite::Addr { .. } => "addr",
            weft_agent::policy::compile::MapWrite::Endpoint { .. } => "endpoint",
        };
        *kinds.entry(k).or_default() += 1;
    }
    let isolated = maps.endpoints.values().filter(|e| e.flags != 0).count();
    eprintln!(
        "{kinds:?} endpoints {} isolated {isolated}",
        maps.endpoints.len()
    );
}

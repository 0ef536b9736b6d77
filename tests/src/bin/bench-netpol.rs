//! `cargo xtask bench`'s NetworkPolicy part: prints ONE JSON object.
//!
//! - `verdict_prog_ns`: `from_pod` on a new flow (conntrack miss: the rules are looked at)
//!   into a pod whose ingress rule set holds 1, 100 and 10,000 rule entries (one per peer
//!   address), the allowed peer's entry among them; medians of interleaved rounds, plus the
//!   same new flow with no policy at all;
//! - `forwarding_prog_ns`: `from_pod` local delivery of an established flow (conntrack hit),
//!   with policies isolating both pods and with none: the per-packet cost of policy;
//! - `change_enforced_ms`: a 3-node cluster (etcd on tmpfs): a policy change written to etcd
//!   until every agent reports (in its pinned maps) that it enforces it; p50, p99, max;
//! - `identity_propagation_ms`: from the start of a new pod's CNI ADD on node 1 until nodes 2
//!   and 3 hold its address with its class (a policy selects pods like it as peers); p50, p99, max;
//! - `agent_rss_mib`: a real agent fed 10,000 pods (objects and addresses) and 1,000 policies
//!   through etcd, once it enforces them.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};
use weft_agent::{
    netpol::{maps::KernelMaps, store},
    policy::{
        compile::Compiler,
        model::{PodRecord, Policy, World},
    },
};
use weft_common::{
    policy::{POLICY_CFG_F_READY, PolicyConfig},
    prog_names,
};
use weft_tests::{
    cluster::{Cluster, ClusterOptions, FLANNEL_PREFIX},
    injection_node::*,
    netpol::{NetpolCluster, pod_object},
    packets::tcp_frame,
    testrun::run_tc,
};

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentiles(mut v: Vec<f64>) -> Value {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    json!({"p50": round(pct(0.5)), "p99": round(pct(0.99)), "max": round(pct(1.0)), "samples": v.len()})
}

fn world(peers: usize) -> World {
    let mut w = World::default();
    let mk = |ns: &str, name: &str, ip: Ipv4Addr, node: &str, app: &str| PodRecord {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        ip: Some(ip),
        node: node.into(),
        host_network: false,
        ports: vec![],
    };
    w.upsert_pod(mk("x", "a", POD1_IP.into(), "here", "a"));
    w.upsert_pod(mk("x", "b", POD2_IP.into(), "here", "b"));
    for i in 0..peers {
        // Peers on other nodes, each its own class (a label of its own).
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + i as u32);
        w.upsert_pod(mk("y", &format!("p{i}"), ip, "there", &format!("p{i}")));
    }
    w.nodes.insert("here".into(), vec![NODE_IP.into()]);
    w
}

/// x/b accepts app=a, and `peers - 1` other peers each on its own port: `peers` rule entries.
fn policies(peers: usize) -> Vec<Policy> {
    let mut from = vec![json!({"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]})];
    for i in 1..peers {
        from.push(json!({"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": format!("p{i}")}}}],
            "ports": [{"port": 1000 + (i % 50000)}]}));
    }
    let np: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "b-in", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": from}}))
    .unwrap();
    vec![Policy::from_api(&np, "x").unwrap()]
}

/// (new-flow cost per rule count and without policy, established-flow cost with and without).
fn prog_costs(calls: usize, rounds: usize) -> (Value, Value) {
    with_node(move |node| {
        let idx = node.pod1_ifindex;
        let mut sport = 1024u32;
        let mut new_flow = |node: &mut Node| -> f64 {
            let frames: Vec<Vec<u8>> = (0..calls)
                .map(|_| {
                    sport += 1;
                    let (s, d) = (1024 + (sport % 60_000) as u16, 80 + (sport / 60_000) as u16);
                    tcp_frame(POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, s, d, &[0u8; 64])
                })
                .collect();
            let p = node.dp.tc_program(prog_names::FROM_POD).unwrap();
            let total: u64 = frames
                .iter()
                .map(|f| run_tc(p, f, idx, 1).duration_ns)
                .sum();
            total as f64 / calls as f64
        };
        let established = |node: &mut Node| -> f64 {
            let f = tcp_frame(POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, 999, 80, &[0u8; 64]);
            let p = node.dp.tc_program(prog_names::FROM_POD).unwrap();
            let total: u64 = (0..calls).map(|_| run_tc(p, &f, idx, 1).duration_ns).sum();
            total as f64 / calls as f64
        };
        let configure = |node: &mut Node, peers: usize, revision: u32| {
            // A fresh rule set: clear the endpoint's old entries by building anew each time
            // (ids are unique per compiler; stale entries of other rule sets cost nothing).
            let (mut c, plan) = Compiler::new("here")
                .with_id_floor(revision * 100_000, revision * 10, revision * 10)
                .build_from(
                    world(peers),
                    if peers == 0 { vec![] } else { policies(peers) },
                );
            let report = c.apply(&plan, &mut KernelMaps::new(&mut node.dp.maps));
            assert!(report.is_clean(), "{report:?}");
            node.dp
                .maps
                .set_policy_config(&PolicyConfig {
                    revision,
                    flags: POLICY_CFG_F_READY,
                    service_net: [0; 4],
                    service_mask: [0; 4],
                    datastore_revision: 0,
                })
                .unwrap();
        };
        let counts = [0usize, 1, 100, 10_000];
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); counts.len()];
        let mut est_none = Vec::new();
        let mut est_policy = Vec::new();
        let mut rev = 1;
        for _ in 0..rounds {
            for (i, n) in counts.iter().enumerate() {
                rev += 1;
                configure(node, *n, rev);
                samples[i].push(new_flow(node));
                // The established flow's entry, judged once at this revision.
                let _ = established(node);
                let e = established(node);
                if *n == 0 {
                    est_none.push(e);
                } else if *n == 1 {
                    est_policy.push(e);
                }
            }
        }
        let m: Vec<f64> = samples.into_iter().map(median).collect();
        let ruled = &m[1..];
        let (lo, hi) = ruled
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let verdict = json!({
            "new_flow_no_policy": round(m[0]),
            "rules_1": round(m[1]),
            "rules_100": round(m[2]),
            "rules_10000": round(m[3]),
            // Goal: within 10% (max over min of the three rule counts).
            "spread_pct": round((hi / lo - 1.0) * 100.0),
            "rules_10000_over_no_policy": (m[3] / m[0] * 100.0).round() / 100.0,
        });
        let (none, with) = (median(est_none), median(est_policy));
        let forwarding = json!({
            "established_no_policy": round(none),
            "established_with_policy": round(with),
            // Goal: at most +25 ns per packet.
            "overhead_ns": round(with - none),
            "ratio": (with / none * 100.0).round() / 100.0,
        });
        (verdict, forwarding)
    })
}

/// Policy change → enforced on every node; a new pod's identity on every other node.
fn cluster_latencies(changes: usize, pods: usize) -> (Value, Value) {
    let mut nc = NetpolCluster::new().expect("the runner's cluster");
    let mut change = Vec::new();
    for i in 0..changes {
        let spec = json!({"podSelector": {"matchLabels": {"pod": "b"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}], "ports": [{"port": 80 + (i % 2) as u16}]}]});
        let t = Instant::now();
        let rev = nc
            .apply_json(&[
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "bench", "namespace": "x"}, "spec": spec}),
            ])
            .unwrap();
        nc.wait_enforced(rev).unwrap();
        change.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // New pods in x (labelled pod=new) are peers of a policy in y: every node classifies them.
    let rev = nc
        .apply_json(&[json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "from-new", "namespace": "y"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "new"}}}]}]}})])
        .unwrap();
    nc.wait_enforced(rev).unwrap();
    let mut propagation = Vec::new();
    for i in 0..pods {
        let name = format!("new-{i}");
        let mut obj = pod_object("x", &name, &[]);
        obj["metadata"]["labels"] = json!({"pod": "new"});
        let rev = nc.apply_json(&[obj]).unwrap();
        nc.wait_enforced(rev).unwrap();
        // From CNI ADD (the address exists from then on) until every other node knows it.
        let t = Instant::now();
        let (_, ip) = nc.cluster.add_named_pod(0, "x", &name, None);
        let deadline = t + Duration::from_secs(10);
        for node in &nc.cluster.nodes[1..] {
            loop {
                let class = node
                    .maps()
                    .policy_snapshot()
                    .ok()
                    .and_then(|s| s.addrs.get(&ip).copied())
                    .unwrap_or(0);
                if class >= weft_common::policy::POLICY_CLASS_FIRST_DYNAMIC
                    || Instant::now() > deadline
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        propagation.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (percentiles(change), percentiles(propagation))
}

/// A real agent's memory with 10,000 pods and 1,000 policies from etcd.
fn agent_rss() -> Value {
    const PODS: usize = 10_000;
    const NAMESPACES: usize = 100;
    const POLICIES_PER_NS: usize = 10;
    let cluster = Cluster::new(ClusterOptions {
        nodes: 1,
        numbered_subnets: true,
        ..Default::default()
    });
    let client = weft_agent::datastore::etcd::EtcdClient::new(&[cluster.etcd.endpoint()]).unwrap();
    let apps = [
        "web", "api", "db", "cache", "queue", "auth", "search", "mail", "batch", "proxy",
    ];
    let mut objects: Vec<Value> = Vec::new();
    for n in 0..NAMESPACES {
        objects.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{n}"), "labels": {"team": format!("team-{}", n % 10)}}}));
    }
    let mut addresses = Vec::new();
    for i in 0..PODS {
        let ns = format!("ns-{}", i % NAMESPACES);
        let name = format!("pod-{i}");
        let mut p = pod_object(
            &ns,
            &name,
            &[("http".into(), 8000 + (i % 3) as u16, "TCP".into())],
        );
        p["metadata"]["labels"] =
            json!({"app": apps[(i / 7) % apps.len()], "tier": (["fe", "be"])[i % 2], "pod": name});
        objects.push(p);
        // 100 nodes' pods; node-1 (this agent's) holds 100 of them.
        let node = i % 100 + 1;
        let ip = Ipv4Addr::new(10, 244, node as u8, (i / 100 + 2) as u8);
        addresses.push((
            ip,
            json!({"namespace": ns, "name": name, "node": format!("node-{node}")}),
        ));
    }
    for n in 0..NAMESPACES {
        for k in 0..POLICIES_PER_NS {
            let app = apps[k % apps.len()];
            let other = apps[(k + 3) % apps.len()];
            let spec = match k % 4 {
                0 => json!({"podSelector": {"matchLabels": {"app": app}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": other}}}], "ports": [{"port": "http"}]}]}),
                1 => json!({"podSelector": {"matchLabels": {"app": app}},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", (n + k) % 10)}}}],
                                 "ports": [{"port": 8000, "endPort": 8100}]}]}),
                2 => {
                    json!({"podSelector": {"matchLabels": {"tier": "be"}}, "policyTypes": ["Ingress", "Egress"],
                    "ingress": [{"from": [{"ipBlock": {"cidr": format!("10.244.{}.0/24", (n + k) % 100 + 1), "except": [format!("10.244.{}.0/28", (n + k) % 100 + 1)]}}]}],
                    "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}, {"to": [{"podSelector": {"matchLabels": {"app": other}}}]}]})
                }
                _ => {
                    json!({"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Egress"],
                    "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", k % 10)}}}]}]})
                }
            };
            objects.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": format!("pol-{k}"), "namespace": format!("ns-{n}")}, "spec": spec}));
        }
    }
    let text: String = objects.iter().map(|o| o.to_string() + "\n").collect();
    let parsed = store::parse_documents(&text).unwrap();
    let dir = store::k8s_prefix(FLANNEL_PREFIX);
    let t = Instant::now();
    let rev = cluster.in_underlay(move || {
        let mut rev = store::apply(&client, FLANNEL_PREFIX, &parsed, "default").unwrap();
        for chunk in addresses.chunks(128) {
            let ops: Vec<(String, Vec<u8>)> = chunk
                .iter()
                .map(|(ip, v)| (format!("{dir}podips/{ip}"), v.to_string().into_bytes()))
                .collect();
            client.put_all(&ops).unwrap();
        }
        rev = rev.max(client.range_prefix(&format!("{dir}podips/")).unwrap().0);
        rev
    });
    let node = &cluster.nodes[0];
    let deadline = Instant::now() + Duration::from_secs(300);
    while node
        .maps()
        .policy_config()
        .map(|c| c.datastore_revision)
        .unwrap_or(0)
        < rev as u64
    {
        assert!(
            Instant::now() < deadline,
            "the agent never enforced the world\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let enforced_s = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let pid = node.agent.as_ref().unwrap().pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    let snap = node.maps().policy_snapshot().unwrap();
    json!({"pods": PODS, "policies": NAMESPACES * POLICIES_PER_NS,
        "rss_mib": round(field("VmRSS:")), "rss_peak_mib": round(field("VmHWM:")),
        "written_to_enforced_s": round(enforced_s),
        "rule_entries": snap.rules.len(), "addresses": snap.addrs.len()})
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (calls, rounds, changes, pods) = if quick {
        (2_000, 3, 20, 10)
    } else {
        (20_000, 5, 100, 30)
    };
    eprintln!("bench-netpol: verdict and forwarding cost");
    let (verdict, forwarding) = prog_costs(calls, rounds);
    eprintln!("bench-netpol: change to enforcement, identity propagation (3 nodes)");
    let (change, propagation) = cluster_latencies(changes, pods);
    eprintln!("bench-netpol: agent memory at 10,000 pods and 1,000 policies");
    let rss = agent_rss();
    println!(
        "{}",
        json!({"verdict_prog_ns": verdict, "forwarding_prog_ns": forwarding,
            "change_enforced_ms": change, "identity_propagation_ms": propagation,
            "agent": rss})
    );
}

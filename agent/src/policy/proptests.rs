//! Property tests: random worlds and policies (a seeded generator; a failure prints its seed),
//! the compiled form decided through the emulated maps against the reference evaluator, and
//! every intermediate map state of an update against the old and new semantics.
use std::{collections::BTreeSet, net::Ipv4Addr};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};

use super::{
    compile::{Capacities, Compiler, MapWrite, Plan, PolicyMaps},
    emulate::{EmulatedCluster, EmulatedMaps},
    evaluate::{self, Remote},
    model::{Direction, NamedPort, PodRecord, Policy, Protocol, World},
};

/// SplitMix64: small, seedable, good enough to explore shapes.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const NODES: [&str; 2] = ["node-1", "node-2"];
const PORTS: [u16; 4] = [53, 80, 81, 8080];

fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 0, i as u8 + 1)
}

fn random_labels(rng: &mut Rng) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    if rng.chance(70) {
        m.insert("app".into(), json!(rng.pick(&["web", "db", "dns"])));
    }
    if rng.chance(50) {
        m.insert("tier".into(), json!(rng.pick(&["fe", "be"])));
    }
    m
}

fn random_pod(rng: &mut Rng, i: usize) -> PodRecord {
    let node = rng.below(NODES.len());
    let host_network = rng.chance(8);
    let mut ports = Vec::new();
    for name in ["http", "dns"] {
        if rng.chance(60) {
            ports.push(NamedPort {
                name: name.into(),
                protocol: *rng.pick(&[Protocol::Tcp, Protocol::Udp]),
                port: *rng.pick(&PORTS),
            });
        }
    }
    let labels = random_labels(rng)
        .into_iter()
        .map(|(k, v)| (k, v.as_str().unwrap().to_string()))
        .collect();
    PodRecord {
        namespace: rng.pick(&NAMESPACES).to_string(),
        name: format!("p{i}"),
        labels,
        ip: Some(if host_network {
            node_ip(node)
        } else {
            Ipv4Addr::new(10, 244, node as u8 + 1, i as u8 + 2)
        }),
        node: NODES[node].into(),
        host_network,
        ports,
    }
}

pub(crate) fn random_world(rng: &mut Rng) -> World {
    let mut w = World::default();
    for ns in NAMESPACES {
        let mut labels: std::collections::BTreeMap<String, String> = [
            ("ns".to_string(), ns.to_string()),
            ("kubernetes.io/metadata.name".to_string(), ns.to_string()),
        ]
        .into();
        if rng.chance(50) {
            labels.insert("team".into(), rng.pick(&["a", "b"]).to_string());
        }
        w.namespaces.insert(ns.into(), labels);
    }
    for (i, n) in NODES.iter().enumerate() {
        w.nodes.insert(n.to_string(), vec![node_ip(i)]);
    }
    let n = 4 + rng.below(6);
    for i in 0..n {
        w.upsert_pod(random_pod(rng, i));
    }
    w
}

fn random_selector(rng: &mut Rng, keys: &[(&str, &[&str])]) -> Value {
    match rng.below(5) {
        0 => json!({}),
        1 | 2 => {
            let (k, vals) = *rng.pick(keys);
            json!({"matchLabels": {k: rng.pick(vals)}})
        }
        _ => {
            let (k, vals) = *rng.pick(keys);
            let op = *rng.pick(&["In", "NotIn", "Exists", "DoesNotExist"]);
            let mut e = json!({"key": k, "operator": op});
            if op == "In" || op == "NotIn" {
                let mut v: Vec<&str> = vec![*rng.pick(vals)];
                if rng.chance(40) {
                    v.push(*rng.pick(vals));
                    v.dedup();
                }
                e["values"] = json!(v);
            }
            json!({"matchExpressions": [e]})
        }
    }
}

const POD_KEYS: &[(&str, &[&str])] = &[("app", &["web", "db", "dns"]), ("tier", &["fe", "be"])];
const NS_KEYS: &[(&str, &[&str])] = &[("ns", &["x", "y", "z"]), ("team", &["a", "b"])];

fn random_peer(rng: &mut Rng, w: &World) -> Value {
    match rng.below(5) {
        0 => json!({"podSelector": random_selector(rng, POD_KEYS)}),
        1 => json!({"namespaceSelector": random_selector(rng, NS_KEYS)}),
        2 => {
            json!({"podSelector": random_selector(rng, POD_KEYS), "namespaceSelector": random_selector(rng, NS_KEYS)})
        }
        _ => {
            let ips: Vec<Ipv4Addr> = w.pods.values().filter_map(|p| p.ip).collect();
            let some_ip = *rng.pick(&ips);
            let (cidr, excepts): (String, Vec<String>) = match rng.below(4) {
                0 => (
                    "10.244.0.0/16".into(),
                    vec!["10.244.2.0/24".into(), format!("{some_ip}/32")],
                ),
                1 => (
                    "10.244.1.0/24".into(),
                    vec![format!("10.244.1.{}/31", rng.below(8) * 2)],
                ),
                2 => (format!("{some_ip}/32"), vec![]),
                _ => ("0.0.0.0/0".into(), vec!["10.244.0.0/16".into()]),
            };
            let except: Vec<String> = excepts.into_iter().filter(|_| rng.chance(60)).collect();
            let cidr_net: ipnet::IpNet = cidr.parse().unwrap();
            let except: Vec<String> = except
                .into_iter()
                .filter(|e| {
                    let e: ipnet::IpNet = e.parse().unwrap();
                    cidr_net.contains(&e) && e.prefix_len() > cidr_net.prefix_len()
                })
                .collect();
            json!({"ipBlock": {"cidr": cidr, "except": except}})
        }
    }
}

fn random_ports(rng: &mut Rng) -> Option<Value> {
    if rng.chance(35) {
        return None;
    }
    let n = 1 + rng.below(2);
    let ports: Vec<Value> = (0..n)
        .map(|_| {
            let mut p = json!({});
            if rng.chance(60) {
                p["protocol"] = json!(rng.pick(&["TCP", "UDP", "SCTP"]));
            }
            match rng.below(5) {
                0 => {}
                1 | 2 => p["port"] = json!(rng.pick(&PORTS)),
                3 => {
                    let a = *rng.pick(&[53u16, 79, 80]);
                    p["port"] = json!(a);
                    p["endPort"] = json!(a + *rng.pick(&[1u16, 2, 8000]));
                }
                _ => p["port"] = json!(rng.pick(&["http", "dns"])),
            }
            p
        })
        .collect();
    Some(json!(ports))
}

fn random_rules(rng: &mut Rng, w: &World, peer_field: &str) -> Value {
    let n = rng.below(3);
    let rules: Vec<Value> = (0..n)
        .map(|_| {
            let mut r = json!({});
            match rng.below(4) {
                0 => {}
                1 => r[peer_field] = json!([]),
                _ => {
                    let k = 1 + rng.below(2);
                    r[peer_field] = json!((0..k).map(|_| random_peer(rng, w)).collect::<Vec<_>>());
                }
            }
            if let Some(p) = random_ports(rng) {
                r["ports"] = p;
            }
            r
        })
        .collect();
    json!(rules)
}

pub(crate) fn random_policy(rng: &mut Rng, w: &World, name: &str) -> Policy {
    let ns = *rng.pick(&NAMESPACES);
    let mut spec = json!({"podSelector": random_selector(rng, POD_KEYS)});
    if rng.chance(70) {
        spec["ingress"] = random_rules(rng, w, "from");
    }
    if rng.chance(50) {
        spec["egress"] = random_rules(rng, w, "to");
    }
    match rng.below(4) {
        0 => spec["policyTypes"] = json!(["Ingress"]),
        1 => spec["policyTypes"] = json!(["Egress"]),
        2 => spec["policyTypes"] = json!(["Ingress", "Egress"]),
        _ => {}
    }
    let np: NetworkPolicy =
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}))
            .unwrap();
    Policy::from_api(&np, ns).unwrap_or_else(|e| panic!("generated an invalid policy: {e}"))
}

fn probe_addrs(w: &World) -> Vec<Ipv4Addr> {
    let mut a: BTreeSet<Ipv4Addr> = w.pods.values().filter_map(|p| p.ip).collect();
    a.extend(w.nodes.values().flatten());
    a.insert("8.8.8.8".parse().unwrap());
    a.insert("10.244.1.200".parse().unwrap()); // in the cluster, no pod (yet)
    a.into_iter().collect()
}

/// Seeds per property test; `NETPOL_SEEDS=N` explores more.
fn seeds(default: u64) -> u64 {
    std::env::var("NETPOL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

const PROBE_PORTS: [u16; 5] = [53, 80, 81, 443, 8080];
const PROBE_PROTOS: [u8; 4] = [6, 17, 132, 1];

#[test]
fn compiled_equals_reference() {
    let mut checked = 0u64;
    for seed in 0..seeds(150) {
        let mut rng = Rng::new(seed);
        let w = random_world(&mut rng);
        let n = rng.below(5);
        let policies: Vec<Policy> = (0..n)
            .map(|i| random_policy(&mut rng, &w, &format!("p{i}")))
            .collect();
        let (cluster, reports) = EmulatedCluster::build(&w, &policies, Capacities::default());
        assert!(reports.is_empty(), "seed {seed}: {reports:?}");
        let addrs = probe_addrs(&w);
        for &src in &addrs {
            for &dst in &addrs {
                for proto in PROBE_PROTOS {
                    for port in PROBE_PORTS {
                        let expected = evaluate::allowed(&w, &policies, src, dst, proto, port);
                        let got = cluster.allowed(src, dst, proto, port);
                        assert_eq!(
                            got, expected,
                            "seed {seed}: {src} -> {dst} proto {proto} port {port}\npolicies: {policies:#?}\nworld: {w:#?}"
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 100_000, "{checked}");
}

/// A random change of the world or the policies, applied to a compiler.
#[derive(Clone, Debug)]
enum Event {
    Pod(PodRecord),
    RemovePod(String, String),
    Namespace(String, std::collections::BTreeMap<String, String>),
    Policy(Policy),
    RemovePolicy(String, String),
}

impl Event {
    fn random(rng: &mut Rng, w: &World, policies: &[Policy]) -> Self {
        let pods: Vec<&PodRecord> = w.pods.values().collect();
        let choice = if pods.is_empty() { 2 } else { rng.below(8) };
        match choice {
            0 => {
                let mut p = (*rng.pick(&pods)).clone();
                p.labels = random_labels(rng)
                    .into_iter()
                    .map(|(k, v)| (k, v.as_str().unwrap().into()))
                    .collect();
                Event::Pod(p)
            }
            1 => {
                let mut p = (*rng.pick(&pods)).clone();
                let fresh = random_pod(rng, 0);
                p.ports = fresh.ports;
                Event::Pod(p)
            }
            2 => {
                let i = 40 + rng.below(10);
                let mut p = random_pod(rng, i);
                p.host_network = false;
                // Unique per (namespace, name): no two pods share an address.
                let ns_idx = NAMESPACES.iter().position(|n| *n == p.namespace).unwrap();
                let node_idx = NODES.iter().position(|n| *n == p.node).unwrap();
                p.ip = Some(Ipv4Addr::new(
                    10,
                    244,
                    node_idx as u8 + 1,
                    (100 + 10 * ns_idx + i - 40) as u8,
                ));
                Event::Pod(p)
            }
            3 => {
                let p = rng.pick(&pods);
                Event::RemovePod(p.namespace.clone(), p.name.clone())
            }
            4 => {
                let ns = rng.pick(&NAMESPACES).to_string();
                let mut labels: std::collections::BTreeMap<String, String> =
                    [("ns".to_string(), ns.clone())].into();
                if rng.chance(60) {
                    labels.insert("team".into(), rng.pick(&["a", "b"]).to_string());
                }
                Event::Namespace(ns, labels)
            }
            5 | 6 => {
                let name = if !policies.is_empty() && rng.chance(60) {
                    rng.pick(policies).name.clone()
                } else {
                    format!("p{}", 10 + rng.below(5))
                };
                let mut p = random_policy(rng, w, &name);
                if let Some(old) = policies.iter().find(|o| o.name == name) {
                    p.namespace = old.namespace.clone();
                }
                Event::Policy(p)
            }
            _ => match policies.first() {
                Some(p) => Event::RemovePolicy(p.namespace.clone(), p.name.clone()),
                None => Event::Policy(random_policy(rng, w, "p0")),
            },
        }
    }

    fn apply_world(&self, w: &mut World, policies: &mut Vec<Policy>) {
        match self {
            Event::Pod(p) => w.upsert_pod(p.clone()),
            Event::RemovePod(ns, n) => {
                w.pods.remove(&(ns.clone(), n.clone()));
            }
            Event::Namespace(ns, l) => {
                let mut l = l.clone();
                l.insert("kubernetes.io/metadata.name".into(), ns.clone());
                w.namespaces.insert(ns.clone(), l);
            }
            Event::Policy(p) => {
                policies.retain(|o| !(o.namespace == p.namespace && o.name == p.name));
                policies.push(p.clone());
            }
            Event::RemovePolicy(ns, n) => {
                policies.retain(|o| !(&o.namespace == ns && &o.name == n))
            }
        }
    }

    fn plan(&self, c: &mut Compiler) -> Plan {
        match self {
            Event::Pod(p) => c.upsert_pod(p.clone()),
            Event::RemovePod(ns, n) => c.remove_pod(ns, n),
            Event::Namespace(ns, l) => c.upsert_namespace(ns, l.clone()),
            Event::Policy(p) => c.upsert_policy(p.clone()),
            Event::RemovePolicy(ns, n) => c.remove_policy(ns, n),
        }
    }
}

/// Per-direction verdicts of the reference on one world, for a node's endpoints.
fn direction_verdict(
    w: &World,
    policies: &[Policy],
    endpoint: &PodRecord,
    dir: Direction,
    remote: Ipv4Addr,
    proto: u8,
    port: u16,
) -> bool {
    let by_ip = w.pods_by_ip();
    evaluate::direction_allows(
        w,
        policies,
        endpoint,
        dir,
        Remote {
            ip: remote,
            pod: by_ip.get(&remote).copied(),
        },
        proto,
        port,
    )
}

#[test]
fn every_intermediate_state_is_between_old_and_new() {
    let ports = [53u16, 80, 8080];
    let protos = [6u8, 17, 1];
    for seed in 0..seeds(120) {
        let mut rng = Rng::new(1000 + seed);
        let w_old = random_world(&mut rng);
        let n = rng.below(4);
        let p_old: Vec<Policy> = (0..n)
            .map(|i| random_policy(&mut rng, &w_old, &format!("p{i}")))
            .collect();
        let event = Event::random(&mut rng, &w_old, &p_old);
        let (mut w_new, mut p_new) = (w_old.clone(), p_old.clone());
        event.apply_world(&mut w_new, &mut p_new);
        for node in NODES {
            let (mut c, plan) = Compiler::build(node, w_old.clone(), p_old.iter().cloned());
            let mut maps = EmulatedMaps::new(Capacities::default());
            assert!(c.apply(&plan, &mut maps).is_clean());
            // Endpoints of this node in both worlds (same pod, same address), and new ones.
            let local = |w: &World| -> Vec<PodRecord> {
                w.pods
                    .values()
                    .filter(|p| p.node == node && !p.host_network && p.ip.is_some())
                    .cloned()
                    .collect()
            };
            let old_eps = local(&w_old);
            let new_eps = local(&w_new);
            // A brand-new local pod goes through CNI ADD before the agent hears of it.
            for p in &new_eps {
                if !old_eps.iter().any(|o| o.ip == p.ip) {
                    maps.cni_add(p.ip.unwrap(), &p.namespace).unwrap();
                }
            }
            let mut remotes: BTreeSet<Ipv4Addr> = probe_addrs(&w_old).into_iter().collect();
            remotes.extend(probe_addrs(&w_new));
            // Expected verdicts, computed once.
            let mut cases = Vec::new();
            for ep in &new_eps {
                let old_ep = old_eps
                    .iter()
                    .find(|o| o.ip == ep.ip && o.namespace == ep.namespace && o.name == ep.name);
                if old_eps.iter().any(|o| o.ip == ep.ip) && old_ep.is_none() {
                    continue; // the address changed hands: not the same endpoint
                }
                for &r in &remotes {
                    for dir in [Direction::Ingress, Direction::Egress] {
                        for proto in protos {
                            for port in ports {
                                let new =
                                    direction_verdict(&w_new, &p_new, ep, dir, r, proto, port);
                                let old = old_ep.map(|o| {
                                    direction_verdict(&w_old, &p_old, o, dir, r, proto, port)
                                });
                                cases.push((ep.ip.unwrap(), r, dir, proto, port, old, new));
                            }
                        }
                    }
                }
            }
            let plan = event.plan(&mut c);
            let check = |maps: &EmulatedMaps, step: usize, last: bool| {
                for (ip, r, dir, proto, port, old, new) in &cases {
                    let got = match dir {
                        Direction::Ingress => maps.ingress(*ip, *r, *proto, *port),
                        Direction::Egress => maps.egress(*ip, *r, *proto, *port),
                    };
                    let ok = if last {
                        got == *new
                    } else {
                        match old {
                            // Between old and new: never more than their union, never less than
                            // their intersection.
                            Some(old) => (!got || *old || *new) && (got || !(*old && *new)),
                            // A new endpoint: never more open than it will be.
                            None => !got || *new,
                        }
                    };
                    assert!(
                        ok,
                        "seed {seed} node {node} step {step}/{} ({:?}): {ip} {dir:?} {r} proto {proto} port {port}: got {got}, old {old:?}, new {new}\nevent {event:?}",
                        plan.writes.len(),
                        plan.writes.get(step.wrapping_sub(1)),
                    );
                }
            };
            check(&maps, 0, plan.writes.is_empty());
            for (i, w) in plan.writes.iter().enumerate() {
                maps.write(w).unwrap();
                check(&maps, i + 1, i + 1 == plan.writes.len());
            }
        }
    }
}

#[test]
fn updates_leave_no_garbage() {
    // After many random events the maps hold exactly what a fresh build of the final state
    // holds (up to numbering): same number of entries in every map.
    for seed in 0..20u64 {
        let mut rng = Rng::new(5000 + seed);
        let mut w = random_world(&mut rng);
        let mut policies: Vec<Policy> = (0..3)
            .map(|i| random_policy(&mut rng, &w, &format!("p{i}")))
            .collect();
        let (mut c, plan) = Compiler::build("node-1", w.clone(), policies.iter().cloned());
        let mut maps = EmulatedMaps::new(Capacities::default());
        c.apply(&plan, &mut maps);
        for _ in 0..25 {
            let e = Event::random(&mut rng, &w, &policies);
            e.apply_world(&mut w, &mut policies);
            let plan = e.plan(&mut c);
            assert!(c.apply(&plan, &mut maps).is_clean());
            if std::env::var("NETPOL_DEBUG").is_ok() {
                eprintln!(
                    "{e:?} -> {:?} endpoints {}",
                    c.stats(),
                    maps.endpoints.len()
                );
            }
        }
        let (mut fresh_c, fresh_plan) =
            Compiler::build("node-1", w.clone(), policies.iter().cloned());
        let mut fresh = EmulatedMaps::new(Capacities::default());
        fresh_c.apply(&fresh_plan, &mut fresh);
        let sizes = |m: &EmulatedMaps| {
            (
                m.endpoints.len(),
                m.addrs.len(),
                m.cidrs.len(),
                m.rules.len(),
                m.blocks.len(),
                m.ns_defaults.len(),
            )
        };
        assert_eq!(sizes(&maps), sizes(&fresh), "seed {seed}");
        assert_eq!(c.stats(), fresh_c.stats(), "seed {seed}");
    }
}

/// Pod p0 on node-1 in namespace x, selected by a policy whose rule i allows p(i+1) (on
/// node-2) to port 1000 + i + 1.
fn many_rules_world(rules: usize) -> (World, Vec<Policy>) {
    let mut w = World::default();
    w.nodes.insert("node-1".into(), vec![node_ip(0)]);
    w.nodes.insert("node-2".into(), vec![node_ip(1)]);
    for i in 0..=rules {
        w.upsert_pod(PodRecord {
            namespace: "x".into(),
            name: format!("p{i}"),
            labels: [("id".to_string(), i.to_string())].into(),
            ip: Some(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(10, 244, 64, 0)) + i as u32,
            )),
            node: if i == 0 {
                "node-1".into()
            } else {
                "node-2".into()
            },
            host_network: false,
            ports: vec![],
        });
    }
    let from: Vec<Value> = (0..rules)
        .map(|i| json!({"from": [{"podSelector": {"matchLabels": {"id": (i + 1).to_string()}}}], "ports": [{"port": 1001 + (i % 60000)}]}))
        .collect();
    let np: NetworkPolicy =
        serde_json::from_value(json!({"metadata": {"name": "many", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"id": "0"}}, "ingress": from}}))
        .unwrap();
    (w, vec![Policy::from_api(&np, "x").unwrap()])
}

#[test]
fn lookups_per_verdict_do_not_grow_with_rules() {
    let mut per_verdict = Vec::new();
    for rules in [1usize, 100, 10_000] {
        let (w, policies) = many_rules_world(rules);
        let (mut c, plan) = Compiler::build("node-1", w.clone(), policies.clone());
        let mut maps = EmulatedMaps::new(Capacities::default());
        assert!(c.apply(&plan, &mut maps).is_clean());
        let dst = Ipv4Addr::new(10, 244, 64, 0);
        let src = Ipv4Addr::new(10, 244, 64, 1);
        maps.lookups.set(0);
        assert!(maps.ingress(dst, src, 6, 1001));
        assert!(!maps.ingress(dst, src, 6, 1002));
        per_verdict.push(maps.lookups.get());
    }
    assert_eq!(per_verdict[0], per_verdict[2], "{per_verdict:?}");
    assert!(per_verdict[0] <= 2 * 8, "{per_verdict:?}");
}

#[test]
fn fragmented_ports_use_the_bitmap() {
    let mut w = World::default();
    w.nodes.insert("node-1".into(), vec![node_ip(0)]);
    w.upsert_pod(PodRecord {
        namespace: "x".into(),
        name: "a".into(),
        labels: Default::default(),
        ip: Some("10.244.1.2".parse().unwrap()),
        node: "node-1".into(),
        host_network: false,
        ports: vec![],
    });
    let ports: Vec<Value> = (0..40)
        .map(|i| json!({"port": 1000 + 7 * i, "endPort": 1000 + 7 * i + (i % 3)}))
        .collect();
    let np: NetworkPolicy =
        serde_json::from_value(json!({"metadata": {"name": "frag", "namespace": "x"},
        "spec": {"podSelector": {}, "ingress": [{"ports": ports}]}}))
        .unwrap();
    let policies = vec![Policy::from_api(&np, "x").unwrap()];
    let (mut c, plan) = Compiler::build("node-1", w.clone(), policies.clone());
    let mut maps = EmulatedMaps::new(Capacities::default());
    assert!(c.apply(&plan, &mut maps).is_clean());
    assert!(!maps.blocks.is_empty());
    let a: Ipv4Addr = "10.244.1.2".parse().unwrap();
    let src: Ipv4Addr = "10.244.2.9".parse().unwrap();
    for port in 990..1300u16 {
        assert_eq!(
            maps.ingress(a, src, 6, port),
            evaluate::allowed(&w, &policies, src, a, 6, port),
            "port {port}"
        );
    }
}

#[test]
fn full_rule_map_fails_closed_and_names_the_endpoint() {
    let (w, policies) = many_rules_world(50);
    let caps = Capacities {
        rules: 10,
        ..Capacities::default()
    };
    let (mut c, plan) = Compiler::build("node-1", w.clone(), policies.clone());
    let mut maps = EmulatedMaps::new(caps);
    let report = c.apply(&plan, &mut maps);
    let dst = Ipv4Addr::new(10, 244, 64, 0);
    assert_eq!(
        report.failed_endpoints,
        [(dst, Direction::Ingress, "WEFT_POLICY_RULES")]
    );
    assert_eq!(c.failed_endpoints(), 1);
    // A later change about something else applies cleanly: the endpoint stays closed.
    let other = c.upsert_namespace("elsewhere", Default::default());
    assert!(c.apply(&other, &mut maps).is_clean());
    assert_eq!(c.failed_endpoints(), 1);
    // Closed: even the sources whose entries fit are denied now.
    for i in 1..50u32 {
        let src = Ipv4Addr::from(u32::from(dst) + i);
        assert!(!maps.ingress(dst, src, 6, 1000 + i as u16), "source {src}");
    }
    // Capacity raised: the retry restores the allowances.
    maps.caps = Capacities::default();
    let retry = c.retry_plan();
    assert!(c.apply(&retry, &mut maps).is_clean());
    assert_eq!(c.failed_endpoints(), 0);
    for i in 1..50u32 {
        let src = Ipv4Addr::from(u32::from(dst) + i);
        assert!(maps.ingress(dst, src, 6, 1000 + i as u16), "source {src}");
        assert!(!maps.ingress(dst, src, 6, 1001 + i as u16), "source {src}");
    }
}

#[test]
fn full_cidr_map_fails_closed() {
    let mut rng = Rng::new(7);
    let w = random_world(&mut rng);
    let np: NetworkPolicy = serde_json::from_value(json!({"metadata": {"name": "b", "namespace": "x"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}]}]}}))
    .unwrap();
    let policies = vec![Policy::from_api(&np, "x").unwrap()];
    for node in NODES {
        let (mut c, plan) = Compiler::build(node, w.clone(), policies.clone());
        let mut maps = EmulatedMaps::new(Capacities {
            cidrs: 1,
            ..Capacities::default()
        });
        let report = c.apply(&plan, &mut maps);
        let eps: Vec<Ipv4Addr> = w
            .pods
            .values()
            .filter(|p| p.node == node && !p.host_network && p.namespace == "x")
            .filter_map(|p| p.ip)
            .collect();
        assert_eq!(report.failed_endpoints.len(), eps.len(), "{report:?}");
        for ep in eps {
            // 10.244.1.200 is excepted: with the except boundary missing it would have been let in.
            assert!(!maps.ingress(ep, "10.244.1.200".parse().unwrap(), 6, 80));
            assert!(!maps.ingress(ep, "8.8.8.8".parse().unwrap(), 6, 80));
        }
    }
}

#[test]
fn new_pod_is_isolated_before_the_agent_knows_it() {
    let mut maps = EmulatedMaps::new(Capacities::default());
    let ip: Ipv4Addr = "10.244.1.9".parse().unwrap();
    // Before the agent's first sync: isolated both ways.
    maps.cni_add(ip, "x").unwrap();
    assert!(!maps.ingress(ip, "10.244.1.3".parse().unwrap(), 6, 80));
    assert!(!maps.egress(ip, "10.244.1.3".parse().unwrap(), 6, 80));
    // After: as the namespace's policies could isolate it.
    let (w, policies) = many_rules_world(3);
    let (mut c, plan) = Compiler::build("node-1", w, policies);
    let mut maps = EmulatedMaps::new(Capacities::default());
    assert!(c.apply(&plan, &mut maps).is_clean());
    maps.cni_add(ip, "x").unwrap();
    maps.cni_add("10.244.1.10".parse().unwrap(), "y").unwrap();
    assert!(
        !maps.ingress(ip, "10.244.1.3".parse().unwrap(), 6, 80),
        "x has an ingress policy"
    );
    assert!(
        maps.egress(ip, "10.244.1.3".parse().unwrap(), 6, 80),
        "x has no egress policy"
    );
    assert!(
        maps.ingress(
            "10.244.1.10".parse().unwrap(),
            "10.244.1.3".parse().unwrap(),
            6,
            80
        ),
        "y has none"
    );
}

#[test]
fn node_address_change_moves_the_host_class() {
    let mut rng = Rng::new(3);
    let w = random_world(&mut rng);
    let np: NetworkPolicy =
        serde_json::from_value(json!({"metadata": {"name": "d", "namespace": "x"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}))
        .unwrap();
    let policies = vec![Policy::from_api(&np, "x").unwrap()];
    let (mut c, plan) = Compiler::build("node-1", w.clone(), policies);
    let mut maps = EmulatedMaps::new(Capacities::default());
    c.apply(&plan, &mut maps);
    let Some(ep) = w
        .pods
        .values()
        .find(|p| p.node == "node-1" && p.namespace == "x" && !p.host_network)
    else {
        return;
    };
    let ep = ep.ip.unwrap();
    assert!(maps.ingress(ep, node_ip(0), 6, 10250));
    let plan = c.set_node_addrs("node-1", vec!["192.168.9.1".parse().unwrap()]);
    c.apply(&plan, &mut maps);
    assert!(!maps.ingress(ep, node_ip(0), 6, 10250));
    assert!(maps.ingress(ep, "192.168.9.1".parse().unwrap(), 6, 10250));
    assert!(maps.egress(ep, "192.168.9.1".parse().unwrap(), 6, 10250));
}

#[test]
fn plan_writes_are_ordered_by_kind() {
    // Within a phase: additions, then pointer switches, then deletions.
    let mut rng = Rng::new(11);
    let w = random_world(&mut rng);
    let p = random_policy(&mut rng, &w, "a");
    let (mut c, _) = Compiler::build("node-1", w.clone(), vec![p]);
    let plan = c.upsert_policy(random_policy(&mut rng, &w, "b"));
    let rank = |wr: &MapWrite| match wr {
        MapWrite::Rule { value: Some(_), .. } | MapWrite::PortBlock { value: Some(_), .. } => 0,
        MapWrite::Rule { value: None, .. } | MapWrite::PortBlock { value: None, .. } => 2,
        _ => 1,
    };
    // The plan is at most three phases, each sorted by rank.
    let mut phases = 1;
    for pair in plan.writes.windows(2) {
        if rank(&pair[1]) < rank(&pair[0]) {
            phases += 1;
        }
    }
    assert!(phases <= 3, "{:#?}", plan.writes);
}

#[test]
fn restart_over_pinned_maps_opens_nothing() {
    let ports = [53u16, 80, 8080];
    let protos = [6u8, 17, 1];
    for seed in 0..seeds(40) {
        let mut rng = Rng::new(9000 + seed);
        let w_old = random_world(&mut rng);
        let p_old: Vec<Policy> = (0..3)
            .map(|i| random_policy(&mut rng, &w_old, &format!("p{i}")))
            .collect();
        // The world moved on while the agent was down.
        let event = Event::random(&mut rng, &w_old, &p_old);
        let (mut w_new, mut p_new) = (w_old.clone(), p_old.clone());
        event.apply_world(&mut w_new, &mut p_new);
        for node in NODES {
            let (mut old_c, plan) = Compiler::build(node, w_old.clone(), p_old.iter().cloned());
            let mut maps = EmulatedMaps::new(Capacities::default());
            assert!(old_c.apply(&plan, &mut maps).is_clean());
            let existing = maps.clone();
            let (c, f, s) = existing.max_ids();
            let (mut new_c, _) = Compiler::new(node)
                .with_id_floor(c, f, s)
                .build_from(w_new.clone(), p_new.iter().cloned());
            let plan = new_c.adoption_plan(&existing);
            let eps: Vec<PodRecord> = w_new
                .pods
                .values()
                .filter(|p| p.node == node && !p.host_network && p.ip.is_some())
                .filter(|p| {
                    w_old.pods.values().any(|o| {
                        o.ip == p.ip
                            && o.name == p.name
                            && o.namespace == p.namespace
                            && o.node == p.node
                    })
                })
                .cloned()
                .collect();
            let mut remotes: BTreeSet<Ipv4Addr> = probe_addrs(&w_old).into_iter().collect();
            remotes.extend(probe_addrs(&w_new));
            let mut cases = Vec::new();
            for ep in &eps {
                let old_ep = w_old.pods.values().find(|o| o.ip == ep.ip).unwrap();
                for &r in &remotes {
                    for dir in [Direction::Ingress, Direction::Egress] {
                        for proto in protos {
                            for port in ports {
                                let new =
                                    direction_verdict(&w_new, &p_new, ep, dir, r, proto, port);
                                let old =
                                    direction_verdict(&w_old, &p_old, old_ep, dir, r, proto, port);
                                cases.push((ep.ip.unwrap(), r, dir, proto, port, old, new));
                            }
                        }
                    }
                }
            }
            for (i, wr) in plan.writes.iter().enumerate() {
                maps.write(wr).unwrap();
                let last = i + 1 == plan.writes.len();
                for (ip, r, dir, proto, port, old, new) in &cases {
                    let got = match dir {
                        Direction::Ingress => maps.ingress(*ip, *r, *proto, *port),
                        Direction::Egress => maps.egress(*ip, *r, *proto, *port),
                    };
                    let ok = if last {
                        got == *new
                    } else {
                        (!got || *old || *new) && (got || !(*old && *new))
                    };
                    assert!(
                        ok,
                        "seed {seed} node {node} step {i} {wr:?}: {ip} {dir:?} {r} {proto}/{port}: got {got} old {old} new {new}"
                    );
                }
            }
            // Nothing of the old agent is left behind, and the new agent goes on from there.
            let e2 = Event::random(&mut rng, &w_new, &p_new);
            let (mut w3, mut p3) = (w_new.clone(), p_new.clone());
            e2.apply_world(&mut w3, &mut p3);
            let plan = e2.plan(&mut new_c);
            assert!(new_c.apply(&plan, &mut maps).is_clean());
            let (w_new, p_new) = (w3, p3);
            let (mut fresh_c, fresh_plan) =
                Compiler::build(node, w_new.clone(), p_new.iter().cloned());
            let mut fresh = EmulatedMaps::new(Capacities::default());
            fresh_c.apply(&fresh_plan, &mut fresh);
            assert_eq!(
                (
                    maps.addrs.len(),
                    maps.cidrs.len(),
                    maps.rules.len(),
                    maps.blocks.len(),
                    maps.ns_defaults.len()
                ),
                (
                    fresh.addrs.len(),
                    fresh.cidrs.len(),
                    fresh.rules.len(),
                    fresh.blocks.len(),
                    fresh.ns_defaults.len()
                ),
                "seed {seed} node {node}"
            );
        }
    }
}

#[test]
fn full_address_and_namespace_maps_fail_closed() {
    // x/a accepts x/b by selector and 10.244.1.0/24 by ipBlock; y's pods by nothing.
    let mut w = World::default();
    w.nodes.insert("node-1".into(), vec![node_ip(0)]);
    for (ns, name, ip) in [
        ("x", "a", "10.244.1.2"),
        ("x", "b", "10.244.2.3"),
        ("y", "c", "10.244.1.5"),
    ] {
        w.upsert_pod(PodRecord {
            namespace: ns.into(),
            name: name.into(),
            labels: [("pod".to_string(), name.to_string())].into(),
            ip: Some(ip.parse().unwrap()),
            node: if name == "a" {
                "node-1".into()
            } else {
                "node-2".into()
            },
            host_network: false,
            ports: vec![],
        });
    }
    let np: NetworkPolicy = serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
            {"podSelector": {"matchLabels": {"pod": "b"}}}, {"ipBlock": {"cidr": "10.244.1.0/24"}}]}]}}))
    .unwrap();
    let policies = vec![Policy::from_api(&np, "x").unwrap()];
    let (mut c, plan) = Compiler::build("node-1", w.clone(), policies);
    // Room for the node address only: no pod gets its class.
    let mut maps = EmulatedMaps::new(Capacities {
        addrs: 1,
        ns_defaults: 1,
        ..Capacities::default()
    });
    let report = c.apply(&plan, &mut maps);
    assert_eq!(report.unclassified.len(), 3, "{report:?}");
    assert!(!report.ns_defaults_failed.is_empty(), "{report:?}");
    let a: Ipv4Addr = "10.244.1.2".parse().unwrap();
    // This node's address was written first: its traffic still gets in.
    assert!(maps.ingress(a, node_ip(0), 6, 10250));
    // x/b is unknown to the node now: its selector allowance does not apply (closed).
    assert!(!maps.ingress(a, "10.244.2.3".parse().unwrap(), 6, 80));
    // y/c is inside the ipBlock: matched by address, exactly as with its class.
    assert!(maps.ingress(a, "10.244.1.5".parse().unwrap(), 6, 80));
    // The namespace defaults did not fit: the synced marker is gone, a new pod of a namespace
    // without policies is isolated both ways until the agent compiles it.
    assert!(!maps.ns_defaults.contains_key(""));
    maps.cni_add("10.244.1.9".parse().unwrap(), "z").unwrap();
    assert!(!maps.ingress(
        "10.244.1.9".parse().unwrap(),
        "10.244.1.5".parse().unwrap(),
        6,
        80
    ));
    assert!(!maps.egress(
        "10.244.1.9".parse().unwrap(),
        "10.244.1.5".parse().unwrap(),
        6,
        80
    ));
}

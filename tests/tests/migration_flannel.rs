//! The flannel migration procedure of docs/migrating-from-flannel.md, performed as written: the
//! steps are read from the document (`### N. Title` with a `<!-- e2e: once|each-node ACTION -->`
//! marker naming the harness action), run in the document's order on a cluster of flannel
//! vxlan nodes (the once-steps before the first node step, then the node steps for each
//! node in turn, then the rest), and every pod pings every other pod after each step.
//!
//! flannel nodes are configured as flanneld configures them (kernel `flannel.1`, `cni0`, one
//! pod, a lease in etcd); flanneld's reaction to lease changes is `sync_flannel_nodes`, run
//! before every check. The Kubernetes side of each step (labels, DaemonSet selectors) has its
//! node-level effect here: which daemon runs on the node.
use std::{net::Ipv4Addr, path::Path};

use weft_tests::{
    agentless::FlannelNode,
    cluster::{CLUSTER_NETWORK, Cluster, ClusterOptions, ping_rtt_in},
    netns::Netns,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Once,
    EachNode,
}

#[derive(Debug)]
struct Step {
    number: u32,
    title: String,
    scope: Scope,
    action: String,
}

/// The numbered steps of the document, with their markers.
fn documented_steps(doc: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut in_steps = false;
    for line in doc.lines() {
        if line.starts_with("## ") {
            in_steps = line.trim() == "## Steps";
            continue;
        }
        if !in_steps {
            continue;
        }
        if let Some(heading) = line.strip_prefix("### ") {
            let (number, title) = heading
                .split_once(". ")
                .unwrap_or_else(|| panic!("step heading {line:?} is not `### N. Title`"));
            steps.push(Step {
                number: number
                    .parse()
                    .unwrap_or_else(|_| panic!("step heading {line:?} has no number")),
                title: title.to_string(),
                scope: Scope::Once,
                action: String::new(),
            });
        } else if let Some(marker) = line
            .trim()
            .strip_prefix("<!-- e2e:")
            .and_then(|m| m.strip_suffix("-->"))
        {
            let step = steps
                .last_mut()
                .unwrap_or_else(|| panic!("marker {line:?} before the first step"));
            assert!(
                step.action.is_empty(),
                "step {} has two e2e markers",
                step.number
            );
            let words: Vec<&str> = marker.split_whitespace().collect();
            let [scope, action] = words[..] else {
                panic!("marker {line:?} is not `<!-- e2e: once|each-node ACTION -->`");
            };
            step.scope = match scope {
                "once" => Scope::Once,
                "each-node" => Scope::EachNode,
                other => panic!(
                    "step {}: scope {other:?} is not once or each-node",
                    step.number
                ),
            };
            step.action = action.to_string();
        }
    }
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(
            step.number as usize,
            i + 1,
            "steps are numbered 1, 2, ... in order"
        );
        assert!(
            !step.action.is_empty(),
            "step {} ({}) names no harness action: add `<!-- e2e: once|each-node ACTION -->` under its heading",
            step.number,
            step.title
        );
    }
    steps
}

/// A pod to ping from and to: (label, namespace name, address).
type PodRef = (String, String, Ipv4Addr);

/// A node while it moves from flannel to weft.
enum Migrating {
    /// Drained: flanneld and its kernel state still there, no pod.
    Drained { ns: Netns, ip: Ipv4Addr },
    /// weft's agent runs (index in `cluster.nodes`); flannel's devices may remain.
    Weft(usize),
}

struct Migration {
    cluster: Cluster,
    /// The flannel node being migrated, once drained.
    current: Option<Migrating>,
    migrated: usize,
}

impl Migration {
    /// Every pod reaches every other pod (flanneld has seen every lease first).
    fn check(&self, after: &str) {
        self.cluster.sync_flannel_nodes();
        let mut pods: Vec<PodRef> = Vec::new();
        for node in &self.cluster.nodes {
            for pod in &node.pods {
                pods.push((format!("weft {}", node.name), pod.ns.name.clone(), pod.ip));
            }
        }
        for node in &self.cluster.flannel {
            pods.push((
                format!("flannel {}", node.ip),
                node.pod.ns.name.clone(),
                node.pod.ip,
            ));
        }
        let pairs: Vec<(&PodRef, &PodRef)> = pods
            .iter()
            .flat_map(|a| pods.iter().map(move |b| (a, b)))
            .filter(|(a, b)| a.2 != b.2)
            .collect();
        let mut failed = Vec::new();
        for chunk in pairs.chunks(8) {
            let results: Vec<bool> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|(a, b)| s.spawn(move || ping_rtt_in(&a.1, b.2).is_some()))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for ((a, b), ok) in chunk.iter().zip(results) {
                if !ok {
                    failed.push(format!("{} {} -> {} {}", a.0, a.2, b.0, b.2));
                }
            }
        }
        assert!(
            failed.is_empty(),
            "after {after}: unreachable {failed:?}\n{}\n{}",
            self.cluster.datapath_state(),
            self.cluster.agent_logs()
        );
        eprintln!(
            "after {after}: {} pods, {} pairs reachable",
            pods.len(),
            pairs.len()
        );
    }

    fn run(&mut self, action: &str) {
        match action {
            "same_net_conf" => {
                // weft reads the cluster's (flannel's) net-conf.json and gets the VXLAN network
                // flannel's devices use.
                let text = std::fs::read_to_string(&self.cluster.net_conf).unwrap();
                let conf = weft_agent::config::FlannelNetConf::parse(&text).unwrap();
                assert_eq!(conf.network.to_string(), CLUSTER_NETWORK);
                for node in &self.cluster.flannel {
                    let link = node.ns.ip("-d -j link show flannel.1");
                    let link: serde_json::Value = serde_json::from_str(&link).unwrap();
                    let vxlan = &link[0]["linkinfo"]["info_data"];
                    assert_eq!(vxlan["id"], conf.backend.vni, "VNI: {vxlan}");
                    assert_eq!(vxlan["port"], conf.backend.port, "port: {vxlan}");
                    assert!(conf.is_leasable(node.subnet), "{} leasable", node.subnet);
                }
            }
            "install_weft_nowhere" => {
                // The DaemonSet's selector matches no node: no weft agent runs.
                assert!(self.cluster.nodes.is_empty());
            }
            "drain" => {
                assert!(self.current.is_none(), "a node is already being migrated");
                let FlannelNode { ns, ip, pod, .. } = self.cluster.flannel.remove(0);
                drop(pod);
                self.current = Some(Migrating::Drained { ns, ip });
            }
            "switch_to_weft" => {
                let Some(Migrating::Drained { ns, ip }) = self.current.take() else {
                    panic!("switch_to_weft before drain");
                };
                let name = format!("migrated-{}", self.migrated);
                let index = self.cluster.adopt_node(ns, ip, name);
                self.current = Some(Migrating::Weft(index));
            }
            "remove_flannel_leftovers" => {
                let Some(Migrating::Weft(index)) = self.current else {
                    panic!("remove_flannel_leftovers before switch_to_weft");
                };
                let ns = &self.cluster.nodes[index].ns;
                ns.ip("link delete flannel.1");
                ns.ip("link delete cni0");
            }
            "wait_ready" => {
                let Some(Migrating::Weft(index)) = self.current else {
                    panic!("wait_ready before switch_to_weft");
                };
                self.cluster.wait_converged(index);
                // flannel.1 is gone: VXLAN goes through weft's own device now.
                let node = &self.cluster.nodes[index];
                weft_tests::process::wait_until(
                    &format!("{} to set up {}", node.name, weft_common::VXLAN_DEV),
                    std::time::Duration::from_secs(10),
                    || {
                        node.maps().config().is_ok_and(|c| {
                            weft_common::vxlan_decap(c.flags) == weft_common::VXLAN_DEV
                        })
                    },
                );
                // Routes to the flannel nodes too, not only to weft nodes (polled: with no other
                // weft node, convergence is the subnet file alone, which the agent writes before
                // its first reconcile programs the routes).
                let node = &self.cluster.nodes[index];
                for f in &self.cluster.flannel {
                    weft_tests::process::wait_until(
                        &format!("{} to route flannel's {}", node.name, f.subnet),
                        std::time::Duration::from_secs(30),
                        || {
                            node.maps()
                                .routes()
                                .is_ok_and(|r| r.iter().any(|(net, _)| *net == f.subnet))
                        },
                    );
                }
                self.cluster.wait_ready(index);
            }
            "uncordon" => {
                let Some(Migrating::Weft(index)) = self.current.take() else {
                    panic!("uncordon before switch_to_weft");
                };
                // The pods it had come back, now through weft-cni, in the same subnet.
                let ip = self.cluster.add_pod(index);
                self.cluster.add_pod(index);
                let subnet = weft_agent::subnet_env::SubnetEnv::read(
                    &self.cluster.nodes[index].subnet_file(),
                )
                .unwrap()
                .subnet;
                assert!(subnet.contains(&ip), "{ip} outside the node's {subnet}");
                self.migrated += 1;
            }
            "remove_flannel" => {
                assert!(
                    self.cluster.flannel.is_empty() && self.current.is_none(),
                    "flannel removed before every node was migrated"
                );
                for node in &self.cluster.nodes {
                    for dev in ["flannel.1", "cni0"] {
                        assert!(
                            !node.ns.exec_ok("ip", &["link", "show", dev]),
                            "{} still has {dev}",
                            node.name
                        );
                    }
                }
            }
            other => panic!(
                "docs/migrating-from-flannel.md names the action {other:?}, which the test does not know: add it to tests/tests/migration_flannel.rs"
            ),
        }
    }
}

#[test]
fn flannel_cluster_migrates_node_by_node_as_documented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/migrating-from-flannel.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let steps = documented_steps(&doc);
    assert!(
        steps.iter().any(|s| s.scope == Scope::EachNode),
        "no per-node step"
    );

    // A flannel cluster: three vxlan nodes with a pod each, leases in etcd.
    // The agents run with their default hook, as the DaemonSet does: on these veth underlays
    // tc, with VXLAN through `weft_vxlan` once flannel's `flannel.1` no longer holds the port.
    let mut cluster = Cluster::new(ClusterOptions {
        nodes: 0,
        default_xdp: true,
        ..Default::default()
    });
    let subnets = ["10.244.11.0/24", "10.244.12.0/24", "10.244.13.0/24"];
    for s in subnets {
        cluster.add_flannel_node(s.parse().unwrap());
    }
    let mut m = Migration {
        cluster,
        current: None,
        migrated: 0,
    };
    m.check("setting up the flannel cluster");

    // Once-steps before the node steps, the node steps per node, then the rest.
    let first_node_step = steps
        .iter()
        .position(|s| s.scope == Scope::EachNode)
        .unwrap();
    let last_node_step = steps
        .iter()
        .rposition(|s| s.scope == Scope::EachNode)
        .unwrap();
    assert!(
        steps[first_node_step..=last_node_step]
            .iter()
            .all(|s| s.scope == Scope::EachNode),
        "the per-node steps must follow each other"
    );
    for step in &steps[..first_node_step] {
        m.run(&step.action);
        m.check(&format!("step {} ({})", step.number, step.title));
    }
    for node in 0..subnets.len() {
        for step in &steps[first_node_step..=last_node_step] {
            m.run(&step.action);
            m.check(&format!(
                "node {node}, step {} ({})",
                step.number, step.title
            ));
        }
    }
    for step in &steps[last_node_step + 1..] {
        m.run(&step.action);
        m.check(&format!("step {} ({})", step.number, step.title));
    }

    // The migrated cluster: every node is weft, each kept its flannel subnet.
    assert_eq!(m.cluster.nodes.len(), subnets.len());
    for (node, subnet) in m.cluster.nodes.iter().zip(subnets) {
        let env = weft_agent::subnet_env::SubnetEnv::read(&node.subnet_file()).unwrap();
        assert_eq!(
            env.subnet.to_string(),
            subnet,
            "{} kept its subnet",
            node.name
        );
    }
    // TCP and UDP across the migrated cluster.
    let pairs = m.cluster.assert_tcp_udp_matrix();
    eprintln!("TCP and UDP between {pairs} pairs after the migration");
}

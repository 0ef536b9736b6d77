//! The reference evaluator: the semantic oracle the compiled datapath form is tested against.
//! Written to be read, not to be fast: every decision walks the policies as the API reference
//! describes them.
use std::net::{IpAddr, Ipv4Addr};

use super::{
    model::{Direction, NamespaceScope, Peer, PodRecord, Policy, PortMatch, Protocol, World},
    selector::Selector,
};

/// What a connection's far end is, as the policy side of the near end sees it.
#[derive(Clone, Copy)]
pub struct Remote<'a> {
    pub ip: Ipv4Addr,
    /// The pod owning `ip`, if one does (host-network pods own no address of their own).
    pub pod: Option<&'a PodRecord>,
}

/// Whether a connection `src → dst` (first packet: IP protocol `proto`, destination `port`) is
/// allowed: the source's egress and the destination's ingress must both allow it.
pub fn allowed(
    world: &World,
    policies: &[Policy],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    port: u16,
) -> bool {
    if src == dst {
        return true; // a pod to itself
    }
    let by_ip = world.pods_by_ip();
    let src_pod = by_ip.get(&src).copied();
    let dst_pod = by_ip.get(&dst).copied();
    let egress = match src_pod {
        None => true, // nodes, host-network pods and outside addresses are not isolated
        Some(p) => direction_allows(
            world,
            policies,
            p,
            Direction::Egress,
            Remote {
                ip: dst,
                pod: dst_pod,
            },
            proto,
            port,
        ),
    };
    let ingress = match dst_pod {
        None => true,
        Some(p) => direction_allows(
            world,
            policies,
            p,
            Direction::Ingress,
            Remote {
                ip: src,
                pod: src_pod,
            },
            proto,
            port,
        ),
    };
    egress && ingress
}

/// The policies that select `pod` for `dir` (those isolating it in that direction).
pub fn selecting<'p>(
    policies: &'p [Policy],
    pod: &PodRecord,
    dir: Direction,
) -> impl Iterator<Item = &'p Policy> {
    policies.iter().filter(move |p| {
        p.namespace == pod.namespace
            && p.rules(dir).is_some()
            && p.pod_selector.matches(&pod.labels)
    })
}

/// One direction at one endpoint: is traffic between `endpoint` and `remote` allowed by the
/// policies on `endpoint`'s side? `port` is the destination port (the endpoint's own for
/// ingress, the remote's for egress).
pub fn direction_allows(
    world: &World,
    policies: &[Policy],
    endpoint: &PodRecord,
    dir: Direction,
    remote: Remote,
    proto: u8,
    port: u16,
) -> bool {
    if endpoint.ip == Some(remote.ip) {
        return true;
    }
    // Traffic between a pod and its own node (kubelet probes, host-network pods) is allowed.
    if world.node_addrs(&endpoint.node).contains(&remote.ip) {
        return true;
    }
    let mut isolated = false;
    for policy in selecting(policies, endpoint, dir) {
        isolated = true;
        for rule in policy.rules(dir).unwrap_or(&[]) {
            let peer_ok = match &rule.peers {
                None => true,
                Some(peers) => peers.iter().any(|p| peer_matches(world, p, remote)),
            };
            // Named ports resolve on the destination pod: the endpoint for ingress, the remote
            // for egress (a remote that is not a pod has no named ports).
            let dst_pod = match dir {
                Direction::Ingress => Some(endpoint),
                Direction::Egress => remote.pod,
            };
            let port_ok = match &rule.ports {
                None => true,
                Some(ports) => ports.iter().any(|spec| {
                    spec.protocol.number() == proto
                        && match &spec.port {
                            PortMatch::All => true,
                            PortMatch::Range(first, last) => (*first..=*last).contains(&port),
                            PortMatch::Named(name) => dst_pod
                                .and_then(|p| p.named_port(name, spec.protocol))
                                .is_some_and(|n| n == port),
                        }
                }),
            };
            if peer_ok && port_ok {
                return true;
            }
        }
    }
    !isolated
}

/// Whether `remote` is one of the addresses or pods `peer` describes.
pub fn peer_matches(world: &World, peer: &Peer, remote: Remote) -> bool {
    match peer {
        // ipBlocks match by address, pods' addresses included.
        Peer::IpBlock { cidr, except } => {
            let ip = IpAddr::V4(remote.ip);
            cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
        }
        Peer::Pods { namespaces, pods } => {
            let Some(pod) = remote.pod else {
                return false; // selectors only ever match pods
            };
            let ns_ok = match namespaces {
                NamespaceScope::Own(ns) => &pod.namespace == ns,
                NamespaceScope::Selected(sel) => {
                    sel.matches(&world.namespace_labels(&pod.namespace))
                }
            };
            ns_ok
                && pods
                    .as_ref()
                    .is_none_or(|s: &Selector| s.matches(&pod.labels))
        }
    }
}

/// Convenience for tests and tools: protocol by name.
pub fn proto_number(name: &str) -> Option<u8> {
    Protocol::parse(name).map(Protocol::number)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::model::NamedPort;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use serde_json::json;

    /// The truth-table layout (issue 12): namespaces x, y, z; pods a, b, c; nodes 1-3.
    pub fn layout() -> World {
        let mut w = World::default();
        for ns in ["x", "y", "z"] {
            w.namespaces.insert(
                ns.into(),
                [
                    ("ns".to_string(), ns.to_string()),
                    ("kubernetes.io/metadata.name".to_string(), ns.to_string()),
                ]
                .into(),
            );
        }
        let ips = [
            ("x", "a", "10.244.1.2"),
            ("x", "b", "10.244.1.3"),
            ("x", "c", "10.244.2.2"),
            ("y", "a", "10.244.2.3"),
            ("y", "b", "10.244.3.2"),
            ("y", "c", "10.244.3.3"),
            ("z", "a", "10.244.1.4"),
            ("z", "b", "10.244.2.4"),
            ("z", "c", "10.244.3.4"),
        ];
        for (ns, name, ip) in ips {
            let ip: Ipv4Addr = ip.parse().unwrap();
            let node = format!("node-{}", ip.octets()[2]);
            let mut ports = Vec::new();
            for port in [80u16, 81] {
                for proto in [Protocol::Tcp, Protocol::Udp] {
                    ports.push(NamedPort {
                        name: format!("serve-{port}-{}", proto.name().to_lowercase()),
                        protocol: proto,
                        port,
                    });
                }
            }
            w.upsert_pod(PodRecord {
                namespace: ns.into(),
                name: name.into(),
                labels: [("pod".to_string(), name.to_string())].into(),
                ip: Some(ip),
                node,
                host_network: false,
                ports,
            });
        }
        for n in 1..=3u8 {
            w.nodes
                .insert(format!("node-{n}"), vec![Ipv4Addr::new(192, 168, 0, n)]);
        }
        w
    }

    pub fn policy(ns: &str, spec: serde_json::Value) -> Policy {
        let np: NetworkPolicy = serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": ns}, "spec": spec}),
        )
        .unwrap();
        Policy::from_api(&np, ns).unwrap()
    }

    pub fn ip(w: &World, pod: &str) -> Ipv4Addr {
        let (ns, name) = pod.split_once('/').unwrap();
        w.pods[&(ns.to_string(), name.to_string())].ip.unwrap()
    }

    fn tcp(w: &World, ps: &[Policy], from: &str, to: &str, port: u16) -> bool {
        allowed(w, ps, ip(w, from), ip(w, to), 6, port)
    }

    #[test]
    fn no_policy_allows_everything() {
        let w = layout();
        assert!(tcp(&w, &[], "x/a", "y/b", 80));
    }

    #[test]
    fn default_deny_ingress_but_self_and_node() {
        let w = layout();
        let ps = [policy("x", json!({"podSelector": {}}))];
        assert!(!tcp(&w, &ps, "y/a", "x/a", 80));
        assert!(!tcp(&w, &ps, "x/b", "x/a", 80));
        assert!(tcp(&w, &ps, "x/a", "x/a", 80), "a pod to itself");
        assert!(tcp(&w, &ps, "x/a", "y/a", 80), "egress not isolated");
        // x/a lives on node-1 (192.168.0.1): its node reaches it, another node does not.
        assert!(allowed(
            &w,
            &ps,
            "192.168.0.1".parse().unwrap(),
            ip(&w, "x/a"),
            6,
            80
        ));
        assert!(!allowed(
            &w,
            &ps,
            "192.168.0.2".parse().unwrap(),
            ip(&w, "x/a"),
            6,
            80
        ));
    }

    #[test]
    fn ingress_empty_list_vs_one_empty_rule() {
        let w = layout();
        let none = [policy("x", json!({"podSelector": {}, "ingress": []}))];
        let all = [policy("x", json!({"podSelector": {}, "ingress": [{}]}))];
        assert!(!tcp(&w, &none, "y/a", "x/b", 80));
        assert!(tcp(&w, &all, "y/a", "x/b", 80));
        assert!(allowed(
            &w,
            &all,
            "8.8.8.8".parse().unwrap(),
            ip(&w, "x/b"),
            17,
            5353
        ));
    }

    #[test]
    fn policy_types_default() {
        let w = layout();
        // egress present: Egress added; egress: [] (empty) does not add it.
        let eg = [policy(
            "x",
            json!({"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}),
        )];
        assert!(!tcp(&w, &eg, "x/a", "y/a", 80));
        assert!(!tcp(&w, &eg, "y/a", "x/a", 80), "Ingress always");
        let empty_egress = [policy(
            "x",
            json!({"podSelector": {}, "ingress": [{}], "egress": []}),
        )];
        assert!(tcp(&w, &empty_egress, "x/a", "y/a", 80));
        let typed = [policy(
            "x",
            json!({"podSelector": {}, "policyTypes": ["Egress"]}),
        )];
        assert!(!tcp(&w, &typed, "x/a", "y/a", 80));
        assert!(tcp(&w, &typed, "y/a", "x/a", 80), "only Egress");
    }

    #[test]
    fn and_versus_or() {
        let w = layout();
        let and = [policy(
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )];
        let or = [policy(
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"ns": "y"}}}, {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )];
        assert!(tcp(&w, &and, "y/b", "x/a", 80));
        assert!(!tcp(&w, &and, "y/a", "x/a", 80));
        assert!(!tcp(&w, &and, "x/b", "x/a", 80));
        assert!(tcp(&w, &or, "y/a", "x/a", 80));
        assert!(tcp(&w, &or, "x/b", "x/a", 80));
        assert!(
            !tcp(&w, &or, "z/b", "x/a", 80),
            "podSelector alone is the policy's namespace"
        );
        assert!(tcp(&w, &or, "z/b", "x/b", 80), "x/b not selected");
    }

    #[test]
    fn ip_block_except_over_pod_addresses() {
        let w = layout();
        let ps = [policy(
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
            {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}]}]}),
        )];
        assert!(tcp(&w, &ps, "y/b", "x/a", 80));
        assert!(!tcp(&w, &ps, "y/a", "x/a", 80), "10.244.2.3 is excepted");
        assert!(!allowed(
            &w,
            &ps,
            "10.245.0.1".parse().unwrap(),
            ip(&w, "x/a"),
            6,
            80
        ));
    }

    #[test]
    fn named_and_ranged_ports() {
        let w = layout();
        let ps = [policy(
            "x",
            json!({"podSelector": {}, "ingress": [{"ports": [
            {"port": "serve-81-udp", "protocol": "UDP"}, {"port": "serve-80-udp"}, {"port": 70, "endPort": 80}]}]}),
        )];
        assert!(allowed(&w, &ps, ip(&w, "y/a"), ip(&w, "x/a"), 17, 81));
        assert!(
            !allowed(&w, &ps, ip(&w, "y/a"), ip(&w, "x/a"), 17, 80),
            "serve-80-udp is UDP, the rule says TCP"
        );
        assert!(tcp(&w, &ps, "y/a", "x/a", 80));
        assert!(!tcp(&w, &ps, "y/a", "x/a", 81));
    }

    #[test]
    fn per_pod_named_port() {
        let mut w = layout();
        let mut b = w.pods[&("x".into(), "b".into())].clone();
        for p in &mut b.ports {
            if p.name == "serve-80-tcp" {
                p.port = 81;
            }
        }
        w.upsert_pod(b);
        let ps = [policy(
            "x",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]}),
        )];
        assert!(tcp(&w, &ps, "y/a", "x/a", 80));
        assert!(!tcp(&w, &ps, "y/a", "x/a", 81));
        assert!(tcp(&w, &ps, "y/a", "x/b", 81));
        assert!(!tcp(&w, &ps, "y/a", "x/b", 80));
        // Egress: resolved on the destination pod.
        let eg = [policy(
            "y",
            json!({"podSelector": {}, "egress": [{"ports": [{"port": "serve-80-tcp"}]}]}),
        )];
        assert!(tcp(&w, &eg, "y/a", "x/b", 81));
        assert!(!tcp(&w, &eg, "y/a", "x/b", 80));
        assert!(tcp(&w, &eg, "y/a", "x/a", 80));
        assert!(
            !allowed(&w, &eg, ip(&w, "y/a"), "8.8.8.8".parse().unwrap(), 6, 80),
            "no named ports off-pod"
        );
    }

    #[test]
    fn policies_union_and_both_ends() {
        let w = layout();
        let ps = [
            policy(
                "x",
                json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            ),
            policy(
                "x",
                json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
            ),
            policy(
                "x",
                json!({"podSelector": {"matchLabels": {"pod": "c"}}, "egress": [], "policyTypes": ["Egress"]}),
            ),
        ];
        assert!(tcp(&w, &ps, "x/b", "x/a", 80));
        assert!(!tcp(&w, &ps, "x/c", "x/a", 80), "x/c's egress denies");
        assert!(
            !tcp(&w, &ps, "x/a", "x/b", 80),
            "x/a is not among the allowed sources"
        );
    }

    #[test]
    fn host_network_is_the_node() {
        let mut w = layout();
        w.upsert_pod(PodRecord {
            namespace: "y".into(),
            name: "h".into(),
            labels: [("pod".to_string(), "b".to_string())].into(),
            ip: Some("192.168.0.2".parse().unwrap()),
            node: "node-2".into(),
            host_network: true,
            ports: vec![],
        });
        // Only pod b of y may reach x: the host-network pod labelled pod=b is not matched.
        let ps = [policy(
            "x",
            json!({"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )];
        assert!(!allowed(
            &w,
            &ps,
            "192.168.0.2".parse().unwrap(),
            ip(&w, "x/a"),
            6,
            80
        ));
        assert!(
            allowed(
                &w,
                &ps,
                "192.168.0.2".parse().unwrap(),
                ip(&w, "x/c"),
                6,
                80
            ),
            "its own node"
        );
    }
}

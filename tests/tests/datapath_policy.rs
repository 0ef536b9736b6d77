//! Packet injection for NetworkPolicy: every verdict path of the datapath, with maps written by
//! the agent's own compiler through the kernel-map adapter. Egress at `from_pod` (local and
//! remote destinations, to the stack), ingress on the local fast path, from the underlay and
//! from the stack (`to_pod`), replies of allowed flows (also from an isolated pod), a pod and
//! its node, a pod to itself, unknown sources failing closed, ipBlocks, port bitmaps, Services
//! judged by their backend, a local pod without policy state, and established flows cut at
//! their next packet after a policy change. Verdicts, exact output bytes, and the drop
//! counters (per reason and per endpoint).
use std::net::Ipv4Addr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use weft_agent::{
    datapath::{LoadOptions, PolicyCapacities},
    netpol::maps::KernelMaps,
    policy::{
        compile::Compiler,
        model::{Direction, NamedPort, PodRecord, Policy, Protocol, World},
    },
};
use weft_common::{
    DropReason, Stat,
    policy::{POLICY_CFG_F_READY, POLICY_CFG_F_SERVICE_NET, PolicyConfig, PolicyDrops},
    prog_names,
};
use weft_tests::{injection_node::*, packets::*, testrun::run_tc};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;
const NIC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x50, 0x01];
/// An address no pod has (an unknown source or destination).
const STRANGER: [u8; 4] = [10, 244, 9, 9];
const OUTSIDE: [u8; 4] = [203, 0, 113, 5];
const SERVICE: [u8; 4] = [10, 96, 0, 10];

fn pod(ns: &str, name: &str, ip: [u8; 4], node: &str, app: &str) -> PodRecord {
    PodRecord {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        ip: Some(Ipv4Addr::from(ip)),
        node: node.into(),
        host_network: false,
        ports: vec![NamedPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
    }
}

/// The injection node's world: pods 1 and 2 here (x/a, x/b), a remote pod (y/c).
fn world() -> World {
    let mut w = World::default();
    w.upsert_pod(pod("x", "a", POD1_IP, "here", "a"));
    w.upsert_pod(pod("x", "b", POD2_IP, "here", "b"));
    w.upsert_pod(pod("y", "c", REMOTE_VXLAN_IP, "there", "c"));
    w.nodes.insert("here".into(), vec![Ipv4Addr::from(NODE_IP)]);
    w
}

fn policy(v: serde_json::Value) -> Policy {
    let np: NetworkPolicy = serde_json::from_value(v).unwrap();
    Policy::from_api(&np, "x").unwrap()
}

/// Compiles `policies` with the agent's compiler into the node's maps and bumps the revision,
/// as the agent's controller does. Returns the compiler (for later changes).
fn enforce(node: &mut Node, policies: Vec<Policy>, revision: u32) -> Compiler {
    let (mut c, plan) = Compiler::build("here", world(), policies);
    let report = c.apply(&plan, &mut KernelMaps::new(&mut node.dp.maps));
    assert!(report.is_clean(), "{report:?}");
    set_revision(node, revision);
    c
}

fn set_revision(node: &mut Node, revision: u32) {
    node.dp
        .maps
        .set_policy_config(&PolicyConfig {
            revision,
            flags: POLICY_CFG_F_READY | POLICY_CFG_F_SERVICE_NET,
            service_net: [10, 96, 0, 0],
            service_mask: [255, 255, 0, 0],
            datastore_revision: 0,
        })
        .unwrap();
}

fn run(node: &mut Node, prog: &str, frame: &[u8], ifindex: u32) -> (i32, Vec<u8>) {
    let prog = node.dp.tc_program(prog).unwrap();
    let out = run_tc(prog, frame, ifindex, 1);
    (out.verdict, out.data)
}

fn drops(node: &Node, r: DropReason) -> u64 {
    node.dp.maps.drop_count(r).unwrap()
}

fn endpoint_drops(node: &Node, ip: [u8; 4]) -> PolicyDrops {
    node.dp
        .maps
        .policy_drops()
        .unwrap()
        .into_iter()
        .find(|(a, _)| *a == Ipv4Addr::from(ip))
        .map(|(_, d)| d)
        .unwrap_or_default()
}

fn syn(src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    tcp_frame(src_mac, [0xee; 6], src, dst, sport, dport, b"hello")
}

fn synack(src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(src_mac, [0xee; 6])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 5000, 64240)
        .syn()
        .ack(1001);
    let mut out = Vec::new();
    b.write(&mut out, b"").unwrap();
    out
}

/// Asserts a local delivery: redirected, the forwarded packet byte for byte.
fn assert_delivered(out: (i32, Vec<u8>), frame: &[u8], what: &str) {
    assert_eq!(out.0, TC_ACT_REDIRECT, "{what}: verdict");
    assert_eq!(&out.1[14..], &forwarded_ip(frame)[..], "{what}: bytes");
}

fn assert_dropped(out: (i32, Vec<u8>), what: &str) {
    assert_eq!(out.0, TC_ACT_SHOT, "{what}: verdict");
}

#[test]
fn local_fast_path_judges_egress_and_ingress_and_passes_replies() {
    with_node(|node| {
        let (p1, p2) = (node.pod1_ifindex, node.pod2_ifindex);
        // x/b accepts TCP 80 from app=a only, and sends nothing (egress isolated, no rule).
        enforce(
            node,
            vec![
                policy(
                    json!({"metadata": {"name": "b-in", "namespace": "x"}, "spec": {
                    "podSelector": {"matchLabels": {"app": "b"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                                 "ports": [{"port": 80}]}]}}),
                ),
                policy(
                    json!({"metadata": {"name": "b-out", "namespace": "x"}, "spec": {
                    "podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Egress"]}}),
                ),
            ],
            1,
        );
        let allowed = syn(POD1_MAC, POD1_IP, POD2_IP, 40000, 80);
        assert_delivered(
            run(node, prog_names::FROM_POD, &allowed, p1),
            &allowed,
            "a -> b:80",
        );
        // The reply from the egress-isolated pod passes (conntrack), and the flow goes on.
        let reply = synack(POD2_MAC, POD2_IP, POD1_IP, 80, 40000);
        assert_delivered(
            run(node, prog_names::FROM_POD, &reply, p2),
            &reply,
            "reply b -> a",
        );
        // Another port: denied at b's ingress, counted for b.
        let denied = syn(POD1_MAC, POD1_IP, POD2_IP, 40001, 81);
        assert_dropped(run(node, prog_names::FROM_POD, &denied, p1), "a -> b:81");
        assert_eq!(drops(node, DropReason::PolicyDeniedIngress), 1);
        assert_eq!(
            endpoint_drops(node, POD2_IP),
            PolicyDrops {
                ingress: 1,
                egress: 0
            }
        );
        // A new flow out of b: denied by its egress, counted for b.
        let out_of_b = syn(POD2_MAC, POD2_IP, POD1_IP, 50000, 80);
        assert_dropped(run(node, prog_names::FROM_POD, &out_of_b, p2), "b -> a");
        assert_eq!(drops(node, DropReason::PolicyDeniedEgress), 1);
        assert_eq!(endpoint_drops(node, POD2_IP).egress, 1);
        // UDP to b: no rule for UDP.
        let udp = udp_frame(POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, 5000, 80, b"q");
        assert_dropped(run(node, prog_names::FROM_POD, &udp, p1), "a -> b udp/80");
        // b to itself (through the node: hairpin by the stack) is always allowed.
        let own = syn(POD2_MAC, POD2_IP, POD2_IP, 50001, 9);
        let (verdict, data) = run(node, prog_names::TO_POD, &own, p2);
        assert_eq!((verdict, data), (TC_ACT_OK, own), "b -> b");
        // a is not isolated: everything reaches it from b's replies only... and the node.
        let from_node = syn([0xee; 6], NODE_IP, POD2_IP, 33000, 8080);
        let (verdict, data) = run(node, prog_names::TO_POD, &from_node, p2);
        assert_eq!(
            (verdict, data),
            (TC_ACT_OK, from_node),
            "node -> b (kubelet)"
        );
        let to_node = syn(POD2_MAC, POD2_IP, NODE_IP, 50002, 10250);
        let (verdict, data) = run(node, prog_names::FROM_POD, &to_node, p2);
        assert_eq!((verdict, data), (TC_ACT_OK, to_node), "b -> node");
        assert_eq!(drops(node, DropReason::PolicyDeniedEgress), 1);
        assert_eq!(drops(node, DropReason::PolicyDeniedIngress), 2);
    });
}

#[test]
fn egress_to_remote_pods_and_outside_and_services() {
    with_node(|node| {
        let p1 = node.pod1_ifindex;
        // x/a may reach y/c on the named port "http" (8080 on c) and 198.51.100.0/24 - .128/25.
        enforce(
            node,
            vec![policy(
                json!({"metadata": {"name": "a-out", "namespace": "x"}, "spec": {
                "podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
                "egress": [
                    {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "c"}}}],
                     "ports": [{"port": "http"}]},
                    {"to": [{"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}}]},
                    {"to": [{"podSelector": {"matchLabels": {"app": "b"}}}]}
                ]}}),
            )],
            1,
        );
        let ok = syn(POD1_MAC, POD1_IP, REMOTE_VXLAN_IP, 40000, 8080);
        let (verdict, data) = run(node, prog_names::FROM_POD, &ok, p1);
        assert_eq!(verdict, TC_ACT_REDIRECT, "a -> c:http encapsulated");
        assert_eq!(&data[data.len() - ok.len() + 14..], &forwarded_ip(&ok)[..]);
        assert_eq!(node.dp.maps.stat_count(Stat::VxlanEncap).unwrap(), 1);
        let other_port = syn(POD1_MAC, POD1_IP, REMOTE_VXLAN_IP, 40001, 8081);
        assert_dropped(
            run(node, prog_names::FROM_POD, &other_port, p1),
            "a -> c:8081",
        );
        // An address no pod has: fails closed (no selector matches it).
        let stranger = syn(POD1_MAC, POD1_IP, STRANGER, 40002, 8080);
        assert_dropped(
            run(node, prog_names::FROM_POD, &stranger, p1),
            "a -> unknown",
        );
        // Outside the cluster: the ipBlock, minus its except.
        let outside = syn(POD1_MAC, POD1_IP, OUTSIDE, 40003, 443);
        let (verdict, data) = run(node, prog_names::FROM_POD, &outside, p1);
        assert_eq!(
            (verdict, data),
            (TC_ACT_OK, outside.clone()),
            "to the stack"
        );
        let excepted = syn(POD1_MAC, POD1_IP, [203, 0, 113, 200], 40004, 443);
        assert_dropped(run(node, prog_names::FROM_POD, &excepted, p1), "except");
        assert_eq!(drops(node, DropReason::PolicyDeniedEgress), 3);
        assert_eq!(endpoint_drops(node, POD1_IP).egress, 3);
        // The outside's reply comes back through the stack: it belongs to a's flow.
        let reply = synack([0xee; 6], OUTSIDE, POD1_IP, 443, 40003);
        let (verdict, data) = run(node, prog_names::TO_POD, &reply, p1);
        assert_eq!((verdict, data), (TC_ACT_OK, reply), "reply from outside");
        // A Service address is left to the stack, and judged after its translation by its
        // backend: x/b is allowed, a non-pod backend address is not.
        let to_service = syn(POD1_MAC, POD1_IP, SERVICE, 40005, 53);
        let (verdict, data) = run(node, prog_names::FROM_POD, &to_service, p1);
        assert_eq!((verdict, data), (TC_ACT_OK, to_service), "to the Service");
        let translated = syn(POD1_MAC, POD1_IP, POD2_IP, 40005, 5353);
        let p2 = node.pod2_ifindex;
        let (verdict, _) = run(node, prog_names::TO_POD, &translated, p2);
        assert_eq!(verdict, TC_ACT_OK, "backend x/b");
        let (verdict, _) = run(
            node,
            prog_names::FROM_HOST,
            &syn(POD1_MAC, POD1_IP, REMOTE_VXLAN_IP, 40006, 53),
            0,
        );
        assert_eq!(verdict, TC_ACT_SHOT, "backend y/c on port 53: not allowed");
        assert_eq!(drops(node, DropReason::PolicyDeniedEgress), 4);
    });
}

#[test]
fn ingress_from_the_underlay_and_the_stack_fails_closed_for_unknown_sources() {
    with_node(|node| {
        let p1 = node.pod1_ifindex;
        // x/a accepts y/c (any port) and 10.244.9.0/24 on UDP 53, 7000-7100 and 12 more single
        // ports (more than the inline ranges: the rest in port bitmaps).
        let mut ports: Vec<serde_json::Value> = vec![
            json!({"protocol": "UDP", "port": 53}),
            json!({"protocol": "UDP", "port": 7000, "endPort": 7100}),
        ];
        for i in 0..12 {
            ports.push(json!({"protocol": "UDP", "port": 9000 + 2 * i}));
        }
        enforce(
            node,
            vec![policy(
                json!({"metadata": {"name": "a-in", "namespace": "x"}, "spec": {
                "podSelector": {"matchLabels": {"app": "a"}},
                "ingress": [
                    {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]},
                    {"from": [{"ipBlock": {"cidr": "10.244.9.0/24"}}], "ports": ports}
                ]}}),
            )],
            1,
        );
        let from_underlay = |node: &mut Node, inner: &[u8]| {
            // What the stack sees after XDP: the inner packet under the outer MACs (a plain frame
            // from the on-link peer, whose pod it is).
            let mut f = NIC_MAC.to_vec();
            f.extend_from_slice(&PEER_MAC);
            f.extend_from_slice(&[0x08, 0x00]);
            f.extend_from_slice(&inner[14..]);
            let out = run(node, prog_names::FROM_UNDERLAY, &f, 0);
            (out, f)
        };
        let c = syn(PEER_VTEP_MAC, REMOTE_VXLAN_IP, POD1_IP, 40000, 12345);
        let ((verdict, data), f) = from_underlay(node, &c);
        assert_eq!(verdict, TC_ACT_REDIRECT, "c -> a");
        assert_eq!(&data[14..], &forwarded_ip(&f)[..]);
        // A source no pod has, from the underlay: not y/c's class; the ipBlock allows UDP 53
        // and the bitmap's ports only.
        let (verdict, _) = run(
            node,
            prog_names::TO_POD,
            &syn([0xee; 6], STRANGER, POD1_IP, 1, 80),
            p1,
        );
        assert_eq!(verdict, TC_ACT_SHOT, "unknown source, TCP");
        for (port, allowed) in [
            (53, true),
            (7050, true),
            (7101, false),
            (9000, true),
            (9022, true),
            (9001, false),
            (9024, false),
        ] {
            let u = udp_frame(
                [0xee; 6],
                [0xee; 6],
                STRANGER,
                POD1_IP,
                3000 + port,
                port,
                b"x",
            );
            let (verdict, data) = run(node, prog_names::TO_POD, &u, p1);
            if allowed {
                assert_eq!((verdict, data), (TC_ACT_OK, u), "udp/{port}");
            } else {
                assert_eq!(verdict, TC_ACT_SHOT, "udp/{port}");
            }
        }
        // The node's own address is always allowed (kubelet probes); another host's is not.
        let probe = syn([0xee; 6], NODE_IP, POD1_IP, 33000, 8080);
        assert_eq!(
            run(node, prog_names::TO_POD, &probe, p1).0,
            TC_ACT_OK,
            "kubelet"
        );
        let other_node = syn([0xee; 6], PEER_IP, POD1_IP, 33001, 8080);
        assert_eq!(
            run(node, prog_names::TO_POD, &other_node, p1).0,
            TC_ACT_SHOT,
            "another node"
        );
        assert_eq!(drops(node, DropReason::PolicyDeniedIngress), 5);
        assert_eq!(endpoint_drops(node, POD1_IP).ingress, 5);
        // ICMP errors about an allowed flow follow it; unrelated ones are judged as ICMP.
        assert_eq!(drops(node, DropReason::PolicyDeniedEgress), 0);
    });
}

#[test]
fn established_flows_are_cut_by_a_policy_change_at_their_next_packet() {
    with_node(|node| {
        let (p1, p2) = (node.pod1_ifindex, node.pod2_ifindex);
        let mut c = enforce(node, vec![], 1);
        let first = syn(POD1_MAC, POD1_IP, POD2_IP, 40000, 80);
        assert_delivered(run(node, prog_names::FROM_POD, &first, p1), &first, "open");
        let reply = synack(POD2_MAC, POD2_IP, POD1_IP, 80, 40000);
        assert_delivered(run(node, prog_names::FROM_POD, &reply, p2), &reply, "reply");
        // b becomes isolated with no rule: written to the maps, revision not bumped yet: the
        // established flow still passes on its entry (no rule is looked at).
        let deny = policy(
            json!({"metadata": {"name": "deny", "namespace": "x"}, "spec": {
            "podSelector": {"matchLabels": {"app": "b"}}}}),
        );
        let plan = c.upsert_policy(deny);
        assert!(
            c.apply(&plan, &mut KernelMaps::new(&mut node.dp.maps))
                .is_clean()
        );
        assert_delivered(
            run(node, prog_names::FROM_POD, &reply, p2),
            &reply,
            "same revision",
        );
        // New revision: the next packet, either way, judges the flow again and cuts it.
        set_revision(node, 2);
        assert_dropped(
            run(node, prog_names::FROM_POD, &reply, p2),
            "reply after the change",
        );
        assert_dropped(
            run(node, prog_names::FROM_POD, &first, p1),
            "a's next packet",
        );
        assert_eq!(endpoint_drops(node, POD2_IP).ingress, 2);
        // Allowed again (policy removed, revision bumped): the flow passes again.
        let plan = c.remove_policy("x", "deny");
        assert!(
            c.apply(&plan, &mut KernelMaps::new(&mut node.dp.maps))
                .is_clean()
        );
        set_revision(node, 3);
        assert_delivered(
            run(node, prog_names::FROM_POD, &reply, p2),
            &reply,
            "allowed again",
        );
    });
}

#[test]
fn a_local_pod_without_policy_state_is_denied_both_ways_and_a_pending_one_is_isolated() {
    with_node(|node| {
        let (p1, p2) = (node.pod1_ifindex, node.pod2_ifindex);
        enforce(node, vec![], 1);
        node.dp
            .maps
            .put_policy_endpoint(Ipv4Addr::from(POD2_IP), None)
            .unwrap();
        let to_b = syn(POD1_MAC, POD1_IP, POD2_IP, 40000, 80);
        assert_dropped(
            run(node, prog_names::FROM_POD, &to_b, p1),
            "into a stateless pod",
        );
        let from_b = syn(POD2_MAC, POD2_IP, POD1_IP, 40001, 80);
        assert_dropped(
            run(node, prog_names::FROM_POD, &from_b, p2),
            "out of a stateless pod",
        );
        // What the CNI plugin writes for a new pod of a namespace with ingress policies: ingress
        // isolated, nothing allowed until the agent compiles it; egress open.
        let pending = weft_common::policy::new_endpoint_state(
            Some(weft_common::policy::POLICY_NS_F_SYNCED),
            Some(weft_common::policy::POLICY_F_INGRESS_ISOLATED),
        );
        node.dp
            .maps
            .put_policy_endpoint(Ipv4Addr::from(POD2_IP), Some(&pending))
            .unwrap();
        assert_dropped(
            run(node, prog_names::FROM_POD, &to_b, p1),
            "into a pending pod",
        );
        let from_b = syn(POD2_MAC, POD2_IP, POD1_IP, 40002, 80);
        assert_delivered(
            run(node, prog_names::FROM_POD, &from_b, p2),
            &from_b,
            "out of a pending pod",
        );
    });
}

/// An SCTP packet (common header: ports, verification tag, checksum; then an INIT chunk).
fn sctp(src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&[0; 8]);
    // INIT: type 1, flags, length 20, initiate tag, a_rwnd, streams, initial TSN.
    l4.extend_from_slice(&[1, 0, 0, 20, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1]);
    let ip = etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber(132), src, dst).unwrap();
    ipv4_frame(src_mac, [0xee; 6], &ip, &l4)
}

#[test]
fn sctp_ports_are_matched_as_sctp_not_tcp() {
    with_node(|node| {
        let (p1, p2) = (node.pod1_ifindex, node.pod2_ifindex);
        enforce(
            node,
            vec![policy(
                json!({"metadata": {"name": "b-sctp", "namespace": "x"}, "spec": {
                "podSelector": {"matchLabels": {"app": "b"}},
                "ingress": [{"ports": [{"protocol": "SCTP", "port": 9000},
                                       {"protocol": "TCP", "port": 9001}]}]}}),
            )],
            1,
        );
        let ok = sctp(POD1_MAC, POD1_IP, POD2_IP, 5000, 9000);
        assert_delivered(run(node, prog_names::FROM_POD, &ok, p1), &ok, "SCTP 9000");
        // Its reply (same association) passes.
        let back = sctp(POD2_MAC, POD2_IP, POD1_IP, 9000, 5000);
        assert_delivered(
            run(node, prog_names::FROM_POD, &back, p2),
            &back,
            "SCTP reply",
        );
        let tcp_port = sctp(POD1_MAC, POD1_IP, POD2_IP, 5001, 9001);
        assert_dropped(
            run(node, prog_names::FROM_POD, &tcp_port, p1),
            "SCTP to a TCP port",
        );
        let tcp = syn(POD1_MAC, POD1_IP, POD2_IP, 5002, 9000);
        assert_dropped(
            run(node, prog_names::FROM_POD, &tcp, p1),
            "TCP to the SCTP port",
        );
        assert_eq!(drops(node, DropReason::PolicyDeniedIngress), 2);
    });
}

#[test]
fn a_full_rule_map_closes_the_endpoint_it_could_not_hold_never_opens_it() {
    let options = LoadOptions {
        conntrack_max: weft_tests::TEST_CONNTRACK_MAX,
        policy: PolicyCapacities {
            rules: 8,
            ..Default::default()
        },
        ..Default::default()
    };
    with_node_using(options, |node| {
        let p1 = node.pod1_ifindex;
        // x/b takes app=a on every port, and 20 remote peers (a class each) on a port each:
        // 21 rule entries into a map of 8.
        let mut w = world();
        let mut from = vec![json!({"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]})];
        for i in 0..20u8 {
            w.upsert_pod(pod(
                "y",
                &format!("p{i}"),
                [10, 244, 2, 10 + i],
                "there",
                &format!("p{i}"),
            ));
            from.push(json!({"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": format!("p{i}")}}}],
                             "ports": [{"port": 1000 + i as u16}]}));
        }
        let big = policy(json!({"metadata": {"name": "b-in", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": from}}));
        let (mut c, plan) = Compiler::build("here", w, vec![big]);
        let report = c.apply(&plan, &mut KernelMaps::new(&mut node.dp.maps));
        assert_eq!(
            report.failed_endpoints,
            [(
                Ipv4Addr::from(POD2_IP),
                Direction::Ingress,
                "WEFT_POLICY_RULES"
            )],
            "{report:?}"
        );
        assert_eq!(c.failed_endpoints(), 1);
        set_revision(node, 1);
        // Closed, not open: even app=a, whose entry may well have fitted, is denied.
        let a_to_b = syn(POD1_MAC, POD1_IP, POD2_IP, 41000, 80);
        assert_dropped(
            run(node, prog_names::FROM_POD, &a_to_b, p1),
            "a -> b, closed",
        );
        assert_eq!(endpoint_drops(node, POD2_IP).ingress, 1);
        // x/a is not selected: its traffic is untouched by b's failure.
        let b_to_a = syn(POD2_MAC, POD2_IP, POD1_IP, 41001, 80);
        assert_delivered(
            run(node, prog_names::FROM_POD, &b_to_a, node.pod2_ifindex),
            &b_to_a,
            "b -> a",
        );
        // Room made (the policy shrinks to app=a), the retry restores b's allowances.
        let small = policy(json!({"metadata": {"name": "b-in", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "b"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]}}));
        let mut km = KernelMaps::new(&mut node.dp.maps);
        let plan = c.upsert_policy(small);
        c.apply(&plan, &mut km);
        let retry = c.retry_plan();
        assert!(c.apply(&retry, &mut km).is_clean());
        assert_eq!(c.failed_endpoints(), 0);
        set_revision(node, 2);
        let a_to_b = syn(POD1_MAC, POD1_IP, POD2_IP, 41002, 80);
        assert_delivered(
            run(node, prog_names::FROM_POD, &a_to_b, p1),
            &a_to_b,
            "a -> b after the retry",
        );
        let y_to_b = syn(POD1_MAC, POD1_IP, POD2_IP, 41003, 1000);
        assert_delivered(
            run(node, prog_names::FROM_POD, &y_to_b, p1),
            &y_to_b,
            "a -> b:1000 (all ports)",
        );
    });
}

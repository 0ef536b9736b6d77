//! Per-endpoint flow counters (`WEFT_FLOWS`): what a pod sends past its source checks and what
//! is delivered into it, by packets and IPv4 bytes; cleared when the endpoint goes.
use std::net::Ipv4Addr;

use weft_common::prog_names;
use weft_tests::{injection_node::*, packets::*, testrun::run_tc};

const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

fn flows(node: &Node, ip: [u8; 4]) -> (u64, u64, u64, u64) {
    let all = node.dp.maps.flows().unwrap();
    let f = all
        .iter()
        .find(|(a, _)| *a == Ipv4Addr::from(ip))
        .map(|(_, f)| *f)
        .unwrap_or_default();
    (f.packets_out, f.bytes_out, f.packets_in, f.bytes_in)
}

#[test]
fn endpoint_counters_count_sent_and_delivered_packets() {
    with_node(|node| {
        let idx = node.pod1_ifindex;
        let frame = tcp_frame(POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, 1000, 80, &[0u8; 100]);
        let ip_len = (frame.len() - 14) as u64;
        let prog = node.dp.tc_program(prog_names::FROM_POD).unwrap();
        for _ in 0..3 {
            assert_eq!(run_tc(prog, &frame, idx, 1).verdict, TC_ACT_REDIRECT);
        }
        assert_eq!(flows(node, POD1_IP), (3, 3 * ip_len, 0, 0));
        assert_eq!(flows(node, POD2_IP), (0, 0, 3, 3 * ip_len));
        // A spoofed packet is not the pod's traffic.
        let spoof = tcp_frame(POD2_MAC, [0xee; 6], POD2_IP, POD1_IP, 1000, 80, b"");
        let prog = node.dp.tc_program(prog_names::FROM_POD).unwrap();
        assert_eq!(run_tc(prog, &spoof, idx, 1).verdict, TC_ACT_SHOT);
        assert_eq!(flows(node, POD2_IP), (0, 0, 3, 3 * ip_len));
        assert_eq!(flows(node, POD1_IP), (3, 3 * ip_len, 0, 0));
        // Removing the endpoint clears its counters: a pod that gets the address later starts
        // from zero.
        node.dp
            .maps
            .remove_endpoint(Ipv4Addr::from(POD2_IP))
            .unwrap();
        assert!(
            node.dp
                .maps
                .flows()
                .unwrap()
                .iter()
                .all(|(a, _)| *a != Ipv4Addr::from(POD2_IP)),
            "only endpoints are reported"
        );
        node.dp
            .maps
            .upsert_endpoint(
                Ipv4Addr::from(POD2_IP),
                &weft_common::EndpointInfo {
                    host_ifindex: node.pod2_ifindex,
                    pod_mac: POD2_MAC,
                    host_mac: node.pod2_host_mac,
                    flags: 0,
                },
            )
            .unwrap();
        assert_eq!(flows(node, POD2_IP), (0, 0, 0, 0));
    });
}

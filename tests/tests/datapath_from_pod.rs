//! Packet injection into `from_pod` (tc ingress on a pod's host-side veth) through
//! BPF_PROG_TEST_RUN: verdicts, exact output bytes and counters.
use etherparse::{IpNumber, Ipv4Header, Ipv4Options};
use weft_common::{DropReason, Stat, prog_names};
use weft_tests::{
    injection_node::*,
    packets::*,
    testrun::{TestRunOutput, run_tc},
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

fn from_pod(node: &mut Node, frame: &[u8], ifindex: u32) -> TestRunOutput {
    let prog = node.dp.tc_program(prog_names::FROM_POD).unwrap();
    run_tc(prog, frame, ifindex, 1)
}

fn stat(node: &Node, s: Stat) -> u64 {
    node.dp.maps.stat_count(s).unwrap()
}

fn drops(node: &Node, r: DropReason) -> u64 {
    node.dp.maps.drop_count(r).unwrap()
}

fn pod1_tcp(dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    tcp_frame(POD1_MAC, [0xee; 6], POD1_IP, dst, 40000, 80, payload)
}

/// Checks a VXLAN frame produced for `inner_in` (as sent by the pod) toward the fixture's peer;
/// returns the UDP source port (a flow hash, not predictable from userspace).
fn assert_vxlan_encap(node: &Node, inner_in: &[u8], out: &[u8]) -> u16 {
    assert_eq!(out.len(), inner_in.len() + 50, "VXLAN adds 50 bytes");
    // Outer Ethernet: the underlay next hop from the FIB.
    assert_eq!(
        &out[0..6],
        &PEER_MAC,
        "outer destination MAC is the peer's neighbour entry"
    );
    assert_eq!(
        &out[6..12],
        &node.underlay_mac,
        "outer source MAC is the underlay NIC's"
    );
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    // Outer IPv4.
    let udp_len = 8 + 8 + inner_in.len();
    assert_eq!(
        &out[14..34],
        &outer_ipv4(17, NODE_IP, PEER_IP, udp_len)[..],
        "outer IPv4 header"
    );
    // UDP.
    let sport = u16::from_be_bytes([out[34], out[35]]);
    assert_eq!(
        sport,
        expected_sport(inner_in),
        "source port is the flow hash"
    );
    assert!(
        sport >= 49152,
        "source port {sport} outside the dynamic range"
    );
    assert_eq!(u16::from_be_bytes([out[36], out[37]]), VXLAN_PORT);
    assert_eq!(
        u16::from_be_bytes([out[38], out[39]]) as usize,
        udp_len,
        "UDP length"
    );
    assert_eq!(&out[40..42], &[0, 0], "UDP checksum is zero");
    assert_eq!(&out[42..50], &vxlan_header(VNI), "VXLAN header");
    // Inner Ethernet: VTEP to VTEP.
    assert_eq!(&out[50..56], &PEER_VTEP_MAC);
    assert_eq!(&out[56..62], &VTEP_MAC);
    assert_eq!(&out[62..64], &[0x08, 0x00]);
    // Inner IPv4 packet: forwarded (TTL - 1, checksum fixed), otherwise intact.
    assert_eq!(&out[64..], &forwarded_ip(inner_in)[..], "inner packet");
    sport
}

/// The VXLAN source port weft derives from a frame's flow (addresses, protocol, ports).
fn expected_sport(frame: &[u8]) -> u16 {
    let (ip, rest) = Ipv4Header::from_slice(&frame[14..]).unwrap();
    let first_fragment = ip.fragment_offset.value() == 0;
    let ports = match ip.protocol {
        IpNumber::TCP | IpNumber::UDP if first_fragment && rest.len() >= 4 => {
            [rest[0], rest[1], rest[2], rest[3]]
        }
        _ => [0; 4],
    };
    weft_common::vxlan_source_port(weft_common::flow_hash(
        ip.source,
        ip.destination,
        ip.protocol.0,
        ports,
    ))
}

#[test]
fn vxlan_encapsulation_is_byte_exact() {
    with_node(|node| {
        let frame = pod1_tcp(REMOTE_VXLAN_IP, b"hello across nodes");
        let before = stat(node, Stat::VxlanEncap);
        let out = from_pod(node, &frame, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_vxlan_encap(node, &frame, &out.data);
        assert_eq!(stat(node, Stat::VxlanEncap), before + 1);
    });
}

#[test]
fn vxlan_source_port_is_a_stable_flow_hash() {
    with_node(|node| {
        let frame = pod1_tcp(REMOTE_VXLAN_IP, b"x");
        let idx = node.pod1_ifindex;
        let out = from_pod(node, &frame, idx);
        let a = assert_vxlan_encap(node, &frame, &out.data);
        let out = from_pod(node, &frame, idx);
        let b = assert_vxlan_encap(node, &frame, &out.data);
        assert_eq!(a, b, "one flow, one source port");
        let mut ports = std::collections::BTreeSet::new();
        for sport in 40000..40032u16 {
            let f = tcp_frame(
                POD1_MAC,
                [0xee; 6],
                POD1_IP,
                REMOTE_VXLAN_IP,
                sport,
                80,
                b"x",
            );
            let out = from_pod(node, &f, idx);
            ports.insert(assert_vxlan_encap(node, &f, &out.data));
        }
        assert!(
            ports.len() >= 16,
            "32 flows spread over only {} ports",
            ports.len()
        );
    });
}

#[test]
fn vxlan_encapsulates_udp_options_fragments_and_empty_payloads() {
    with_node(|node| {
        let udp = udp_frame(
            POD1_MAC,
            [0xee; 6],
            POD1_IP,
            REMOTE_VXLAN_IP,
            5353,
            53,
            b"query",
        );
        let out = from_pod(node, &udp, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_vxlan_encap(node, &udp, &out.data);

        let empty = pod1_tcp(REMOTE_VXLAN_IP, b"");
        let out = from_pod(node, &empty, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_vxlan_encap(node, &empty, &out.data);

        // IPv4 with options (a record-route-sized NOP/EOL block): IHL 7.
        let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, POD1_IP, REMOTE_VXLAN_IP).unwrap();
        ip.options = Ipv4Options::try_from(&[1u8, 1, 1, 1, 1, 1, 1, 0][..]).unwrap();
        let with_options = ipv4_frame(POD1_MAC, [0xee; 6], &ip, &tcp_header_bytes(1, 2));
        let out = from_pod(node, &with_options, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_vxlan_encap(node, &with_options, &out.data);

        // A first fragment (MF set) and a later fragment: encapsulated as they are.
        let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, POD1_IP, REMOTE_VXLAN_IP).unwrap();
        ip.dont_fragment = false;
        ip.more_fragments = true;
        let frag = ipv4_frame(POD1_MAC, [0xee; 6], &ip, &[0u8; 64]);
        let out = from_pod(node, &frag, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_vxlan_encap(node, &frag, &out.data);
        ip.more_fragments = false;
        ip.fragment_offset = etherparse::IpFragOffset::try_new(8).unwrap();
        let frag = ipv4_frame(POD1_MAC, [0xee; 6], &ip, &[1u8; 40]);
        let out = from_pod(node, &frag, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_vxlan_encap(node, &frag, &out.data);
    });
}

#[test]
fn ipip_encapsulation_is_byte_exact() {
    with_node(|node| {
        let frame = pod1_tcp(REMOTE_IPIP_IP, b"ip in ip");
        let before = stat(node, Stat::IpipEncap);
        let out = from_pod(node, &frame, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let out = out.data;
        assert_eq!(out.len(), frame.len() + 20);
        assert_eq!(&out[0..6], &PEER_MAC);
        assert_eq!(&out[6..12], &node.underlay_mac);
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        assert_eq!(
            &out[14..34],
            &outer_ipv4(4, NODE_IP, PEER_IP, frame.len() - 14)[..]
        );
        assert_eq!(&out[34..], &forwarded_ip(&frame)[..]);
        assert_eq!(stat(node, Stat::IpipEncap), before + 1);
    });
}

#[test]
fn direct_routing_rewrites_only_macs_and_ttl() {
    with_node(|node| {
        let frame = pod1_tcp(REMOTE_DIRECT_IP, b"host-gw");
        let out = from_pod(node, &frame, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let out = out.data;
        assert_eq!(out.len(), frame.len());
        assert_eq!(&out[0..6], &PEER_MAC, "sent to the owning node's MAC");
        assert_eq!(&out[6..12], &node.underlay_mac);
        assert_eq!(&out[14..], &forwarded_ip(&frame)[..]);
        assert_eq!(stat(node, Stat::DirectForward), 1);
    });
}

#[test]
fn unresolved_next_hop_goes_to_redirect_neigh() {
    with_node(|node| {
        let frame = pod1_tcp(REMOTE_NO_NEIGH_IP, b"who has 192.168.50.3");
        let out = from_pod(node, &frame, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        // Encapsulated; the outer MACs are filled in by the neighbour subsystem later.
        assert_eq!(out.data.len(), frame.len() + 50);
        assert_eq!(
            &out.data[14..34],
            &outer_ipv4(17, NODE_IP, PEER_NO_NEIGH_IP, frame.len() + 16)[..]
        );
        assert_eq!(stat(node, Stat::NeighResolve), 1);
    });
}

#[test]
fn local_delivery_redirects_into_the_target_pod() {
    with_node(|node| {
        let frame = pod1_tcp(POD2_IP, b"same node");
        let out = from_pod(node, &frame, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let out = out.data;
        assert_eq!(out.len(), frame.len());
        assert_eq!(&out[0..6], &POD2_MAC);
        assert_eq!(&out[6..12], &node.pod2_host_mac);
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        assert_eq!(&out[14..], &forwarded_ip(&frame)[..]);
        assert_eq!(stat(node, Stat::LocalDelivered), 1);
    });
}

#[test]
fn spoofed_sources_are_dropped_and_counted() {
    with_node(|node| {
        // An address that is no endpoint.
        let f = tcp_frame(
            POD1_MAC,
            [0xee; 6],
            [10, 244, 1, 99],
            REMOTE_VXLAN_IP,
            1,
            2,
            b"",
        );
        assert_eq!(from_pod(node, &f, node.pod1_ifindex).verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::SpoofedIp), 1);
        // Pod 2's address sent from pod 1's veth.
        let f = tcp_frame(POD2_MAC, [0xee; 6], POD2_IP, REMOTE_VXLAN_IP, 1, 2, b"");
        assert_eq!(from_pod(node, &f, node.pod1_ifindex).verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::SpoofedIp), 2);
        // Pod 1's address with another MAC.
        let f = tcp_frame(
            [0x02, 0xbb, 0, 0, 0, 9],
            [0xee; 6],
            POD1_IP,
            REMOTE_VXLAN_IP,
            1,
            2,
            b"",
        );
        assert_eq!(from_pod(node, &f, node.pod1_ifindex).verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::SpoofedMac), 1);
        assert_eq!(
            stat(node, Stat::VxlanEncap),
            0,
            "nothing spoofed was forwarded"
        );
    });
}

#[test]
fn traffic_weft_does_not_own_passes_untouched() {
    with_node(|node| {
        let arp = raw_frame(POD1_MAC, [0xff; 6], 0x0806, &[0u8; 28]);
        let ipv6 = raw_frame(POD1_MAC, [0xee; 6], 0x86dd, &[0x60; 60]);
        let mut vlan_payload = vec![0x00, 0x05, 0x08, 0x00];
        vlan_payload.extend_from_slice(&pod1_tcp(REMOTE_VXLAN_IP, b"")[14..]);
        let vlan = raw_frame(POD1_MAC, [0xee; 6], 0x8100, &vlan_payload);
        // To the node itself and to the outside world: the host stack's business.
        let to_node = pod1_tcp(NODE_IP, b"kubelet");
        let outside = pod1_tcp([192, 0, 2, 1], b"internet");
        for frame in [&arp, &ipv6, &vlan, &to_node, &outside] {
            let out = from_pod(node, frame, node.pod1_ifindex);
            assert_eq!(out.verdict, TC_ACT_OK);
            assert_eq!(&out.data, frame, "passed frames are untouched");
        }
        assert_eq!(stat(node, Stat::PassedToStack), 2);
        // TTL 1: the stack answers with ICMP time exceeded.
        let mut ttl1 = pod1_tcp(REMOTE_VXLAN_IP, b"");
        ttl1[22] = 1;
        let out = from_pod(node, &ttl1, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, ttl1);
        let total: u64 = node.dp.maps.drops().unwrap().iter().map(|(_, n)| n).sum();
        assert_eq!(total, 0, "nothing dropped");
    });
}

#[test]
fn malformed_ipv4_is_dropped_with_a_reason() {
    with_node(|node| {
        let frame = pod1_tcp(REMOTE_VXLAN_IP, b"0123456789abcdef");
        // Every truncation from the full IP header on (shorter IPv4 frames are refused by
        // BPF_PROG_TEST_RUN before the program runs): total length now exceeds the frame.
        let mut expected = 0;
        for len in 34..frame.len() {
            let out = from_pod(node, &frame[..len], node.pod1_ifindex);
            assert_eq!(out.verdict, TC_ACT_SHOT, "truncated to {len} bytes");
            expected += 1;
            assert_eq!(drops(node, DropReason::MalformedIpv4), expected);
        }
        // IHL below 5, version 6 under an IPv4 ethertype, total length below the header.
        for (offset, value) in [(14usize, 0x44u8), (14, 0x65), (17, 10)] {
            let mut bad = frame.clone();
            bad[16] = 0;
            bad[offset] = value;
            let out = from_pod(node, &bad, node.pod1_ifindex);
            assert_eq!(out.verdict, TC_ACT_SHOT, "byte {offset} = {value:#x}");
            expected += 1;
            assert_eq!(drops(node, DropReason::MalformedIpv4), expected);
        }
        assert_eq!(stat(node, Stat::VxlanEncap), 0);
    });
}

#[test]
fn before_configuration_everything_passes() {
    let ns = namespace();
    ns.run(move || {
        let mut dp = weft_agent::datapath::Datapath::load_unpinned().unwrap();
        let frame = pod1_tcp(REMOTE_VXLAN_IP, b"early");
        let prog = dp.tc_program(prog_names::FROM_POD).unwrap();
        let out = run_tc(prog, &frame, 0, 1);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, frame);
    });
}

#[test]
fn next_hops_are_cached_and_flushable() {
    with_node(|node| {
        let idx = node.pod1_ifindex;
        let frame = pod1_tcp(REMOTE_VXLAN_IP, b"cache");
        from_pod(node, &frame, idx);
        let hops = node.dp.maps.next_hops().unwrap();
        assert_eq!(hops.len(), 1, "{hops:?}");
        assert_eq!(hops[0].0.octets(), PEER_IP);
        assert_eq!(hops[0].1.dmac, PEER_MAC);
        // The neighbour changes: the cached hop is used until it expires or is flushed.
        weft_tests::netns::ip(
            "neigh replace 192.168.50.2 lladdr 02:00:00:00:50:99 dev ul0 nud permanent",
        );
        let out = from_pod(node, &frame, idx);
        assert_eq!(&out.data[0..6], &PEER_MAC, "cached next hop");
        node.dp.maps.flush_next_hops().unwrap();
        let out = from_pod(node, &frame, idx);
        assert_eq!(
            &out.data[0..6],
            &[2, 0, 0, 0, 0x50, 0x99],
            "fresh FIB lookup after a flush"
        );
    });
}

//! Packet injection into `from_pod` (tc ingress on a pod's host-side veth) through
//! BPF_PROG_TEST_RUN: verdicts, exact output bytes and counters.
use etherparse::{IpNumber, Ipv4Header, Ipv4Options};
use weft_common::{DropReason, Stat, prog_names};
use weft_tests::{
    injection_node::*,
    packets::*,
    testrun::{TestRunOutput, run_tc, run_tc_gso},
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

        // A first fragment (MF set) and a later fragment: a datagram takes one path, and only
        // its first fragment carries the ports conntrack needs, so fragments are the stack's
        // (it reassembles, translates if it must, and forwards).
        let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, POD1_IP, REMOTE_VXLAN_IP).unwrap();
        ip.dont_fragment = false;
        ip.more_fragments = true;
        let frag = ipv4_frame(POD1_MAC, [0xee; 6], &ip, &[0u8; 64]);
        let out = from_pod(node, &frag, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, frag, "passed untouched");
        ip.more_fragments = false;
        ip.fragment_offset = etherparse::IpFragOffset::try_new(8).unwrap();
        let frag = ipv4_frame(POD1_MAC, [0xee; 6], &ip, &[1u8; 40]);
        let out = from_pod(node, &frag, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, frag, "passed untouched");
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
        // To the node itself and to the outside world: the host stack's business.
        let to_node = pod1_tcp(NODE_IP, b"kubelet");
        let outside = pod1_tcp([192, 0, 2, 1], b"internet");
        // A pod's own VXLAN-looking traffic to another pod, or to a node on another port.
        let udp_to_pod = udp_frame(
            POD1_MAC,
            [0xee; 6],
            POD1_IP,
            POD2_IP,
            40000,
            VXLAN_PORT,
            b"not a tunnel",
        );
        let udp_to_node = udp_frame(POD1_MAC, [0xee; 6], POD1_IP, PEER_IP, 40000, 53, b"dns");
        for frame in [&to_node, &outside, &udp_to_node] {
            let out = from_pod(node, frame, node.pod1_ifindex);
            assert_eq!(out.verdict, TC_ACT_OK);
            assert_eq!(&out.data, frame, "passed frames are untouched");
        }
        assert_eq!(stat(node, Stat::PassedToStack), 3);
        let out = from_pod(node, &udp_to_pod, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "pod to pod, any port");
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

#[test]
fn pods_send_only_ipv4_and_gateway_arp() {
    with_node(|node| {
        let idx = node.pod1_ifindex;
        let ipv6 = raw_frame(POD1_MAC, [0xee; 6], 0x86dd, &[0x60; 60]);
        let mut vlan_payload = vec![0x00, 0x05, 0x08, 0x00];
        vlan_payload.extend_from_slice(&pod1_tcp(REMOTE_VXLAN_IP, b"")[14..]);
        let vlan = raw_frame(POD1_MAC, [0xee; 6], 0x8100, &vlan_payload);
        let qinq = raw_frame(POD1_MAC, [0xee; 6], 0x88a8, &vlan_payload);
        let lldp = raw_frame(POD1_MAC, [0x01, 0x80, 0xc2, 0, 0, 0x0e], 0x88cc, &[0u8; 46]);
        for (frame, reason, count) in [
            (&ipv6, DropReason::Ipv6FromPod, 1),
            (&vlan, DropReason::VlanFromPod, 1),
            (&qinq, DropReason::VlanFromPod, 2),
            (&lldp, DropReason::NonIpFromPod, 1),
        ] {
            assert_eq!(from_pod(node, frame, idx).verdict, TC_ACT_SHOT);
            assert_eq!(drops(node, reason), count, "{reason:?}");
        }

        // ARP for the gateway, from the pod's own address and MAC: answered in place and sent
        // back to the pod, byte for byte the reply a router would send.
        let gw = weft_common::POD_GATEWAY;
        let request = arp_frame(POD1_MAC, [0xff; 6], 1, POD1_MAC, POD1_IP, [0; 6], gw);
        let out = from_pod(node, &request, idx);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let host = node.pod1_host_mac;
        assert_eq!(
            out.data,
            arp_frame(host, POD1_MAC, 2, host, gw, POD1_MAC, POD1_IP)
        );
        assert_eq!(stat(node, Stat::ArpReplied), 1);

        let spoof = |sha, spa, eth_src| arp_frame(eth_src, [0xff; 6], 1, sha, spa, [0; 6], gw);
        for (frame, reason) in [
            // Another pod's address, or an address no pod has.
            (spoof(POD1_MAC, POD2_IP, POD1_MAC), DropReason::ArpSpoofed),
            (
                spoof(POD1_MAC, [10, 244, 1, 99], POD1_MAC),
                DropReason::ArpSpoofed,
            ),
            // Another MAC in the packet or on the frame.
            (
                spoof([2, 0, 0, 0, 0, 9], POD1_IP, POD1_MAC),
                DropReason::ArpSpoofed,
            ),
            (
                spoof(POD1_MAC, POD1_IP, [2, 0, 0, 0, 0, 9]),
                DropReason::ArpSpoofed,
            ),
            // A request for another address (the node), a gratuitous ARP, a reply.
            (
                arp_frame(POD1_MAC, [0xff; 6], 1, POD1_MAC, POD1_IP, [0; 6], NODE_IP),
                DropReason::ArpNotGateway,
            ),
            (
                arp_frame(POD1_MAC, [0xff; 6], 1, POD1_MAC, POD1_IP, [0; 6], POD1_IP),
                DropReason::ArpNotGateway,
            ),
            // A reply claiming the gateway (or anything but the pod itself).
            (
                arp_frame(POD1_MAC, host, 2, POD1_MAC, POD2_IP, host, NODE_IP),
                DropReason::ArpSpoofed,
            ),
            // Another ARP operation (RARP request).
            (
                arp_frame(POD1_MAC, host, 3, POD1_MAC, POD1_IP, host, gw),
                DropReason::ArpNotGateway,
            ),
        ] {
            let before = drops(node, reason);
            assert_eq!(from_pod(node, &frame, idx).verdict, TC_ACT_SHOT);
            assert_eq!(drops(node, reason), before + 1, "{reason:?}");
        }
        // A reply about the pod itself (the node resolving it) goes to the stack untouched.
        let reply = arp_frame(POD1_MAC, host, 2, POD1_MAC, POD1_IP, host, NODE_IP);
        let out = from_pod(node, &reply, idx);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, reply);
        // Truncated, or not Ethernet/IPv4 ARP.
        for len in 14..request.len() {
            assert_eq!(from_pod(node, &request[..len], idx).verdict, TC_ACT_SHOT);
        }
        let mut not_ipv4 = request.clone();
        not_ipv4[16] = 0x86;
        not_ipv4[17] = 0xdd;
        assert_eq!(from_pod(node, &not_ipv4, idx).verdict, TC_ACT_SHOT);
        assert_eq!(
            drops(node, DropReason::MalformedArp),
            (request.len() - 14 + 1) as u64
        );
        assert_eq!(stat(node, Stat::ArpReplied), 1, "nothing else answered");
    });
}

#[test]
fn tunnel_packets_from_pods_to_nodes_are_dropped() {
    with_node(|node| {
        let idx = node.pod1_ifindex;
        let inner = tcp_frame(
            PEER_VTEP_MAC,
            VTEP_MAC,
            [8, 8, 8, 8],
            REMOTE_VXLAN_IP,
            1,
            2,
            b"forged",
        );
        let mut expected = 0;
        for node_ip in [PEER_IP, NODE_IP, PEER_NO_NEIGH_IP] {
            // VXLAN: UDP to the VXLAN port of a node.
            let mut payload = vxlan_header(VNI).to_vec();
            payload.extend_from_slice(&inner);
            let vx = udp_frame(
                POD1_MAC, [0xee; 6], POD1_IP, node_ip, 51000, VXLAN_PORT, &payload,
            );
            assert_eq!(from_pod(node, &vx, idx).verdict, TC_ACT_SHOT);
            // IPIP: IP protocol 4 to a node.
            let mut ip = Ipv4Header::new(0, 64, IpNumber(4), POD1_IP, node_ip).unwrap();
            ip.dont_fragment = true;
            let ipip = ipv4_frame(POD1_MAC, [0xee; 6], &ip, &inner[14..]);
            assert_eq!(from_pod(node, &ipip, idx).verdict, TC_ACT_SHOT);
            expected += 2;
            assert_eq!(drops(node, DropReason::TunnelFromPod), expected);
        }
        assert_eq!(stat(node, Stat::PassedToStack), 0);
    });
}

/// The pod-side frame of a TCP SYN from pod 1 with `payload_len` bytes of payload.
fn big_syn(dst: [u8; 4], payload_len: usize) -> Vec<u8> {
    pod1_tcp(dst, &vec![0x5a; payload_len])
}

#[test]
fn too_big_for_the_path_answers_frag_needed() {
    with_node(|node| {
        let idx = node.pod1_ifindex;
        // Below any path MTU: encapsulated as usual.
        let frame = big_syn(REMOTE_VXLAN_IP, 1400);
        let out = from_pod(node, &frame, idx);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_vxlan_encap(node, &frame, &out.data);

        // A router toward the peer reports a 1400-byte MTU for one of this node's tunnel
        // packets: learned (from_underlay sees the ICMP addressed to the node).
        let router_mac = [2, 0, 0, 0, 0x50, 0xfe];
        let tunnel_pkt = vxlan_frame(
            &Outer {
                src_mac: node.underlay_mac,
                dst_mac: PEER_MAC,
                src: NODE_IP,
                dst: PEER_IP,
            },
            50000,
            VXLAN_PORT,
            VNI,
            &frame,
        );
        let icmp = frag_needed_frame(
            &tunnel_pkt,
            router_mac,
            node.underlay_mac,
            [192, 168, 50, 254],
            1400,
        );
        let prog = node.dp.tc_program(prog_names::FROM_UNDERLAY).unwrap();
        let out = run_tc(prog, &icmp, 0, 1);
        assert_eq!(out.verdict, TC_ACT_OK, "the stack gets it too");
        assert_eq!(stat(node, Stat::PathMtuLearned), 1);
        let learned = node.dp.maps.path_mtus().unwrap();
        assert_eq!(learned.len(), 1);
        assert_eq!(learned[0].0.octets(), PEER_IP);
        assert_eq!(learned[0].1.mtu, 1400);

        // Now the same pod packet (1440 bytes, 1490 encapsulated) is answered with ICMP
        // fragmentation-needed announcing 1400 - 50, from the node, back to the pod.
        let out = from_pod(node, &frame, idx);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(
            out.data,
            frag_needed_frame(&frame, [0xee; 6], POD1_MAC, NODE_IP, 1350)
        );
        assert_eq!(stat(node, Stat::FragNeededSent), 1);
        // What fits still passes: 1350 bytes inner.
        let fits = big_syn(REMOTE_VXLAN_IP, 1350 - 40);
        let out = from_pod(node, &fits, idx);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_vxlan_encap(node, &fits, &out.data);
        let over = big_syn(REMOTE_VXLAN_IP, 1350 - 40 + 1);
        assert_eq!(from_pod(node, &over, idx).verdict, TC_ACT_REDIRECT);
        assert_eq!(stat(node, Stat::FragNeededSent), 2);
        // IPIP toward the same peer: 20 bytes of overhead, so 1380.
        let ipip = big_syn(REMOTE_IPIP_IP, 1380 - 40 + 1);
        let out = from_pod(node, &ipip, idx);
        assert_eq!(
            out.data,
            frag_needed_frame(&ipip, [0xee; 6], POD1_MAC, NODE_IP, 1380)
        );

        // A GSO packet is judged by its segments: 1000-byte segments fit, 1400-byte ones do
        // not, whatever the super-packet's own length. (BPF_PROG_TEST_RUN cannot mark a packet
        // as TCP GSO, only give it a segment size, so the encapsulation of the fitting one is
        // refused by `bpf_skb_adjust_room`; what matters here is that it is not answered.)
        let gso = big_syn(REMOTE_VXLAN_IP, 2000);
        let before = stat(node, Stat::FragNeededSent);
        let prog = node.dp.tc_program(prog_names::FROM_POD).unwrap();
        let out = run_tc_gso(prog, &gso, idx, 1000, 1);
        assert_ne!(
            out.data.len(),
            frag_needed_frame(&gso, [0xee; 6], POD1_MAC, NODE_IP, 1350).len()
        );
        assert_eq!(
            stat(node, Stat::FragNeededSent),
            before,
            "segments of 1040 bytes fit"
        );
        let prog = node.dp.tc_program(prog_names::FROM_POD).unwrap();
        let out = run_tc_gso(prog, &gso, idx, 1400, 1);
        assert_eq!(
            out.data,
            frag_needed_frame(&gso, [0xee; 6], POD1_MAC, NODE_IP, 1350)
        );

        // A route's own MTU (the off-link peer's subnet is routed with mtu 1300).
        let offlink = big_syn(REMOTE_OFFLINK_IP, 1300 - 50 - 40 + 1);
        let out = from_pod(node, &offlink, idx);
        assert_eq!(
            out.data,
            frag_needed_frame(&offlink, [0xee; 6], POD1_MAC, NODE_IP, 1250)
        );
        let fits = big_syn(REMOTE_OFFLINK_IP, 1300 - 50 - 40);
        assert_eq!(from_pod(node, &fits, idx).verdict, TC_ACT_REDIRECT);
    });
}

#[test]
fn path_mtu_learning_accepts_only_this_nodes_tunnel_packets() {
    with_node(|node| {
        let router_mac = [2, 0, 0, 0, 0x50, 0xfe];
        let router = [192, 168, 50, 254];
        let payload = pod1_tcp(REMOTE_VXLAN_IP, &[0u8; 100]);
        let underlay_mac = node.underlay_mac;
        let tunnel = |src: [u8; 4], dst: [u8; 4], dport: u16| {
            vxlan_frame(
                &Outer {
                    src_mac: underlay_mac,
                    dst_mac: PEER_MAC,
                    src,
                    dst,
                },
                50000,
                dport,
                VNI,
                &payload,
            )
        };
        let learn = |node: &mut Node, frame: &[u8]| {
            let prog = node.dp.tc_program(prog_names::FROM_UNDERLAY).unwrap();
            let out = run_tc(prog, frame, 0, 1);
            assert_eq!(out.verdict, TC_ACT_OK);
            assert_eq!(out.data, frame, "passed to the stack untouched");
            node.dp.maps.path_mtus().unwrap()
        };
        // About a packet another host sent, to a port that is not VXLAN's, to a host that is
        // not a node, or a plain UDP packet of this node: ignored.
        for quoted in [
            tunnel([192, 168, 50, 9], PEER_IP, VXLAN_PORT),
            tunnel(NODE_IP, PEER_IP, 4789),
            tunnel(NODE_IP, [192, 168, 50, 77], VXLAN_PORT),
        ] {
            let icmp = frag_needed_frame(&quoted, router_mac, underlay_mac, router, 1400);
            // The error goes to the quoted packet's source; make it this node for the test.
            let mut icmp = icmp;
            icmp[30..34].copy_from_slice(&NODE_IP);
            let mut ip = Ipv4Header::from_slice(&icmp[14..]).unwrap().0;
            ip.header_checksum = ip.calc_header_checksum();
            icmp[14..34].copy_from_slice(&ip.to_bytes());
            assert!(learn(node, &icmp).is_empty(), "{quoted:?}");
        }
        // Truncated errors (the quote cut short of the UDP ports) are only passed on.
        let ours = tunnel(NODE_IP, PEER_IP, VXLAN_PORT);
        let icmp = frag_needed_frame(&ours, router_mac, underlay_mac, router, 1000);
        for len in 34..(14 + 20 + 8 + 20 + 4) {
            let mut cut = icmp[..len].to_vec();
            let mut ip = Ipv4Header::from_slice(&cut[14..34]).unwrap().0;
            ip.total_len = (len - 14) as u16;
            ip.header_checksum = ip.calc_header_checksum();
            cut[14..34].copy_from_slice(&ip.to_bytes());
            assert!(learn(node, &cut).is_empty(), "truncated to {len}");
        }
        // The whole error is learned; a larger MTU later does not raise it; a forged tiny one
        // is raised to the kernel's minimum.
        assert_eq!(learn(node, &icmp)[0].1.mtu, 1000);
        let icmp = frag_needed_frame(&ours, router_mac, underlay_mac, router, 1400);
        assert_eq!(learn(node, &icmp)[0].1.mtu, 1000);
        let icmp = frag_needed_frame(&ours, router_mac, underlay_mac, router, 68);
        assert_eq!(learn(node, &icmp)[0].1.mtu, weft_common::PATH_MTU_MIN);
        assert_eq!(stat(node, Stat::PathMtuLearned), 2);
    });
}

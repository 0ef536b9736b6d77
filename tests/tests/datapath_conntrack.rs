//! Packet injection for connection tracking: which packets between pods take the fast path,
//! which go to the host stack, what `to_pod` and `from_host` record, ICMP errors, malformed
//! L4 headers, fragments, expiry, and the agent's garbage collection.
use etherparse::{IpNumber, Ipv4Header, PacketBuilder};
use weft_agent::conntrack::{Gc, now_s};
use weft_common::{
    DropReason, Stat,
    conntrack::{
        CT_F_INIT_HI, CT_F_SEEN_HI, CT_F_SEEN_LO, CT_F_SYN_HI, CT_F_SYN_LO,
        CT_TIMEOUT_TCP_ESTABLISHED_S, CT_TIMEOUT_TCP_SYN_S, CtEntry, CtKey, CtOrigin,
    },
    prog_names,
};
use weft_tests::{injection_node::*, packets::*, testrun::run_tc};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

#[derive(Clone, Copy)]
enum Flags {
    Syn,
    SynAck,
    Ack,
    Fin,
    Rst,
}

fn tcp(src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, f: Flags) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, [0xee; 6])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240);
    let b = match f {
        Flags::Syn => b.syn(),
        Flags::SynAck => b.syn().ack(1),
        Flags::Ack => b.ack(1),
        Flags::Fin => b.fin().ack(1),
        Flags::Rst => b.rst(),
    };
    let mut out = Vec::new();
    b.write(&mut out, b"data").unwrap();
    out
}

fn run(
    node: &mut Node,
    prog: &str,
    frame: &[u8],
    ifindex: u32,
) -> weft_tests::testrun::TestRunOutput {
    let prog = node.dp.tc_program(prog).unwrap();
    run_tc(prog, frame, ifindex, 1)
}

fn stat(node: &Node, s: Stat) -> u64 {
    node.dp.maps.stat_count(s).unwrap()
}

fn entry(node: &Node, a: [u8; 4], ap: u16, b: [u8; 4], bp: u16, proto: u8) -> Option<CtEntry> {
    let (key, _) = CtKey::of(a, ap.to_be_bytes(), b, bp.to_be_bytes(), proto);
    node.dp
        .maps
        .conntrack()
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, e)| e)
}

#[test]
fn fast_flows_are_tracked_and_replies_take_the_fast_path() {
    with_node(|node| {
        let (p1, p2) = (node.pod1_ifindex, node.pod2_ifindex);
        let syn = tcp(POD1_MAC, POD1_IP, POD2_IP, 40000, 80, Flags::Syn);
        let out = run(node, prog_names::FROM_POD, &syn, p1);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(&out.data[14..], &forwarded_ip(&syn)[..]);
        assert_eq!(stat(node, Stat::ConntrackFastNew), 1);
        let e = entry(node, POD1_IP, 40000, POD2_IP, 80, 6).expect("entry");
        assert_eq!(e.origin, CtOrigin::Fast as u8);
        // pod 1 (10.244.1.2) sorts below pod 2: the low endpoint opened the flow.
        assert_eq!(e.flags, CT_F_SEEN_LO | CT_F_SYN_LO);
        let now = now_s();
        assert!(
            e.expires_s >= now + CT_TIMEOUT_TCP_SYN_S - 2
                && e.expires_s <= now + CT_TIMEOUT_TCP_SYN_S
        );

        // The reply, and the rest of the flow both ways, take the fast path.
        let synack = tcp(POD2_MAC, POD2_IP, POD1_IP, 80, 40000, Flags::SynAck);
        let out = run(node, prog_names::FROM_POD, &synack, p2);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(&out.data[0..6], &POD1_MAC);
        let e = entry(node, POD1_IP, 40000, POD2_IP, 80, 6).unwrap();
        assert_eq!(
            e.flags,
            CT_F_SEEN_LO | CT_F_SYN_LO | CT_F_SEEN_HI | CT_F_SYN_HI,
            "established"
        );
        assert!(e.expires_s >= now + CT_TIMEOUT_TCP_ESTABLISHED_S - 2);
        for _ in 0..3 {
            let ack = tcp(POD1_MAC, POD1_IP, POD2_IP, 40000, 80, Flags::Ack);
            assert_eq!(
                run(node, prog_names::FROM_POD, &ack, p1).verdict,
                TC_ACT_REDIRECT
            );
        }
        assert_eq!(stat(node, Stat::LocalDelivered), 5);
        assert_eq!(stat(node, Stat::ConntrackFastNew), 1, "one flow, one entry");
        assert_eq!(stat(node, Stat::StackFlowToStack), 0);

        // UDP and ICMP echo open flows too; the echo reply finds the request's entry.
        let udp = udp_frame(POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, 5353, 53, b"q");
        assert_eq!(
            run(node, prog_names::FROM_POD, &udp, p1).verdict,
            TC_ACT_REDIRECT
        );
        assert!(entry(node, POD1_IP, 5353, POD2_IP, 53, 17).is_some());
        let echo = |mac, src, dst, request: bool| {
            let b = PacketBuilder::ethernet2(mac, [0xee; 6]).ipv4(src, dst, 64);
            let b = if request {
                b.icmpv4_echo_request(77, 1)
            } else {
                b.icmpv4_echo_reply(77, 1)
            };
            let mut out = Vec::new();
            b.write(&mut out, b"ping").unwrap();
            out
        };
        // A reply without a request: not known, the stack's.
        let reply = echo(POD2_MAC, POD2_IP, POD1_IP, false);
        let out = run(node, prog_names::FROM_POD, &reply, p2);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, reply);
        let request = echo(POD1_MAC, POD1_IP, POD2_IP, true);
        assert_eq!(
            run(node, prog_names::FROM_POD, &request, p1).verdict,
            TC_ACT_REDIRECT
        );
        assert!(
            entry(node, POD1_IP, 77, POD2_IP, 77, 1).is_some(),
            "the id is the port"
        );
        assert_eq!(
            run(node, prog_names::FROM_POD, &reply, p2).verdict,
            TC_ACT_REDIRECT
        );
    });
}

#[test]
fn a_flow_the_stack_carried_stays_on_the_stack() {
    with_node(|node| {
        let (p1, p2) = (node.pod1_ifindex, node.pod2_ifindex);
        // The stack delivers pod 1's connection into pod 2 (a Service's DNAT): to_pod records
        // it and passes it untouched.
        let syn = tcp(POD1_MAC, POD1_IP, POD2_IP, 40001, 8080, Flags::Syn);
        let out = run(node, prog_names::TO_POD, &syn, p2);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, syn);
        assert_eq!(stat(node, Stat::StackToPod), 1);
        assert_eq!(stat(node, Stat::ConntrackStackNew), 1);
        let e = entry(node, POD1_IP, 40001, POD2_IP, 8080, 6).expect("entry");
        assert_eq!(e.origin, CtOrigin::Stack as u8);
        // Pod 2's reply goes back through the stack (which undoes the DNAT), untouched.
        let synack = tcp(POD2_MAC, POD2_IP, POD1_IP, 8080, 40001, Flags::SynAck);
        let out = run(node, prog_names::FROM_POD, &synack, p2);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, synack);
        assert_eq!(stat(node, Stat::StackFlowToStack), 1);
        // So does a UDP reply (UDP replies would otherwise open a fast flow).
        let req = udp_frame(
            POD1_MAC,
            [0xee; 6],
            POD1_IP,
            POD2_IP,
            5000,
            53,
            b"dns query",
        );
        assert_eq!(run(node, prog_names::TO_POD, &req, p2).verdict, TC_ACT_OK);
        let resp = udp_frame(
            POD2_MAC,
            [0xee; 6],
            POD2_IP,
            POD1_IP,
            53,
            5000,
            b"dns answer",
        );
        let out = run(node, prog_names::FROM_POD, &resp, p2);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, resp);
        // A fast flow the stack then carries (a fragmented datagram, a detour) becomes the
        // stack's.
        let udp = udp_frame(POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, 6000, 53, b"x");
        assert_eq!(
            run(node, prog_names::FROM_POD, &udp, p1).verdict,
            TC_ACT_REDIRECT
        );
        assert_eq!(
            entry(node, POD1_IP, 6000, POD2_IP, 53, 17).unwrap().origin,
            CtOrigin::Fast as u8
        );
        assert_eq!(run(node, prog_names::TO_POD, &udp, p2).verdict, TC_ACT_OK);
        assert_eq!(
            entry(node, POD1_IP, 6000, POD2_IP, 53, 17).unwrap().origin,
            CtOrigin::Stack as u8
        );
        assert_eq!(run(node, prog_names::FROM_POD, &udp, p1).verdict, TC_ACT_OK);
    });
}

#[test]
fn packets_without_a_known_start_go_to_the_stack() {
    with_node(|node| {
        let p1 = node.pod1_ifindex;
        // The middle of a TCP connection weft never saw: the stack may hold its NAT state.
        let ack = tcp(POD1_MAC, POD1_IP, POD2_IP, 40002, 80, Flags::Ack);
        let out = run(node, prog_names::FROM_POD, &ack, p1);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, ack);
        assert!(
            entry(node, POD1_IP, 40002, POD2_IP, 80, 6).is_none(),
            "nothing recorded"
        );
        // To a remote pod, the same.
        let ack = tcp(POD1_MAC, POD1_IP, REMOTE_VXLAN_IP, 40002, 80, Flags::Ack);
        assert_eq!(run(node, prog_names::FROM_POD, &ack, p1).verdict, TC_ACT_OK);

        // An expired entry is no entry: a fast one whose time has passed.
        let (key, _) = CtKey::of(
            POD1_IP,
            40003u16.to_be_bytes(),
            POD2_IP,
            80u16.to_be_bytes(),
            6,
        );
        let dead = CtEntry {
            expires_s: now_s() - 5,
            created_s: now_s() - 100,
            policy_rev: 0,
            origin: CtOrigin::Fast as u8,
            flags: CT_F_SEEN_LO | CT_F_SEEN_HI,
            policy: 0,
            _pad: 0,
        };
        node.dp.maps.upsert_conntrack(&key, &dead).unwrap();
        let ack = tcp(POD1_MAC, POD1_IP, POD2_IP, 40003, 80, Flags::Ack);
        assert_eq!(run(node, prog_names::FROM_POD, &ack, p1).verdict, TC_ACT_OK);
        // A SYN on that tuple opens a new flow over it.
        let syn = tcp(POD1_MAC, POD1_IP, POD2_IP, 40003, 80, Flags::Syn);
        assert_eq!(
            run(node, prog_names::FROM_POD, &syn, p1).verdict,
            TC_ACT_REDIRECT
        );
        let e = entry(node, POD1_IP, 40003, POD2_IP, 80, 6).unwrap();
        assert!(e.expires_s > now_s());
        assert_eq!(e.flags & CT_F_SEEN_HI, 0, "fresh state");

        // A connection reset, then a new SYN on the same tuple: a fresh fast flow.
        let rst = tcp(POD2_MAC, POD2_IP, POD1_IP, 80, 40003, Flags::Rst);
        assert_eq!(
            run(node, prog_names::FROM_POD, &rst, node.pod2_ifindex).verdict,
            TC_ACT_REDIRECT
        );
        assert_eq!(
            run(node, prog_names::FROM_POD, &syn, p1).verdict,
            TC_ACT_REDIRECT
        );
        let e = entry(node, POD1_IP, 40003, POD2_IP, 80, 6).unwrap();
        assert_eq!(e.flags, CT_F_SEEN_LO | CT_F_SYN_LO, "reopened");

        // A FIN each way closes; the flow is still carried until its entry expires.
        let fin1 = tcp(POD1_MAC, POD1_IP, POD2_IP, 40003, 80, Flags::Fin);
        let fin2 = tcp(POD2_MAC, POD2_IP, POD1_IP, 80, 40003, Flags::Fin);
        assert_eq!(
            run(node, prog_names::FROM_POD, &fin1, p1).verdict,
            TC_ACT_REDIRECT
        );
        assert_eq!(
            run(node, prog_names::FROM_POD, &fin2, node.pod2_ifindex).verdict,
            TC_ACT_REDIRECT
        );
        let e = entry(node, POD1_IP, 40003, POD2_IP, 80, 6).unwrap();
        assert!(e.expires_s <= now_s() + weft_common::conntrack::CT_TIMEOUT_TCP_CLOSING_S);
    });
}

#[test]
fn icmp_errors_follow_their_flow() {
    with_node(|node| {
        let (p1, p2) = (node.pod1_ifindex, node.pod2_ifindex);
        let udp = udp_frame(POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, 7000, 9, b"discard");
        assert_eq!(
            run(node, prog_names::FROM_POD, &udp, p1).verdict,
            TC_ACT_REDIRECT
        );
        // Pod 2 answers port unreachable: the error quotes pod 1's datagram, a fast flow, so it
        // goes the flow's way (the stack never saw the flow and could not relate it).
        let unreachable = |quoted: &[u8]| {
            let b = PacketBuilder::ethernet2(POD2_MAC, [0xee; 6])
                .ipv4(POD2_IP, POD1_IP, 64)
                .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::Port,
                ));
            let mut out = Vec::new();
            b.write(&mut out, &quoted[14..]).unwrap();
            out
        };
        let err = unreachable(&udp);
        let out = run(node, prog_names::FROM_POD, &err, p2);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(&out.data[0..6], &POD1_MAC);
        // An error about a flow weft does not know: the stack's.
        let other = udp_frame(POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, 7001, 9, b"other");
        let err = unreachable(&other);
        let out = run(node, prog_names::FROM_POD, &err, p2);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, err);
        // Errors cut short of the quoted ports: the stack's, nothing recorded or dropped.
        let err = unreachable(&udp);
        for quote in 0..24 {
            let mut cut = err[..14 + 20 + 8 + quote].to_vec();
            let mut ip = Ipv4Header::from_slice(&cut[14..34]).unwrap().0;
            ip.total_len = (cut.len() - 14) as u16;
            ip.header_checksum = ip.calc_header_checksum();
            cut[14..34].copy_from_slice(&ip.to_bytes());
            let out = run(node, prog_names::FROM_POD, &cut, p2);
            assert_eq!(out.verdict, TC_ACT_OK, "quote of {quote} bytes");
            // What to_pod sees of it is not recorded either.
            assert_eq!(run(node, prog_names::TO_POD, &cut, p1).verdict, TC_ACT_OK);
        }
        assert_eq!(stat(node, Stat::ConntrackStackNew), 0);
        let drops: u64 = node.dp.maps.drops().unwrap().iter().map(|(_, n)| n).sum();
        assert_eq!(drops, 0);
    });
}

#[test]
fn truncated_l4_and_fragments_are_the_stacks() {
    with_node(|node| {
        let p1 = node.pod1_ifindex;
        // A TCP header cut short (the IP length is consistent, the header is not whole).
        let syn = tcp(POD1_MAC, POD1_IP, POD2_IP, 41000, 80, Flags::Syn);
        for l4 in 0..20 {
            let mut cut = syn[..34 + l4].to_vec();
            let mut ip = Ipv4Header::from_slice(&cut[14..34]).unwrap().0;
            ip.total_len = (20 + l4) as u16;
            ip.header_checksum = ip.calc_header_checksum();
            cut[14..34].copy_from_slice(&ip.to_bytes());
            let out = run(node, prog_names::FROM_POD, &cut, p1);
            assert_eq!(out.verdict, TC_ACT_OK, "{l4} bytes of TCP");
            assert_eq!(out.data, cut);
        }
        assert!(node.dp.maps.conntrack().unwrap().is_empty());

        // A fragmented datagram into a pod through the stack: its first fragment (the one
        // with the ports) is recorded, so the reply takes the stack too.
        let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, POD1_IP, POD2_IP).unwrap();
        ip.dont_fragment = false;
        ip.more_fragments = true;
        let mut l4 = etherparse::UdpHeader {
            source_port: 9000,
            destination_port: 53,
            length: 2000,
            checksum: 0,
        }
        .to_bytes()
        .to_vec();
        l4.extend_from_slice(&[0u8; 64]);
        let first = ipv4_frame(POD1_MAC, [0xee; 6], &ip, &l4);
        assert_eq!(
            run(node, prog_names::TO_POD, &first, node.pod2_ifindex).verdict,
            TC_ACT_OK
        );
        let e = entry(node, POD1_IP, 9000, POD2_IP, 53, 17).expect("first fragment recorded");
        assert_eq!(e.origin, CtOrigin::Stack as u8);
        let reply = udp_frame(POD2_MAC, [0xee; 6], POD2_IP, POD1_IP, 53, 9000, b"reply");
        assert_eq!(
            run(node, prog_names::FROM_POD, &reply, node.pod2_ifindex).verdict,
            TC_ACT_OK
        );
        // Later fragments carry no ports: nothing is recorded for them.
        ip.more_fragments = false;
        ip.fragment_offset = etherparse::IpFragOffset::try_new(9).unwrap();
        let later = ipv4_frame(POD1_MAC, [0xee; 6], &ip, &[0u8; 40]);
        let before = node.dp.maps.conntrack().unwrap().len();
        assert_eq!(
            run(node, prog_names::TO_POD, &later, node.pod2_ifindex).verdict,
            TC_ACT_OK
        );
        assert_eq!(node.dp.maps.conntrack().unwrap().len(), before);
    });
}

#[test]
fn to_pod_passes_everything_untouched() {
    with_node(|node| {
        let p1 = node.pod1_ifindex;
        let arp = raw_frame([0xee; 6], [0xff; 6], 0x0806, &[0u8; 28]);
        let ipv6 = raw_frame([0xee; 6], POD1_MAC, 0x86dd, &[0x60; 60]);
        let tcp = tcp(POD2_MAC, POD2_IP, POD1_IP, 1, 2, Flags::Ack);
        let mut bad_ihl = tcp.clone();
        bad_ihl[14] = 0x44;
        let mut frames = vec![arp, ipv6, tcp.clone(), bad_ihl];
        for len in 34..tcp.len() {
            frames.push(tcp[..len].to_vec());
        }
        for frame in &frames {
            let out = run(node, prog_names::TO_POD, frame, p1);
            assert_eq!(out.verdict, TC_ACT_OK);
            assert_eq!(&out.data, frame);
        }
        let drops: u64 = node.dp.maps.drops().unwrap().iter().map(|(_, n)| n).sum();
        assert_eq!(drops, 0, "to_pod never drops");
    });
}

#[test]
fn from_host_carries_the_nodes_traffic_and_what_the_stack_translated() {
    with_node(|node| {
        // The node's own traffic to a remote pod: encapsulated.
        let from_node = tcp(
            [0xee; 6],
            NODE_IP,
            REMOTE_VXLAN_IP,
            40000,
            10250,
            Flags::Syn,
        );
        let out = run(node, prog_names::FROM_HOST, &from_node, 0);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(out.data.len(), from_node.len() + 50);
        // A local pod's connection the stack translated (a Service's DNAT to a remote
        // backend): encapsulated, and recorded as the stack's.
        let dnatted = tcp([0xee; 6], POD1_IP, REMOTE_VXLAN_IP, 40010, 8080, Flags::Syn);
        let out = run(node, prog_names::FROM_HOST, &dnatted, 0);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let e = entry(node, POD1_IP, 40010, REMOTE_VXLAN_IP, 8080, 6).expect("recorded");
        assert_eq!(e.origin, CtOrigin::Stack as u8);
        assert_eq!(e.flags & CT_F_INIT_HI, 0, "pod 1 opened it");
        // The backend's reply from the tunnel goes to the stack, which undoes the DNAT.
        let reply = tcp(
            PEER_VTEP_MAC,
            REMOTE_VXLAN_IP,
            POD1_IP,
            8080,
            40010,
            Flags::SynAck,
        );
        let vx = vxlan_frame(
            &Outer {
                src_mac: PEER_MAC,
                dst_mac: node.underlay_mac,
                src: PEER_IP,
                dst: NODE_IP,
            },
            51000,
            VXLAN_PORT,
            VNI,
            &reply,
        );
        let out = run(node, prog_names::FROM_UNDERLAY, &vx, 0);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(
            &out.data[14..],
            &reply[14..],
            "decapsulated, handed to the stack"
        );
        assert_eq!(stat(node, Stat::UnderlayDelivered), 0);

        // Anything else: a host outside the cluster relayed toward the overlay, a remote
        // pod's address, a pod address nobody has.
        for src in [
            [192, 168, 50, 200],
            REMOTE_IPIP_IP,
            [10, 244, 1, 99],
            [8, 8, 8, 8],
        ] {
            let f = tcp([0xee; 6], src, REMOTE_VXLAN_IP, 1, 2, Flags::Syn);
            assert_eq!(run(node, prog_names::FROM_HOST, &f, 0).verdict, TC_ACT_SHOT);
        }
        assert_eq!(
            node.dp
                .maps
                .drop_count(DropReason::HostForeignSource)
                .unwrap(),
            4
        );
    });
}

#[test]
fn from_host_answers_addresses_nobody_holds_with_host_unreachable() {
    use etherparse::icmpv4::DestUnreachableHeader;
    with_node(|node| {
        // The stack routes the whole cluster network into weft_host: an address no route and
        // no local pod covers would come back here until its TTL ran out. The node's own
        // packet to an unassigned subnet, and a local pod's (through the stack) to an address
        // of this node's subnet that no pod holds, are answered from that address.
        let mut dropped = 0;
        for (src_mac, src, dst) in [
            ([0xee; 6], NODE_IP, [10, 244, 77, 5]),
            (POD1_MAC, POD1_IP, [10, 244, 1, 99]),
        ] {
            let syn = tcp(src_mac, src, dst, 40000, 80, Flags::Syn);
            let out = run(node, prog_names::FROM_HOST, &syn, 0);
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "sent back out of weft_net");
            assert_eq!(
                out.data,
                dest_unreachable_frame(&syn, [0xee; 6], src_mac, dst, DestUnreachableHeader::Host),
                "{dst:?}"
            );
            dropped += 1;
            assert_eq!(
                node.dp.maps.drop_count(DropReason::NoPodRoute).unwrap(),
                dropped
            );
        }
        // An echo request gets the same answer (ping: "Destination Host Unreachable").
        let echo = {
            let b = PacketBuilder::ethernet2([0xee; 6], [0xee; 6])
                .ipv4(NODE_IP, [10, 244, 77, 5], 64)
                .icmpv4_echo_request(7, 1);
            let mut out = Vec::new();
            b.write(&mut out, &[0x61; 56]).unwrap();
            out
        };
        let out = run(node, prog_names::FROM_HOST, &echo, 0);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(
            out.data,
            dest_unreachable_frame(
                &echo,
                [0xee; 6],
                [0xee; 6],
                [10, 244, 77, 5],
                DestUnreachableHeader::Host
            )
        );
        dropped += 1;
        // Never an ICMP error about an ICMP error, nor about a fragment other than the first:
        // dropped, counted, nothing sent.
        // (the node's port unreachable about a segment claiming to come from that address)
        let error = dest_unreachable_frame(
            &tcp(
                [0xee; 6],
                [10, 244, 77, 5],
                NODE_IP,
                80,
                40000,
                Flags::SynAck,
            ),
            [0xee; 6],
            [0xee; 6],
            NODE_IP,
            DestUnreachableHeader::Port,
        );
        let mut fragment = tcp([0xee; 6], NODE_IP, [10, 244, 77, 5], 40000, 80, Flags::Ack);
        fragment[20] = 0x00;
        fragment[21] = 0x10; // offset 128 bytes
        for frame in [error, fragment] {
            assert_eq!(
                run(node, prog_names::FROM_HOST, &frame, 0).verdict,
                TC_ACT_SHOT
            );
            dropped += 1;
        }
        assert_eq!(
            node.dp.maps.drop_count(DropReason::NoPodRoute).unwrap(),
            dropped
        );
        assert_eq!(
            stat(node, Stat::PassedToStack),
            0,
            "nothing went back to the stack"
        );
        // Routed and local destinations are unaffected.
        let to_remote = tcp([0xee; 6], NODE_IP, REMOTE_VXLAN_IP, 40001, 80, Flags::Syn);
        assert_eq!(
            run(node, prog_names::FROM_HOST, &to_remote, 0).verdict,
            TC_ACT_REDIRECT
        );
        assert_eq!(
            node.dp.maps.drop_count(DropReason::NoPodRoute).unwrap(),
            dropped
        );
    });
}

#[test]
fn remote_flows_are_tracked_on_the_receiving_node() {
    with_node(|node| {
        let nic = node.underlay_mac;
        let vx = |inner: &[u8]| {
            vxlan_frame(
                &Outer {
                    src_mac: PEER_MAC,
                    dst_mac: nic,
                    src: PEER_IP,
                    dst: NODE_IP,
                },
                51000,
                VXLAN_PORT,
                VNI,
                inner,
            )
        };
        // A remote pod opens a connection to pod 1: delivered, tracked as fast.
        let syn = tcp(
            PEER_VTEP_MAC,
            REMOTE_VXLAN_IP,
            POD1_IP,
            33000,
            80,
            Flags::Syn,
        );
        assert_eq!(
            run(node, prog_names::FROM_UNDERLAY, &vx(&syn), 0).verdict,
            TC_ACT_REDIRECT
        );
        assert_eq!(
            entry(node, REMOTE_VXLAN_IP, 33000, POD1_IP, 80, 6)
                .unwrap()
                .origin,
            CtOrigin::Fast as u8
        );
        // Pod 1's reply is encapsulated straight away.
        let synack = tcp(POD1_MAC, POD1_IP, REMOTE_VXLAN_IP, 80, 33000, Flags::SynAck);
        let out = run(node, prog_names::FROM_POD, &synack, node.pod1_ifindex);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(out.data.len(), synack.len() + 50);
        // A segment of a connection weft never saw: the stack's.
        let ack = tcp(
            PEER_VTEP_MAC,
            REMOTE_VXLAN_IP,
            POD1_IP,
            33001,
            80,
            Flags::Ack,
        );
        assert_eq!(
            run(node, prog_names::FROM_UNDERLAY, &vx(&ack), 0).verdict,
            TC_ACT_OK
        );
    });
}

/// The agent's GC deletes expired entries in chunks, keeps live ones, and counts them.
#[test]
fn gc_deletes_expired_entries_in_chunks() {
    with_node(|node| {
        let now = now_s();
        for i in 0..300u16 {
            let (key, _) = CtKey::of(POD1_IP, i.to_be_bytes(), POD2_IP, 80u16.to_be_bytes(), 6);
            let expired = i % 3 == 0;
            let e = CtEntry {
                expires_s: if expired { now - 1 } else { now + 100 },
                created_s: now - 200,
                policy_rev: 0,
                origin: CtOrigin::Fast as u8,
                flags: CT_F_SEEN_LO,
                policy: 0,
                _pad: 0,
            };
            node.dp.maps.upsert_conntrack(&key, &e).unwrap();
        }
        let mut gc = Gc::default();
        let (mut scanned, mut deleted, mut passes) = (0, 0, Vec::new());
        for _ in 0..10 {
            let step = gc.step(&mut node.dp.maps, 64, now).unwrap();
            assert!(step.scanned <= 64);
            scanned += step.scanned;
            deleted += step.deleted;
            if let Some(live) = step.pass_live {
                passes.push(live);
                break;
            }
        }
        assert_eq!(scanned, 300, "one pass over every entry");
        assert_eq!(deleted, 100);
        assert_eq!(passes, vec![200]);
        let left = node.dp.maps.conntrack().unwrap();
        assert_eq!(left.len(), 200);
        assert!(left.iter().all(|(_, e)| e.expires_s > now));
        // The next pass finds nothing to delete.
        let mut deleted = 0;
        loop {
            let step = gc.step(&mut node.dp.maps, 1000, now).unwrap();
            deleted += step.deleted;
            if step.pass_live.is_some() {
                assert_eq!(step.pass_live, Some(200));
                break;
            }
        }
        assert_eq!(deleted, 0);
    });
}

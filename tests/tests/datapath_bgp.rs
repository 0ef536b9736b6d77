//! Packet injection for the `bgp` route mode: the next hop comes from weft's BGP table (what
//! BIRD installs), not from the owning node's address; a missing route is a counted drop; no
//! path loops; plain frames from bgp peers are accepted only through the next hop toward their
//! source (a reverse-path check). The injection node's namespace gets a router on the underlay
//! (a neighbour entry) and routes in weft's table written with `ip route ... table N`, as BIRD
//! writes them.
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use weft_common::{
    BGP_TABLE_DEFAULT, CONFIG_F_ACCEPT_ROUTED, DropReason, NodeInfo, RouteInfo, RouteMode, Stat,
    prog_names,
};
use weft_tests::{
    injection_node::*,
    netns::ip,
    packets::*,
    testrun::{TestRunOutput, run_tc},
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

/// A router on the fixture's underlay subnet: the BGP next hop toward nodes behind it.
const ROUTER_IP: &str = "192.168.50.254";
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x50, 0xfe];
/// A node on another subnet, behind the router: the owner of the `bgp` subnets below. Not
/// on-link; the main table reaches it through the router, only the BGP table reaches its pods.
const FAR_NODE_IP: [u8; 4] = [192, 168, 70, 9];
/// Pod subnets owned by the far node, routed in `bgp` mode.
const BGP_SUBNET: &str = "10.244.16.0/24";
const BGP_POD: [u8; 4] = [10, 244, 16, 7];
const NO_ROUTE_SUBNET: &str = "10.244.17.0/24";
const NO_ROUTE_POD: [u8; 4] = [10, 244, 17, 7];
const LOOP_SUBNET: &str = "10.244.18.0/24";
const LOOP_POD: [u8; 4] = [10, 244, 18, 7];
/// This node's underlay NIC as frames from the underlay address it.
const NIC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x50, 0x01];
/// Another host on the router's subnet (not a node).
const OUTSIDER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x50, 0xc8];

fn from_pod(node: &mut Node, frame: &[u8]) -> TestRunOutput {
    let ifindex = node.pod1_ifindex;
    let prog = node.dp.tc_program(prog_names::FROM_POD).unwrap();
    run_tc(prog, frame, ifindex, 1)
}

fn from_underlay(node: &mut Node, frame: &[u8]) -> TestRunOutput {
    let prog = node.dp.tc_program(prog_names::FROM_UNDERLAY).unwrap();
    run_tc(prog, frame, 0, 1)
}

fn stat(node: &Node, s: Stat) -> u64 {
    node.dp.maps.stat_count(s).unwrap()
}

fn drops(node: &Node, r: DropReason) -> u64 {
    node.dp.maps.drop_count(r).unwrap()
}

fn pod1_tcp(dst: [u8; 4]) -> Vec<u8> {
    tcp_frame(POD1_MAC, [0xee; 6], POD1_IP, dst, 40000, 80, b"over bgp")
}

fn bgp_route(node: &mut Node, subnet: &str) {
    node.dp
        .maps
        .upsert_route(
            subnet.parse::<Ipv4Net>().unwrap(),
            &RouteInfo {
                node_ip: FAR_NODE_IP,
                vtep_mac: PEER_VTEP_MAC,
                mode: RouteMode::Bgp as u8,
                _pad: 0,
            },
        )
        .unwrap();
}

/// The injection node plus: the router's neighbour entry, the far node (a `bgp` peer, reached
/// through the router in the main table), `bgp` routes for its subnets, a BGP-table route for
/// the first one through the router, and a decoy in the main table for the subnet without a BGP
/// route (the main table must never be used for `bgp` routes).
fn with_bgp_node(test: impl FnOnce(&mut Node) + Send + 'static) {
    with_node(move |node| {
        ip(&format!(
            "neigh replace {ROUTER_IP} lladdr 02:00:00:00:50:fe dev ul0 nud permanent"
        ));
        ip(&format!(
            "route add 192.168.70.0/24 via {ROUTER_IP} dev ul0"
        ));
        node.dp
            .maps
            .upsert_node(
                Ipv4Addr::from(FAR_NODE_IP),
                &NodeInfo {
                    vtep_mac: PEER_VTEP_MAC,
                    mode: RouteMode::Bgp as u8,
                    _pad: 0,
                },
            )
            .unwrap();
        ip(&format!(
            "route add {BGP_SUBNET} via {ROUTER_IP} dev ul0 table {BGP_TABLE_DEFAULT} proto bird"
        ));
        ip(&format!(
            "route add {NO_ROUTE_SUBNET} via 192.168.50.2 dev ul0"
        ));
        for subnet in [BGP_SUBNET, NO_ROUTE_SUBNET, LOOP_SUBNET] {
            bgp_route(node, subnet);
        }
        test(node)
    })
}

#[test]
fn next_hop_comes_from_weft_table_not_from_the_owning_node() {
    with_bgp_node(|node| {
        let frame = pod1_tcp(BGP_POD);
        let out = from_pod(node, &frame);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(out.data.len(), frame.len(), "no encapsulation");
        assert_eq!(&out.data[0..6], &ROUTER_MAC, "sent to the BGP next hop");
        assert_eq!(&out.data[6..12], &node.underlay_mac);
        assert_eq!(&out.data[12..14], &[0x08, 0x00]);
        assert_eq!(&out.data[14..], &forwarded_ip(&frame)[..], "TTL - 1 only");
        assert_eq!(stat(node, Stat::BgpForward), 1);
        for s in [Stat::VxlanEncap, Stat::IpipEncap, Stat::DirectForward] {
            assert_eq!(stat(node, s), 0, "{s:?}");
        }
        // Node traffic (from_host, no anti-spoofing) takes the same path.
        let from_node = tcp_frame([2, 0, 0, 0, 0, 9], [0xee; 6], NODE_IP, BGP_POD, 1, 2, b"");
        let prog = node.dp.tc_program(prog_names::FROM_HOST).unwrap();
        let out = run_tc(prog, &from_node, 0, 1);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(&out.data[0..6], &ROUTER_MAC);
        assert_eq!(stat(node, Stat::BgpForward), 2);
    });
}

#[test]
fn a_changed_bgp_route_is_used_once_the_cache_is_flushed() {
    with_bgp_node(|node| {
        let frame = pod1_tcp(BGP_POD);
        from_pod(node, &frame);
        let hops = node.dp.maps.next_hops().unwrap();
        assert_eq!(hops.len(), 1, "{hops:?}");
        assert_eq!(hops[0].0, Ipv4Addr::from(BGP_POD), "cached per destination");
        assert_eq!(hops[0].1.dmac, ROUTER_MAC);
        // BIRD moves the route to another next hop (the node became on-link, say).
        ip(&format!(
            "route replace {BGP_SUBNET} via 192.168.50.2 dev ul0 table {BGP_TABLE_DEFAULT} proto bird"
        ));
        assert_eq!(&from_pod(node, &frame).data[0..6], &ROUTER_MAC, "cached");
        node.dp.maps.flush_next_hops().unwrap();
        assert_eq!(
            &from_pod(node, &frame).data[0..6],
            &PEER_MAC,
            "looked up again"
        );
    });
}

#[test]
fn unresolved_bgp_next_hop_goes_to_redirect_neigh() {
    with_bgp_node(|node| {
        ip(&format!(
            "route replace {BGP_SUBNET} via 192.168.50.253 dev ul0 table {BGP_TABLE_DEFAULT}"
        ));
        let frame = pod1_tcp(BGP_POD);
        let out = from_pod(node, &frame);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(&out.data[14..], &forwarded_ip(&frame)[..]);
        assert_eq!(stat(node, Stat::NeighResolve), 1);
        assert_eq!(stat(node, Stat::BgpForward), 1);
    });
}

#[test]
fn missing_bgp_route_is_a_counted_drop_not_a_pass() {
    with_bgp_node(|node| {
        // The main table routes this subnet (the decoy): bgp must not fall back to it, and must
        // not hand the packet to the stack (whose route for the cluster network leads back
        // into weft).
        let frame = pod1_tcp(NO_ROUTE_POD);
        let out = from_pod(node, &frame);
        assert_eq!(out.verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::NoBgpRoute), 1);
        assert_eq!(stat(node, Stat::BgpForward), 0);
        assert_eq!(stat(node, Stat::PassedToStack), 0);
        // BIRD withdraws the route that existed: dropped too (after the cache is flushed, as
        // the agent does when weft's table changes).
        ip(&format!("route del {BGP_SUBNET} table {BGP_TABLE_DEFAULT}"));
        let out = from_pod(node, &pod1_tcp(BGP_POD));
        assert_eq!(out.verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::NoBgpRoute), 2);
        // A table that does not exist at all (nothing learned yet on a fresh node).
        let mut cfg = node.dp.maps.config().unwrap();
        cfg.bgp_table = BGP_TABLE_DEFAULT + 1;
        node.dp.maps.set_config(&cfg).unwrap();
        let out = from_pod(node, &pod1_tcp(BGP_POD));
        assert_eq!(out.verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::NoBgpRoute), 3);
        // An unreachable route (as a peer's withdrawn, stale path may leave): dropped.
        ip(&format!(
            "route add unreachable {NO_ROUTE_SUBNET} table {}",
            BGP_TABLE_DEFAULT + 1
        ));
        let out = from_pod(node, &frame);
        assert_eq!(out.verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::NoBgpRoute), 4);
    });
}

#[test]
fn a_bgp_route_that_leads_back_into_the_node_is_not_used() {
    with_bgp_node(|node| {
        // weft's table routes a pod subnet through a pod's veth: forwarding there would bring
        // the packet back into weft. The lookup only accepts routes out of the underlay NIC.
        ip(&format!(
            "route add {LOOP_SUBNET} dev h2 table {BGP_TABLE_DEFAULT}"
        ));
        let out = from_pod(node, &pod1_tcp(LOOP_POD));
        assert_eq!(out.verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::NoBgpRoute), 1);
        assert_eq!(stat(node, Stat::BgpForward), 0);
        assert_eq!(stat(node, Stat::PassedToStack), 0);
        // A route back to this node's own address (the kernel accepts it as a gateway): the
        // packet would come straight back. Refused as a loop.
        ip(&format!(
            "route replace {LOOP_SUBNET} via 192.168.50.1 dev ul0 table {BGP_TABLE_DEFAULT}"
        ));
        let out = from_pod(node, &pod1_tcp(LOOP_POD));
        assert_eq!(out.verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::RouteLoop), 1);
        assert_eq!(stat(node, Stat::BgpForward), 0);
    });
}

#[test]
fn transit_from_the_underlay_is_refused_delivery_is_not() {
    with_bgp_node(|node| {
        let nic = NIC_MAC;
        // A router sends this node traffic for the far node's pods: the only way on is back
        // out of the underlay. Refused as a loop, counted.
        let transit = tcp_frame(ROUTER_MAC, nic, [10, 244, 9, 9], BGP_POD, 80, 40000, b"x");
        let out = from_underlay(node, &transit);
        assert_eq!(out.verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::RouteLoop), 1);
        // The same toward a host-gw subnet is not weft's business to refuse (unchanged).
        let to_direct = tcp_frame(
            ROUTER_MAC,
            nic,
            [10, 244, 9, 9],
            REMOTE_DIRECT_IP,
            80,
            40000,
            b"x",
        );
        let out = from_underlay(node, &to_direct);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, to_direct);
        // A far pod's packet to a local pod, routed to us by the router: delivered.
        let delivery = tcp_frame(ROUTER_MAC, nic, BGP_POD, POD1_IP, 80, 40000, b"reply");
        let out = from_underlay(node, &delivery);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(&out.data[0..6], &POD1_MAC);
        assert_eq!(&out.data[14..], &forwarded_ip(&delivery)[..]);
        assert_eq!(stat(node, Stat::UnderlayDelivered), 1);
        assert_eq!(drops(node, DropReason::RouteLoop), 1);
    });
}

/// Plain frames from bgp peers arrive through routers, so they cannot be held to the on-link
/// check; they are held to the reverse path instead: a frame from a bgp peer's pod must come
/// from the MAC of the next hop weft's BGP table gives toward that pod's subnet, a frame from
/// the peer's own address from the next hop the main table gives toward it. A host beside the
/// router forging either is refused; routed access from outside is the operator's choice.
#[test]
fn plain_frames_from_bgp_peers_pass_the_reverse_path_check() {
    with_bgp_node(|node| {
        let plain = |mac: [u8; 6], src: [u8; 4]| {
            udp_frame(mac, NIC_MAC, src, POD1_IP, 4000, 5000, b"plain over bgp")
        };
        // Accepted: the far node's pod, from the router (weft's table's next hop toward its
        // subnet): delivered into the pod.
        let ok = plain(ROUTER_MAC, BGP_POD);
        let out = from_underlay(node, &ok);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(&out.data[0..6], &POD1_MAC);
        assert_eq!(&out.data[14..], &forwarded_ip(&ok)[..]);
        assert_eq!(stat(node, Stat::UnderlayDelivered), 1);
        // Accepted: the far node itself, from the router (the main table's next hop toward
        // it): the stack delivers a node's traffic.
        let from_far_node = plain(ROUTER_MAC, FAR_NODE_IP);
        let out = from_underlay(node, &from_far_node);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, from_far_node);
        assert_eq!(drops(node, DropReason::BgpReversePath), 0);

        // Refused: the same sources from another host on the router's subnet (forged).
        for src in [BGP_POD, FAR_NODE_IP] {
            let out = from_underlay(node, &plain(OUTSIDER_MAC, src));
            assert_eq!(out.verdict, TC_ACT_SHOT, "{src:?}");
        }
        assert_eq!(drops(node, DropReason::BgpReversePath), 2);
        // Refused: from an on-link peer (a node, but not the way toward the bgp subnet).
        assert_eq!(
            from_underlay(node, &plain(PEER_MAC, BGP_POD)).verdict,
            TC_ACT_SHOT
        );
        assert_eq!(drops(node, DropReason::BgpReversePath), 3);
        // Refused: a bgp subnet weft's table has no route for (BIRD has not learned it), even
        // from the router and although the main table routes it.
        assert_eq!(
            from_underlay(node, &plain(ROUTER_MAC, NO_ROUTE_POD)).verdict,
            TC_ACT_SHOT
        );
        assert_eq!(drops(node, DropReason::BgpReversePath), 4);
        // Not a peer at all: the on-link rule's reason, as before.
        assert_eq!(
            from_underlay(node, &plain(ROUTER_MAC, [10, 244, 99, 1])).verdict,
            TC_ACT_SHOT
        );
        assert_eq!(drops(node, DropReason::PlainFromNonPeer), 1);
        assert_eq!(stat(node, Stat::UnderlayDelivered), 1);

        // A withdrawn route (the cache flushed, as the agent does on table changes): refused.
        ip(&format!("route del {BGP_SUBNET} table {BGP_TABLE_DEFAULT}"));
        node.dp.maps.flush_next_hops().unwrap();
        assert_eq!(from_underlay(node, &ok).verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::BgpReversePath), 5);

        // With routed access allowed (`--accept-routed-pod-traffic`, for BGP networks that route
        // to pods), what fails the check goes to the host stack instead of being dropped.
        let mut cfg = node.dp.maps.config().unwrap();
        cfg.flags |= CONFIG_F_ACCEPT_ROUTED;
        node.dp.maps.set_config(&cfg).unwrap();
        let forged = plain(OUTSIDER_MAC, BGP_POD);
        let passed = stat(node, Stat::PassedToStack);
        let out = from_underlay(node, &forged);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, forged);
        assert_eq!(stat(node, Stat::PassedToStack), passed + 1);
        assert_eq!(drops(node, DropReason::BgpReversePath), 5);
        assert_eq!(stat(node, Stat::UnderlayDelivered), 1);
    });
}

//! Forwarding an IPv4 packet by its destination: into a local pod, or toward the node owning
//! the destination (encapsulated or routed), answering packets too big for the path with ICMP
//! fragmentation-needed. Shared by `from_pod`, `from_host` and `from_underlay`.
use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_redirect_peer, programs::TcContext};
use weft_common::{
    DropReason, EP_F_STACK_ONLY, EndpointInfo, NodeConfig, RouteInfo, RouteMode, Stat,
};

use crate::{
    conntrack::{self, Path},
    counters::count,
    encap, flows, icmp, mtu,
    parse::{ETH_HLEN, EthHdr, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, ptr_at, put},
    policy, route,
};

/// Where a packet's destination lives.
pub enum Dest {
    /// A pod on this node.
    Local(&'static EndpointInfo),
    /// A pod on another node.
    Remote(&'static RouteInfo),
    /// Not a pod: the node, or outside the cluster network.
    Other,
}

#[inline(always)]
pub fn dest(daddr: [u8; 4]) -> Dest {
    if let Some(ep) = route::endpoint(daddr) {
        return Dest::Local(ep);
    }
    match route::route(daddr) {
        Some(r) => Dest::Remote(r),
        None => Dest::Other,
    }
}

/// Whether two MAC addresses are equal (integer compares: no `memcmp` in BPF).
#[inline(always)]
pub fn mac_eq(a: &[u8; 6], b: &[u8; 6]) -> bool {
    u32::from_ne_bytes([a[0], a[1], a[2], a[3]]) == u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
        && u16::from_ne_bytes([a[4], a[5]]) == u16::from_ne_bytes([b[4], b[5]])
}

/// The flow hash of the packet (addresses, protocol, and ports when the packet carries them).
#[inline(always)]
fn flow_hash(ctx: &TcContext, ip: &Ipv4Hdr) -> u32 {
    let mut ports = [0u8; 4];
    let has_ports = matches!(ip.protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
        && u16::from_be_bytes(ip.frag_off) & 0x1fff == 0;
    if has_ports
        && let Some(p) = ptr_at::<[u8; 4]>(ctx.data(), ctx.data_end(), ETH_HLEN + ip.header_len())
    {
        ports = unsafe { *p };
    }
    weft_common::flow_hash(ip.saddr, ip.daddr, ip.protocol, ports)
}

/// Delivers a packet into a local pod's namespace: a routed hop (TTL, MACs of the pod's
/// link), then `bpf_redirect_peer` into the pod's side of its veth. TTL 1 goes to the stack,
/// which answers with ICMP time exceeded.
#[inline(always)]
pub fn deliver_to_pod(eth: &mut EthHdr, ip: &mut Ipv4Hdr, dst: &EndpointInfo, stat: Stat) -> i32 {
    if ip.ttl <= 1 {
        count(Stat::PassedToStack);
        return TC_ACT_OK;
    }
    ip.decrement_ttl();
    put(&mut eth.dst, dst.pod_mac);
    put(&mut eth.src, dst.host_mac);
    count(stat);
    flows::received(ip.daddr, ip.tot_len());
    unsafe { bpf_redirect_peer(dst.host_ifindex, 0) as i32 }
}

/// A packet from another node (decapsulated, or plain from a peer) to the local pod `dst`;
/// `from_pod`: its source is one of the sending node's pods. A pod-to-pod packet takes the
/// fast path into the pod when conntrack says its flow is weft's. Anything else goes to the
/// host stack: a node's own traffic (so the stack's conntrack sees the request and the pod's
/// reply is recognised as a reply, not masqueraded as new pod-to-node traffic, and the node's
/// own firewall applies), a pod whose traffic must see the stack's qdiscs, a flow the stack
/// translated.
#[inline(always)]
pub fn from_remote(
    ctx: &TcContext,
    eth: &mut EthHdr,
    ip: &mut Ipv4Hdr,
    dst: &EndpointInfo,
    from_pod: bool,
) -> Result<i32, DropReason> {
    if !from_pod || dst.flags & EP_F_STACK_ONLY != 0 {
        count(Stat::PassedToStack);
        return Ok(TC_ACT_OK);
    }
    let track = conntrack::track(ctx.data(), ctx.data_end(), ip, ETH_HLEN + ip.header_len());
    if conntrack::path(&track, &policy::Check::of(ip))? == Path::Stack {
        return Ok(TC_ACT_OK);
    }
    Ok(deliver_to_pod(eth, ip, dst, Stat::UnderlayDelivered))
}

/// Forwards the packet toward the node owning its destination (`route`). A packet that would
/// not fit the path once encapsulated is answered with ICMP fragmentation-needed from
/// `icmp_source`, sent back out of `ifindex` (the interface it came in on). `Ok(TC_ACT_OK)`
/// hands the packet to the stack (TTL 1).
#[inline(always)]
pub fn to_remote(
    ctx: &TcContext,
    cfg: &NodeConfig,
    ip: &mut Ipv4Hdr,
    route: &RouteInfo,
    icmp_source: [u8; 4],
    ifindex: u32,
) -> Result<i32, DropReason> {
    if ip.ttl <= 1 {
        count(Stat::PassedToStack);
        return Ok(TC_ACT_OK);
    }
    let Some(mode) = RouteMode::from_u8(route.mode) else {
        return Err(DropReason::BadRouteMode);
    };
    // Tunnels are addressed to the owning node, and direct routing sends the unchanged packet
    // to its MAC (host-gw: the node is on-link). bgp routes the unchanged packet along the
    // route BIRD learned for the destination: to the node, or to a router in between.
    let hop = if mode == RouteMode::Bgp {
        encap::bgp_next_hop(ctx, cfg, ip.saddr, ip.daddr)?
    } else {
        encap::next_hop(ctx, cfg, cfg.node_ip, route.node_ip)?
    };
    let path_mtu = mtu::path_mtu(&hop, route.node_ip);
    let overhead = mode.overhead();
    if path_mtu > overhead {
        let len = mtu::segment_len(ctx, ip, ETH_HLEN + ip.header_len()) + overhead;
        if len > path_mtu {
            // DF or not: the packet cannot be fragmented on the way (a fragmented tunnel
            // packet is never decapsulated), so the sender learns the path MTU either way.
            return icmp::frag_needed(ctx, icmp_source, path_mtu - overhead, ifindex);
        }
    }
    ip.decrement_ttl();
    let stat = match mode {
        RouteMode::Vxlan => {
            let hash = flow_hash(ctx, ip);
            encap::vxlan(ctx, cfg, route, hash)?;
            Stat::VxlanEncap
        }
        RouteMode::Ipip => {
            encap::ipip(ctx, cfg, route)?;
            Stat::IpipEncap
        }
        RouteMode::Direct => Stat::DirectForward,
        RouteMode::Bgp => Stat::BgpForward,
    };
    let (verdict, neigh) = encap::send(ctx, &hop)?;
    count(stat);
    if neigh {
        count(Stat::NeighResolve);
    }
    Ok(verdict)
}

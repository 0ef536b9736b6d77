//! Forwarding an IPv4 packet by its destination: into a local pod, or toward the node owning
//! the destination (encapsulated or routed). Shared by `from_pod` and `from_host`.
use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_redirect_peer, programs::TcContext};
use weft_common::{DropReason, EndpointInfo, NodeConfig, RouteMode, Stat};

use crate::{
    counters::count,
    encap,
    parse::{ETH_HLEN, EthHdr, IPPROTO_UDP, Ipv4Hdr, ptr_at},
    route,
};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_SCTP: u8 = 132;

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
    eth.dst = dst.pod_mac;
    eth.src = dst.host_mac;
    count(stat);
    unsafe { bpf_redirect_peer(dst.host_ifindex, 0) as i32 }
}

/// Forwards the packet whose headers are `eth`/`ip`; `Ok(TC_ACT_OK)` hands it to the stack.
#[inline(always)]
pub fn forward(
    ctx: &TcContext,
    cfg: &NodeConfig,
    eth: &mut EthHdr,
    ip: &mut Ipv4Hdr,
) -> Result<i32, DropReason> {
    if let Some(dst) = route::endpoint(ip.daddr) {
        return Ok(deliver_to_pod(eth, ip, dst, Stat::LocalDelivered));
    }

    let Some(route) = route::route(ip.daddr) else {
        count(Stat::PassedToStack);
        return Ok(TC_ACT_OK);
    };
    if ip.ttl <= 1 {
        count(Stat::PassedToStack);
        return Ok(TC_ACT_OK);
    }
    ip.decrement_ttl();
    let stat = match RouteMode::from_u8(route.mode) {
        Some(RouteMode::Vxlan) => {
            let hash = flow_hash(ctx, ip);
            encap::vxlan(ctx, cfg, route, hash)?;
            Stat::VxlanEncap
        }
        Some(RouteMode::Ipip) => {
            encap::ipip(ctx, cfg, route)?;
            Stat::IpipEncap
        }
        Some(RouteMode::Direct) => Stat::DirectForward,
        Some(RouteMode::Bgp) => Stat::BgpForward,
        None => return Err(DropReason::BadRouteMode),
    };
    // Tunnels are addressed to the owning node, and direct routing sends the unchanged packet
    // to its MAC (host-gw: the node is on-link). bgp routes the unchanged packet along the
    // route BIRD learned for the destination: to the node, or to a router in between.
    let (src, lookup) = if stat == Stat::BgpForward {
        let lookup = encap::Lookup::BgpTable {
            dst: ip.daddr,
            table: cfg.bgp_table,
        };
        (ip.saddr, lookup)
    } else {
        (cfg.node_ip, encap::Lookup::Node(route.node_ip))
    };
    let (verdict, neigh) = encap::redirect_to_underlay(ctx, cfg, src, lookup)?;
    count(stat);
    if neigh {
        count(Stat::NeighResolve);
    }
    Ok(verdict)
}

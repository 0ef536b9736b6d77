//! tc ingress on the host side of a pod's veth: everything a pod sends.
//!
//! A pod may send IPv4 from its own address and MAC, and ARP for its gateway (answered here);
//! everything else is dropped with its reason (IPv6, VLAN tags, other ethertypes, spoofed
//! sources, tunnel packets to a node). IPv4 to another pod takes the fast path when conntrack
//! says its flow is weft's (straight into the local pod, or encapsulated toward its node);
//! the rest (Services, the node, the outside world, flows the stack translated) goes to the
//! host stack. NetworkPolicy: the egress of every new flow is judged here (a Service address's
//! after the stack translated it), a local destination's ingress too.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use weft_common::{DropReason, EP_F_STACK_ONLY, NodeConfig, Stat, monitor::Hook};

use crate::{
    arp,
    conntrack::{self, Path},
    counters::{count, count_drop},
    flows,
    forward::{self, Dest},
    monitor,
    parse::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6, EthHdr,
        HEADERS_LEN, IPPROTO_IPIP, IPPROTO_UDP, Ipv4Hdr, L3, parse_ipv4, ptr_at,
    },
    policy, route,
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    match try_from_pod(&ctx) {
        Ok(verdict) => {
            monitor::forwarded(&ctx, Hook::FromPod, verdict as u32);
            verdict
        }
        Err(reason) => {
            count_drop(&ctx, Hook::FromPod, reason);
            TC_ACT_SHOT
        }
    }
}

/// A pod sent a tunnel packet (VXLAN to the configured port, or IPIP) to a node's address:
/// with the node's masquerade it would reach a peer as that node's own tunnel traffic.
#[inline(always)]
fn is_tunnel_to_node(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4Hdr) -> bool {
    let tunnel = match ip.protocol {
        IPPROTO_IPIP => true,
        IPPROTO_UDP if !ip.is_fragment() => {
            match ptr_at::<[u8; 4]>(ctx.data(), ctx.data_end(), ETH_HLEN + ip.header_len()) {
                Some(ports) => {
                    let ports = unsafe { *ports };
                    u16::from_be_bytes([ports[2], ports[3]]) == cfg.vxlan_port
                }
                None => false,
            }
        }
        _ => false,
    };
    tunnel && (ip.daddr == cfg.node_ip || route::node(ip.daddr).is_some())
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(cfg) = route::config() else {
        return Ok(TC_ACT_OK);
    };
    let frame_len = ctx.len() as usize;
    if ctx.data() + HEADERS_LEN > ctx.data_end() && frame_len > ETH_HLEN {
        // Headers in paged data: make them linear (rare; not on veth).
        let want = core::cmp::min(frame_len, HEADERS_LEN) as u32;
        let _ = ctx.pull_data(want);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
        return Ok(TC_ACT_OK);
    };
    match unsafe { (*eth).ethertype() } {
        ETH_P_IPV4 => {}
        ETH_P_ARP => return arp::answer_gateway(ctx),
        ETH_P_IPV6 => return Err(DropReason::Ipv6FromPod),
        ETH_P_8021Q | ETH_P_8021AD => return Err(DropReason::VlanFromPod),
        _ => return Err(DropReason::NonIpFromPod),
    }
    let frame = match parse_ipv4(ctx.data(), ctx.data_end(), frame_len) {
        L3::Other => return Ok(TC_ACT_OK),
        L3::Malformed => return Err(DropReason::MalformedIpv4),
        L3::Ipv4(frame) => frame,
    };
    let (eth, ip): (&mut EthHdr, &mut Ipv4Hdr) = unsafe { (&mut *frame.eth, &mut *frame.ip) };

    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(src) = route::endpoint(ip.saddr) else {
        return Err(DropReason::SpoofedIp);
    };
    if src.host_ifindex != ifindex {
        return Err(DropReason::SpoofedIp);
    }
    if !forward::mac_eq(&eth.src, &src.pod_mac) {
        return Err(DropReason::SpoofedMac);
    }
    if is_tunnel_to_node(ctx, cfg, ip) {
        return Err(DropReason::TunnelFromPod);
    }
    flows::sent(ip.saddr, ip.tot_len());
    // A shaped pod's traffic takes the stack, past the classic tc filters (the `bandwidth`
    // plugin redirects to its ifb there): TC_ACT_UNSPEC lets them run, TC_ACT_OK would not.
    let to_stack = if src.flags & EP_F_STACK_ONLY != 0 {
        TC_ACT_UNSPEC
    } else {
        TC_ACT_OK
    };

    let dst = forward::dest(ip.daddr);
    if let Dest::Local(ep) = dst
        && ep.flags & EP_F_STACK_ONLY != 0
    {
        count(Stat::PassedToStack);
        return Ok(to_stack);
    }
    if matches!(dst, Dest::Other) {
        // Nothing after the stack sees this flow with its pod source (masqueraded, or a
        // Service's translation toward a backend, which `to_pod`/`from_host` judge): its egress
        // is judged here, and its entry lets replies in.
        let track = conntrack::track(ctx.data(), ctx.data_end(), ip, ETH_HLEN + ip.header_len());
        conntrack::record_stack(&track, &policy::Check::to_stack(ip))?;
    }
    if matches!(dst, Dest::Other) || to_stack != TC_ACT_OK {
        count(Stat::PassedToStack);
        return Ok(to_stack);
    }
    let track = conntrack::track(ctx.data(), ctx.data_end(), ip, ETH_HLEN + ip.header_len());
    if conntrack::path(&track, &policy::Check::of(ip))? == Path::Stack {
        return Ok(TC_ACT_OK);
    }
    match dst {
        Dest::Local(ep) => Ok(forward::deliver_to_pod(eth, ip, ep, Stat::LocalDelivered)),
        Dest::Remote(route) => forward::to_remote(ctx, cfg, ip, route, cfg.node_ip, ifindex),
        Dest::Other => Ok(TC_ACT_OK),
    }
}

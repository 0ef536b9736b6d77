//! tc ingress on the host side of a pod's veth: everything a pod sends.
//!
//! Anti-spoofing first (the source must be the endpoint's own address and MAC, arriving on its
//! own veth), then local delivery straight into the target pod, or encapsulation / direct
//! routing toward the node owning the destination. Traffic for anything else (the node, the
//! outside world) goes to the host stack, which masquerades it.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect_peer,
    macros::classifier,
    programs::TcContext,
};
use weft_common::{DropReason, RouteMode, Stat};

use crate::{
    counters::{count, count_drop},
    encap,
    parse::{ETH_HLEN, EthHdr, IPV4_HLEN, Ipv4Hdr, L3, parse_ipv4},
    route,
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    match try_from_pod(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(cfg) = route::config() else {
        return Ok(TC_ACT_OK);
    };
    let frame_len = ctx.len() as usize;
    if ctx.data() + ETH_HLEN + IPV4_HLEN > ctx.data_end() && frame_len >= ETH_HLEN + IPV4_HLEN {
        // Headers in paged data: make them linear (rare; not on veth).
        let _ = ctx.pull_data((ETH_HLEN + IPV4_HLEN) as u32);
    }
    let frame = match parse_ipv4(ctx.data(), ctx.data_end(), frame_len) {
        L3::Other => return Ok(TC_ACT_OK),
        L3::Malformed => return Err(DropReason::MalformedIpv4),
        L3::Ipv4(frame) => frame,
    };
    let (eth, ip): (&mut EthHdr, &mut Ipv4Hdr) = unsafe { (&mut *frame.eth, &mut *frame.ip) };

    let Some(src) = route::endpoint(ip.saddr) else {
        return Err(DropReason::SpoofedIp);
    };
    if src.host_ifindex != unsafe { (*ctx.skb.skb).ifindex } {
        return Err(DropReason::SpoofedIp);
    }
    if eth.src != src.pod_mac {
        return Err(DropReason::SpoofedMac);
    }

    if let Some(dst) = route::endpoint(ip.daddr) {
        if ip.ttl <= 1 {
            // The stack answers with ICMP time exceeded.
            count(Stat::PassedToStack);
            return Ok(TC_ACT_OK);
        }
        ip.decrement_ttl();
        eth.dst = dst.pod_mac;
        eth.src = dst.host_mac;
        count(Stat::LocalDelivered);
        return Ok(unsafe { bpf_redirect_peer(dst.host_ifindex, 0) } as i32);
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
            encap::vxlan(ctx, cfg, route)?;
            Stat::VxlanEncap
        }
        Some(RouteMode::Ipip) => {
            encap::ipip(ctx, cfg, route)?;
            Stat::IpipEncap
        }
        Some(RouteMode::Direct) => Stat::DirectForward,
        None => return Err(DropReason::BadRouteMode),
    };
    // The next hop is always the owning node: tunnels are addressed to it, and direct routing
    // sends the unchanged packet to its MAC (host-gw: the node is on-link).
    let (verdict, neigh) = encap::redirect_to_underlay(ctx, cfg, cfg.node_ip, route.node_ip)?;
    count(stat);
    if neigh {
        count(Stat::NeighResolve);
    }
    Ok(verdict)
}

//! tc ingress on the host side of a pod's veth: everything a pod sends.
//!
//! Anti-spoofing first (the source must be the endpoint's own address and MAC, arriving on its
//! own veth), then local delivery straight into the target pod, or encapsulation / direct
//! routing toward the node owning the destination. Traffic for anything else (the node, the
//! outside world) goes to the host stack, which masquerades it.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use weft_common::DropReason;

use crate::{
    counters::count_drop,
    forward,
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

    forward::forward(ctx, cfg, eth, ip)
}

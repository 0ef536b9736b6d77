//! tc ingress on `weft_net`, the peer of the node's `weft_host` veth: traffic the node itself
//! sends to pods on other nodes (kubelet probes, hostNetwork pods). The agent routes the
//! cluster network through `weft_host`; here it is encapsulated or routed like pod traffic, as
//! Cilium does with `cilium_host`/`cilium_net`. The node is trusted: no anti-spoofing.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use weft_common::DropReason;

use crate::{
    counters::count_drop,
    forward,
    parse::{EthHdr, Ipv4Hdr, L3, parse_ipv4},
    route,
};

#[classifier]
pub fn from_host(ctx: TcContext) -> i32 {
    match try_from_host(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_from_host(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(cfg) = route::config() else {
        return Ok(TC_ACT_OK);
    };
    let frame = match parse_ipv4(ctx.data(), ctx.data_end(), ctx.len() as usize) {
        L3::Other => return Ok(TC_ACT_OK),
        L3::Malformed => return Err(DropReason::MalformedIpv4),
        L3::Ipv4(frame) => frame,
    };
    let (eth, ip): (&mut EthHdr, &mut Ipv4Hdr) = unsafe { (&mut *frame.eth, &mut *frame.ip) };
    forward::forward(ctx, cfg, eth, ip)
}

//! tc egress on the host side of a pod's veth: what the host stack delivers into a pod (a
//! Service's DNAT, a NodePort, a hostPort, the node's own traffic, a flow the fast path handed
//! over). Fast-path deliveries never pass here (`bpf_redirect_peer` enters the pod directly),
//! so everything seen here is the stack's: its flow is recorded as a stack flow, and the pod's
//! replies go back through the stack, which undoes its translations.
//!
//! NetworkPolicy checks ingress here too, the stack's way into a pod.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use weft_common::{DropReason, Stat, monitor::Hook};

use crate::{
    conntrack,
    counters::{count, count_drop},
    flows, monitor,
    parse::{ETH_HLEN, HEADERS_LEN, L3, parse_ipv4},
    policy, route,
};

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    match try_to_pod(&ctx) {
        Ok(()) => {
            monitor::forwarded(&ctx, Hook::ToPod, TC_ACT_OK as u32);
            TC_ACT_OK
        }
        Err(reason) => {
            count_drop(&ctx, Hook::ToPod, reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Result<(), DropReason> {
    if route::config().is_none() {
        return Ok(());
    }
    let frame_len = ctx.len() as usize;
    if ctx.data() + HEADERS_LEN > ctx.data_end() && frame_len > ETH_HLEN {
        let want = core::cmp::min(frame_len, HEADERS_LEN) as u32;
        let _ = ctx.pull_data(want);
    }
    // Whatever the stack sends is its own business to have built right: only IPv4 is
    // tracked, and only NetworkPolicy drops here.
    let L3::Ipv4(frame) = parse_ipv4(ctx.data(), ctx.data_end(), frame_len) else {
        return Ok(());
    };
    let ip = unsafe { &*frame.ip };
    let track = conntrack::track(ctx.data(), ctx.data_end(), ip, ETH_HLEN + ip.header_len());
    conntrack::record_stack(&track, &policy::Check::of(ip))?;
    count(Stat::StackToPod);
    flows::received(ip.daddr, ip.tot_len());
    Ok(())
}

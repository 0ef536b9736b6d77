//! tc egress on the host side of a pod's veth: what the host stack delivers into a pod (a
//! Service's DNAT, a NodePort, a hostPort, the node's own traffic, a flow the fast path handed
//! over). Fast-path deliveries never pass here (`bpf_redirect_peer` enters the pod directly),
//! so everything seen here is the stack's: its flow is recorded as a stack flow, and the pod's
//! replies go back through the stack, which undoes its translations.
//!
//! NetworkPolicy checks ingress here too, the stack's way into a pod.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use weft_common::Stat;

use crate::{
    conntrack,
    counters::count,
    parse::{ETH_HLEN, HEADERS_LEN, L3, parse_ipv4},
    route,
};

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    try_to_pod(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) {
    if route::config().is_none() {
        return;
    }
    let frame_len = ctx.len() as usize;
    if ctx.data() + HEADERS_LEN > ctx.data_end() && frame_len > ETH_HLEN {
        let want = core::cmp::min(frame_len, HEADERS_LEN) as u32;
        let _ = ctx.pull_data(want);
    }
    // Whatever the stack sends is its own business to have built right: only IPv4 is
    // tracked, nothing is dropped here.
    let L3::Ipv4(frame) = parse_ipv4(ctx.data(), ctx.data_end(), frame_len) else {
        return;
    };
    let ip = unsafe { &*frame.ip };
    count(Stat::StackToPod);
    let track = conntrack::track(ctx.data(), ctx.data_end(), ip, ETH_HLEN + ip.header_len());
    conntrack::record_stack(&track);
}

//! XDP on the underlay NIC: decapsulates VXLAN and IPIP addressed to this node from known
//! nodes, before GRO, and passes the inner packet to the stack (tc then delivers it to the pod).
//! Everything else passes untouched.
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_xdp_adjust_head,
    macros::xdp,
    programs::XdpContext,
};
use weft_common::DropReason;

use crate::{
    counters::{count, count_drop},
    decap::{Tunnel, classify},
    parse::{ETH_HLEN, EthHdr, ptr_at},
    route,
};

#[xdp]
pub fn xdp_underlay(ctx: XdpContext) -> u32 {
    let Some(cfg) = route::config() else {
        return XDP_PASS;
    };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (outer_len, inner_has_eth, stat) = match classify(data, data_end, data_end - data, cfg) {
        Tunnel::NotOurs => return XDP_PASS,
        Tunnel::Drop(reason) => {
            count_drop(reason);
            return XDP_DROP;
        }
        Tunnel::Decap {
            outer_len,
            inner_has_eth,
            stat_xdp,
        } => (outer_len, inner_has_eth, stat_xdp),
    };
    // The outer Ethernet header is addressed to this NIC: the inner frame inherits it so the
    // stack accepts it as PACKET_HOST.
    let Some(outer_eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return XDP_PASS;
    };
    let mut eth = unsafe { *outer_eth };
    eth.ethertype = 0x0800u16.to_be_bytes();
    // VXLAN: strip up to the inner Ethernet header; IPIP: keep room for an Ethernet header.
    let strip = if inner_has_eth {
        ETH_HLEN + outer_len
    } else {
        outer_len
    };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        count_drop(DropReason::AdjustRoomFailed);
        return XDP_DROP;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(new_eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        count_drop(DropReason::StoreFailed);
        return XDP_DROP;
    };
    unsafe { *new_eth = eth };
    count(stat);
    XDP_PASS
}

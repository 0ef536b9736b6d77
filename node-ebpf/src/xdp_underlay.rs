//! XDP on the underlay NIC: decapsulates VXLAN and IPIP addressed to this node from known
//! nodes (inner source checked against the sending node's pods), before GRO, and passes the
//! inner packet to the stack (tc then delivers it to the pod). Everything else passes
//! untouched.
//!
//! A decapsulated packet carries metadata (`DecapMeta`, in front of the packet, not in it)
//! saying which peer it came from: `from_underlay` tells it apart from a plain frame with the
//! same headers sent on the wire. Where the driver keeps no metadata, nothing is decapsulated
//! here and tc does it.
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    macros::xdp,
    programs::XdpContext,
};
use weft_common::{DECAP_META_MAGIC, DECAP_META_MAGIC_POD, DecapMeta, DropReason, monitor::Hook};

use crate::{
    counters::{count, count_drop},
    decap::{Tunnel, classify},
    monitor,
    parse::{ETH_HLEN, EthHdr, ptr_at},
    route,
};

#[xdp]
pub fn xdp_underlay(ctx: XdpContext) -> u32 {
    let Some(cfg) = route::config() else {
        return XDP_PASS;
    };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (outer_len, inner_has_eth, stat, peer, from_pod) =
        match classify(data, data_end, data_end - data, cfg) {
            Tunnel::NotOurs => return XDP_PASS,
            Tunnel::Drop(reason) => {
                count_drop(&ctx, Hook::XdpUnderlay, reason);
                return XDP_DROP;
            }
            Tunnel::Decap {
                outer_len,
                inner_has_eth,
                stat_xdp,
                peer,
                from_pod,
                ..
            } => (outer_len, inner_has_eth, stat_xdp, peer, from_pod),
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
    // The packet start moves first, then the metadata goes in front of it: the other order
    // makes `bpf_xdp_adjust_head` move the metadata along (a memmove on every packet).
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        count_drop(&ctx, Hook::XdpUnderlay, DropReason::AdjustRoomFailed);
        return XDP_DROP;
    }
    // Without the metadata tc could not tell this packet from a plain frame, so a driver that
    // keeps none gets the frame back untouched (nothing was written yet) and tc decapsulates.
    let meta_len = core::mem::size_of::<DecapMeta>() as i32;
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -meta_len) } != 0 {
        return restore(&ctx, strip);
    }
    let (meta, data) = unsafe { ((*ctx.ctx).data_meta as usize, (*ctx.ctx).data as usize) };
    if meta + meta_len as usize > data {
        return restore(&ctx, strip);
    }
    unsafe {
        *(meta as *mut DecapMeta) = DecapMeta {
            magic: if from_pod {
                DECAP_META_MAGIC_POD
            } else {
                DECAP_META_MAGIC
            },
            peer,
        }
    };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(new_eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        count_drop(&ctx, Hook::XdpUnderlay, DropReason::StoreFailed);
        return XDP_DROP;
    };
    unsafe { *new_eth = eth };
    count(stat);
    monitor::forwarded(&ctx, Hook::XdpUnderlay, XDP_PASS);
    XDP_PASS
}

/// Puts back the `strip` bytes of outer headers (still in place: nothing was written) and
/// passes the frame as it arrived.
#[inline(always)]
fn restore(ctx: &XdpContext, strip: usize) -> u32 {
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(strip as i32)) } != 0 {
        count_drop(ctx, Hook::XdpUnderlay, DropReason::AdjustRoomFailed);
        return XDP_DROP;
    }
    XDP_PASS
}

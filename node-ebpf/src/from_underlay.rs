//! tc ingress on the underlay NIC: delivers packets from other nodes' pods to local pods
//! straight into the pod's namespace (`bpf_redirect_peer`), after decapsulating tunnel packets
//! XDP did not handle (XDP not attached, or not supported by the NIC).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    macros::classifier,
    programs::TcContext,
};
use weft_common::{DropReason, RouteMode, Stat};

use crate::{
    counters::{count, count_drop},
    decap::{Tunnel, classify},
    forward,
    parse::{EthHdr, L3, parse_ipv4},
    route,
};

/// Enough linear bytes for an outer header with options, UDP, VXLAN and the inner headers.
const PULL_LEN: u32 = 14 + 60 + 8 + 8 + 14 + 20;

#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    match try_from_underlay(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_from_underlay(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(cfg) = route::config() else {
        return Ok(TC_ACT_OK);
    };
    let frame_len = ctx.len() as usize;
    if ctx.data() + PULL_LEN as usize > ctx.data_end() {
        let want = if frame_len < PULL_LEN as usize {
            frame_len as u32
        } else {
            PULL_LEN
        };
        let _ = ctx.pull_data(want);
    }
    let mut tc_decapsulated = false;
    match classify(ctx.data(), ctx.data_end(), frame_len, cfg) {
        Tunnel::NotOurs => {}
        Tunnel::Drop(reason) => return Err(reason),
        Tunnel::Decap {
            outer_len,
            inner_has_eth,
            ..
        } => {
            // Remove everything between the outer Ethernet header and the inner IPv4 header;
            // the outer Ethernet header (addressed to this NIC, type IPv4) stays.
            let strip = if inner_has_eth {
                outer_len + 14
            } else {
                outer_len
            };
            ctx.adjust_room(-(strip as i32), BPF_ADJ_ROOM_MAC, 0)
                .map_err(|_| DropReason::AdjustRoomFailed)?;
            count(Stat::TcDecap);
            tc_decapsulated = true;
        }
    }

    let frame_len = ctx.len() as usize;
    let frame = match parse_ipv4(ctx.data(), ctx.data_end(), frame_len) {
        L3::Ipv4(frame) => frame,
        L3::Other | L3::Malformed => return Ok(TC_ACT_OK),
    };
    let (eth, ip): (&mut EthHdr, &mut _) = unsafe { (&mut *frame.eth, &mut *frame.ip) };
    let Some(dst) = route::endpoint(ip.daddr) else {
        // Another node's pods, reached over BGP, arriving here unencapsulated: a router sent
        // them to the wrong node. weft nodes never transit (the only way on is back out of the
        // underlay, toward the router that sent it): the start of a loop, refused and counted.
        if !tc_decapsulated
            && route::route(ip.daddr).is_some_and(|r| r.mode == RouteMode::Bgp as u8)
        {
            return Err(DropReason::RouteLoop);
        }
        return Ok(TC_ACT_OK);
    };
    // (Packets tc decapsulated itself are always delivered here: handing them back to the
    // stack after `bpf_skb_adjust_room` leaves offload state the stack cannot forward.)
    if !tc_decapsulated && route::route(ip.saddr).is_none() {
        // Not from a pod of another node (a node, hostNetwork pod or anything else): the host
        // stack delivers it, so its conntrack sees the request and the pod's reply is
        // recognised as a reply (not masqueraded as new pod-to-node traffic), and the node's
        // own firewall applies. Pod-to-pod traffic keeps the fast path.
        count(Stat::PassedToStack);
        return Ok(TC_ACT_OK);
    }
    Ok(forward::deliver_to_pod(
        eth,
        ip,
        dst,
        Stat::UnderlayDelivered,
    ))
}

//! tc ingress on the underlay NIC: delivers packets from other nodes' pods to local pods
//! straight into the pod's namespace (`bpf_redirect_peer`), after decapsulating tunnel packets
//! XDP did not handle (XDP not attached, or not supported by the NIC). With `weft_vxlan`
//! (`CONFIG_F_VXLAN_DEV`), VXLAN carrying TCP (and any GSO packet) is checked here and left to
//! the kernel's vxlan socket, which decapsulates it after the underlay's GRO aggregated it;
//! `from_vxlan` delivers it.
//!
//! What may reach a pod from the underlay:
//! - tunnel packets from known nodes whose inner source the sending node owns (checked in
//!   `decap::classify`, by XDP or here);
//! - plain frames from on-link peers (host-gw, DirectRouting) whose source is that peer or
//!   one of its pods, coming from that peer's MAC;
//! - plain frames from `bgp` peers (possibly behind routers) whose source is that peer or one
//!   of its pods, coming from the next hop this node's routes give toward that source;
//! - nothing else, unless the agent allows routed access from outside (`--accept-routed-pod-
//!   traffic`), which hands such traffic to the stack.
//!
//! Pod-to-pod packets take the fast path when conntrack says their flow is weft's; the rest
//! (a node's own traffic, flows the stack translated) is the stack's. This program also learns
//! path MTUs from ICMP fragmentation-needed about this node's tunnel packets.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    macros::classifier,
    programs::TcContext,
};
use weft_common::{
    CONFIG_F_ACCEPT_ROUTED, CONFIG_F_VXLAN_DEV, DECAP_META_MAGIC, DECAP_META_MAGIC_POD, DecapMeta,
    DropReason, NodeConfig, RouteMode, Stat, monitor::Hook,
};

use crate::{
    counters::{count, count_drop},
    decap::{Tunnel, classify},
    encap::{self, Hop},
    forward::{self, mac_eq},
    monitor, mtu,
    parse::{ETH_HLEN, EthHdr, IPPROTO_TCP, Ipv4Hdr, L3, parse_ipv4},
    route,
};

/// Enough linear bytes for an outer header with options, UDP, VXLAN and the inner headers.
const PULL_LEN: u32 = 14 + 60 + 8 + 8 + 14 + 20;

#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    match try_from_underlay(&ctx) {
        Ok(verdict) => {
            // Only what weft forwards: the underlay also carries the node's own traffic.
            if verdict == TC_ACT_REDIRECT {
                monitor::forwarded(&ctx, Hook::FromUnderlay, verdict as u32);
            }
            verdict
        }
        Err(reason) => {
            count_drop(&ctx, Hook::FromUnderlay, reason);
            TC_ACT_SHOT
        }
    }
}

/// How a packet reached this program.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// A plain frame from the wire.
    Plain,
    /// Decapsulated (by XDP or here); the inner source may be the peer itself.
    Decapsulated,
    /// Decapsulated, and the inner source is known to be a pod of the peer.
    DecapsulatedFromPod,
}

/// Whether XDP decapsulated this packet, as its metadata says.
#[inline(always)]
fn xdp_arrival(ctx: &TcContext) -> Arrival {
    let (meta, data) = unsafe {
        (
            (*ctx.skb.skb).data_meta as usize,
            (*ctx.skb.skb).data as usize,
        )
    };
    if meta + core::mem::size_of::<DecapMeta>() > data {
        return Arrival::Plain;
    }
    match unsafe { (*(meta as *const DecapMeta)).magic } {
        DECAP_META_MAGIC_POD => Arrival::DecapsulatedFromPod,
        DECAP_META_MAGIC => Arrival::Decapsulated,
        _ => Arrival::Plain,
    }
}

/// A plain frame to a local pod: allowed only from an on-link peer (or one of its pods) and
/// from that peer's MAC, or from a `bgp` peer (or one of its pods) through the next hop toward
/// it. Returns whether the source is one of the peer's pods.
#[inline(always)]
fn plain_sender_ok(
    ctx: &TcContext,
    cfg: &NodeConfig,
    eth: &EthHdr,
    ip: &Ipv4Hdr,
) -> Result<bool, DropReason> {
    let bgp = RouteMode::Bgp as u8;
    let (peer, pod, mode) = match route::route(ip.saddr) {
        Some(r) => (r.node_ip, true, r.mode),
        None => match route::node(ip.saddr) {
            Some(n) => (ip.saddr, false, n.mode),
            None => return Err(DropReason::PlainFromNonPeer),
        },
    };
    if mode == bgp {
        bgp_reverse_path_ok(ctx, cfg, eth, ip.saddr, pod)?;
        return Ok(pod);
    }
    let hop =
        encap::next_hop(ctx, cfg, cfg.node_ip, peer).map_err(|_| DropReason::PlainFromNonPeer)?;
    if !hop.onlink(peer) {
        return Err(DropReason::PlainFromNonPeer);
    }
    if let Hop::Resolved(h) = hop
        && !mac_eq(&h.dmac, &eth.src)
    {
        return Err(DropReason::PlainPeerMacMismatch);
    }
    Ok(pod)
}

/// A plain frame from a `bgp` peer's pod (`pod`) or from the peer itself: BGP routes it
/// through routers, so the sender need not be on-link, but the frame must come the way this
/// node would send the reply (a reverse-path check, as the kernel's strict `rp_filter`): from
/// the MAC of the next hop weft's BGP table gives toward the source's pod subnet, or the main
/// table toward a node's own address. A host beside the router forging a pod's source is
/// refused; routed access from elsewhere needs `--accept-routed-pod-traffic`.
#[inline(always)]
fn bgp_reverse_path_ok(
    ctx: &TcContext,
    cfg: &NodeConfig,
    eth: &EthHdr,
    src: [u8; 4],
    pod: bool,
) -> Result<(), DropReason> {
    let hop = if pod {
        encap::bgp_next_hop(ctx, cfg, cfg.node_ip, src)
    } else {
        encap::next_hop(ctx, cfg, cfg.node_ip, src)
    }
    .map_err(|_| DropReason::BgpReversePath)?;
    // An unresolved next hop has no MAC to compare yet (the neighbour subsystem resolves it
    // with the reply); as for on-link peers, the frame is taken.
    if let Hop::Resolved(h) = hop
        && !mac_eq(&h.dmac, &eth.src)
    {
        return Err(DropReason::BgpReversePath);
    }
    Ok(())
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
    let mut arrival = xdp_arrival(ctx);
    if arrival == Arrival::Plain {
        match classify(ctx.data(), ctx.data_end(), frame_len, cfg) {
            Tunnel::NotOurs => {}
            Tunnel::Drop(reason) => return Err(reason),
            Tunnel::Decap {
                outer_len,
                inner_has_eth,
                from_pod,
                inner_proto,
                ..
            } => {
                if inner_has_eth
                    && cfg.flags & CONFIG_F_VXLAN_DEV != 0
                    && (inner_proto == IPPROTO_TCP || unsafe { (*ctx.skb.skb).gso_size } != 0)
                {
                    // Checked, and the kernel's vxlan socket takes it from here (`weft_vxlan`):
                    // the underlay's GRO has aggregated the flow's TCP segments (this may be
                    // one such packet), the socket decapsulates them, and `from_vxlan`
                    // delivers. Every TCP packet goes that way, so a TCP flow never takes two
                    // paths. Other protocols gain nothing from it (GRO aggregates no inner
                    // UDP or ICMP without a socket for it here) and cost less decapsulated
                    // here, unless a packet arrives GSO (an underlay that passes GSO
                    // packets): only the socket sheds its tunnel GSO state.
                    return Ok(TC_ACT_OK);
                }
                // Remove everything between the outer Ethernet header and the inner IPv4
                // header; the outer Ethernet header (addressed to this NIC, type IPv4) stays.
                // The packet may then go to the stack (a flow it translated, a node's traffic):
                // fine for IPIP, whose GRO leaves a TCP GSO packet; a UDP-tunnel GSO packet
                // would keep tunnel GSO state the stack cannot forward (no DECAP_L4_UDP on this
                // kernel), but without a VXLAN socket the kernel does not aggregate VXLAN.
                let strip = if inner_has_eth {
                    outer_len + 14
                } else {
                    outer_len
                };
                // FIXED_GSO: a GRO'd packet keeps its senders' segment size. Without it the
                // kernel grows the segments by the bytes removed, and the stack, forwarding the
                // packet to a pod, finds segments larger than the pod's MTU.
                ctx.adjust_room(
                    -(strip as i32),
                    BPF_ADJ_ROOM_MAC,
                    BPF_F_ADJ_ROOM_FIXED_GSO as u64,
                )
                .map_err(|_| DropReason::AdjustRoomFailed)?;
                count(Stat::TcDecap);
                arrival = if from_pod {
                    Arrival::DecapsulatedFromPod
                } else {
                    Arrival::Decapsulated
                };
            }
        }
    }

    let frame_len = ctx.len() as usize;
    let frame = match parse_ipv4(ctx.data(), ctx.data_end(), frame_len) {
        L3::Ipv4(frame) => frame,
        L3::Other | L3::Malformed => return Ok(TC_ACT_OK),
    };
    let (eth, ip): (&mut EthHdr, &mut Ipv4Hdr) = unsafe { (&mut *frame.eth, &mut *frame.ip) };
    let l4 = ETH_HLEN + ip.header_len();
    if arrival == Arrival::Plain && mtu::learn(ctx.data(), ctx.data_end(), cfg, ip, l4) {
        return Ok(TC_ACT_OK);
    }
    let Some(dst) = route::endpoint(ip.daddr) else {
        // Another node's pods, reached over BGP, arriving here unencapsulated: a router sent
        // them to the wrong node. weft nodes never transit (the only way on is back out of the
        // underlay, toward the router that sent it): the start of a loop, refused and counted.
        if arrival == Arrival::Plain
            && route::route(ip.daddr).is_some_and(|r| r.mode == RouteMode::Bgp as u8)
        {
            return Err(DropReason::RouteLoop);
        }
        return Ok(TC_ACT_OK);
    };
    // Whether the source is a pod of another node: each path has looked its route up already,
    // except a packet an older `xdp_underlay` decapsulated.
    let from_pod = match arrival {
        Arrival::DecapsulatedFromPod => true,
        Arrival::Decapsulated => route::route(ip.saddr).is_some(),
        Arrival::Plain => match plain_sender_ok(ctx, cfg, eth, ip) {
            Ok(from_pod) => from_pod,
            Err(reason) => {
                if cfg.flags & CONFIG_F_ACCEPT_ROUTED == 0 {
                    return Err(reason);
                }
                // Routed access from outside, allowed by the operator: the stack delivers it.
                count(Stat::PassedToStack);
                return Ok(TC_ACT_OK);
            }
        },
    };
    forward::from_remote(ctx, eth, ip, dst, from_pod)
}

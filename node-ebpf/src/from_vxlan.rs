//! tc ingress on `weft_vxlan`, the node's metadata-mode (collect_md) VXLAN device: what the
//! kernel's vxlan socket decapsulated, delivered to local pods. `from_underlay` sends it VXLAN
//! carrying TCP (and any GSO packet); it decapsulates the rest itself, cheaper per packet.
//!
//! Why a kernel device at all: without a UDP socket on the VXLAN port, nothing aggregates
//! VXLAN on the way in, and tc decapsulation hands a pod one MTU-sized segment at a time. The
//! socket registers the UDP-tunnel GRO handler, so the underlay's GRO merges a flow's VXLAN
//! packets before decapsulation (as for the kernel's own vxlan device); decapsulating a GRO'd
//! tunnel packet in tc instead would leave tunnel GSO state behind (no
//! `BPF_F_ADJ_ROOM_DECAP_L4_UDP` on this kernel). Cilium's `cilium_vxlan` works the same way.
//!
//! The socket accepts VXLAN from anywhere, so this program is the authority on what it
//! delivers, whichever interface the packet came in on (`from_underlay` checks the same on the
//! underlay first): the sending node (the outer source, from the tunnel metadata) must be a
//! known node, the VNI the configured one, the inner frame IPv4, and the inner source one of
//! the sending node's pods or the node itself. Then the same delivery as `from_underlay`:
//! into the pod when conntrack says the flow is weft's, else to the host stack (the device has
//! the node's VTEP MAC, so the inner frame is addressed to it).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_tunnel_key},
    btf_maps::Array,
    helpers::bpf_skb_get_tunnel_key,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use weft_common::{DropReason, Stat, TunnelKey, monitor::Hook};

use crate::{
    counters::{count, count_drop},
    decap, forward, monitor,
    parse::{ETH_HLEN, EthHdr, HEADERS_LEN, Ipv4Hdr, L3, parse_ipv4},
    route,
};

/// The tunnel key a test or trace instance supplies (`weft_common::map_names::TRACE_TUNNEL`):
/// BPF_PROG_TEST_RUN cannot attach tunnel metadata to a packet. Never pinned; the agent's
/// instance never writes it.
#[btf_map]
static WEFT_TRACE_TUNNEL: Array<TunnelKey, 1> = Array::new();

#[classifier]
pub fn from_vxlan(ctx: TcContext) -> i32 {
    match try_from_vxlan(&ctx) {
        Ok(verdict) => {
            if verdict == TC_ACT_REDIRECT {
                monitor::forwarded(&ctx, Hook::FromVxlan, verdict as u32);
            }
            verdict
        }
        Err(reason) => {
            count_drop(&ctx, Hook::FromVxlan, reason);
            TC_ACT_SHOT
        }
    }
}

/// The sending node and VNI from the kernel's tunnel metadata (or a test's key).
#[inline(always)]
fn tunnel_key(ctx: &TcContext) -> Option<TunnelKey> {
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    let size = core::mem::size_of::<bpf_tunnel_key>() as u32;
    if unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, size, 0) } == 0 {
        // The helper gives addresses and the tunnel id in host order.
        let remote = unsafe { key.__bindgen_anon_1.remote_ipv4 };
        return Some(TunnelKey {
            peer: remote.to_be_bytes(),
            vni: key.tunnel_id,
            valid: 1,
        });
    }
    let supplied = WEFT_TRACE_TUNNEL.get(0)?;
    if supplied.valid == 0 {
        return None;
    }
    Some(*supplied)
}

#[inline(always)]
fn try_from_vxlan(ctx: &TcContext) -> Result<i32, DropReason> {
    let key = tunnel_key(ctx).ok_or(DropReason::TunnelMetadataMissing)?;
    // Without a config no node is known.
    let cfg = route::config().ok_or(DropReason::UnknownTunnelSource)?;
    if key.vni != cfg.vni {
        return Err(decap::refused(key.peer, DropReason::VxlanVniMismatch));
    }
    let frame_len = ctx.len() as usize;
    if ctx.data() + HEADERS_LEN > ctx.data_end() && frame_len > ETH_HLEN {
        let want = core::cmp::min(frame_len, HEADERS_LEN) as u32;
        let _ = ctx.pull_data(want);
    }
    let frame = match parse_ipv4(ctx.data(), ctx.data_end(), frame_len) {
        L3::Ipv4(frame) => frame,
        L3::Other => return Err(decap::refused(key.peer, DropReason::InnerNotIpv4)),
        L3::Malformed => return Err(decap::refused(key.peer, DropReason::MalformedTunnel)),
    };
    let (eth, ip): (&mut EthHdr, &mut Ipv4Hdr) = unsafe { (&mut *frame.eth, &mut *frame.ip) };
    let from_pod = decap::inner_source(key.peer, ip.saddr)?;
    count(Stat::VxlanDeviceDecap);
    let Some(dst) = route::endpoint(ip.daddr) else {
        // The node itself, or nobody here: the stack's.
        return Ok(TC_ACT_OK);
    };
    forward::from_remote(ctx, eth, ip, dst, from_pod)
}

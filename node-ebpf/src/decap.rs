//! Recognising and validating tunnel packets addressed to this node (VXLAN and IPIP), shared
//! by the XDP and tc decapsulation paths.
use weft_common::{DropReason, NodeConfig, Stat};

use crate::{
    parse::{
        ETH_HLEN, ETH_P_IPV4, EthHdr, IPPROTO_IPIP, IPPROTO_UDP, IPV4_HLEN, Ipv4Hdr, L3, UDP_HLEN,
        UdpHdr, VXLAN_FLAG_VNI, VXLAN_HLEN, VxlanHdr, parse_ipv4, ptr_at,
    },
    route,
};

pub enum Tunnel {
    /// Not a tunnel packet for this node: pass untouched.
    NotOurs,
    /// Addressed to this node's tunnel but unacceptable.
    Drop(DropReason),
    /// A valid tunnel packet from `peer`: `outer_len` bytes follow the outer Ethernet header up
    /// to the inner Ethernet header (VXLAN) or the inner IPv4 header (IPIP, `inner_has_eth`
    /// false).
    Decap {
        outer_len: usize,
        inner_has_eth: bool,
        stat_xdp: Stat,
        peer: [u8; 4],
    },
}

/// Checks the inner IPv4 header at `offset` of a tunnel packet from `peer`: valid, and from an
/// address the peer owns (a pod of its pod CIDR, or the peer itself).
#[inline(always)]
fn inner_check(
    data: usize,
    data_end: usize,
    offset: usize,
    peer: [u8; 4],
) -> Result<(), DropReason> {
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, offset) else {
        return Err(DropReason::MalformedTunnel);
    };
    let ip = unsafe { &*ip };
    if ip.version() != 4 || ip.header_len() < IPV4_HLEN {
        return Err(DropReason::MalformedTunnel);
    }
    if u32::from_ne_bytes(ip.saddr) == u32::from_ne_bytes(peer) {
        return Ok(());
    }
    match route::route(ip.saddr) {
        Some(r) if u32::from_ne_bytes(r.node_ip) == u32::from_ne_bytes(peer) => Ok(()),
        _ => Err(DropReason::TunnelInnerSourceSpoofed),
    }
}

/// Classifies a frame `[data, data_end)` of `frame_len` bytes.
#[inline(always)]
pub fn classify(data: usize, data_end: usize, frame_len: usize, cfg: &NodeConfig) -> Tunnel {
    let frame = match parse_ipv4(data, data_end, frame_len) {
        L3::Ipv4(frame) => frame,
        // Not ours to judge: the stack handles (and counts) what it receives.
        L3::Other | L3::Malformed => return Tunnel::NotOurs,
    };
    let ip = unsafe { &*frame.ip };
    if ip.daddr != cfg.node_ip || ip.is_fragment() {
        return Tunnel::NotOurs;
    }
    let l4 = ETH_HLEN + ip.header_len();
    match ip.protocol {
        IPPROTO_UDP => {
            let Some(udp) = ptr_at::<UdpHdr>(data, data_end, l4) else {
                return Tunnel::NotOurs;
            };
            if u16::from_be_bytes(unsafe { (*udp).dport }) != cfg.vxlan_port {
                return Tunnel::NotOurs;
            }
            let Some(vxlan) = ptr_at::<VxlanHdr>(data, data_end, l4 + UDP_HLEN) else {
                return Tunnel::Drop(DropReason::MalformedTunnel);
            };
            let vxlan = unsafe { &*vxlan };
            if vxlan.flags & VXLAN_FLAG_VNI == 0 {
                return Tunnel::Drop(DropReason::MalformedTunnel);
            }
            if vxlan.vni() != cfg.vni {
                // Another VTEP on this node may own that VNI.
                return Tunnel::NotOurs;
            }
            if route::node(ip.saddr).is_none() {
                return Tunnel::Drop(DropReason::UnknownTunnelSource);
            }
            let inner_eth_off = l4 + UDP_HLEN + VXLAN_HLEN;
            let Some(inner_eth) = ptr_at::<EthHdr>(data, data_end, inner_eth_off) else {
                return Tunnel::Drop(DropReason::MalformedTunnel);
            };
            if unsafe { (*inner_eth).ethertype() } != ETH_P_IPV4 {
                return Tunnel::Drop(DropReason::InnerNotIpv4);
            }
            if let Err(reason) = inner_check(data, data_end, inner_eth_off + ETH_HLEN, ip.saddr) {
                return Tunnel::Drop(reason);
            }
            Tunnel::Decap {
                outer_len: inner_eth_off - ETH_HLEN,
                inner_has_eth: true,
                stat_xdp: Stat::XdpVxlanDecap,
                peer: ip.saddr,
            }
        }
        IPPROTO_IPIP => {
            if route::node(ip.saddr).is_none() {
                return Tunnel::Drop(DropReason::UnknownTunnelSource);
            }
            if let Err(reason) = inner_check(data, data_end, l4, ip.saddr) {
                return Tunnel::Drop(reason);
            }
            Tunnel::Decap {
                outer_len: l4 - ETH_HLEN,
                inner_has_eth: false,
                stat_xdp: Stat::XdpIpipDecap,
                peer: ip.saddr,
            }
        }
        _ => Tunnel::NotOurs,
    }
}

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
    /// false). `from_pod`: the inner source is a pod of the peer (else the peer itself).
    /// `inner_proto`: the inner IPv4 header's protocol.
    Decap {
        outer_len: usize,
        inner_has_eth: bool,
        stat_xdp: Stat,
        peer: [u8; 4],
        from_pod: bool,
        inner_proto: u8,
    },
}

/// The reason to drop a tunnel packet from `peer` for `reason`, unless `peer` is not a known
/// node at all, which comes first.
#[inline(always)]
pub fn refused(peer: [u8; 4], reason: DropReason) -> DropReason {
    if route::node(peer).is_none() {
        return DropReason::UnknownTunnelSource;
    }
    reason
}

#[inline(always)]
fn refuse(peer: [u8; 4], reason: DropReason) -> Tunnel {
    Tunnel::Drop(refused(peer, reason))
}

/// Whether a tunnel packet from `peer` may carry the inner source `saddr`: a pod of the peer's
/// pod CIDR (`Ok(true)`) or the peer itself (`Ok(false)`). The route of the inner source is
/// looked up first: naming the peer, it also vouches for the peer being a known node (routes
/// only ever point at known nodes: the agent adds a node before its routes and removes it
/// after them), so the common case costs one lookup; the node map is read only when the route
/// does not decide. Shared by the decapsulating programs and `from_vxlan`, which takes the
/// peer from the kernel's tunnel metadata.
#[inline(always)]
pub fn inner_source(peer: [u8; 4], saddr: [u8; 4]) -> Result<bool, DropReason> {
    match route::route(saddr) {
        Some(r) if u32::from_ne_bytes(r.node_ip) == u32::from_ne_bytes(peer) => Ok(true),
        _ if u32::from_ne_bytes(saddr) == u32::from_ne_bytes(peer) => {
            if route::node(peer).is_none() {
                return Err(DropReason::UnknownTunnelSource);
            }
            Ok(false)
        }
        _ => Err(refused(peer, DropReason::TunnelInnerSourceSpoofed)),
    }
}

/// Accepts a tunnel packet from `peer` whose inner header starts at `offset`: the inner IPv4
/// header is valid, and its source passes [`inner_source`].
#[inline(always)]
fn accept(
    data: usize,
    data_end: usize,
    offset: usize,
    peer: [u8; 4],
    outer_len: usize,
    inner_has_eth: bool,
    stat_xdp: Stat,
) -> Tunnel {
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, offset) else {
        return refuse(peer, DropReason::MalformedTunnel);
    };
    let ip = unsafe { &*ip };
    if ip.version() != 4 || ip.header_len() < IPV4_HLEN {
        return refuse(peer, DropReason::MalformedTunnel);
    }
    match inner_source(peer, ip.saddr) {
        Ok(from_pod) => Tunnel::Decap {
            outer_len,
            inner_has_eth,
            stat_xdp,
            peer,
            from_pod,
            inner_proto: ip.protocol,
        },
        Err(reason) => Tunnel::Drop(reason),
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
            let inner_eth_off = l4 + UDP_HLEN + VXLAN_HLEN;
            let Some(inner_eth) = ptr_at::<EthHdr>(data, data_end, inner_eth_off) else {
                return refuse(ip.saddr, DropReason::MalformedTunnel);
            };
            if unsafe { (*inner_eth).ethertype() } != ETH_P_IPV4 {
                return refuse(ip.saddr, DropReason::InnerNotIpv4);
            }
            accept(
                data,
                data_end,
                inner_eth_off + ETH_HLEN,
                ip.saddr,
                inner_eth_off - ETH_HLEN,
                true,
                Stat::XdpVxlanDecap,
            )
        }
        IPPROTO_IPIP => accept(
            data,
            data_end,
            l4,
            ip.saddr,
            l4 - ETH_HLEN,
            false,
            Stat::XdpIpipDecap,
        ),
        _ => Tunnel::NotOurs,
    }
}

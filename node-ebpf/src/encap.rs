//! Encapsulation in tc (`bpf_skb_adjust_room`) and the hand-off to the underlay NIC.
//!
//! The inserted headers are declared to the kernel (`ENCAP_*` flags) so GSO packets from pods
//! are segmented as tunnel packets on the way out. `FIXED_GSO` keeps the pod's MSS: the pod MTU
//! already leaves room for the overhead, so shrinking segments would only waste bytes.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_DIRECT, BPF_FIB_LOOKUP_OUTPUT,
        BPF_FIB_LOOKUP_TBID, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use weft_common::{
    DropReason, Ipv4Key, NEXT_HOP_F_ONLINK, NEXT_HOP_TTL_NS, NextHop, NodeConfig, RouteInfo,
};

use crate::{
    checksum,
    maps::WEFT_NEXT_HOPS,
    parse::{
        ETH_HLEN, ETH_P_IPV4, EthHdr, IPPROTO_IPIP, IPPROTO_UDP, IPV4_DF, IPV4_HLEN, Ipv4Hdr,
        UDP_HLEN, UdpHdr, VXLAN_ENCAP_LEN, VXLAN_FLAG_VNI, VXLAN_HLEN, VxlanHdr, ptr_at, put,
    },
};

const AF_INET: u8 = 2;
/// TTL of the outer header (the kernel's default).
const OUTER_TTL: u8 = 64;

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: length of the inner L2 header, in the top byte.
const fn encap_l2_len(len: u64) -> u64 {
    (len & 0xff) << 56
}

/// Writes an option-less outer IPv4 header with DF set, id 0 and its checksum.
#[inline(always)]
fn write_outer_ipv4(ip: &mut Ipv4Hdr, tot_len: u16, protocol: u8, saddr: [u8; 4], daddr: [u8; 4]) {
    ip.version_ihl = 0x45;
    ip.tos = 0;
    ip.tot_len = tot_len.to_be_bytes();
    ip.id = [0, 0];
    ip.frag_off = IPV4_DF.to_be_bytes();
    ip.ttl = OUTER_TTL;
    ip.protocol = protocol;
    ip.check = [0, 0];
    ip.saddr = saddr;
    ip.daddr = daddr;
    let words: [u16; 10] = [
        0x4500u16.to_be(),
        tot_len.to_be(),
        0,
        IPV4_DF.to_be(),
        u16::from_be_bytes([OUTER_TTL, protocol]).to_be(),
        0,
        u16::from_be_bytes([saddr[0], saddr[1]]).to_be(),
        u16::from_be_bytes([saddr[2], saddr[3]]).to_be(),
        u16::from_be_bytes([daddr[0], daddr[1]]).to_be(),
        u16::from_be_bytes([daddr[2], daddr[3]]).to_be(),
    ];
    ip.check = checksum::ipv4_header(&words).to_be_bytes();
}

/// Wraps the frame in outer IPv4/UDP/VXLAN and an inner Ethernet header addressed to the
/// remote VTEP. On return the outer Ethernet header still holds the pod's addresses; the
/// caller resolves the underlay next hop.
#[inline(always)]
pub fn vxlan(
    ctx: &TcContext,
    cfg: &NodeConfig,
    route: &RouteInfo,
    hash: u32,
) -> Result<(), DropReason> {
    let frame_len = ctx.len() as usize;
    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH
        | BPF_F_ADJ_ROOM_FIXED_GSO) as u64
        | encap_l2_len(ETH_HLEN as u64);
    ctx.adjust_room(VXLAN_ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| DropReason::AdjustRoomFailed)?;

    let (data, data_end) = (ctx.data(), ctx.data_end());
    let ip = ptr_at::<Ipv4Hdr>(data, data_end, ETH_HLEN).ok_or(DropReason::StoreFailed)?;
    let udp_off = ETH_HLEN + IPV4_HLEN;
    let udp = ptr_at::<UdpHdr>(data, data_end, udp_off).ok_or(DropReason::StoreFailed)?;
    let vxlan =
        ptr_at::<VxlanHdr>(data, data_end, udp_off + UDP_HLEN).ok_or(DropReason::StoreFailed)?;
    let inner_eth = ptr_at::<EthHdr>(data, data_end, udp_off + UDP_HLEN + VXLAN_HLEN)
        .ok_or(DropReason::StoreFailed)?;

    // Outer IPv4 covers everything after the outer Ethernet header.
    let outer_len = (frame_len + VXLAN_ENCAP_LEN - ETH_HLEN) as u16;
    unsafe {
        write_outer_ipv4(&mut *ip, outer_len, IPPROTO_UDP, cfg.node_ip, route.node_ip);
        let udp = &mut *udp;
        udp.sport = weft_common::vxlan_source_port(hash).to_be_bytes();
        udp.dport = cfg.vxlan_port.to_be_bytes();
        udp.len = (outer_len - IPV4_HLEN as u16).to_be_bytes();
        // Zero: no checksum (legal for IPv4, RFC 768); immune to checksum-offload bugs.
        udp.check = [0, 0];
        let vxlan = &mut *vxlan;
        vxlan.flags = VXLAN_FLAG_VNI;
        put(&mut vxlan.reserved1, [0; 3]);
        vxlan.vni_reserved = (cfg.vni << 8).to_be_bytes();
        let inner_eth = &mut *inner_eth;
        put(&mut inner_eth.dst, route.vtep_mac);
        put(&mut inner_eth.src, cfg.vtep_mac);
        inner_eth.ethertype = ETH_P_IPV4.to_be_bytes();
    }
    Ok(())
}

/// Wraps the IPv4 packet in an outer IPv4 header, protocol 4 (IP-in-IP, RFC 2003).
#[inline(always)]
pub fn ipip(ctx: &TcContext, cfg: &NodeConfig, route: &RouteInfo) -> Result<(), DropReason> {
    let frame_len = ctx.len() as usize;
    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_FIXED_GSO) as u64;
    ctx.adjust_room(IPV4_HLEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| DropReason::AdjustRoomFailed)?;
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let ip = ptr_at::<Ipv4Hdr>(data, data_end, ETH_HLEN).ok_or(DropReason::StoreFailed)?;
    let outer_len = (frame_len + IPV4_HLEN - ETH_HLEN) as u16;
    unsafe {
        write_outer_ipv4(
            &mut *ip,
            outer_len,
            IPPROTO_IPIP,
            cfg.node_ip,
            route.node_ip,
        )
    };
    Ok(())
}

/// An underlay next hop toward a node.
pub enum Hop {
    /// MACs and egress interface known (cached, or fresh from the FIB).
    Resolved(NextHop),
    /// The FIB knows the route but not the neighbour: `bpf_redirect_neigh` resolves it as
    /// the stack would.
    Unresolved {
        ifindex: u32,
        /// The FIB's next hop (the node itself when on-link, else a router).
        gateway: [u8; 4],
    },
}

impl Hop {
    /// The node is on-link (the FIB's next hop is the node itself).
    #[inline(always)]
    pub fn onlink(&self, node: [u8; 4]) -> bool {
        match self {
            Hop::Resolved(h) => h.flags & NEXT_HOP_F_ONLINK != 0,
            Hop::Unresolved { gateway, .. } => {
                u32::from_ne_bytes(*gateway) == u32::from_ne_bytes(node)
            }
        }
    }
}

/// The next hop toward `next_ip` through the underlay, from the cache (reused for
/// `NEXT_HOP_TTL_NS`) or the kernel's FIB. The FIB is asked with a packet length, so it also
/// reports the route's MTU (a route `mtu` metric, a learned exception, or the device's); a
/// smaller path MTU learned from ICMP (`WEFT_PATH_MTU`) is folded into the cached hop.
#[inline(always)]
pub fn next_hop(
    ctx: &TcContext,
    cfg: &NodeConfig,
    src_ip: [u8; 4],
    next_ip: [u8; 4],
) -> Result<Hop, DropReason> {
    fib_next_hop(ctx, cfg, src_ip, next_ip, None)
}

/// The next hop toward the pod address `dst` along weft's BGP table (`cfg.bgp_table`, filled by
/// BIRD): the owning node, or a router on the way to it. Looked up with
/// `BPF_FIB_LOOKUP_DIRECT | TBID` in that table only, never the main table (which routes the
/// cluster network into `weft_host`). Cached like node next hops, per pod address: node and pod
/// addresses never collide. A route back to this node's own address is a loop.
#[inline(always)]
pub fn bgp_next_hop(
    ctx: &TcContext,
    cfg: &NodeConfig,
    src_ip: [u8; 4],
    dst: [u8; 4],
) -> Result<Hop, DropReason> {
    fib_next_hop(ctx, cfg, src_ip, dst, Some(cfg.bgp_table))
}

#[inline(always)]
fn fib_next_hop(
    ctx: &TcContext,
    cfg: &NodeConfig,
    src_ip: [u8; 4],
    next_ip: [u8; 4],
    bgp_table: Option<u32>,
) -> Result<Hop, DropReason> {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let key = Ipv4Key { addr: next_ip };
    if let Some(hop) = WEFT_NEXT_HOPS.get_ptr(key)
        && unsafe { (*hop).expires_ns } > now
    {
        return Ok(Hop::Resolved(unsafe { *hop }));
    }
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    // An egress lookup with the underlay NIC as the output device: only routes out of it
    // match. A route in weft's BGP table through any other device (weft_host, a pod's veth)
    // would bring the packet back into weft; the FIB does not return it (no usable route).
    fib.ifindex = cfg.underlay_ifindex;
    // Any length fits: the lookup only reports the route's MTU back in `mtu_result`.
    fib.__bindgen_anon_1.tot_len = 1;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src_ip);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(next_ip);
    let mut flags = BPF_FIB_LOOKUP_OUTPUT;
    if let Some(table) = bgp_table {
        fib.__bindgen_anon_5.tbid = table;
        flags |= BPF_FIB_LOOKUP_DIRECT | BPF_FIB_LOOKUP_TBID;
    }
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    // After the lookup, ipv4_dst holds the next hop (a gateway, or the node itself).
    let gateway = unsafe { fib.__bindgen_anon_4.ipv4_dst }.to_ne_bytes();
    if bgp_table.is_some()
        && (rc == BPF_FIB_LKUP_RET_SUCCESS as i64 || rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64)
        && u32::from_ne_bytes(gateway) == u32::from_ne_bytes(cfg.node_ip)
    {
        // weft's table sends the packet to this node's own address (the kernel accepts such a
        // gateway): it would come straight back.
        return Err(DropReason::RouteLoop);
    }
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let onlink = u32::from_ne_bytes(gateway) == u32::from_ne_bytes(next_ip);
        let route_mtu = unsafe { fib.__bindgen_anon_1.mtu_result } as u32;
        let hop = NextHop {
            ifindex: fib.ifindex,
            mtu: crate::mtu::with_learned(route_mtu, next_ip, now),
            smac: fib.smac,
            dmac: fib.dmac,
            flags: if onlink { NEXT_HOP_F_ONLINK } else { 0 },
            expires_ns: now + NEXT_HOP_TTL_NS,
        };
        // Best effort: a full cache only means the next packet looks up again.
        let _ = WEFT_NEXT_HOPS.insert(key, hop, 0);
        return Ok(Hop::Resolved(hop));
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Ok(Hop::Unresolved {
            ifindex: fib.ifindex,
            gateway,
        });
    }
    if rc == BPF_FIB_LKUP_RET_FWD_DISABLED as i64 {
        return Err(DropReason::ForwardingDisabled);
    }
    Err(match bgp_table {
        Some(_) => DropReason::NoBgpRoute,
        None => DropReason::NoUnderlayRoute,
    })
}

/// Sends the (encapsulated or routed) frame to `hop`. Returns the verdict and whether the
/// neighbour subsystem has to resolve the next hop.
#[inline(always)]
pub fn send(ctx: &TcContext, hop: &Hop) -> Result<(i32, bool), DropReason> {
    match hop {
        Hop::Resolved(hop) => {
            let (data, data_end) = (ctx.data(), ctx.data_end());
            let eth = ptr_at::<EthHdr>(data, data_end, 0).ok_or(DropReason::StoreFailed)?;
            unsafe {
                put(&mut (*eth).dst, hop.dmac);
                put(&mut (*eth).src, hop.smac);
                (*eth).ethertype = ETH_P_IPV4.to_be_bytes();
            }
            Ok((unsafe { bpf_redirect(hop.ifindex, 0) } as i32, false))
        }
        Hop::Unresolved { ifindex, gateway } => {
            let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
            nh.nh_family = AF_INET as u32;
            nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(*gateway);
            let ret = unsafe {
                bpf_redirect_neigh(
                    *ifindex,
                    &mut nh,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            } as i32;
            Ok((ret, true))
        }
    }
}

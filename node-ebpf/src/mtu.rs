//! Path MTU toward peers: what a packet may measure once encapsulated.
//!
//! Two sources: the route's MTU as the kernel's FIB reports it (cached with the next hop: a
//! route `mtu` metric or the underlay device's), and what this node learned from ICMP
//! fragmentation-needed about its own tunnel packets (`learn`). The kernel learns nothing from
//! those: no socket sent the tunnel packets, so it has no one to tell.
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use weft_common::{Ipv4Key, NodeConfig, PATH_MTU_MIN, PATH_MTU_TTL_NS, PathMtu, Stat};

use crate::{
    counters::count,
    encap::Hop,
    maps::{WEFT_NEXT_HOPS, WEFT_PATH_MTU},
    parse::{
        ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_HLEN, IPPROTO_ICMP, IPPROTO_IPIP, IPPROTO_TCP,
        IPPROTO_UDP, IPV4_HLEN, IcmpHdr, Ipv4Hdr, ptr_at,
    },
    route,
};

/// The smaller of `mtu` (0: unknown) and the path MTU learned toward `node`, if one is still
/// valid at `now_ns`.
#[inline(always)]
pub fn with_learned(mtu: u32, node: [u8; 4], now_ns: u64) -> u32 {
    if let Some(learned) = WEFT_PATH_MTU.get_ptr(Ipv4Key { addr: node }) {
        let learned = unsafe { &*learned };
        if learned.expires_ns > now_ns && (mtu == 0 || learned.mtu < mtu) {
            return learned.mtu;
        }
    }
    mtu
}

/// The path MTU toward `node` (0: unknown, the kernel checks the device MTU as usual). A
/// resolved next hop carries it already: the learned path MTU is folded in when the hop is
/// resolved (once a second per peer), and learning a new one drops the cached hop, so the
/// per-packet path reads one map, not two.
#[inline(always)]
pub fn path_mtu(hop: &Hop, node: [u8; 4]) -> u32 {
    match hop {
        Hop::Resolved(h) => h.mtu,
        Hop::Unresolved { .. } => with_learned(0, node, unsafe { bpf_ktime_get_coarse_ns() }),
    }
}

/// The length of the IPv4 packets `ip` stands for on the wire: its own length, or for a GSO
/// packet the length of each segment (headers plus `gso_size`).
#[inline(always)]
pub fn segment_len(ctx: &TcContext, ip: &Ipv4Hdr, l4: usize) -> u32 {
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return ip.tot_len() as u32;
    }
    let l4_hdr = match ip.protocol {
        // Data offset: the high nibble of byte 12, in 32-bit words.
        IPPROTO_TCP => match ptr_at::<[u8; 13]>(ctx.data(), ctx.data_end(), l4) {
            Some(tcp) => ((unsafe { (*tcp)[12] } >> 4) as u32) * 4,
            None => 20,
        },
        IPPROTO_UDP => 8,
        _ => 0,
    };
    ip.header_len() as u32 + l4_hdr + gso_size
}

/// Learns from an ICMP fragmentation-needed addressed to this node about one of its tunnel
/// packets (VXLAN to a peer's port, or IPIP, sent from this node to a known node). Only ever
/// lowers the path MTU, and never below `PATH_MTU_MIN`. Returns whether it learned.
#[inline(always)]
pub fn learn(data: usize, data_end: usize, cfg: &NodeConfig, ip: &Ipv4Hdr, l4: usize) -> bool {
    if ip.protocol != IPPROTO_ICMP || ip.daddr != cfg.node_ip || ip.is_fragment() {
        return false;
    }
    let Some(icmp) = ptr_at::<IcmpHdr>(data, data_end, l4) else {
        return false;
    };
    let icmp = unsafe { &*icmp };
    if icmp.kind != ICMP_DEST_UNREACH || icmp.code != ICMP_FRAG_NEEDED {
        return false;
    }
    let quoted = l4 + ICMP_HLEN;
    let Some(inner) = ptr_at::<Ipv4Hdr>(data, data_end, quoted) else {
        return false;
    };
    let inner = unsafe { &*inner };
    if inner.version() != 4 || inner.header_len() < IPV4_HLEN || inner.saddr != cfg.node_ip {
        return false;
    }
    let ours = match inner.protocol {
        IPPROTO_IPIP => true,
        IPPROTO_UDP => {
            let at = quoted + (inner.header_len() & 0x3c);
            match ptr_at::<[u8; 4]>(data, data_end, at) {
                Some(ports) => {
                    let ports = unsafe { *ports };
                    u16::from_be_bytes([ports[2], ports[3]]) == cfg.vxlan_port
                }
                None => false,
            }
        }
        _ => false,
    };
    if !ours || route::node(inner.daddr).is_none() {
        return false;
    }
    let mtu = core::cmp::max(
        u16::from_be_bytes([icmp.rest[2], icmp.rest[3]]) as u32,
        PATH_MTU_MIN,
    );
    let key = Ipv4Key { addr: inner.daddr };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(known) = WEFT_PATH_MTU.get_ptr(key) {
        let known = unsafe { &*known };
        if known.expires_ns > now && known.mtu <= mtu {
            return false;
        }
    }
    let _ = WEFT_PATH_MTU.insert(
        key,
        PathMtu {
            mtu,
            _pad: 0,
            expires_ns: now + PATH_MTU_TTL_NS,
        },
        0,
    );
    // The cached next hop carries the old path MTU: the next packet resolves it afresh.
    let _ = WEFT_NEXT_HOPS.remove(key);
    count(Stat::PathMtuLearned);
    true
}

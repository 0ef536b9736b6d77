//! ICMP destination unreachable (RFC 792), generated in tc from the packet it is about: the frame
//! is cut to the original IP header and 64 bytes of its payload (what the error quotes), 28
//! bytes of room are made after the Ethernet header for the new IPv4 and ICMP headers, and the
//! frame goes back out the interface it came in on, addresses swapped.
//!
//! Two codes: fragmentation-needed (RFC 1191), for a packet too big for the tunnel (the
//! kernel's own tunnels answer the same way, `skb_tunnel_check_pmtu`; the stack cannot do it for
//! weft, which forwards pod traffic without a route per peer), and host unreachable, for a
//! packet to an address of the cluster network that nobody holds (what the kernel answers for a
//! route of type `unreachable`).
use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use weft_common::{DropReason, Stat};

use crate::{
    checksum,
    counters::count,
    parse::{
        ETH_HLEN, ETH_P_IPV4, EthHdr, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_HLEN,
        ICMP_HOST_UNREACH, IPPROTO_ICMP, IPV4_HLEN, IcmpHdr, Ipv4Hdr, ptr_at,
    },
};

/// Bytes of the original datagram's payload the error quotes (beyond its IP header).
const QUOTED_PAYLOAD: usize = 64;
/// ICMP header plus the largest quote (IPv4 header with options, 64 bytes), rounded up to
/// four bytes for `bpf_csum_diff`.
const CSUM_BUF: usize = ICMP_HLEN + 60 + QUOTED_PAYLOAD;
/// TTL and TOS of the error, as the kernel's `icmp_send` sets them (precedence "internetwork
/// control").
const TTL: u8 = 64;
const TOS: u8 = 0xc0;

/// Answers the frame in `ctx` (Ethernet/IPv4, headers linear) with an ICMP fragmentation-needed
/// from `source` announcing `mtu`, sent back out of `ifindex`. The original packet is consumed.
#[inline(always)]
pub fn frag_needed(
    ctx: &TcContext,
    source: [u8; 4],
    mtu: u32,
    ifindex: u32,
) -> Result<i32, DropReason> {
    let verdict = dest_unreachable(ctx, source, ICMP_FRAG_NEEDED, mtu, ifindex)?;
    count(Stat::FragNeededSent);
    Ok(verdict)
}

/// Whether an ICMP error may be sent about the packet `ip` (RFC 1122 3.2.2, RFC 1812 4.3.2.7):
/// never about an ICMP error, nor about a fragment other than the first.
#[inline(always)]
pub fn may_answer(data: usize, data_end: usize, ip: &Ipv4Hdr) -> bool {
    if u16::from_be_bytes(ip.frag_off) & 0x1fff != 0 {
        return false;
    }
    if ip.protocol != IPPROTO_ICMP {
        return true;
    }
    match ptr_at::<IcmpHdr>(data, data_end, ETH_HLEN + ip.header_len()) {
        // Echo request and reply, timestamp, information and address mask queries: not errors.
        Some(icmp) => matches!(unsafe { (*icmp).kind }, 0 | 8 | 13 | 14 | 15 | 16 | 17 | 18),
        None => false,
    }
}

/// Answers the frame in `ctx` with an ICMP host unreachable from `source` (the address nobody
/// holds), sent back out of `ifindex`. The original packet is consumed.
#[inline(always)]
pub fn host_unreachable(ctx: &TcContext, source: [u8; 4], ifindex: u32) -> Result<i32, DropReason> {
    dest_unreachable(ctx, source, ICMP_HOST_UNREACH, 0, ifindex)
}

/// An ICMP destination unreachable of `code` (with `mtu` as the next-hop MTU for
/// fragmentation-needed, 0 otherwise) from `source`, sent back out of `ifindex`.
#[inline(always)]
fn dest_unreachable(
    ctx: &TcContext,
    source: [u8; 4],
    code: u8,
    mtu: u32,
    ifindex: u32,
) -> Result<i32, DropReason> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let eth = unsafe { *ptr_at::<EthHdr>(data, data_end, 0).ok_or(DropReason::StoreFailed)? };
    let ip =
        unsafe { *ptr_at::<Ipv4Hdr>(data, data_end, ETH_HLEN).ok_or(DropReason::StoreFailed)? };
    // A constant upper bound the verifier can follow.
    let ihl = ip.header_len() & 0x3c;
    let quote = core::cmp::min(ip.tot_len(), ihl + QUOTED_PAYLOAD);
    if quote < IPV4_HLEN {
        return Err(DropReason::MalformedIpv4);
    }
    // Cut the frame to the quote (also drops any GSO state), then make room for the headers.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + quote) as u32, 0) } != 0 {
        return Err(DropReason::AdjustRoomFailed);
    }
    ctx.adjust_room((IPV4_HLEN + ICMP_HLEN) as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| DropReason::AdjustRoomFailed)?;

    // The ICMP checksum covers its header and the quote: both go into one zero-padded buffer.
    let mut buf = [0u32; CSUM_BUF / 4];
    let bytes = buf.as_mut_ptr() as *mut u8;
    let icmp_hdr: [u8; 8] = [
        ICMP_DEST_UNREACH,
        code,
        0,
        0,
        0,
        0,
        (mtu >> 8) as u8,
        mtu as u8,
    ];
    unsafe { core::ptr::copy_nonoverlapping(icmp_hdr.as_ptr(), bytes, ICMP_HLEN) };
    let quoted_at = ETH_HLEN + IPV4_HLEN + ICMP_HLEN;
    let n = (quote as u32) & 0x7f;
    if n == 0
        || unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                quoted_at as u32,
                bytes.add(ICMP_HLEN) as *mut _,
                n,
            )
        } != 0
    {
        return Err(DropReason::StoreFailed);
    }
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.as_mut_ptr(),
            CSUM_BUF as u32,
            0,
        )
    };
    // Folded in memory order: stored as is, it is the checksum in network order.
    let csum = !checksum::fold(sum as u32);
    let mut icmp = icmp_hdr;
    icmp[2..4].copy_from_slice(&csum.to_ne_bytes());

    let tot_len = (IPV4_HLEN + ICMP_HLEN + quote) as u16;
    let words: [u16; 10] = [
        u16::from_be_bytes([0x45, TOS]).to_be(),
        tot_len.to_be(),
        0,
        0,
        u16::from_be_bytes([TTL, IPPROTO_ICMP]).to_be(),
        0,
        u16::from_be_bytes([source[0], source[1]]).to_be(),
        u16::from_be_bytes([source[2], source[3]]).to_be(),
        u16::from_be_bytes([ip.saddr[0], ip.saddr[1]]).to_be(),
        u16::from_be_bytes([ip.saddr[2], ip.saddr[3]]).to_be(),
    ];
    let new_ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: TOS,
        tot_len: tot_len.to_be_bytes(),
        id: [0, 0],
        frag_off: [0, 0],
        ttl: TTL,
        protocol: IPPROTO_ICMP,
        check: checksum::ipv4_header(&words).to_be_bytes(),
        saddr: source,
        daddr: ip.saddr,
    };
    let new_eth = EthHdr {
        dst: eth.src,
        src: eth.dst,
        ethertype: ETH_P_IPV4.to_be_bytes(),
    };
    ctx.store(0, &new_eth, 0)
        .map_err(|_| DropReason::StoreFailed)?;
    ctx.store(ETH_HLEN, &new_ip, 0)
        .map_err(|_| DropReason::StoreFailed)?;
    ctx.store(ETH_HLEN + IPV4_HLEN, &icmp, 0)
        .map_err(|_| DropReason::StoreFailed)?;
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

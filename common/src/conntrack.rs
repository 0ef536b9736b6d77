//! weft's connection tracking: one entry per flow (both directions share it), keyed by the
//! IPv4 5-tuple in a canonical order, recording how the flow entered this node's datapath.
//!
//! - **Fast** flows are pod to pod with no translation: weft carried their first packet
//!   itself, so every later packet may skip the host stack (`bpf_redirect_peer`, or straight
//!   into the tunnel).
//! - **Stack** flows were carried by the host stack (a Service's DNAT, a NodePort, a hostPort,
//!   masquerade, or a flow not seen from its start): the stack's conntrack may hold NAT state
//!   for them, so their packets keep going through the stack in both directions.
//!
//! The state machine and timeouts are pure functions here, shared by the datapath and the
//! agent (GC, CLI) and unit-tested without a kernel.

/// Default capacity of the conntrack map (the agent's `--conntrack-max`).
pub const CT_MAX_DEFAULT: u32 = 524_288;

/// TCP: a SYN seen, the handshake not answered yet.
pub const CT_TIMEOUT_TCP_SYN_S: u32 = 60;
/// TCP: both directions seen. Long, as Cilium's 6 h: an idle connection whose entry expired
/// is still forwarded correctly (its next packet, not a SYN, goes through the stack).
pub const CT_TIMEOUT_TCP_ESTABLISHED_S: u32 = 21_600;
/// TCP: a RST, or a FIN from both sides.
pub const CT_TIMEOUT_TCP_CLOSING_S: u32 = 10;
/// UDP, ICMP and other protocols, one direction seen so far.
pub const CT_TIMEOUT_OTHER_S: u32 = 60;
/// UDP, ICMP and other protocols, both directions seen. Longer than the kernel's
/// `nf_conntrack_udp_timeout_stream` (120 s), so a translated flow's entry outlives the
/// kernel's NAT state for it and its replies never take the fast path by mistake.
pub const CT_TIMEOUT_OTHER_REPLIED_S: u32 = 180;
/// An entry's expiry is written back only when it moves by more than this: a busy flow
/// writes its entry about once a second, not once per packet.
pub const CT_REFRESH_SLACK_S: u32 = 1;

/// How a flow entered this node's datapath (`CtEntry::origin`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtOrigin {
    /// Pod to pod, carried by weft from its first packet: the fast path may carry it.
    Fast = 1,
    /// Carried by the host stack: its packets go through the stack.
    Stack = 2,
}

impl CtOrigin {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Fast),
            2 => Some(Self::Stack),
            _ => None,
        }
    }
}

/// `CtEntry::flags`: a packet from the low endpoint of the key was seen.
pub const CT_F_SEEN_LO: u8 = 1 << 0;
/// A packet from the high endpoint was seen.
pub const CT_F_SEEN_HI: u8 = 1 << 1;
/// TCP SYN from the low / high endpoint.
pub const CT_F_SYN_LO: u8 = 1 << 2;
pub const CT_F_SYN_HI: u8 = 1 << 3;
/// TCP FIN from the low / high endpoint.
pub const CT_F_FIN_LO: u8 = 1 << 4;
pub const CT_F_FIN_HI: u8 = 1 << 5;
/// TCP RST from either side.
pub const CT_F_RST: u8 = 1 << 6;
/// The high endpoint sent the flow's first packet (otherwise the low one did).
pub const CT_F_INIT_HI: u8 = 1 << 7;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// TCP header flag bits (byte 13).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A flow, direction-free: the (address, port) endpoint that sorts lower comes first, so a
/// packet and its reply (and an ICMP error quoting either) find the same entry. Aligned to 4
/// (the layout is the same, every field is byte-sized): built on the stack of the datapath,
/// a byte-aligned key has its padding zeroed by a `memset` subprogram call per packet.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtKey {
    pub addr_lo: [u8; 4],
    pub addr_hi: [u8; 4],
    /// Ports in network order (ICMP echo: the identifier on both sides; protocols without
    /// ports: zero).
    pub port_lo: [u8; 2],
    pub port_hi: [u8; 2],
    pub protocol: u8,
    /// Padding, as scalars: a zeroed byte array is a `memset` call in the datapath.
    pub _pad: u8,
    pub _pad2: u16,
}

impl CtKey {
    /// The key of a packet from `src:sport` to `dst:dport`, and whether the packet comes from
    /// the high endpoint.
    #[inline(always)]
    pub fn of(
        src: [u8; 4],
        sport: [u8; 2],
        dst: [u8; 4],
        dport: [u8; 2],
        protocol: u8,
    ) -> (Self, bool) {
        // Integers, not array comparisons: those become `memcmp` calls, which BPF lacks.
        let (s, d) = (u32::from_be_bytes(src), u32::from_be_bytes(dst));
        let src_is_hi = s > d || (s == d && u16::from_be_bytes(sport) > u16::from_be_bytes(dport));
        let (lo, hi) = if src_is_hi {
            ((dst, dport), (src, sport))
        } else {
            ((src, sport), (dst, dport))
        };
        (
            Self {
                addr_lo: lo.0,
                addr_hi: hi.0,
                port_lo: lo.1,
                port_hi: hi.1,
                protocol,
                _pad: 0,
                _pad2: 0,
            },
            src_is_hi,
        )
    }
}

/// One tracked flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtEntry {
    /// Coarse monotonic time (`bpf_ktime_get_coarse_ns` in seconds, `CLOCK_MONOTONIC` in
    /// userspace) after which the entry is dead: lookups treat it as absent, the agent's GC
    /// deletes it.
    pub expires_s: u32,
    /// When the entry was created (same clock).
    pub created_s: u32,
    /// NetworkPolicy: the policy revision the flow was admitted under (0: none evaluated).
    /// Reserved for the policy datapath: a later revision re-evaluates established flows.
    pub policy_rev: u32,
    /// A [`CtOrigin`] as u8.
    pub origin: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// NetworkPolicy: verdict bits of `policy_rev` (reserved, zero today).
    pub policy: u8,
    pub _pad: u8,
}

/// A TCP packet that opens a connection: SYN without ACK.
#[inline(always)]
pub fn tcp_opens(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The flags of an entry after a packet with `tcp_flags` (zero for other protocols) from the
/// high endpoint (`from_hi`) or the low one.
#[inline(always)]
pub fn next_flags(flags: u8, protocol: u8, tcp_flags: u8, from_hi: bool) -> u8 {
    let mut f = flags | if from_hi { CT_F_SEEN_HI } else { CT_F_SEEN_LO };
    if protocol == IPPROTO_TCP {
        if tcp_flags & TCP_SYN != 0 {
            f |= if from_hi { CT_F_SYN_HI } else { CT_F_SYN_LO };
        }
        if tcp_flags & TCP_FIN != 0 {
            f |= if from_hi { CT_F_FIN_HI } else { CT_F_FIN_LO };
        }
        if tcp_flags & TCP_RST != 0 {
            f |= CT_F_RST;
        }
    }
    f
}

/// A TCP flow that is over (RST, or FIN both ways): a new SYN on its tuple starts afresh.
#[inline(always)]
pub fn closing(protocol: u8, flags: u8) -> bool {
    protocol == IPPROTO_TCP
        && (flags & CT_F_RST != 0
            || flags & (CT_F_FIN_LO | CT_F_FIN_HI) == CT_F_FIN_LO | CT_F_FIN_HI)
}

/// How long an entry in state `flags` lives after its last packet.
#[inline(always)]
pub fn timeout_s(protocol: u8, flags: u8) -> u32 {
    let both = flags & (CT_F_SEEN_LO | CT_F_SEEN_HI) == CT_F_SEEN_LO | CT_F_SEEN_HI;
    if protocol == IPPROTO_TCP {
        if closing(protocol, flags) {
            CT_TIMEOUT_TCP_CLOSING_S
        } else if both {
            CT_TIMEOUT_TCP_ESTABLISHED_S
        } else {
            CT_TIMEOUT_TCP_SYN_S
        }
    } else if both {
        CT_TIMEOUT_OTHER_REPLIED_S
    } else {
        CT_TIMEOUT_OTHER_S
    }
}

/// A new entry for a flow whose first packet (seen now) has `tcp_flags` and comes from the
/// high endpoint or not.
#[inline(always)]
pub fn new_entry(
    origin: CtOrigin,
    protocol: u8,
    tcp_flags: u8,
    from_hi: bool,
    now_s: u32,
) -> CtEntry {
    let mut flags = next_flags(0, protocol, tcp_flags, from_hi);
    if from_hi {
        flags |= CT_F_INIT_HI;
    }
    CtEntry {
        expires_s: now_s.wrapping_add(timeout_s(protocol, flags)),
        created_s: now_s,
        policy_rev: 0,
        origin: origin as u8,
        flags,
        policy: 0,
        _pad: 0,
    }
}

/// The entry's state after a packet: new flags and expiry, and whether they differ enough
/// from the stored ones to be written back (flags changed, or the expiry moved by more than
/// `CT_REFRESH_SLACK_S`).
#[inline(always)]
pub fn refreshed(
    entry: &CtEntry,
    protocol: u8,
    tcp_flags: u8,
    from_hi: bool,
    now_s: u32,
) -> (u8, u32, bool) {
    let flags = next_flags(entry.flags, protocol, tcp_flags, from_hi);
    let expires = now_s.wrapping_add(timeout_s(protocol, flags));
    let write = flags != entry.flags || expires > entry.expires_s.wrapping_add(CT_REFRESH_SLACK_S);
    (flags, expires, write)
}

/// Whether the entry is still alive at `now_s`.
#[inline(always)]
pub fn alive(entry: &CtEntry, now_s: u32) -> bool {
    entry.expires_s >= now_s
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 4] = [10, 244, 1, 2];
    const B: [u8; 4] = [10, 244, 2, 3];

    #[test]
    fn a_packet_and_its_reply_share_a_key() {
        let (k1, hi1) = CtKey::of(A, 40000u16.to_be_bytes(), B, 80u16.to_be_bytes(), 6);
        let (k2, hi2) = CtKey::of(B, 80u16.to_be_bytes(), A, 40000u16.to_be_bytes(), 6);
        assert_eq!(k1, k2);
        assert_ne!(hi1, hi2);
        assert_eq!(k1.addr_lo, A);
        assert_eq!(k1.port_hi, 80u16.to_be_bytes());
        // Same addresses, other ports: another flow.
        let (k3, _) = CtKey::of(A, 40001u16.to_be_bytes(), B, 80u16.to_be_bytes(), 6);
        assert_ne!(k1, k3);
        // Same tuple, other protocol: another flow.
        let (k4, _) = CtKey::of(A, 40000u16.to_be_bytes(), B, 80u16.to_be_bytes(), 17);
        assert_ne!(k1, k4);
    }

    #[test]
    fn tcp_states_and_timeouts() {
        let e = new_entry(CtOrigin::Fast, IPPROTO_TCP, TCP_SYN, false, 100);
        assert_eq!(e.flags, CT_F_SEEN_LO | CT_F_SYN_LO);
        assert_eq!(e.expires_s, 100 + CT_TIMEOUT_TCP_SYN_S);
        assert!(tcp_opens(TCP_SYN) && !tcp_opens(TCP_SYN | TCP_ACK) && !tcp_opens(TCP_ACK));
        // SYN-ACK from the other side: established.
        let (f, exp, write) = refreshed(&e, IPPROTO_TCP, TCP_SYN | TCP_ACK, true, 101);
        assert!(write);
        assert_eq!(f & (CT_F_SEEN_HI | CT_F_SYN_HI), CT_F_SEEN_HI | CT_F_SYN_HI);
        assert_eq!(exp, 101 + CT_TIMEOUT_TCP_ESTABLISHED_S);
        let est = CtEntry {
            flags: f,
            expires_s: exp,
            ..e
        };
        // The next packet a second later writes nothing (same flags, expiry moved by 1 s).
        let (_, _, write) = refreshed(&est, IPPROTO_TCP, TCP_ACK, false, 102);
        assert!(!write);
        let (_, _, write) = refreshed(&est, IPPROTO_TCP, TCP_ACK, false, 103);
        assert!(write, "moved by more than the slack");
        // FIN one way: still established; both ways: closing.
        let (f, exp, _) = refreshed(&est, IPPROTO_TCP, TCP_FIN | TCP_ACK, false, 110);
        assert!(!closing(IPPROTO_TCP, f));
        assert_eq!(exp, 110 + CT_TIMEOUT_TCP_ESTABLISHED_S);
        let half = CtEntry { flags: f, ..est };
        let (f, exp, _) = refreshed(&half, IPPROTO_TCP, TCP_FIN | TCP_ACK, true, 111);
        assert!(closing(IPPROTO_TCP, f));
        assert_eq!(exp, 111 + CT_TIMEOUT_TCP_CLOSING_S);
        // RST closes.
        let (f, _, _) = refreshed(&est, IPPROTO_TCP, TCP_RST, true, 120);
        assert!(closing(IPPROTO_TCP, f));
    }

    #[test]
    fn udp_lives_longer_once_answered_and_expiry_is_checked() {
        let e = new_entry(CtOrigin::Stack, IPPROTO_UDP, 0, true, 1000);
        assert_eq!(e.flags, CT_F_SEEN_HI | CT_F_INIT_HI);
        assert_eq!(e.expires_s, 1000 + CT_TIMEOUT_OTHER_S);
        let (f, exp, _) = refreshed(&e, IPPROTO_UDP, 0, false, 1001);
        assert_eq!(exp, 1001 + CT_TIMEOUT_OTHER_REPLIED_S);
        assert_eq!(f & CT_F_INIT_HI, CT_F_INIT_HI, "the initiator is kept");
        assert!(alive(&e, 1060));
        assert!(!alive(&e, 1061));
        const {
            assert!(
                CT_TIMEOUT_OTHER_REPLIED_S > 120,
                "outlives the kernel's UDP stream timeout"
            )
        };
    }
}

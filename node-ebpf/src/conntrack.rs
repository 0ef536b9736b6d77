//! Connection tracking in the datapath (state machine and timeouts: `weft_common::conntrack`).
//!
//! A packet between two pods is carried by the fast path only if its flow is a known fast flow,
//! or if it opens a new flow (TCP SYN, any UDP datagram, ICMP echo request, other protocols):
//! that creates a fast entry. A packet of a stack flow, or one that continues a flow weft never
//! saw (a TCP segment without an entry), goes to the host stack, whose conntrack undoes any
//! translation. `to_pod` and `from_host` record what the stack carries as stack flows.
//!
//! NetworkPolicy rides on the entries: a flow without a live entry is judged
//! (`policy::admit`) before one is created, the entry records the verdict's revision, and a
//! packet on a live entry passes unless a policy change since then denies its flow
//! (`policy::established`).
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use weft_common::{
    DropReason, Stat,
    conntrack::{CtEntry, CtKey, CtOrigin, alive, closing, new_entry, refreshed, tcp_opens},
};

use crate::{
    counters::count,
    maps::WEFT_CT,
    parse::{
        ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_HLEN, IPPROTO_ICMP,
        IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, IcmpHdr, Ipv4Hdr, ptr_at,
    },
    policy::{self, Check},
};

/// The fragment offset bits of an IPv4 header's flags/offset field.
const IPV4_OFFSET_MASK: u16 = 0x1fff;

/// ICMP error types whose payload quotes the packet that caused them.
const ICMP_SOURCE_QUENCH: u8 = 4;
const ICMP_REDIRECT: u8 = 5;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// What conntrack makes of a packet.
pub enum Track {
    /// A packet of flow `key`, sent by the key's high endpoint or not.
    Flow {
        key: CtKey,
        from_hi: bool,
        tcp_flags: u8,
        /// It may open a flow (TCP SYN without ACK, UDP, ICMP echo request, others).
        opens: bool,
        /// The first fragment of a datagram: it carries the ports, so the stack's carrying it
        /// is recorded, but the fast path never takes it (the other fragments, portless, go
        /// to the stack, and a datagram must take one path).
        fragment: bool,
    },
    /// An ICMP error about a packet of flow `key`.
    Related { key: CtKey },
    /// Not trackable by its headers: a fragment after the first (the ports are in the first
    /// one), a truncated L4 header, an unknown ICMP type. The host stack's business.
    Untracked,
}

/// The current coarse monotonic time in seconds (the clock of `CtEntry::expires_s`).
#[inline(always)]
pub fn now_s() -> u32 {
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// Ports of a TCP, UDP or SCTP header at `l4` (all start with source and destination port).
#[inline(always)]
fn ports(data: usize, data_end: usize, l4: usize) -> Option<([u8; 2], [u8; 2])> {
    let p = ptr_at::<[u8; 4]>(data, data_end, l4)?;
    let p = unsafe { *p };
    Some(([p[0], p[1]], [p[2], p[3]]))
}

/// The flow of an ICMP error's quoted packet (its header and first eight bytes) at `quoted`.
#[inline(always)]
fn quoted_flow(data: usize, data_end: usize, quoted: usize) -> Option<CtKey> {
    let inner = unsafe { &*ptr_at::<Ipv4Hdr>(data, data_end, quoted)? };
    if inner.version() != 4 || inner.header_len() < IPV4_HLEN || inner.is_fragment() {
        return None;
    }
    // The quoted header's length is bounded so that the verifier sees a constant range.
    let l4 = quoted + (inner.header_len() & 0x3c);
    let (sport, dport) = match inner.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => ports(data, data_end, l4)?,
        IPPROTO_ICMP => {
            let icmp = unsafe { &*ptr_at::<IcmpHdr>(data, data_end, l4)? };
            if icmp.kind != ICMP_ECHO_REQUEST && icmp.kind != ICMP_ECHO_REPLY {
                return None;
            }
            let id = [icmp.rest[0], icmp.rest[1]];
            (id, id)
        }
        _ => ([0; 2], [0; 2]),
    };
    Some(CtKey::of(inner.saddr, sport, inner.daddr, dport, inner.protocol).0)
}

/// Classifies the IPv4 packet `ip`, whose L4 header starts at offset `l4` of `[data,
/// data_end)`.
#[inline(always)]
pub fn track(data: usize, data_end: usize, ip: &Ipv4Hdr, l4: usize) -> Track {
    let fragment = ip.is_fragment();
    if u16::from_be_bytes(ip.frag_off) & IPV4_OFFSET_MASK != 0 {
        return Track::Untracked;
    }
    let (sport, dport, tcp_flags, opens) = match ip.protocol {
        IPPROTO_TCP => {
            let Some((sport, dport)) = ports(data, data_end, l4) else {
                return Track::Untracked;
            };
            // A whole header (20 bytes) or nothing: byte 13 holds the flags.
            let Some(flags) = ptr_at::<[u8; 20]>(data, data_end, l4) else {
                return Track::Untracked;
            };
            let flags = unsafe { (*flags)[13] };
            (sport, dport, flags, tcp_opens(flags))
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            // A whole header (UDP's 8 bytes, SCTP's common header is 12) or nothing.
            if ptr_at::<[u8; 8]>(data, data_end, l4).is_none() {
                return Track::Untracked;
            }
            let Some((sport, dport)) = ports(data, data_end, l4) else {
                return Track::Untracked;
            };
            (sport, dport, 0, true)
        }
        IPPROTO_ICMP => {
            let Some(icmp) = ptr_at::<IcmpHdr>(data, data_end, l4) else {
                return Track::Untracked;
            };
            let icmp = unsafe { &*icmp };
            match icmp.kind {
                ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY => {
                    let id = [icmp.rest[0], icmp.rest[1]];
                    (id, id, 0, icmp.kind == ICMP_ECHO_REQUEST)
                }
                ICMP_DEST_UNREACH
                | ICMP_SOURCE_QUENCH
                | ICMP_REDIRECT
                | ICMP_TIME_EXCEEDED
                | ICMP_PARAMETER_PROBLEM => {
                    return match quoted_flow(data, data_end, l4 + ICMP_HLEN) {
                        Some(key) => Track::Related { key },
                        None => Track::Untracked,
                    };
                }
                _ => return Track::Untracked,
            }
        }
        _ => ([0; 2], [0; 2], 0, true),
    };
    let (key, from_hi) = CtKey::of(ip.saddr, sport, ip.daddr, dport, ip.protocol);
    Track::Flow {
        key,
        from_hi,
        tcp_flags,
        opens,
        fragment,
    }
}

/// The live entry of `key`, if any.
#[inline(always)]
fn live_entry(key: &CtKey, now: u32) -> Option<*mut CtEntry> {
    let entry = WEFT_CT.get_ptr_mut(key)?;
    if alive(unsafe { &*entry }, now) {
        Some(entry)
    } else {
        None
    }
}

/// Updates a live entry for a packet of its flow, writing only when the state changed or the
/// expiry moved by more than the slack (in place: no hash update).
#[inline(always)]
fn touch(entry: *mut CtEntry, protocol: u8, tcp_flags: u8, from_hi: bool, now: u32) {
    let (flags, expires, write) = refreshed(unsafe { &*entry }, protocol, tcp_flags, from_hi, now);
    if write {
        unsafe {
            (*entry).flags = flags;
            (*entry).expires_s = expires;
        }
    }
}

/// Where a packet between two pods goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// weft carries it (fast path).
    Fast,
    /// The host stack carries it.
    Stack,
}

/// The destination port of a packet of flow `key` sent by its high endpoint or not.
#[inline(always)]
fn dport(key: &CtKey, from_hi: bool) -> [u8; 2] {
    if from_hi { key.port_lo } else { key.port_hi }
}

/// The path of a packet weft could carry between pods, updating (or creating) its entry;
/// `Err` when NetworkPolicy denies it (counted).
#[inline(always)]
pub fn path(track: &Track, check: &Check) -> Result<Path, DropReason> {
    let now = now_s();
    match track {
        Track::Untracked => {
            policy::untracked(check).map_err(|d| d.count())?;
            Ok(Path::Stack)
        }
        // An error about a fast flow goes its way: the stack never saw the flow, so its
        // conntrack cannot relate the error (kube-proxy drops what it finds INVALID).
        Track::Related { key } => match live_entry(key, now) {
            Some(e) if policy::allows_related(e) => {
                if unsafe { (*e).origin } == CtOrigin::Fast as u8 {
                    Ok(Path::Fast)
                } else {
                    Ok(Path::Stack)
                }
            }
            _ => {
                policy::unrelated(check).map_err(|d| d.count())?;
                Ok(Path::Stack)
            }
        },
        Track::Flow {
            key,
            from_hi,
            tcp_flags,
            opens,
            fragment,
        } => {
            let mut live = live_entry(key, now);
            if let Some(e) = live {
                let origin = unsafe { (*e).origin };
                // A new connection on the tuple of a finished fast one starts afresh.
                let reopened = *opens
                    && origin == CtOrigin::Fast as u8
                    && closing(key.protocol, unsafe { (*e).flags });
                if reopened {
                    live = None;
                } else {
                    policy::established(e, key).map_err(|d| d.count())?;
                    if *fragment {
                        return Ok(Path::Stack);
                    }
                    touch(e, key.protocol, *tcp_flags, *from_hi, now);
                    if origin == CtOrigin::Fast as u8 {
                        return Ok(Path::Fast);
                    }
                    count(Stat::StackFlowToStack);
                    return Ok(Path::Stack);
                }
            }
            if live.is_none() {
                let port = policy::policy_port(key.protocol, dport(key, *from_hi));
                policy::admit(
                    check_src(key, *from_hi),
                    check_dst(key, *from_hi),
                    key.protocol,
                    port,
                    *check,
                )
                .map_err(|d| d.count())?;
            }
            if *fragment {
                return Ok(Path::Stack);
            }
            if !*opens {
                // The middle of a flow weft never saw begin: the stack may hold its NAT state.
                count(Stat::StackFlowToStack);
                return Ok(Path::Stack);
            }
            let mut entry = new_entry(CtOrigin::Fast, key.protocol, *tcp_flags, *from_hi, now);
            policy::stamp(&mut entry, *check);
            // A full map only evicts its least recently used entry (LRU).
            let _ = WEFT_CT.insert(key, entry, 0);
            count(Stat::ConntrackFastNew);
            Ok(Path::Fast)
        }
    }
}

/// The sender of a packet of flow `key`.
#[inline(always)]
fn check_src(key: &CtKey, from_hi: bool) -> [u8; 4] {
    if from_hi { key.addr_hi } else { key.addr_lo }
}

/// The receiver of a packet of flow `key`.
#[inline(always)]
fn check_dst(key: &CtKey, from_hi: bool) -> [u8; 4] {
    if from_hi { key.addr_lo } else { key.addr_hi }
}

/// Records that the host stack carries (or carried) this packet: its flow becomes (or stays) a
/// stack flow, so weft hands the flow's packets to the stack in both directions. `Err` when
/// NetworkPolicy denies it (counted).
#[inline(always)]
pub fn record_stack(track: &Track, check: &Check) -> Result<(), DropReason> {
    let now = now_s();
    let (key, from_hi, tcp_flags) = match track {
        Track::Flow {
            key,
            from_hi,
            tcp_flags,
            ..
        } => (key, from_hi, tcp_flags),
        Track::Untracked => return policy::untracked(check).map_err(|d| d.count()),
        Track::Related { key } => {
            return match live_entry(key, now) {
                Some(e) if policy::allows_related(e) => Ok(()),
                _ => policy::unrelated(check).map_err(|d| d.count()),
            };
        }
    };
    if let Some(e) = live_entry(key, now) {
        policy::established(e, key).map_err(|d| d.count())?;
        if unsafe { (*e).origin } == CtOrigin::Stack as u8 {
            touch(e, key.protocol, *tcp_flags, *from_hi, now);
            return Ok(());
        }
        // A fast flow the stack now carries (a fragmented datagram, a hop the stack took):
        // from now on it is the stack's.
        unsafe { (*e).origin = CtOrigin::Stack as u8 };
        touch(e, key.protocol, *tcp_flags, *from_hi, now);
        return Ok(());
    }
    let port = policy::policy_port(key.protocol, dport(key, *from_hi));
    policy::admit(
        check_src(key, *from_hi),
        check_dst(key, *from_hi),
        key.protocol,
        port,
        *check,
    )
    .map_err(|d| d.count())?;
    let mut entry = new_entry(CtOrigin::Stack, key.protocol, *tcp_flags, *from_hi, now);
    policy::stamp(&mut entry, *check);
    let _ = WEFT_CT.insert(key, entry, 0);
    count(Stat::ConntrackStackNew);
    Ok(())
}

//! `weft monitor`: datapath events through BPF ring buffers.
//!
//! Up to [`MONITOR_SLOTS`] monitors listen at once, each in its own slot with its own ring
//! buffer and its own options (drops only or forwarding too, sampling, budget), so one
//! monitor's settings never change what another receives. The datapath emits an event (a
//! drop, or a sampled forwarding decision) into each slot whose monitor asked for it, and
//! nowhere while no monitor is attached:
//!
//! - `WEFT_MONITOR_FLAGS` (array of one [`MonitorFlags`]: a byte of `MONITOR_F_*` bits per
//!   slot, in one 32-bit word) is what the programs test first: one inlined array load and a
//!   branch per event point, as with a single monitor, so a node without a monitor pays that
//!   and emits nothing. The map is `BPF_F_MMAPABLE`: each monitor maps it and stores its own
//!   byte, so monitors attaching and leaving at once never overwrite each other's flags (an
//!   element update would rewrite the whole word);
//! - `WEFT_MONITORS` (array, one [`MonitorConfig`] per slot) holds each slot's budget, sampling
//!   and owner, read only for a slot whose flags are set;
//! - `WEFT_MONITOR_SOCKS` (a sockmap, one entry per slot) holds a socket of each attached
//!   monitor. The kernel removes a socket from a sockmap when it is closed, and a process's
//!   sockets are closed when it dies however it dies (SIGKILL included): the slot is free at
//!   once. Before emitting into a slot, the datapath checks that it still holds a socket; an
//!   empty slot means its monitor is gone, and the datapath clears that slot's flags itself.
//!   A monitor claims a slot with `BPF_NOEXIST`, so two monitors never share one; when every
//!   slot is taken, a new monitor is told so, with the pids of the holders;
//! - `WEFT_MONITOR_RATES` (per-CPU, one [`MonitorRate`] per slot) is each slot's token bucket:
//!   at most `rate_per_sec` events per second per CPU (bursts up to `burst`) for that slot's
//!   monitor, checked before the sockmap and the ring buffer, so a flood of drops costs at most
//!   the budget of each attached monitor. The budget is per slot: N monitors cost at most the
//!   sum of their budgets, and a monitor with a small budget never starves another. Events
//!   refused by the budget or by a full ring are counted per slot, and each monitor reports
//!   its own;
//! - `WEFT_EVENTS_<slot>` (ring buffers) carry [`MonitorEvent`]s: the hook, the reason or
//!   verdict, the interface and the first [`CAPTURE_LEN`] bytes of the packet, from which
//!   userspace reads the 5-tuple (inner and outer for tunnel packets) and resolves names.

/// How many monitors can listen at once (listener slots).
pub const MONITOR_SLOTS: u32 = 4;

/// Bytes of the packet copied into an event: Ethernet, outer IPv4 with options, UDP, VXLAN,
/// inner Ethernet, inner IPv4 and the inner ports fit.
pub const CAPTURE_LEN: usize = 128;

/// Size of each slot's event ring buffer (a power of two, in bytes): about 3,000 events.
pub const EVENTS_RING_BYTES: u32 = 512 * 1024;

/// A slot's `MonitorFlags` byte: emit drop events.
pub const MONITOR_F_DROPS: u32 = 1 << 0;
/// Emit sampled forwarding events.
pub const MONITOR_F_TRACE: u32 = 1 << 1;

/// Default budget: events per second per CPU.
pub const MONITOR_RATE_DEFAULT: u32 = 1000;

/// Which events each slot's monitor asked for (`WEFT_MONITOR_FLAGS[0]`): `MONITOR_F_*` bits,
/// one byte per slot. All zero: nobody listens.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct MonitorFlags {
    pub slots: [u8; MONITOR_SLOTS as usize],
}

/// `MONITOR_F_DROPS` in every slot's byte of the flags word.
pub const MONITOR_ANY_DROPS: u32 = MONITOR_F_DROPS * 0x0101_0101;
/// `MONITOR_F_TRACE` in every slot's byte of the flags word.
pub const MONITOR_ANY_TRACE: u32 = MONITOR_F_TRACE * 0x0101_0101;

/// The flags of `slot` in the flags word (read as one native-endian u32).
#[inline(always)]
pub const fn slot_flags(word: u32, slot: u32) -> u32 {
    word.to_ne_bytes()[slot as usize] as u32
}

/// How the monitor of a slot wants its events (`WEFT_MONITORS[slot]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct MonitorConfig {
    /// Token bucket refill: events per second per CPU.
    pub rate_per_sec: u32,
    /// Token bucket size: the largest burst per CPU.
    pub burst: u32,
    /// Forwarding events: one in this many (0 or 1: every one), before the budget.
    pub sample_every: u32,
    /// Process id of the slot's monitor (for the message a monitor gets when every slot is
    /// taken).
    pub owner_pid: u32,
}

/// A slot's per-CPU token bucket and loss counters (`WEFT_MONITOR_RATES[slot]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct MonitorRate {
    /// Tokens in units of 1/1e9 event (elapsed nanoseconds times the rate, no division).
    pub tokens: u64,
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
    /// Events emitted.
    pub emitted: u64,
    /// Events refused by the budget.
    pub over_budget: u64,
    /// Events lost because the ring buffer was full (the monitor reads too slowly).
    pub ring_full: u64,
}

/// One token, in [`MonitorRate::tokens`] units.
pub const TOKEN: u64 = 1_000_000_000;

/// The longest idle time a refill counts (so a bucket holds at most two seconds' budget).
pub const MAX_REFILL_NS: u64 = 2 * TOKEN;

/// Refills a bucket and takes one token if there is one. Pure, shared by the datapath and the
/// unit tests.
#[inline(always)]
pub fn take_token(rate: &mut MonitorRate, now_ns: u64, rate_per_sec: u32, burst: u32) -> bool {
    let cap = burst as u64 * TOKEN;
    // Clamp the elapsed time so nothing overflows for any u32 rate and burst (2 s × 2^32/s and
    // 2^32 tokens fit u64 with room for the sum): a burst larger than two seconds' budget is
    // never reached (`weft monitor` refuses to ask for one).
    let mut elapsed = now_ns.wrapping_sub(rate.last_ns);
    if elapsed > MAX_REFILL_NS {
        elapsed = MAX_REFILL_NS;
    }
    let mut tokens = rate.tokens + elapsed * rate_per_sec as u64;
    if tokens > cap {
        tokens = cap;
    }
    rate.last_ns = now_ns;
    if tokens >= TOKEN {
        rate.tokens = tokens - TOKEN;
        true
    } else {
        rate.tokens = tokens;
        false
    }
}

/// `MonitorEvent::kind`.
pub const EVENT_DROP: u8 = 1;
pub const EVENT_FORWARD: u8 = 2;

/// Where in the datapath an event happened.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    FromPod = 1,
    ToPod = 2,
    FromHost = 3,
    FromUnderlay = 4,
    XdpUnderlay = 5,
    FromVxlan = 6,
}

impl Hook {
    pub const ALL: [Hook; 6] = [
        Hook::FromPod,
        Hook::ToPod,
        Hook::FromHost,
        Hook::FromUnderlay,
        Hook::XdpUnderlay,
        Hook::FromVxlan,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|h| *h as u8 == v)
    }

    /// The program's name (`weft_common::prog_names`).
    pub fn name(self) -> &'static str {
        match self {
            Hook::FromPod => crate::prog_names::FROM_POD,
            Hook::ToPod => crate::prog_names::TO_POD,
            Hook::FromHost => crate::prog_names::FROM_HOST,
            Hook::FromUnderlay => crate::prog_names::FROM_UNDERLAY,
            Hook::XdpUnderlay => crate::prog_names::XDP_UNDERLAY,
            Hook::FromVxlan => crate::prog_names::FROM_VXLAN,
        }
    }
}

/// One ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct MonitorEvent {
    /// `bpf_ktime_get_ns` (monotonic, since boot).
    pub ts_ns: u64,
    /// `EVENT_*`.
    pub kind: u8,
    /// A [`Hook`] as u8.
    pub hook: u8,
    pub _pad: u16,
    /// Drops: the `DropReason`; forwarding: the program's verdict (`TC_ACT_*`, `XDP_*`).
    pub code: u32,
    /// Interface the program ran on (tc: the skb's; XDP: the ingress interface).
    pub ifindex: u32,
    /// Length of the whole packet.
    pub pkt_len: u32,
    /// Bytes of `data` that hold packet bytes.
    pub cap_len: u32,
    /// CPU that emitted it.
    pub cpu: u32,
    pub data: [u8; CAPTURE_LEN],
}

const _: () = {
    assert!(core::mem::size_of::<MonitorConfig>() == 16);
    assert!(core::mem::size_of::<MonitorFlags>() == MONITOR_SLOTS as usize);
    assert!(core::mem::size_of::<MonitorRate>() == 40);
    assert!(core::mem::size_of::<MonitorEvent>() == 32 + CAPTURE_LEN);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slots_byte_is_its_flags_in_the_word() {
        let mut f = MonitorFlags::default();
        f.slots[2] = (MONITOR_F_DROPS | MONITOR_F_TRACE) as u8;
        f.slots[3] = MONITOR_F_DROPS as u8;
        let word = u32::from_ne_bytes(f.slots);
        assert_eq!(slot_flags(word, 0), 0);
        assert_eq!(slot_flags(word, 2), MONITOR_F_DROPS | MONITOR_F_TRACE);
        assert_eq!(slot_flags(word, 3), MONITOR_F_DROPS);
        assert_ne!(word & MONITOR_ANY_DROPS, 0);
        assert_ne!(word & MONITOR_ANY_TRACE, 0);
        f.slots[2] = 0;
        let word = u32::from_ne_bytes(f.slots);
        assert_eq!(word & MONITOR_ANY_TRACE, 0);
    }

    #[test]
    fn bucket_caps_a_burst_and_refills_at_the_rate() {
        let mut r = MonitorRate::default();
        let t0 = 100 * TOKEN;
        // A long idle time fills the bucket to the burst, no more.
        let taken = (0..50).filter(|_| take_token(&mut r, t0, 10, 5)).count();
        assert_eq!(taken, 5);
        // 10/s: 100 ms gives one token.
        assert!(!take_token(&mut r, t0 + TOKEN / 20, 10, 5));
        assert!(take_token(&mut r, t0 + TOKEN / 10, 10, 5));
        assert!(!take_token(&mut r, t0 + TOKEN / 10, 10, 5));
        // One second at 10/s, capped at 5.
        let taken = (0..50)
            .filter(|_| take_token(&mut r, t0 + 2 * TOKEN, 10, 5))
            .count();
        assert_eq!(taken, 5);
        // A zero rate never refills.
        let mut z = MonitorRate::default();
        assert!(!take_token(&mut z, t0, 0, 5));
        // The largest values neither overflow nor stop refilling.
        let mut m = MonitorRate::default();
        for i in 0..100u64 {
            assert!(take_token(
                &mut m,
                u64::MAX / 2 + i * 3 * TOKEN,
                u32::MAX,
                u32::MAX
            ));
        }
    }
}

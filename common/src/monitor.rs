//! `weft monitor`: datapath events through a BPF ring buffer.
//!
//! The datapath emits an event (a drop, or with `--trace` a sampled forwarding decision) only
//! while a monitor is attached:
//!
//! - `WEFT_MONITOR` (array, one [`MonitorConfig`]) holds the flags the programs test first, an
//!   inlined array lookup, so a node without a monitor pays one load and a branch per event
//!   point and emits nothing;
//! - `WEFT_MONITOR_SOCK` (a sockmap with one slot) holds a socket of the attached monitor. The
//!   kernel removes a socket from a sockmap when it is closed, and a process's sockets are
//!   closed when it dies however it dies (SIGKILL included). Before emitting, the datapath
//!   checks that the slot still holds a socket; an empty slot means the monitor is gone, and
//!   the datapath clears the flags itself. Claiming the slot (`BPF_NOEXIST`) also makes the
//!   attachment exclusive: one monitor per node, a second one is told who holds it;
//! - `WEFT_MONITOR_RATE` (per-CPU [`MonitorRate`]) is a token bucket: at most
//!   `rate_per_sec` events per second per CPU (bursts up to `burst`), checked before the
//!   sockmap and the ring buffer, so a flood of drops costs at most the budget. Events refused
//!   by the budget or by a full ring are counted, and the monitor reports them;
//! - `WEFT_EVENTS` (ring buffer) carries [`MonitorEvent`]s: the hook, the reason or verdict,
//!   the interface and the first [`CAPTURE_LEN`] bytes of the packet, from which userspace
//!   reads the 5-tuple (inner and outer for tunnel packets) and resolves names.

/// Bytes of the packet copied into an event: Ethernet, outer IPv4 with options, UDP, VXLAN,
/// inner Ethernet, inner IPv4 and the inner ports fit.
pub const CAPTURE_LEN: usize = 128;

/// Size of the event ring buffer (a power of two, in bytes): about 3,000 events.
pub const EVENTS_RING_BYTES: u32 = 512 * 1024;

/// `MonitorConfig::flags`: emit drop events.
pub const MONITOR_F_DROPS: u32 = 1 << 0;
/// Emit sampled forwarding events.
pub const MONITOR_F_TRACE: u32 = 1 << 1;

/// Default budget: events per second per CPU.
pub const MONITOR_RATE_DEFAULT: u32 = 1000;

/// What an attached monitor asked for (index 0 of `WEFT_MONITOR`). All zero: nobody listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct MonitorConfig {
    /// `MONITOR_F_*` bits.
    pub flags: u32,
    /// Token bucket refill: events per second per CPU.
    pub rate_per_sec: u32,
    /// Token bucket size: the largest burst per CPU.
    pub burst: u32,
    /// Forwarding events: one in this many (0 or 1: every one), before the budget.
    pub sample_every: u32,
    /// Process id of the attached monitor (for the message a second monitor gets).
    pub owner_pid: u32,
    pub _pad: u32,
}

/// Per-CPU token bucket and loss counters (index 0 of `WEFT_MONITOR_RATE`).
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
    assert!(core::mem::size_of::<MonitorConfig>() == 24);
    assert!(core::mem::size_of::<MonitorRate>() == 40);
    assert!(core::mem::size_of::<MonitorEvent>() == 32 + CAPTURE_LEN);
};

#[cfg(test)]
mod tests {
    use super::*;

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

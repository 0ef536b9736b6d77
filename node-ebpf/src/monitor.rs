//! `weft monitor` events: drops (emitted where drops are counted, `counters::count_drop`) and
//! sampled forwarding decisions (emitted by each program's entry point), into the ring buffer
//! of every listener slot whose monitor asked for them, only while that monitor is attached
//! and within its per-CPU budget. The protocol with userspace is described in
//! `weft_common::monitor`.
//!
//! The maps live here rather than in `maps.rs`: nothing else in the datapath uses them.
use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf, SockMap},
    helpers::{
        bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_map_lookup_elem,
        bpf_sk_release, bpf_skb_load_bytes, bpf_xdp_load_bytes,
    },
    macros::btf_map,
    programs::{TcContext, XdpContext},
};
use weft_common::{
    Ipv4Key, NODES_MAX, NodeName,
    monitor::{
        CAPTURE_LEN, EVENT_DROP, EVENT_FORWARD, EVENTS_RING_BYTES, Hook, MONITOR_ANY_DROPS,
        MONITOR_ANY_TRACE, MONITOR_F_DROPS, MONITOR_F_TRACE, MONITOR_SLOTS, MonitorConfig,
        MonitorEvent, MonitorFlags, MonitorRate, slot_flags, take_token,
    },
};

/// Which events each slot's monitor asked for, a byte per slot in one word (all zero: nobody
/// listens). Mappable: each monitor stores its own byte from userspace.
#[btf_map]
pub static WEFT_MONITOR_FLAGS: Array<MonitorFlags, 1, { BPF_F_MMAPABLE as usize }> = Array::new();

/// Per slot: budget, sampling and owner of its monitor.
#[btf_map]
pub static WEFT_MONITORS: Array<MonitorConfig, { MONITOR_SLOTS as usize }> = Array::new();

/// Per slot: a socket of its monitor; the kernel empties the slot when the socket closes.
#[btf_map]
pub static WEFT_MONITOR_SOCKS: SockMap<{ MONITOR_SLOTS as usize }> = SockMap::new();

/// Per slot: per-CPU token bucket and loss counters.
#[btf_map]
pub static WEFT_MONITOR_RATES: PerCpuArray<MonitorRate, { MONITOR_SLOTS as usize }> =
    PerCpuArray::new();

// The events of each slot (`MonitorEvent`s). Declared without a value type, as C declares ring
// buffers: libbpf (`bpftool prog loadall`) refuses a ring buffer whose BTF names a value.
#[btf_map]
pub static WEFT_EVENTS_0: RingBuf<(), { EVENTS_RING_BYTES as usize }> = RingBuf::new();
#[btf_map]
pub static WEFT_EVENTS_1: RingBuf<(), { EVENTS_RING_BYTES as usize }> = RingBuf::new();
#[btf_map]
pub static WEFT_EVENTS_2: RingBuf<(), { EVENTS_RING_BYTES as usize }> = RingBuf::new();
#[btf_map]
pub static WEFT_EVENTS_3: RingBuf<(), { EVENTS_RING_BYTES as usize }> = RingBuf::new();

const _: () = assert!(
    MONITOR_SLOTS == 4,
    "one WEFT_EVENTS_<slot> per slot, and `ring`"
);

/// Node address -> name, for `weft monitor` and `weft nodes` (the agent writes it from its
/// datastore). No program reads it: it is declared here so that the object declares it and
/// it is pinned with the other maps (and `bpftool` prints its names). Allocated per entry.
#[btf_map]
pub static WEFT_NODE_NAMES: HashMap<
    Ipv4Key,
    NodeName,
    { NODES_MAX as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// What an event needs from a program's context.
pub trait Packet {
    /// The interface the program runs on.
    fn ifindex(&self) -> u32;
    /// The packet's length.
    fn pkt_len(&self) -> u32;
    /// Copies the first `min(len, CAPTURE_LEN)` bytes into `dst`; returns how many.
    fn capture(&self, dst: &mut [u8; CAPTURE_LEN]) -> u32;
}

/// The capture length for a packet of `len` bytes, in `0..=CAPTURE_LEN` in a form the
/// verifier bounds.
#[inline(always)]
fn capture_len(len: u32) -> u32 {
    if len >= CAPTURE_LEN as u32 {
        CAPTURE_LEN as u32
    } else {
        len & (CAPTURE_LEN as u32 - 1)
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn pkt_len(&self) -> u32 {
        self.len()
    }

    #[inline(always)]
    fn capture(&self, dst: &mut [u8; CAPTURE_LEN]) -> u32 {
        let n = capture_len(self.len());
        if n == 0 {
            return 0;
        }
        let ret = unsafe { bpf_skb_load_bytes(self.as_ptr(), 0, dst.as_mut_ptr().cast(), n) };
        if ret == 0 { n } else { 0 }
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn pkt_len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }

    #[inline(always)]
    fn capture(&self, dst: &mut [u8; CAPTURE_LEN]) -> u32 {
        let n = capture_len(self.pkt_len());
        if n == 0 {
            return 0;
        }
        let ret = unsafe { bpf_xdp_load_bytes(self.ctx, 0, dst.as_mut_ptr().cast(), n) };
        if ret == 0 { n } else { 0 }
    }
}

/// Whether the monitor of `SLOT` still holds its socket. A sockmap lookup takes a reference on
/// the socket, released at once.
#[inline(always)]
fn listener_alive<const SLOT: u32>() -> bool {
    let key = SLOT;
    let map = core::ptr::from_ref(&WEFT_MONITOR_SOCKS)
        .cast_mut()
        .cast::<c_void>();
    let sk = unsafe { bpf_map_lookup_elem(map, core::ptr::from_ref(&key).cast()) };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk) };
    true
}

/// The ring buffer of `SLOT` (a constant after monomorphization: each slot's code names its
/// own map).
#[inline(always)]
fn ring<const SLOT: u32>() -> &'static RingBuf<(), { EVENTS_RING_BYTES as usize }> {
    match SLOT {
        0 => &WEFT_EVENTS_0,
        1 => &WEFT_EVENTS_1,
        2 => &WEFT_EVENTS_2,
        _ => &WEFT_EVENTS_3,
    }
}

/// The flags word (index 0 of `WEFT_MONITOR_FLAGS`) and a pointer to it.
#[inline(always)]
fn flags() -> Option<(*mut MonitorFlags, u32)> {
    let f = WEFT_MONITOR_FLAGS.get_ptr_mut(0)?;
    // One 32-bit load (the value is 4-byte aligned): every slot's byte at once.
    let word = unsafe { core::ptr::read_volatile(f.cast::<u32>()) };
    Some((f, word))
}

#[inline(always)]
fn emit<const SLOT: u32, P: Packet>(
    p: &P,
    flags: *mut MonitorFlags,
    cfg: &MonitorConfig,
    kind: u8,
    hook: Hook,
    code: u32,
) {
    let Some(rate) = WEFT_MONITOR_RATES.get_ptr_mut(SLOT) else {
        return;
    };
    // Per-CPU: no other writer.
    let rate = unsafe { &mut *rate };
    let now = unsafe { bpf_ktime_get_ns() };
    if !take_token(rate, now, cfg.rate_per_sec, cfg.burst) {
        rate.over_budget += 1;
        return;
    }
    if !listener_alive::<SLOT>() {
        // The slot's monitor is gone (killed before it could clear its flags): stop for good.
        // A byte store: the other slots' bytes, which their monitors store, are untouched.
        unsafe { core::ptr::write_volatile((*flags).slots.as_mut_ptr().add(SLOT as usize), 0) };
        return;
    }
    let Some(mut entry) = ring::<SLOT>().reserve_untyped::<MonitorEvent>(0) else {
        rate.ring_full += 1;
        return;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).ts_ns = now;
        (*ev).kind = kind;
        (*ev).hook = hook as u8;
        (*ev)._pad = 0;
        (*ev).code = code;
        (*ev).ifindex = p.ifindex();
        (*ev).pkt_len = p.pkt_len();
        (*ev).cpu = bpf_get_smp_processor_id();
        (*ev).cap_len = p.capture(&mut (*ev).data);
    }
    entry.submit(0);
    rate.emitted += 1;
}

#[inline(always)]
fn dropped_in<const SLOT: u32, P: Packet>(
    p: &P,
    flags: *mut MonitorFlags,
    word: u32,
    hook: Hook,
    reason: u32,
) {
    if slot_flags(word, SLOT) & MONITOR_F_DROPS == 0 {
        return;
    }
    let Some(cfg) = WEFT_MONITORS.get(SLOT) else {
        return;
    };
    emit::<SLOT, P>(p, flags, cfg, EVENT_DROP, hook, reason);
}

#[inline(always)]
fn forwarded_in<const SLOT: u32, P: Packet>(
    p: &P,
    flags: *mut MonitorFlags,
    word: u32,
    hook: Hook,
    verdict: u32,
) {
    if slot_flags(word, SLOT) & MONITOR_F_TRACE == 0 {
        return;
    }
    let Some(cfg) = WEFT_MONITORS.get(SLOT) else {
        return;
    };
    // Each monitor samples on its own.
    if cfg.sample_every > 1 && unsafe { bpf_get_prandom_u32() } % cfg.sample_every != 0 {
        return;
    }
    emit::<SLOT, P>(p, flags, cfg, EVENT_FORWARD, hook, verdict);
}

/// A drop (called where drops are counted): into every slot whose monitor reports drops.
#[inline(always)]
pub fn dropped<P: Packet>(p: &P, hook: Hook, reason: u32) {
    let Some((f, word)) = flags() else {
        return;
    };
    // Nobody listens for drops: the one test a node without a monitor pays.
    if word & MONITOR_ANY_DROPS == 0 {
        return;
    }
    dropped_in::<0, P>(p, f, word, hook, reason);
    dropped_in::<1, P>(p, f, word, hook, reason);
    dropped_in::<2, P>(p, f, word, hook, reason);
    dropped_in::<3, P>(p, f, word, hook, reason);
}

/// A program's verdict on a packet it did not drop: into every slot whose monitor asked for
/// forwarding events (`--trace`), each sampled as that monitor asked.
#[inline(always)]
pub fn forwarded<P: Packet>(p: &P, hook: Hook, verdict: u32) {
    let Some((f, word)) = flags() else {
        return;
    };
    if word & MONITOR_ANY_TRACE == 0 {
        return;
    }
    forwarded_in::<0, P>(p, f, word, hook, verdict);
    forwarded_in::<1, P>(p, f, word, hook, verdict);
    forwarded_in::<2, P>(p, f, word, hook, verdict);
    forwarded_in::<3, P>(p, f, word, hook, verdict);
}

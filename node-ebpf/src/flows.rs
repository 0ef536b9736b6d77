//! Per-endpoint flow counters: packets and bytes each local pod sent (counted by `from_pod`
//! once its source checks pass) and received (counted where weft delivers into a pod, and by
//! `to_pod` for what the stack delivers).
//!
//! A per-CPU array indexed by the low bits of the pod's address (`flow_slot`), not a hash: the
//! verifier inlines an array lookup (a few instructions), where a per-CPU hash lookup is a
//! helper call (measured about 30 ns per lookup, two per locally delivered packet). Pod
//! addresses come from the node's subnet, so they are distinct in their low bits for subnets
//! up to `FLOW_SLOTS` addresses; each slot records its owner's address, and a packet of another
//! address (a larger subnet's collision) takes the slot over on that CPU.
use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use weft_common::{FLOW_SLOTS, FlowSlot, flow_slot};

/// Per-CPU counters by `flow_slot(pod address)`.
#[btf_map]
pub static WEFT_FLOWS: PerCpuArray<FlowSlot, { FLOW_SLOTS as usize }> = PerCpuArray::new();

#[inline(always)]
fn slot(addr: [u8; 4]) -> Option<&'static mut FlowSlot> {
    let s = WEFT_FLOWS.get_ptr_mut(flow_slot(addr))?;
    // Per-CPU value: no other writer.
    let s = unsafe { &mut *s };
    if s.addr != addr {
        *s = FlowSlot {
            addr,
            ..FlowSlot::ZERO
        };
    }
    Some(s)
}

/// A local pod sent a packet of `bytes` (IPv4 length).
#[inline(always)]
pub fn sent(addr: [u8; 4], bytes: usize) {
    if let Some(s) = slot(addr) {
        s.packets_out += 1;
        s.bytes_out += bytes as u64;
    }
}

/// A packet of `bytes` (IPv4 length) goes into the local pod `addr`.
#[inline(always)]
pub fn received(addr: [u8; 4], bytes: usize) {
    if let Some(s) = slot(addr) {
        s.packets_in += 1;
        s.bytes_in += bytes as u64;
    }
}

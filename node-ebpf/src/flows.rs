//! Per-endpoint flow counters: packets and bytes each local pod sent (counted by `from_pod`
//! once its source checks pass) and received (counted where weft delivers into a pod, and by
//! `to_pod` for what the stack delivers). Keyed by the pod's address; an entry is created only
//! for an address in the endpoint map, so there are at most as many entries as local pods
//! (the agent exports them in `/metrics` and deletes those of pods that are gone).
use aya_ebpf::{btf_maps::PerCpuHashMap, macros::btf_map};
use weft_common::{ENDPOINTS_MAX, EndpointFlows, Ipv4Key};

use crate::route;

/// Per-CPU counters by local pod address.
#[btf_map]
pub static WEFT_FLOWS: PerCpuHashMap<Ipv4Key, EndpointFlows, { ENDPOINTS_MAX as usize }> =
    PerCpuHashMap::new();

/// `BPF_NOEXIST`: another CPU may have created the entry meanwhile; its own slot is still zero.
const BPF_NOEXIST: u64 = 1;

#[inline(always)]
fn account(addr: [u8; 4], bytes: usize, sent: bool) {
    let key = Ipv4Key { addr };
    if let Some(f) = WEFT_FLOWS.get_ptr_mut(key) {
        // Per-CPU value: no other writer.
        let f = unsafe { &mut *f };
        if sent {
            f.packets_out += 1;
            f.bytes_out += bytes as u64;
        } else {
            f.packets_in += 1;
            f.bytes_in += bytes as u64;
        }
        return;
    }
    if route::endpoint(addr).is_none() {
        return;
    }
    let first = if sent {
        EndpointFlows {
            packets_out: 1,
            bytes_out: bytes as u64,
            ..EndpointFlows::ZERO
        }
    } else {
        EndpointFlows {
            packets_in: 1,
            bytes_in: bytes as u64,
            ..EndpointFlows::ZERO
        }
    };
    let _ = WEFT_FLOWS.insert(key, first, BPF_NOEXIST);
}

/// A local pod sent a packet of `bytes` (IPv4 length).
#[inline(always)]
pub fn sent(addr: [u8; 4], bytes: usize) {
    account(addr, bytes, true);
}

/// A packet of `bytes` (IPv4 length) goes into the local pod `addr`.
#[inline(always)]
pub fn received(addr: [u8; 4], bytes: usize) {
    account(addr, bytes, false);
}

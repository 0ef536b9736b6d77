//! The maps shared with userspace. All are BTF maps so `bpftool map dump` prints field names;
//! userspace pins them under a schema-versioned directory.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use weft_common::{
    DROP_REASON_COUNT, ENDPOINTS_MAX, EndpointInfo, Ipv4Key, NEXT_HOPS_MAX, NODES_MAX, NextHop,
    NodeConfig, NodeInfo, PATH_MTU_MAX, PathMtu, ROUTES_MAX, RouteInfo, STAT_COUNT,
    conntrack::{CT_MAX_DEFAULT, CtEntry, CtKey},
};

/// Node-wide configuration (index 0).
#[btf_map]
pub static WEFT_CONFIG: Array<NodeConfig, 1> = Array::new();

/// Pod CIDRs of other nodes → owning node and mode. Longest prefix wins.
#[btf_map]
pub static WEFT_ROUTES: LpmTrie<[u8; 4], RouteInfo, { ROUTES_MAX as usize }> = LpmTrie::new();

/// Pods on this node, by IPv4 address.
#[btf_map]
pub static WEFT_ENDPOINTS: HashMap<Ipv4Key, EndpointInfo, { ENDPOINTS_MAX as usize }> =
    HashMap::new();

/// Known tunnel peers by underlay address: the only accepted outer sources.
#[btf_map]
pub static WEFT_NODES: HashMap<Ipv4Key, NodeInfo, { NODES_MAX as usize }> = HashMap::new();

/// Per-CPU drop counters, indexed by `DropReason`.
#[btf_map]
pub static WEFT_DROPS: PerCpuArray<u64, { DROP_REASON_COUNT as usize }> = PerCpuArray::new();

/// Per-CPU path counters, indexed by `Stat`.
#[btf_map]
pub static WEFT_STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

/// Underlay next hops resolved by the kernel's FIB, reused for `NEXT_HOP_TTL_NS`.
#[btf_map]
pub static WEFT_NEXT_HOPS: LruHashMap<Ipv4Key, NextHop, { NEXT_HOPS_MAX as usize }> =
    LruHashMap::new();

/// weft's connection tracking: one entry per flow (see `weft_common::conntrack`). The size is
/// the default; the agent sets its own (`--conntrack-max`) before loading.
#[btf_map]
pub static WEFT_CT: LruHashMap<CtKey, CtEntry, { CT_MAX_DEFAULT as usize }> = LruHashMap::new();

/// Path MTUs toward peers learned from ICMP fragmentation-needed about tunnel packets.
#[btf_map]
pub static WEFT_PATH_MTU: LruHashMap<Ipv4Key, PathMtu, { PATH_MTU_MAX as usize }> =
    LruHashMap::new();

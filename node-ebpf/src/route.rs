//! Lookups in the route, endpoint, node and config maps.
use aya_ebpf::btf_maps::lpm_trie::Key;
use weft_common::{CONFIG_F_READY, EndpointInfo, Ipv4Key, NodeConfig, NodeInfo, RouteInfo};

use crate::maps::{WEFT_CONFIG, WEFT_ENDPOINTS, WEFT_NODES, WEFT_ROUTES};

/// The node configuration, once userspace has written it. Until then every program passes
/// everything untouched.
#[inline(always)]
pub fn config() -> Option<&'static NodeConfig> {
    let cfg = WEFT_CONFIG.get(0)?;
    if cfg.flags & CONFIG_F_READY == 0 {
        return None;
    }
    Some(cfg)
}

#[inline(always)]
pub fn endpoint(addr: [u8; 4]) -> Option<&'static EndpointInfo> {
    // Entries are only replaced whole by userspace; a racing update yields the old or the new
    // value, both of which are valid endpoints.
    unsafe { WEFT_ENDPOINTS.get(Ipv4Key { addr }) }
}

#[inline(always)]
pub fn node(addr: [u8; 4]) -> Option<&'static NodeInfo> {
    unsafe { WEFT_NODES.get(Ipv4Key { addr }) }
}

#[inline(always)]
pub fn route(addr: [u8; 4]) -> Option<&'static RouteInfo> {
    WEFT_ROUTES.get(&Key::new(32, addr))
}

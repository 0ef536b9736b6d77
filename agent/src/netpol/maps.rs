//! The compiler's map interface on the node's pinned maps, and the pinned maps read back as the
//! compiler's snapshot (adoption after a restart).
use weft_common::map_names;

use crate::{
    datapath::{Maps, PolicySnapshot, policy_write::PolicyWriteError},
    policy::{
        compile::{Capacities, MapFull, MapWrite, PolicyMaps},
        emulate::EmulatedMaps,
    },
};

/// [`PolicyMaps`] on the kernel's maps. A write refused because the map is full is reported as
/// [`MapFull`] (the compiler closes what depends on it); any other failure is logged and
/// reported as a full map too, so that nothing fails open.
pub struct KernelMaps<'a> {
    pub maps: &'a mut Maps,
    /// Writes refused for another reason than a full map (logged).
    pub errors: usize,
}

impl<'a> KernelMaps<'a> {
    pub fn new(maps: &'a mut Maps) -> Self {
        Self { maps, errors: 0 }
    }
}

impl PolicyMaps for KernelMaps<'_> {
    fn write(&mut self, w: &MapWrite) -> Result<(), MapFull> {
        let m = &mut *self.maps;
        let result = match w {
            MapWrite::NsDefault { namespace, flags } => m.put_policy_ns_default(namespace, *flags),
            MapWrite::PortBlock { key, value } => m.put_policy_port_block(key, value.as_ref()),
            MapWrite::Rule { key, value } => m.put_policy_rule(key, value.as_ref()),
            MapWrite::Cidr { net, class } => m.put_policy_cidr(*net, *class),
            MapWrite::Addr { ip, class } => m.put_policy_addr(*ip, *class),
            MapWrite::Endpoint { ip, state } => m.put_policy_endpoint(*ip, state.as_ref()),
        };
        match result {
            Ok(()) => Ok(()),
            Err(PolicyWriteError::Full(map)) => Err(MapFull(map)),
            Err(PolicyWriteError::Other { map, source }) => {
                self.errors += 1;
                tracing::warn!("policy map write {w:?} failed: {source}");
                Err(MapFull(map))
            }
        }
    }
}

/// The compiler's capacities: the maps' sizes as created.
pub fn capacities(maps: &Maps) -> anyhow::Result<Capacities> {
    Ok(Capacities {
        endpoints: maps.capacity(map_names::POLICY_ENDPOINTS)?,
        addrs: maps.capacity(map_names::POLICY_ADDRS)?,
        cidrs: maps.capacity(map_names::POLICY_CIDRS)?,
        rules: maps.capacity(map_names::POLICY_RULES)?,
        port_blocks: maps.capacity(map_names::POLICY_PORT_BLOCKS)?,
        ns_defaults: maps.capacity(map_names::POLICY_NS_DEFAULTS)?,
    })
}

/// What the pinned maps hold, as the compiler's snapshot type.
pub fn snapshot(maps: &Maps, caps: Capacities) -> anyhow::Result<EmulatedMaps> {
    let PolicySnapshot {
        endpoints,
        addrs,
        cidrs,
        rules,
        blocks,
        ns_defaults,
    } = maps.policy_snapshot()?;
    let mut e = EmulatedMaps::new(caps);
    e.endpoints = endpoints;
    e.addrs = addrs;
    e.cidrs = cidrs;
    e.rules = rules;
    e.blocks = blocks;
    e.ns_defaults = ns_defaults;
    Ok(e)
}

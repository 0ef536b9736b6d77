//! From the cluster's node records to the datapath's maps.
//!
//! The desired state (one route per remote subnet, one node entry per remote node address, in
//! the mode this node's backend gives each peer) is computed in memory from the current
//! records and diffed against what the maps hold; only differences are written. The reconciler
//! remembers what it wrote (`programmed`), so an event costs a diff in memory plus the changed
//! entries; a full resync (at start and periodically) re-reads the maps first, which adopts
//! whatever a previous agent left (a restart writes nothing when nothing changed) and repairs
//! anything changed behind the agent's back. Every step is idempotent: a failed apply is simply
//! retried.
use std::{
    collections::HashMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Result;
use ipnet::Ipv4Net;
use weft_common::{NodeInfo, RouteInfo, RouteMode};

use crate::{
    config::BackendType,
    datapath::Maps,
    datastore::{Event, NodeLease},
    node_net::vtep_mac_for,
};

/// How this node reaches a peer: its backend, or direct for peers on its own underlay subnet
/// when DirectRouting is on. host-gw is direct to everyone (and needs every peer on-link).
#[derive(Clone, Debug)]
pub struct ModePolicy {
    pub backend: BackendType,
    pub direct_routing: bool,
    pub underlay_subnet: Ipv4Net,
}

impl ModePolicy {
    pub fn mode_for(&self, peer: Ipv4Addr) -> RouteMode {
        if self.direct_routing && self.underlay_subnet.contains(&peer) {
            return RouteMode::Direct;
        }
        self.backend.route_mode()
    }

    /// A peer this node routes directly to although it is not on the underlay subnet: host-gw
    /// cannot reach it (flannel silently breaks there; weft reports it).
    pub fn is_offlink(&self, peer: Ipv4Addr) -> bool {
        self.mode_for(peer) == RouteMode::Direct && !self.underlay_subnet.contains(&peer)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub routes: HashMap<Ipv4Net, RouteInfo>,
    pub nodes: HashMap<Ipv4Addr, NodeInfo>,
}

/// The writes that turn `current` into `desired`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub route_upserts: Vec<(Ipv4Net, RouteInfo)>,
    pub route_removes: Vec<Ipv4Net>,
    pub node_upserts: Vec<(Ipv4Addr, NodeInfo)>,
    pub node_removes: Vec<Ipv4Addr>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.route_upserts.is_empty()
            && self.route_removes.is_empty()
            && self.node_upserts.is_empty()
            && self.node_removes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.route_upserts.len()
            + self.route_removes.len()
            + self.node_upserts.len()
            + self.node_removes.len()
    }
}

pub fn diff(current: &DesiredState, desired: &DesiredState) -> Plan {
    let mut plan = Plan::default();
    for (k, v) in &desired.routes {
        if current.routes.get(k) != Some(v) {
            plan.route_upserts.push((*k, *v));
        }
    }
    for k in current.routes.keys() {
        if !desired.routes.contains_key(k) {
            plan.route_removes.push(*k);
        }
    }
    for (k, v) in &desired.nodes {
        if current.nodes.get(k) != Some(v) {
            plan.node_upserts.push((*k, *v));
        }
    }
    for k in current.nodes.keys() {
        if !desired.nodes.contains_key(k) {
            plan.node_removes.push(*k);
        }
    }
    plan
}

/// What one apply did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyReport {
    pub writes: usize,
    pub duration: Duration,
}

pub struct Reconciler {
    pub policy: ModePolicy,
    pub local_subnet: Ipv4Net,
    pub local_ip: Ipv4Addr,
    peers: HashMap<Ipv4Net, NodeLease>,
    programmed: DesiredState,
    offlink_reported: std::collections::HashSet<Ipv4Addr>,
    /// Whether a complete set of records has been seen (ready only after that).
    pub synced: bool,
}

impl Reconciler {
    pub fn new(policy: ModePolicy, local_subnet: Ipv4Net, local_ip: Ipv4Addr) -> Self {
        Self {
            policy,
            local_subnet,
            local_ip,
            peers: HashMap::new(),
            programmed: DesiredState::default(),
            offlink_reported: Default::default(),
            synced: false,
        }
    }

    /// Takes a datastore event into the record set. Returns whether the desired state may
    /// have changed.
    pub fn handle(&mut self, event: Event) -> bool {
        match event {
            Event::Snapshot(leases) => {
                self.peers = leases.into_iter().map(|l| (l.subnet, l)).collect();
                self.synced = true;
                true
            }
            Event::Upsert(lease) => self.peers.insert(lease.subnet, lease.clone()) != Some(lease),
            Event::Remove(subnet) => self.peers.remove(&subnet).is_some(),
            Event::LocalSubnet(subnet) => {
                self.local_subnet = subnet;
                true
            }
            Event::Connected(_) => false,
        }
    }

    pub fn peer_count(&self) -> usize {
        self.peers.values().filter(|l| self.is_remote(l)).count()
    }

    fn is_remote(&self, lease: &NodeLease) -> bool {
        // Our own record, and any stale record carrying our address, never become routes.
        lease.subnet != self.local_subnet && lease.public_ip != self.local_ip
    }

    pub fn desired(&self) -> DesiredState {
        let mut out = DesiredState {
            routes: HashMap::with_capacity(self.peers.len()),
            nodes: HashMap::with_capacity(self.peers.len()),
        };
        for lease in self.peers.values().filter(|l| self.is_remote(l)) {
            let mode = self.policy.mode_for(lease.public_ip) as u8;
            let vtep_mac = lease
                .vtep_mac
                .unwrap_or_else(|| vtep_mac_for(lease.public_ip));
            out.routes.insert(
                lease.subnet,
                RouteInfo {
                    node_ip: lease.public_ip.octets(),
                    vtep_mac,
                    mode,
                    _pad: 0,
                },
            );
            out.nodes.insert(
                lease.public_ip,
                NodeInfo {
                    vtep_mac,
                    mode,
                    _pad: 0,
                },
            );
        }
        out
    }

    /// Peers this node routes to directly but cannot reach on-link (host-gw across subnets).
    pub fn offlink_peers(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<_> = self
            .peers
            .values()
            .filter(|l| self.is_remote(l) && self.policy.is_offlink(l.public_ip))
            .map(|l| l.public_ip)
            .collect();
        v.sort();
        v
    }

    /// Re-reads the maps (adopting what is there), then applies.
    pub fn resync(&mut self, maps: &mut Maps) -> Result<ApplyReport> {
        self.programmed = DesiredState {
            routes: maps.routes()?.into_iter().collect(),
            nodes: maps.nodes()?.into_iter().collect(),
        };
        self.apply(maps)
    }

    /// Writes the difference between the desired state and what was programmed.
    pub fn apply(&mut self, maps: &mut Maps) -> Result<ApplyReport> {
        let start = Instant::now();
        for ip in self.offlink_peers() {
            if self.offlink_reported.insert(ip) {
                tracing::warn!(
                    peer = %ip,
                    underlay = %self.policy.underlay_subnet,
                    "peer is not on this node's underlay subnet: host-gw cannot reach it (use vxlan, ipip or DirectRouting)"
                );
            }
        }
        let desired = self.desired();
        let plan = diff(&self.programmed, &desired);
        let writes = plan.len();
        // New peers first (decapsulation accepts them before routes send to them); removals
        // of routes before the nodes they point to.
        for (ip, info) in plan.node_upserts {
            maps.upsert_node(ip, &info)?;
            self.programmed.nodes.insert(ip, info);
        }
        let mut next_hops_stale = false;
        for (net, info) in plan.route_upserts {
            if let Some(old) = self.programmed.routes.get(&net) {
                next_hops_stale |= old.node_ip != info.node_ip;
            }
            maps.upsert_route(net, &info)?;
            self.programmed.routes.insert(net, info);
        }
        for net in plan.route_removes {
            match maps.remove_route(net) {
                Ok(()) => {}
                // Already gone: the goal is reached.
                Err(_) if !maps.routes()?.iter().any(|(n, _)| *n == net) => {}
                Err(e) => return Err(e),
            }
            self.programmed.routes.remove(&net);
        }
        for ip in plan.node_removes {
            let _ = maps.remove_node(ip);
            self.programmed.nodes.remove(&ip);
            next_hops_stale = true;
        }
        if next_hops_stale {
            // A node left or moved: forget cached underlay next hops (they refresh within 1 s
            // anyway; this makes it immediate).
            maps.flush_next_hops()?;
        }
        Ok(ApplyReport {
            writes,
            duration: start.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(subnet: &str, ip: [u8; 4]) -> NodeLease {
        NodeLease {
            subnet: subnet.parse().unwrap(),
            public_ip: Ipv4Addr::from(ip),
            backend: Some(BackendType::Vxlan),
            vtep_mac: None,
        }
    }

    fn rec(backend: BackendType, direct: bool) -> Reconciler {
        Reconciler::new(
            ModePolicy {
                backend,
                direct_routing: direct,
                underlay_subnet: "192.168.1.0/24".parse().unwrap(),
            },
            "10.244.1.0/24".parse().unwrap(),
            Ipv4Addr::new(192, 168, 1, 1),
        )
    }

    #[test]
    fn modes_per_peer() {
        let mut r = rec(BackendType::Vxlan, true);
        r.handle(Event::Snapshot(vec![
            lease("10.244.1.0/24", [192, 168, 1, 1]),
            lease("10.244.2.0/24", [192, 168, 1, 2]),
            lease("10.244.3.0/24", [192, 168, 2, 3]),
            // A stale record with our address: never a route.
            lease("10.244.9.0/24", [192, 168, 1, 1]),
        ]));
        let d = r.desired();
        assert_eq!(d.routes.len(), 2);
        assert_eq!(
            d.routes[&"10.244.2.0/24".parse().unwrap()].mode,
            RouteMode::Direct as u8
        );
        let far = d.routes[&"10.244.3.0/24".parse().unwrap()];
        assert_eq!(far.mode, RouteMode::Vxlan as u8);
        assert_eq!(far.vtep_mac, [2, 0x57, 192, 168, 2, 3]);
        assert_eq!(far.node_ip, [192, 168, 2, 3]);
        assert!(r.offlink_peers().is_empty());
        let mut hg = rec(BackendType::HostGw, false);
        hg.handle(Event::Snapshot(vec![lease(
            "10.244.3.0/24",
            [192, 168, 2, 3],
        )]));
        assert_eq!(hg.offlink_peers(), vec![Ipv4Addr::new(192, 168, 2, 3)]);
        let mut ip = rec(BackendType::Ipip, false);
        ip.handle(Event::Snapshot(vec![lease(
            "10.244.2.0/24",
            [192, 168, 1, 2],
        )]));
        assert_eq!(
            ip.desired().nodes[&Ipv4Addr::new(192, 168, 1, 2)].mode,
            RouteMode::Ipip as u8
        );
    }

    #[test]
    fn diff_is_minimal_and_complete() {
        let mut r = rec(BackendType::Vxlan, false);
        r.handle(Event::Snapshot(vec![
            lease("10.244.2.0/24", [192, 168, 1, 2]),
            lease("10.244.3.0/24", [192, 168, 1, 3]),
        ]));
        let before = r.desired();
        assert!(diff(&before, &before).is_empty());
        // Node 3 moves to a new address, node 2 leaves, node 4 joins.
        assert!(r.handle(Event::Upsert(lease("10.244.3.0/24", [192, 168, 1, 33]))));
        assert!(r.handle(Event::Remove("10.244.2.0/24".parse().unwrap())));
        assert!(!r.handle(Event::Remove("10.244.2.0/24".parse().unwrap())));
        assert!(r.handle(Event::Upsert(lease("10.244.4.0/24", [192, 168, 1, 4]))));
        assert!(!r.handle(Event::Upsert(lease("10.244.4.0/24", [192, 168, 1, 4]))));
        let plan = diff(&before, &r.desired());
        assert_eq!(plan.route_upserts.len(), 2);
        assert_eq!(
            plan.route_removes,
            vec!["10.244.2.0/24".parse::<Ipv4Net>().unwrap()]
        );
        let mut removed = plan.node_removes.clone();
        removed.sort();
        assert_eq!(
            removed,
            vec![Ipv4Addr::new(192, 168, 1, 2), Ipv4Addr::new(192, 168, 1, 3)]
        );
        assert_eq!(plan.node_upserts.len(), 2);
    }
}

//! From the cluster's node records to the datapath's maps.
//!
//! The desired state (one route per remote subnet, one node entry per remote node address, in
//! the mode this node's backend gives each peer, and the name of every node that has one, this
//! node's included, for `weft monitor`) is computed in memory from the current
//! records and diffed against what the maps hold; only differences are written. The reconciler
//! remembers what it wrote (`programmed`), so an event costs a diff in memory plus the changed
//! entries; a full resync (at start and periodically) re-reads the maps first, which adopts
//! whatever a previous agent left (a restart writes nothing when nothing changed) and repairs
//! anything changed behind the agent's back. Every step is idempotent: a failed apply is simply
//! retried.
//!
//! Records are admitted first (`crate::admission`): only admitted records become routes and
//! peers. A write that fails (a full map) does not stop the others: the apply carries on, and
//! what failed is retried.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Result;
use ipnet::Ipv4Net;
use weft_common::{NodeConfig, NodeInfo, RouteInfo, RouteMode};

use crate::{
    admission::{Records, Rules},
    config::BackendType,
    datapath::{MapFull, Maps},
    datastore::{Event, NodeLease},
    node_net::vtep_mac_for,
};

/// What the reconciler reads and writes: the datapath's peer maps. [`Maps`] is the real one;
/// [`MemoryMaps`] keeps them in memory and records every write (unit tests, no root).
pub trait PeerMaps {
    fn routes(&self) -> Result<Vec<(Ipv4Net, RouteInfo)>>;
    fn nodes(&self) -> Result<Vec<(Ipv4Addr, NodeInfo)>>;
    fn upsert_route(&mut self, cidr: Ipv4Net, info: &RouteInfo) -> Result<()>;
    fn remove_route(&mut self, cidr: Ipv4Net) -> Result<()>;
    fn upsert_node(&mut self, addr: Ipv4Addr, info: &NodeInfo) -> Result<()>;
    fn remove_node(&mut self, addr: Ipv4Addr) -> Result<()>;
    /// Forgets cached underlay next hops (a peer left or moved).
    fn flush_next_hops(&mut self) -> Result<()>;
    fn set_config(&mut self, cfg: &NodeConfig) -> Result<()>;
    /// Node names by address (`WEFT_NODE_NAMES`: for people, no program reads them).
    fn node_names(&self) -> Result<Vec<(Ipv4Addr, String)>>;
    fn upsert_node_name(&mut self, addr: Ipv4Addr, name: &str) -> Result<()>;
    fn remove_node_name(&mut self, addr: Ipv4Addr) -> Result<()>;
}

impl PeerMaps for Maps {
    fn routes(&self) -> Result<Vec<(Ipv4Net, RouteInfo)>> {
        Maps::routes(self)
    }
    fn nodes(&self) -> Result<Vec<(Ipv4Addr, NodeInfo)>> {
        Maps::nodes(self)
    }
    fn upsert_route(&mut self, cidr: Ipv4Net, info: &RouteInfo) -> Result<()> {
        Maps::upsert_route(self, cidr, info)
    }
    fn remove_route(&mut self, cidr: Ipv4Net) -> Result<()> {
        Maps::remove_route(self, cidr)
    }
    fn upsert_node(&mut self, addr: Ipv4Addr, info: &NodeInfo) -> Result<()> {
        Maps::upsert_node(self, addr, info)
    }
    fn remove_node(&mut self, addr: Ipv4Addr) -> Result<()> {
        Maps::remove_node(self, addr)
    }
    fn flush_next_hops(&mut self) -> Result<()> {
        Maps::flush_next_hops(self)
    }
    fn set_config(&mut self, cfg: &NodeConfig) -> Result<()> {
        Maps::set_config(self, cfg)
    }
    fn node_names(&self) -> Result<Vec<(Ipv4Addr, String)>> {
        Maps::node_names(self)
    }
    fn upsert_node_name(&mut self, addr: Ipv4Addr, name: &str) -> Result<()> {
        Maps::upsert_node_name(self, addr, name)
    }
    fn remove_node_name(&mut self, addr: Ipv4Addr) -> Result<()> {
        Maps::remove_node_name(self, addr)
    }
}

/// One write to the peer maps, as [`MemoryMaps`] records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapWrite {
    UpsertRoute(Ipv4Net),
    RemoveRoute(Ipv4Net),
    UpsertNode(Ipv4Addr),
    RemoveNode(Ipv4Addr),
    FlushNextHops,
    Config,
    UpsertName(Ipv4Addr),
    RemoveName(Ipv4Addr),
}

/// Peer maps in memory, with a log of writes and injectable failures.
#[derive(Debug, Default)]
pub struct MemoryMaps {
    pub routes: std::collections::BTreeMap<Ipv4Net, RouteInfo>,
    pub nodes: std::collections::BTreeMap<Ipv4Addr, NodeInfo>,
    pub names: std::collections::BTreeMap<Ipv4Addr, String>,
    pub config: Option<NodeConfig>,
    pub writes: Vec<MapWrite>,
    /// The next this many writes fail (a map that refuses).
    pub fail_writes: usize,
    /// Capacities of the route, node and node name maps (None: unbounded): a new entry beyond
    /// them fails with [`MapFull`], as the kernel refuses it.
    pub routes_max: Option<usize>,
    pub nodes_max: Option<usize>,
    pub names_max: Option<usize>,
}

impl MemoryMaps {
    fn write(&mut self, w: MapWrite) -> Result<()> {
        if self.fail_writes > 0 {
            self.fail_writes -= 1;
            anyhow::bail!("injected failure of {w:?}");
        }
        let full = match &w {
            MapWrite::UpsertRoute(net) => self
                .routes_max
                .filter(|max| !self.routes.contains_key(net) && self.routes.len() >= *max)
                .map(|max| (weft_common::map_names::ROUTES, max)),
            MapWrite::UpsertNode(ip) => self
                .nodes_max
                .filter(|max| !self.nodes.contains_key(ip) && self.nodes.len() >= *max)
                .map(|max| (weft_common::map_names::NODES, max)),
            MapWrite::UpsertName(ip) => self
                .names_max
                .filter(|max| !self.names.contains_key(ip) && self.names.len() >= *max)
                .map(|max| (weft_common::map_names::NODE_NAMES, max)),
            _ => None,
        };
        if let Some((map, max)) = full {
            return Err(MapFull {
                map,
                capacity: max as u32,
            }
            .into());
        }
        self.writes.push(w);
        Ok(())
    }
}

impl PeerMaps for MemoryMaps {
    fn routes(&self) -> Result<Vec<(Ipv4Net, RouteInfo)>> {
        Ok(self.routes.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn nodes(&self) -> Result<Vec<(Ipv4Addr, NodeInfo)>> {
        Ok(self.nodes.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn upsert_route(&mut self, cidr: Ipv4Net, info: &RouteInfo) -> Result<()> {
        self.write(MapWrite::UpsertRoute(cidr))?;
        self.routes.insert(cidr, *info);
        Ok(())
    }
    fn remove_route(&mut self, cidr: Ipv4Net) -> Result<()> {
        self.write(MapWrite::RemoveRoute(cidr))?;
        self.routes
            .remove(&cidr)
            .map(|_| ())
            .ok_or_else(|| anyhow::anyhow!("no route {cidr}"))
    }
    fn upsert_node(&mut self, addr: Ipv4Addr, info: &NodeInfo) -> Result<()> {
        self.write(MapWrite::UpsertNode(addr))?;
        self.nodes.insert(addr, *info);
        Ok(())
    }
    fn remove_node(&mut self, addr: Ipv4Addr) -> Result<()> {
        self.write(MapWrite::RemoveNode(addr))?;
        self.nodes
            .remove(&addr)
            .map(|_| ())
            .ok_or_else(|| anyhow::anyhow!("no node {addr}"))
    }
    fn flush_next_hops(&mut self) -> Result<()> {
        self.write(MapWrite::FlushNextHops)
    }
    fn set_config(&mut self, cfg: &NodeConfig) -> Result<()> {
        self.write(MapWrite::Config)?;
        self.config = Some(*cfg);
        Ok(())
    }
    fn node_names(&self) -> Result<Vec<(Ipv4Addr, String)>> {
        Ok(self.names.iter().map(|(k, v)| (*k, v.clone())).collect())
    }
    fn upsert_node_name(&mut self, addr: Ipv4Addr, name: &str) -> Result<()> {
        self.write(MapWrite::UpsertName(addr))?;
        self.names.insert(addr, name.to_string());
        Ok(())
    }
    fn remove_node_name(&mut self, addr: Ipv4Addr) -> Result<()> {
        self.write(MapWrite::RemoveName(addr))?;
        self.names
            .remove(&addr)
            .map(|_| ())
            .ok_or_else(|| anyhow::anyhow!("no name for {addr}"))
    }
}

/// How this node reaches a peer: its backend, or direct for peers on its own underlay subnet
/// when DirectRouting is on. host-gw is direct to everyone (and needs every peer on-link).
#[derive(Clone, Debug)]
pub struct ModePolicy {
    pub backend: BackendType,
    pub direct_routing: bool,
    pub underlay_subnet: Ipv4Net,
    /// [bgp] The bgp backend's settings and the routes BIRD installed (backend bgp only).
    pub bgp: Option<crate::bgp::RouteModes>,
}

impl ModePolicy {
    pub fn mode_for(&self, peer: Ipv4Addr) -> RouteMode {
        // [bgp] Native along BGP's routes, or tunnelled (Encapsulation CrossSubnet / Always).
        if let Some(bgp) = &self.bgp {
            return bgp.config.mode_for(peer, self.underlay_subnet);
        }
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
    /// Node names by address: every peer whose record names its node, and this node.
    pub names: HashMap<Ipv4Addr, String>,
}

/// The map writes that turn `current` into `desired`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MapDiff {
    pub route_upserts: Vec<(Ipv4Net, RouteInfo)>,
    pub route_removes: Vec<Ipv4Net>,
    pub node_upserts: Vec<(Ipv4Addr, NodeInfo)>,
    pub node_removes: Vec<Ipv4Addr>,
    pub name_upserts: Vec<(Ipv4Addr, String)>,
    pub name_removes: Vec<Ipv4Addr>,
}

impl MapDiff {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.route_upserts.len()
            + self.route_removes.len()
            + self.node_upserts.len()
            + self.node_removes.len()
            + self.name_upserts.len()
            + self.name_removes.len()
    }
}

pub fn diff(current: &DesiredState, desired: &DesiredState) -> MapDiff {
    let mut plan = MapDiff::default();
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
    for (k, v) in &desired.names {
        if current.names.get(k) != Some(v) {
            plan.name_upserts.push((*k, v.clone()));
        }
    }
    for k in current.names.keys() {
        if !desired.names.contains_key(k) {
            plan.name_removes.push(*k);
        }
    }
    plan
}

/// What one apply did.
#[derive(Debug, Default, Clone)]
pub struct ApplyReport {
    /// Entries written or removed.
    pub writes: usize,
    pub duration: Duration,
    /// Writes that failed (retried later), with why; the others were applied.
    pub failures: Vec<String>,
    /// Maps that refused entries for lack of room, and how many entries they refused.
    pub full_maps: Vec<(MapFull, usize)>,
}

impl ApplyReport {
    pub fn failed(&self) -> bool {
        !self.failures.is_empty()
    }
}

pub struct Reconciler {
    pub policy: ModePolicy,
    pub local_subnet: Ipv4Net,
    pub local_ip: Ipv4Addr,
    /// This node's name (recorded with its peers' for `weft monitor`).
    local_name: Option<String>,
    /// Every record of the datastore, and which are admitted.
    records: Records,
    /// The admitted records, by subnet.
    peers: HashMap<Ipv4Net, NodeLease>,
    /// Subnets announced by each node address (a node entry exists while one remains).
    by_ip: HashMap<Ipv4Addr, BTreeSet<Ipv4Net>>,
    programmed: DesiredState,
    /// Everything must be diffed (after a snapshot, a resync, a policy change).
    full: bool,
    /// Keys touched by events since the last successful apply.
    pending_subnets: HashSet<Ipv4Net>,
    pending_ips: HashSet<Ipv4Addr>,
    offlink_reported: HashSet<Ipv4Addr>,
    /// Whether a complete set of records has been seen (ready only after that).
    pub synced: bool,
}

impl Reconciler {
    pub fn new(policy: ModePolicy, local_subnet: Ipv4Net, local_ip: Ipv4Addr) -> Self {
        Self {
            policy,
            local_subnet,
            local_ip,
            local_name: None,
            records: Records::new(Rules {
                network: None,
                local_subnet: Some(local_subnet),
                local_ip,
            }),
            peers: HashMap::new(),
            by_ip: HashMap::new(),
            programmed: DesiredState::default(),
            full: true,
            pending_subnets: HashSet::new(),
            pending_ips: HashSet::new(),
            offlink_reported: Default::default(),
            synced: false,
        }
    }

    /// Records this node's name with its peers' (`WEFT_NODE_NAMES`).
    pub fn with_local_name(mut self, name: &str) -> Self {
        self.local_name = Some(name.to_string()).filter(|n| !n.is_empty());
        self.full = true;
        self
    }

    /// Takes a datastore event into the record set. Returns whether the desired state may
    /// have changed.
    pub fn handle(&mut self, event: Event) -> bool {
        let changed = match event {
            Event::Snapshot(leases) => {
                self.synced = true;
                self.full = true;
                self.records.replace_all(leases);
                self.rebuild_peers();
                return true;
            }
            Event::Upsert(lease) => self.records.upsert(lease),
            Event::Remove(name) => self.records.remove(&name),
            Event::Unreadable { name, error } => self.records.unreadable(&name, error),
            Event::LocalSubnet(subnet) => {
                self.local_subnet = subnet;
                self.set_local_subnet(Some(subnet));
                return true;
            }
            Event::SubnetLost(subnet) => {
                if subnet != self.local_subnet {
                    return false;
                }
                // The subnet's new holder becomes a peer like any other.
                self.set_local_subnet(None);
                return true;
            }
            Event::Connected(_) => return false,
        };
        if changed.is_empty() {
            return false;
        }
        if self.full {
            self.rebuild_peers();
            return true;
        }
        for subnet in &changed {
            self.take_admitted(*subnet);
        }
        true
    }

    fn set_local_subnet(&mut self, subnet: Option<Ipv4Net>) {
        self.full = true;
        let rules = Rules {
            local_subnet: subnet,
            ..self.records.rules().clone()
        };
        self.records.set_rules(rules);
        self.rebuild_peers();
    }

    /// Checks records against the cluster's `Network` and `SubnetLen` from now on (the control
    /// loop sets them from net-conf.json).
    pub fn set_network(&mut self, network: Ipv4Net, subnet_len: u8) {
        let rules = Rules {
            network: Some((network, subnet_len)),
            ..self.records.rules().clone()
        };
        if !self.records.set_rules(rules).is_empty() {
            self.full = true;
            self.rebuild_peers();
        }
    }

    /// The refused records, with why (for metrics and the CLI).
    pub fn records(&self) -> &Records {
        &self.records
    }

    /// Makes `peers` the admitted record of `subnet`, if any.
    fn take_admitted(&mut self, subnet: Ipv4Net) {
        if let Some(old) = self.peers.remove(&subnet) {
            self.forget_ip(old.public_ip, subnet);
        }
        if let Some(lease) = self.records.admitted(&subnet).cloned() {
            self.by_ip
                .entry(lease.public_ip)
                .or_default()
                .insert(lease.subnet);
            self.pending_ips.insert(lease.public_ip);
            self.peers.insert(subnet, lease);
        }
        self.pending_subnets.insert(subnet);
    }

    /// `peers` and `by_ip` from every admitted record.
    fn rebuild_peers(&mut self) {
        self.peers = self
            .records
            .admitted_all()
            .map(|l| (l.subnet, l.clone()))
            .collect();
        self.by_ip.clear();
        for l in self.peers.values() {
            self.by_ip.entry(l.public_ip).or_default().insert(l.subnet);
        }
    }

    fn forget_ip(&mut self, ip: Ipv4Addr, subnet: Ipv4Net) {
        if let Some(set) = self.by_ip.get_mut(&ip) {
            set.remove(&subnet);
            if set.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
        self.pending_ips.insert(ip);
    }

    /// Changes how peers are reached (a live backend switch): every entry is re-diffed.
    pub fn set_policy(&mut self, policy: ModePolicy) {
        self.policy = policy;
        self.full = true;
    }

    /// The subnet this node holds: None while it lost its own to another node and holds none
    /// (then it must not announce or serve it).
    pub fn held_subnet(&self) -> Option<Ipv4Net> {
        self.records.rules().local_subnet
    }

    /// [bgp] Every remote node record (what BGP peers with and accepts routes for).
    pub fn remote_leases(&self) -> impl Iterator<Item = &NodeLease> {
        self.peers.values().filter(|l| self.is_remote(l))
    }

    pub fn peer_count(&self) -> usize {
        self.peers.values().filter(|l| self.is_remote(l)).count()
    }

    fn is_remote(&self, lease: &NodeLease) -> bool {
        // Our own record, and any stale record carrying our address, never become routes.
        !self.records.rules().is_local(lease) && lease.public_ip != self.local_ip
    }

    fn route_for(&self, lease: &NodeLease) -> RouteInfo {
        let mut mode = self.policy.mode_for(lease.public_ip);
        // [bgp] A route switching into bgp keeps its mode until BIRD installed its route.
        if let Some(bgp) = &self.policy.bgp {
            let programmed = self.programmed.routes.get(&lease.subnet).map(|r| r.mode);
            mode = crate::bgp::effective_mode(mode, lease.subnet, &bgp.learned, programmed);
        }
        RouteInfo {
            node_ip: lease.public_ip.octets(),
            vtep_mac: lease
                .vtep_mac
                .unwrap_or_else(|| vtep_mac_for(lease.public_ip)),
            mode: mode as u8,
            _pad: 0,
        }
    }

    fn desired_route(&self, subnet: &Ipv4Net) -> Option<RouteInfo> {
        let lease = self.peers.get(subnet).filter(|l| self.is_remote(l))?;
        Some(self.route_for(lease))
    }

    fn desired_node(&self, ip: &Ipv4Addr) -> Option<NodeInfo> {
        // Any of the node's subnets describes it (one per node in practice).
        let lease = self
            .by_ip
            .get(ip)?
            .iter()
            .filter_map(|s| self.peers.get(s))
            .find(|l| self.is_remote(l))?;
        let r = self.route_for(lease);
        Some(NodeInfo {
            vtep_mac: r.vtep_mac,
            mode: r.mode,
            _pad: 0,
        })
    }

    /// The name recorded for a node address: this node's, or the name a peer's record gives
    /// (peers only: a refused record names nothing).
    fn desired_name(&self, ip: &Ipv4Addr) -> Option<String> {
        if *ip == self.local_ip {
            return self.local_name.clone();
        }
        self.by_ip
            .get(ip)?
            .iter()
            .filter_map(|s| self.peers.get(s))
            .filter(|l| self.is_remote(l))
            .find_map(|l| l.node_name.clone())
    }

    pub fn desired(&self) -> DesiredState {
        DesiredState {
            names: self
                .by_ip
                .keys()
                .chain([&self.local_ip])
                .filter_map(|ip| Some((*ip, self.desired_name(ip)?)))
                .collect(),
            routes: self
                .peers
                .keys()
                .filter_map(|s| Some((*s, self.desired_route(s)?)))
                .collect(),
            nodes: self
                .by_ip
                .keys()
                .filter_map(|ip| Some((*ip, self.desired_node(ip)?)))
                .collect(),
        }
    }

    /// The writes for the keys events touched: O(changes), not O(cluster).
    fn partial_plan(&self) -> MapDiff {
        let mut plan = MapDiff::default();
        for subnet in &self.pending_subnets {
            match (
                self.programmed.routes.get(subnet),
                self.desired_route(subnet),
            ) {
                (cur, Some(want)) if cur != Some(&want) => plan.route_upserts.push((*subnet, want)),
                (Some(_), None) => plan.route_removes.push(*subnet),
                _ => {}
            }
        }
        for ip in &self.pending_ips {
            match (self.programmed.nodes.get(ip), self.desired_node(ip)) {
                (cur, Some(want)) if cur != Some(&want) => plan.node_upserts.push((*ip, want)),
                (Some(_), None) => plan.node_removes.push(*ip),
                _ => {}
            }
            match (self.programmed.names.get(ip), self.desired_name(ip)) {
                (cur, Some(want)) if cur != Some(&want) => plan.name_upserts.push((*ip, want)),
                (Some(_), None) => plan.name_removes.push(*ip),
                _ => {}
            }
        }
        plan
    }

    /// How many peers are currently off-link for this node's mode (as of the last apply).
    pub fn offlink_count(&self) -> usize {
        self.offlink_reported.len()
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
    pub fn resync(&mut self, maps: &mut impl PeerMaps) -> Result<ApplyReport> {
        self.programmed = DesiredState {
            routes: maps.routes()?.into_iter().collect(),
            nodes: maps.nodes()?.into_iter().collect(),
            names: maps.node_names()?.into_iter().collect(),
        };
        self.full = true;
        self.apply(maps)
    }

    /// Writes the difference between the desired state and what was programmed.
    pub fn apply(&mut self, maps: &mut impl PeerMaps) -> Result<ApplyReport> {
        let start = Instant::now();
        let plan = if self.full {
            diff(&self.programmed, &self.desired())
        } else {
            self.partial_plan()
        };
        let offlink: Vec<Ipv4Addr> = if self.full {
            let all = self.offlink_peers();
            self.offlink_reported.retain(|ip| all.contains(ip));
            all
        } else {
            let mut v = Vec::new();
            for ip in &self.pending_ips {
                let present = self.desired_node(ip).is_some();
                if present && self.policy.is_offlink(*ip) {
                    v.push(*ip);
                } else {
                    self.offlink_reported.remove(ip);
                }
            }
            v
        };
        for ip in offlink {
            if self.offlink_reported.insert(ip) {
                tracing::warn!(
                    peer = %ip,
                    underlay = %self.policy.underlay_subnet,
                    "peer is not on this node's underlay subnet: host-gw cannot reach it (use vxlan, ipip or DirectRouting)"
                );
            }
        }
        let writes = plan.len();
        // Removals first (they free room in full maps), routes before the nodes they point to;
        // then new peers before the routes that send to them (decapsulation accepts a peer
        // before traffic to it can come back). A route pointing at a removed node still
        // encapsulates: node entries only admit decapsulation.
        let mut plan = plan;
        plan.route_removes.sort();
        plan.node_removes.sort();
        plan.node_upserts.sort_by_key(|(k, _)| *k);
        plan.route_upserts.sort_by_key(|(k, _)| *k);
        let mut next_hops_stale = false;
        // Each write stands alone: one that fails (a full map) is reported and retried, the
        // others go on.
        let mut failures = Outcome::default();
        for net in plan.route_removes {
            match maps.remove_route(net) {
                Ok(()) => {}
                // Already gone: the goal is reached.
                Err(_) if !maps.routes()?.iter().any(|(n, _)| *n == net) => {}
                Err(e) => {
                    failures.subnet(net, e);
                    continue;
                }
            }
            self.programmed.routes.remove(&net);
        }
        for ip in plan.node_removes {
            match maps.remove_node(ip) {
                Ok(()) => {}
                Err(_) if !maps.nodes()?.iter().any(|(n, _)| *n == ip) => {}
                Err(e) => {
                    failures.ip(ip, e);
                    continue;
                }
            }
            self.programmed.nodes.remove(&ip);
            next_hops_stale = true;
        }
        for (ip, info) in plan.node_upserts {
            match maps.upsert_node(ip, &info) {
                Ok(()) => {
                    self.programmed.nodes.insert(ip, info);
                }
                Err(e) => failures.ip(ip, e),
            }
        }
        for (net, info) in plan.route_upserts {
            let node = Ipv4Addr::from(info.node_ip);
            // No route toward a peer whose node entry could not be written: its replies
            // would be refused (decapsulation admits known nodes only).
            if failures.ips.contains(&node) && !self.programmed.nodes.contains_key(&node) {
                failures.subnets.insert(net);
                continue;
            }
            if let Some(old) = self.programmed.routes.get(&net) {
                next_hops_stale |= old.node_ip != info.node_ip;
            }
            match maps.upsert_route(net, &info) {
                Ok(()) => {
                    self.programmed.routes.insert(net, info);
                }
                Err(e) => failures.subnet(net, e),
            }
        }
        // Names last: for people only, nothing waits on them, and a name that cannot be
        // written is retried but never makes the node unready (`Outcome::name`).
        plan.name_removes.sort();
        plan.name_upserts.sort();
        for ip in plan.name_removes {
            match maps.remove_node_name(ip) {
                Ok(()) => {}
                Err(_) if !maps.node_names()?.iter().any(|(n, _)| *n == ip) => {}
                Err(e) => {
                    failures.name(ip, e);
                    continue;
                }
            }
            self.programmed.names.remove(&ip);
        }
        for (ip, name) in plan.name_upserts {
            match maps.upsert_node_name(ip, &name) {
                Ok(()) => {
                    self.programmed.names.insert(ip, name);
                }
                Err(e) => failures.name(ip, e),
            }
        }
        if next_hops_stale {
            // A node left or moved: forget cached underlay next hops (they refresh within 1 s
            // anyway; this makes it immediate).
            if let Err(e) = maps.flush_next_hops() {
                failures.messages.push(format!("{e:#}"));
            }
        }
        self.full = false;
        self.pending_subnets.clear();
        self.pending_ips.clear();
        // What failed is retried by the next apply.
        self.pending_subnets.extend(&failures.subnets);
        self.pending_ips.extend(&failures.ips);
        Ok(ApplyReport {
            writes: writes - failures.subnets.len() - failures.ips.len(),
            duration: start.elapsed(),
            failures: failures.messages,
            full_maps: failures.full.into_values().collect(),
        })
    }
}

/// The writes of one apply that failed.
#[derive(Default)]
struct Outcome {
    subnets: BTreeSet<Ipv4Net>,
    ips: BTreeSet<Ipv4Addr>,
    messages: Vec<String>,
    /// Full maps by name, with how many entries each refused.
    full: std::collections::BTreeMap<&'static str, (MapFull, usize)>,
}

impl Outcome {
    fn note(&mut self, e: anyhow::Error) {
        if let Some(full) = e.downcast_ref::<MapFull>() {
            self.full.entry(full.map).or_insert((full.clone(), 0)).1 += 1;
        }
        self.messages.push(format!("{e:#}"));
    }

    fn subnet(&mut self, net: Ipv4Net, e: anyhow::Error) {
        self.subnets.insert(net);
        self.note(e);
    }

    fn ip(&mut self, ip: Ipv4Addr, e: anyhow::Error) {
        self.ips.insert(ip);
        self.note(e);
    }

    /// A node name not written: retried, reported, but no full map (the names map is for
    /// people; it never makes the node unready).
    fn name(&mut self, ip: Ipv4Addr, e: anyhow::Error) {
        self.ips.insert(ip);
        self.messages.push(format!("{e:#}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(subnet: &str, ip: [u8; 4]) -> NodeLease {
        let subnet: Ipv4Net = subnet.parse().unwrap();
        NodeLease {
            subnet,
            public_ip: Ipv4Addr::from(ip),
            backend: Some(BackendType::Vxlan),
            vtep_mac: None,
            name: crate::datastore::subnet_key(subnet),
            node_name: None,
            seniority: 0,
            unknown_backend: None,
        }
    }

    fn rec(backend: BackendType, direct: bool) -> Reconciler {
        Reconciler::new(
            ModePolicy {
                backend,
                direct_routing: direct,
                underlay_subnet: "192.168.1.0/24".parse().unwrap(),
                bgp: None,
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
        assert!(r.handle(Event::Remove("10.244.2.0-24".into())));
        assert!(!r.handle(Event::Remove("10.244.2.0-24".into())));
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

    #[test]
    fn incremental_plan_matches_a_full_diff() {
        let mut r = rec(BackendType::Vxlan, true);
        r.handle(Event::Snapshot(vec![
            lease("10.244.2.0/24", [192, 168, 1, 2]),
            lease("10.244.3.0/24", [192, 168, 1, 3]),
        ]));
        // Pretend the snapshot was applied.
        r.programmed = r.desired();
        r.full = false;
        let events = [
            Event::Upsert(lease("10.244.3.0/24", [192, 168, 2, 33])),
            Event::Remove("10.244.2.0-24".into()),
            Event::Upsert(lease("10.244.4.0/24", [192, 168, 1, 4])),
            Event::Upsert(lease("10.244.5.0/24", [192, 168, 1, 4])),
            Event::Remove("10.244.5.0-24".into()),
        ];
        for e in events {
            r.handle(e);
        }
        let mut partial = r.partial_plan();
        let mut full = diff(&r.programmed, &r.desired());
        for p in [&mut partial, &mut full] {
            p.route_upserts.sort_by_key(|(k, _)| *k);
            p.route_removes.sort();
            p.node_upserts.sort_by_key(|(k, _)| *k);
            p.node_removes.sort();
        }
        assert_eq!(partial, full);
        assert_eq!(
            full.node_removes,
            vec![Ipv4Addr::new(192, 168, 1, 2), Ipv4Addr::new(192, 168, 1, 3)]
        );
        assert_eq!(full.route_upserts.len(), 2);
    }

    fn named(subnet: &str, ip: [u8; 4], node: Option<&str>) -> NodeLease {
        NodeLease {
            node_name: node.map(str::to_string),
            ..lease(subnet, ip)
        }
    }

    #[test]
    fn node_names_follow_the_records_incrementally_and_survive_a_restart() {
        let mut r = rec(BackendType::Vxlan, false).with_local_name("node-a");
        r.handle(Event::Snapshot(vec![
            named("10.244.2.0/24", [192, 168, 1, 2], Some("node-b")),
            // flanneld's lease: no name.
            named("10.244.3.0/24", [192, 168, 1, 3], None),
            // A record refused (it overlaps this node's subnet): it names nothing.
            named("10.244.1.128/25", [192, 168, 1, 9], Some("rogue")),
        ]));
        let mut maps = MemoryMaps::default();
        r.apply(&mut maps).unwrap();
        let want = |pairs: &[([u8; 4], &str)]| -> std::collections::BTreeMap<Ipv4Addr, String> {
            pairs
                .iter()
                .map(|(ip, n)| (Ipv4Addr::from(*ip), n.to_string()))
                .collect()
        };
        assert_eq!(
            maps.names,
            want(&[([192, 168, 1, 1], "node-a"), ([192, 168, 1, 2], "node-b")])
        );
        // Names are written after the routes and nodes they describe.
        let first_name = maps
            .writes
            .iter()
            .position(|w| matches!(w, MapWrite::UpsertName(_)))
            .unwrap();
        assert!(
            maps.writes[first_name..]
                .iter()
                .all(|w| matches!(w, MapWrite::UpsertName(_))),
            "{:?}",
            maps.writes
        );

        // Events: node-b renamed, node 3 gains a name, a new named node, node-b's address moves.
        let events = [
            Event::Upsert(named("10.244.2.0/24", [192, 168, 1, 2], Some("node-b2"))),
            Event::Upsert(named("10.244.3.0/24", [192, 168, 1, 3], Some("node-c"))),
            Event::Upsert(named("10.244.4.0/24", [192, 168, 1, 4], Some("node-d"))),
            Event::Upsert(named("10.244.2.0/24", [192, 168, 1, 22], Some("node-b2"))),
        ];
        for e in events {
            r.handle(e);
        }
        let mut partial = r.partial_plan();
        let mut full = diff(&r.programmed, &r.desired());
        for p in [&mut partial, &mut full] {
            p.route_upserts.sort_by_key(|(k, _)| *k);
            p.route_removes.sort();
            p.node_upserts.sort_by_key(|(k, _)| *k);
            p.node_removes.sort();
            p.name_upserts.sort();
            p.name_removes.sort();
        }
        assert_eq!(partial, full);
        assert_eq!(full.name_removes, vec![Ipv4Addr::new(192, 168, 1, 2)]);
        r.apply(&mut maps).unwrap();
        let expected = want(&[
            ([192, 168, 1, 1], "node-a"),
            ([192, 168, 1, 3], "node-c"),
            ([192, 168, 1, 4], "node-d"),
            ([192, 168, 1, 22], "node-b2"),
        ]);
        assert_eq!(maps.names, expected);

        // A node gone: its name goes too.
        r.handle(Event::Remove("10.244.4.0-24".into()));
        r.apply(&mut maps).unwrap();
        assert!(!maps.names.contains_key(&Ipv4Addr::new(192, 168, 1, 4)));

        // A restarted agent adopts the names and writes nothing; a name changed behind its back
        // is repaired by the resync.
        let mut again = rec(BackendType::Vxlan, false).with_local_name("node-a");
        again.handle(Event::Snapshot(vec![
            named("10.244.2.0/24", [192, 168, 1, 22], Some("node-b2")),
            named("10.244.3.0/24", [192, 168, 1, 3], Some("node-c")),
        ]));
        maps.writes.clear();
        let report = again.resync(&mut maps).unwrap();
        assert_eq!(report.writes, 0, "{:?}", maps.writes);
        maps.names
            .insert(Ipv4Addr::new(192, 168, 1, 3), "wrong".into());
        again.resync(&mut maps).unwrap();
        assert_eq!(
            maps.names[&Ipv4Addr::new(192, 168, 1, 3)],
            "node-c",
            "repaired"
        );
        // A failed name write is retried by the next apply.
        again.handle(Event::Upsert(named(
            "10.244.3.0/24",
            [192, 168, 1, 3],
            Some("node-c3"),
        )));
        maps.fail_writes = 1;
        assert!(again.apply(&mut maps).unwrap().failed());
        assert_eq!(maps.names[&Ipv4Addr::new(192, 168, 1, 3)], "node-c");
        assert!(!again.apply(&mut maps).unwrap().failed());
        assert_eq!(maps.names[&Ipv4Addr::new(192, 168, 1, 3)], "node-c3");

        // A full name map: routes and nodes go on, the name is retried, and no map is reported
        // full (a missing name never makes the node unready).
        let mut small = MemoryMaps {
            names_max: Some(1),
            ..MemoryMaps::default()
        };
        let mut r = rec(BackendType::Vxlan, false).with_local_name("node-a");
        r.handle(Event::Snapshot(vec![named(
            "10.244.2.0/24",
            [192, 168, 1, 2],
            Some("node-b"),
        )]));
        let report = r.apply(&mut small).unwrap();
        assert!(report.failed());
        assert!(report.full_maps.is_empty(), "{:?}", report.full_maps);
        assert_eq!(small.routes.len(), 1);
        assert_eq!(small.nodes.len(), 1);
        assert_eq!(small.names.len(), 1);
        small.names_max = None;
        assert!(!r.apply(&mut small).unwrap().failed(), "retried");
        assert_eq!(small.names.len(), 2);
    }
}

//! The compiler: from the world and the policies to the contents of one node's policy maps,
//! kept incrementally, and the ordered map writes that take the maps from one state to the next
//! without a window that is open to denied traffic or closed to allowed traffic.
//!
//! # Representation (per node)
//!
//! - **Peers** are the policies' `from`/`to` entries, shared by content: two policies naming the
//!   same selector pair in the same namespace share one peer.
//! - An address's **class** is its membership signature: the peers it matches (ipBlocks
//!   included) and, for egress named ports, the number it gives each name used by an egress rule.
//!   Pods with equal signatures share a class. Every pod address (cluster-wide) gets its class in
//!   `WEFT_POLICY_ADDRS`; ipBlock `cidr`/`except` boundaries get the class of the region they
//!   start in `WEFT_POLICY_CIDRS` (LPM). An address in neither matches no peer
//!   ([`POLICY_CLASS_NONE`]): an unknown pod can only be allowed by an ipBlock or an "all
//!   peers" rule, never by a selector (fail closed).
//! - A local endpoint's **rule set** per direction is the signature of the policies selecting it
//!   (by revision) plus, for ingress, the numbers the endpoint gives the named ports those
//!   policies use. Endpoints with equal signatures share a rule set.
//! - **Rule entries** `(rule set, class|ANY, protocol|ANY)` → allowed ports exist only where
//!   something is allowed.
//!
//! Class and rule-set numbers stand for immutable contents: an entry's value never changes while
//! its key exists, so every update is made of additions, pointer switches (an address's class, an
//! endpoint's rule sets) and deletions.
//!
//! # Update ordering
//!
//! Each phase writes, in order: namespace defaults that isolate more; port blocks; rule entries
//! for every new (rule set, class) pair, including pairs of a rule set that is on its way out
//! with a class on its way in; LPM prefixes (longest first) and address classes; endpoint
//! states; endpoint deletions; rule-entry and port-block deletions; namespace defaults that
//! isolate less. Pointer switches are single map writes, so every (endpoint, address) pair flips
//! from its old verdict to its new one exactly once.
//!
//! A policy change runs in three phases so that the pointers never refer to a rule set that
//! cannot interpret a class: (1) the new revision's peers join the peer universe (addresses move
//! to classes that also say whether they match the new peers; verdicts unchanged), (2) endpoints
//! switch to rule sets built from the new revision (each endpoint flips at once), (3) the old
//! revision's peers leave (addresses move to smaller classes; verdicts unchanged).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net};
use weft_common::policy::*;

use super::{
    model::{Direction, NamespaceScope, Peer, PodRecord, Policy, PortMatch, Protocol, World},
    selector::Labels,
};

/// Entries each map may hold (the maps' `max_entries`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub endpoints: u32,
    pub addrs: u32,
    pub cidrs: u32,
    pub rules: u32,
    pub port_blocks: u32,
    pub ns_defaults: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            endpoints: POLICY_ENDPOINTS_MAX,
            addrs: POLICY_ADDRS_MAX,
            cidrs: POLICY_CIDRS_MAX,
            rules: POLICY_RULES_MAX,
            port_blocks: POLICY_PORT_BLOCKS_MAX,
            ns_defaults: POLICY_NS_DEFAULTS_MAX,
        }
    }
}

/// One map write (`None`: delete the key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapWrite {
    NsDefault {
        namespace: String,
        flags: Option<u32>,
    },
    PortBlock {
        key: PolicyPortBlockKey,
        value: Option<PolicyPortBlock>,
    },
    Rule {
        key: PolicyRuleKey,
        value: Option<PolicyPorts>,
    },
    Cidr {
        net: Ipv4Net,
        class: Option<u32>,
    },
    Addr {
        ip: Ipv4Addr,
        class: Option<u32>,
    },
    Endpoint {
        ip: Ipv4Addr,
        state: Option<PolicyEndpoint>,
    },
}

/// The map that refused a write because it is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFull(pub &'static str);

/// The policy maps, as the datapath has them (aya maps) or emulated ([`super::emulate`]).
pub trait PolicyMaps {
    /// Applies one write. Deleting a missing key succeeds.
    fn write(&mut self, w: &MapWrite) -> Result<(), MapFull>;
}

/// The ordered writes of one update.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub writes: Vec<MapWrite>,
}

/// What could not be applied, and what was closed because of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Endpoints (by address) that deny a whole direction because their rules did not fit,
    /// with the direction and the full map.
    pub failed_endpoints: Vec<(Ipv4Addr, Direction, &'static str)>,
    /// Addresses whose class could not be written (they match ipBlocks only until retried).
    pub unclassified: Vec<(Ipv4Addr, &'static str)>,
    /// Endpoints without any policy state (the datapath denies them both ways).
    pub stateless_endpoints: Vec<(Ipv4Addr, &'static str)>,
    /// A namespace default did not fit: the synced marker was removed, so new pods are isolated
    /// both ways until the agent compiles them.
    pub ns_defaults_failed: Vec<(String, &'static str)>,
}

impl ApplyReport {
    pub fn is_clean(&self) -> bool {
        *self == Self::default()
    }
}

type PeerId = u32;
type RevId = u64;
type Name = (String, Protocol);

#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
struct ClassSig {
    peers: Vec<PeerId>,
    named: Vec<(String, Protocol, u16)>,
}

impl ClassSig {
    fn has_peer(&self, p: PeerId) -> bool {
        self.peers.binary_search(&p).is_ok()
    }
    fn resolve(&self, name: &str, proto: Protocol) -> Option<u16> {
        self.named
            .iter()
            .find(|(n, p, _)| n == name && *p == proto)
            .map(|x| x.2)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RulesetSig {
    dir: Direction,
    revs: Vec<RevId>,
    named: Vec<(String, Protocol, u16)>,
}

#[derive(Clone, Debug)]
struct CRule {
    peers: Option<Vec<PeerId>>,
    ports: Option<Vec<super::model::PortSpec>>,
}

struct Rev {
    policy: Arc<Policy>,
    ingress: Vec<CRule>,
    egress: Vec<CRule>,
}

impl Rev {
    fn rules(&self, dir: Direction) -> &[CRule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// A rule set's rules, indexed by the peers they name, so that the entries of one class are
/// computed from the rules that can concern it only.
#[derive(Default)]
struct RuleIndex {
    by_peer: HashMap<PeerId, Vec<(RevId, usize)>>,
    /// Rules for every peer (`from`/`to` empty).
    wild: Vec<(RevId, usize)>,
}

/// Selector peers of one namespace, indexed by a label their pod selector requires (the first
/// single-valued `In`/`matchLabels` requirement), so a pod is checked against the peers that
/// could match it rather than all of them.
#[derive(Default)]
struct SelectorIndex {
    by_label: HashMap<(String, String), BTreeSet<PeerId>>,
    rest: BTreeSet<PeerId>,
}

impl SelectorIndex {
    fn slot(peer: &Peer) -> Option<(String, String)> {
        let Peer::Pods {
            pods: Some(sel), ..
        } = peer
        else {
            return None;
        };
        sel.requirements
            .iter()
            .find(|r| r.op == super::selector::Operator::In && r.values.len() == 1)
            .map(|r| (r.key.clone(), r.values.iter().next().expect("one").clone()))
    }
    fn insert(&mut self, id: PeerId, peer: &Peer) {
        match Self::slot(peer) {
            Some(k) => {
                self.by_label.entry(k).or_default().insert(id);
            }
            None => {
                self.rest.insert(id);
            }
        }
    }
    fn remove(&mut self, id: PeerId, peer: &Peer) {
        match Self::slot(peer) {
            Some(k) => {
                if let Some(s) = self.by_label.get_mut(&k) {
                    s.remove(&id);
                    if s.is_empty() {
                        self.by_label.remove(&k);
                    }
                }
            }
            None => {
                self.rest.remove(&id);
            }
        }
    }
    fn is_empty(&self) -> bool {
        self.by_label.is_empty() && self.rest.is_empty()
    }
    fn candidates<'a>(&'a self, labels: &'a Labels) -> impl Iterator<Item = PeerId> + 'a {
        self.rest.iter().copied().chain(
            labels
                .iter()
                .filter_map(|(k, v)| self.by_label.get(&(k.clone(), v.clone())))
                .flatten()
                .copied(),
        )
    }
}

/// An interned value with a reference count.
struct Interned<T> {
    value: T,
    refs: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct EndpointDesired {
    ingress: Option<u32>,
    egress: Option<u32>,
}

/// Writes of one phase, ordered by [`Phase::finish`].
#[derive(Default)]
struct Phase {
    ns_grow: Vec<MapWrite>,
    blocks_add: Vec<MapWrite>,
    rules_add: Vec<MapWrite>,
    cidrs: Vec<(Ipv4Net, Option<u32>)>,
    addrs: Vec<MapWrite>,
    endpoints: Vec<MapWrite>,
    endpoints_del: Vec<MapWrite>,
    rules_del: Vec<MapWrite>,
    blocks_del: Vec<MapWrite>,
    ns_shrink: Vec<MapWrite>,
}

impl Phase {
    fn finish(mut self, plan: &mut Plan) {
        // Longest prefixes first: a new boundary never lends its class to a region it does not
        // cover. Deletions after insertions.
        self.cidrs
            .sort_by_key(|(net, class)| (class.is_none(), std::cmp::Reverse(net.prefix_len())));
        let cidrs = self
            .cidrs
            .into_iter()
            .map(|(net, class)| MapWrite::Cidr { net, class });
        plan.writes.extend(
            self.ns_grow
                .into_iter()
                .chain(self.blocks_add)
                .chain(self.rules_add)
                .chain(cidrs)
                .chain(self.addrs)
                .chain(self.endpoints)
                .chain(self.endpoints_del)
                .chain(self.rules_del)
                .chain(self.blocks_del)
                .chain(self.ns_shrink),
        );
    }
}

/// One node's policy compiler. Feed it the world's changes; each call returns the [`Plan`] that
/// takes the maps from the previous state to the new one.
pub struct Compiler {
    node: String,
    world: World,
    /// (namespace, name) → active revision.
    active: BTreeMap<(String, String), RevId>,
    revs: HashMap<RevId, Rev>,
    next_rev: RevId,

    peer_ids: HashMap<Peer, PeerId>,
    peers: HashMap<PeerId, Interned<Peer>>,
    next_peer: PeerId,
    peers_own_ns: HashMap<String, SelectorIndex>,
    peers_ns_sel: BTreeSet<PeerId>,
    peers_ip_block: BTreeSet<PeerId>,
    /// Names used by egress rules of revisions in the universe, with use counts.
    egress_names: HashMap<Name, u32>,
    /// Namespace → the namespace-selector peers matching it (cache).
    ns_sel_cache: HashMap<String, Vec<PeerId>>,

    class_ids: HashMap<ClassSig, u32>,
    classes: HashMap<u32, Interned<ClassSig>>,
    next_class: u32,
    classes_by_peer: HashMap<PeerId, HashSet<u32>>,
    classes_by_name: HashMap<Name, HashSet<u32>>,
    addr_class: HashMap<Ipv4Addr, u32>,
    cidr_class: BTreeMap<Ipv4Net, u32>,

    ruleset_ids: HashMap<RulesetSig, u32>,
    rulesets: HashMap<u32, Interned<RulesetSig>>,
    ruleset_rules: HashMap<u32, RuleIndex>,
    next_ruleset: u32,
    endpoints: HashMap<Ipv4Addr, EndpointDesired>,
    /// Rule set → class (or ANY) → protocols with entries.
    rule_index: HashMap<u32, HashMap<u32, Vec<u8>>>,
    rules: HashMap<PolicyRuleKey, PolicyPorts>,
    port_set_ids: HashMap<Vec<PortRange>, u32>,
    port_sets: HashMap<u32, Interned<Vec<PortRange>>>,
    next_port_set: u32,
    ns_defaults: HashMap<String, u32>,
    synced: bool,

    failed_rulesets: HashSet<u32>,
    phase: Phase,
    /// Classes and rule sets whose count fell to zero in this phase: they keep their entries
    /// until the phase ends, so every pair live during the phase's writes has its entries.
    dead_classes: BTreeSet<u32>,
    dead_rulesets: BTreeSet<u32>,
}

impl Compiler {
    pub fn new(node: &str) -> Self {
        Self {
            node: node.into(),
            world: World::default(),
            active: BTreeMap::new(),
            revs: HashMap::new(),
            next_rev: 1,
            peer_ids: HashMap::new(),
            peers: HashMap::new(),
            next_peer: 1,
            peers_own_ns: HashMap::new(),
            peers_ns_sel: BTreeSet::new(),
            peers_ip_block: BTreeSet::new(),
            egress_names: HashMap::new(),
            ns_sel_cache: HashMap::new(),
            class_ids: HashMap::new(),
            classes: HashMap::new(),
            next_class: POLICY_CLASS_FIRST_DYNAMIC,
            classes_by_peer: HashMap::new(),
            classes_by_name: HashMap::new(),
            addr_class: HashMap::new(),
            cidr_class: BTreeMap::new(),
            ruleset_ids: HashMap::new(),
            rulesets: HashMap::new(),
            ruleset_rules: HashMap::new(),
            next_ruleset: POLICY_RULESET_DENY + 1,
            endpoints: HashMap::new(),
            rule_index: HashMap::new(),
            rules: HashMap::new(),
            port_set_ids: HashMap::new(),
            port_sets: HashMap::new(),
            next_port_set: 1,
            ns_defaults: HashMap::new(),
            synced: false,
            failed_rulesets: HashSet::new(),
            phase: Phase::default(),
            dead_classes: BTreeSet::new(),
            dead_rulesets: BTreeSet::new(),
        }
    }

    /// Starts numbering above the given values (an agent adopting maps pinned by its previous
    /// run starts above the numbers found there, so old and new entries never collide).
    pub fn with_id_floor(mut self, class: u32, ruleset: u32, port_set: u32) -> Self {
        self.next_class = self.next_class.max(class + 1);
        self.next_ruleset = self.next_ruleset.max(ruleset + 1);
        self.next_port_set = self.next_port_set.max(port_set + 1);
        self
    }

    /// Builds a compiler from a whole world and policy set; the plan writes everything.
    pub fn build(
        node: &str,
        world: World,
        policies: impl IntoIterator<Item = Policy>,
    ) -> (Self, Plan) {
        Self::new(node).build_from(world, policies)
    }

    /// [`Self::build`] on a compiler made with [`Self::new`] (and perhaps
    /// [`Self::with_id_floor`]).
    pub fn build_from(
        self,
        world: World,
        policies: impl IntoIterator<Item = Policy>,
    ) -> (Self, Plan) {
        let mut c = self;
        let mut plan = Plan::default();
        c.world.nodes = world.nodes;
        c.world.namespaces = world.namespaces;
        for p in policies {
            let rev = c.new_rev(p);
            let key = {
                let p = &c.revs[&rev].policy;
                (p.namespace.clone(), p.name.clone())
            };
            c.enter_universe(rev);
            if let Some(old) = c.active.insert(key, rev) {
                c.leave_universe(old);
            }
        }
        c.world.pods = world.pods;
        c.synced = true;
        c.phase.ns_grow.push(MapWrite::NsDefault {
            namespace: String::new(),
            flags: Some(POLICY_NS_F_SYNCED),
        });
        c.refresh_cidrs();
        // This node's own addresses first: with the address map short of room, kubelet probes
        // keep working and pods fall back to their ipBlock-only class.
        c.refresh_node_addrs(&[]);
        let keys: Vec<_> = c.world.pods.keys().cloned().collect();
        c.refresh_pods(keys.iter());
        let namespaces: BTreeSet<String> = c.active.keys().map(|k| k.0.clone()).collect();
        for ns in namespaces {
            c.refresh_ns_default(&ns);
        }
        c.end_phase(&mut plan);
        (c, plan)
    }

    /// The plan that takes maps an earlier agent left pinned (read into `existing`) to this
    /// compiler's state, for a compiler made with [`Self::with_id_floor`] above `existing`'s
    /// numbers and [`Self::build_from`] (whose own plan this replaces). The old numbers' meaning
    /// is unknown, so the switch goes through transitional classes, one per (old class, new
    /// class) pair found at an address or LPM location: to an old rule set a transitional class
    /// is its old class (its old entries are copied), to a new rule set its new class.
    ///
    /// 1. every new entry and every transitional entry is written;
    /// 2. addresses and LPM prefixes (old and new) switch to their transitional classes: no
    ///    verdict changes;
    /// 3. endpoints switch to the new rule sets: each flips from its old verdicts to its new ones;
    /// 4. addresses and prefixes switch to their new classes, old-only ones are deleted: no
    ///    verdict changes;
    /// 5. everything old and transitional is deleted. Endpoint states the CNI plugin wrote for
    ///    pods this compiler does not know yet (`PENDING`) are kept.
    pub fn adoption_plan(&mut self, existing: &super::emulate::EmulatedMaps) -> Plan {
        let longest = |m: &BTreeMap<Ipv4Net, u32>, net: &Ipv4Net| -> u32 {
            m.iter()
                .filter(|(n, _)| n.contains(net))
                .max_by_key(|(n, _)| n.prefix_len())
                .map_or(POLICY_CLASS_NONE, |(_, c)| *c)
        };
        let old_addr = |ip: &Ipv4Addr| {
            existing
                .addrs
                .get(ip)
                .copied()
                .unwrap_or_else(|| longest(&existing.cidrs, &Ipv4Net::from(*ip)))
        };
        let new_addr = |ip: &Ipv4Addr| {
            self.addr_class
                .get(ip)
                .copied()
                .unwrap_or_else(|| longest(&self.cidr_class, &Ipv4Net::from(*ip)))
        };
        let mut ips: BTreeSet<Ipv4Addr> = existing.addrs.keys().copied().collect();
        ips.extend(self.addr_class.keys());
        let mut nets: BTreeSet<Ipv4Net> = existing.cidrs.keys().copied().collect();
        nets.extend(self.cidr_class.keys());
        // Locations and their (old, new) classes.
        let mut addr_pairs: Vec<(Ipv4Addr, u32, u32)> = ips
            .iter()
            .map(|ip| (*ip, old_addr(ip), new_addr(ip)))
            .collect();
        let mut net_pairs: Vec<(Ipv4Net, u32, u32)> = nets
            .iter()
            .map(|n| {
                let old = existing
                    .cidrs
                    .get(n)
                    .copied()
                    .unwrap_or_else(|| longest(&existing.cidrs, n));
                let new = self
                    .cidr_class
                    .get(n)
                    .copied()
                    .unwrap_or_else(|| longest(&self.cidr_class, n));
                (*n, old, new)
            })
            .collect();
        net_pairs.sort_by_key(|(n, _, _)| std::cmp::Reverse(n.prefix_len()));
        // Transitional classes (not for the host class: its meaning is built into the datapath).
        let mut transitional: BTreeMap<(u32, u32), u32> = BTreeMap::new();
        let pairs: Vec<(u32, u32)> = addr_pairs
            .iter()
            .map(|(_, o, n)| (*o, *n))
            .chain(net_pairs.iter().map(|(_, o, n)| (*o, *n)))
            .collect();
        for (old, new) in pairs {
            if old == new
                || old == POLICY_CLASS_HOST
                || new == POLICY_CLASS_HOST
                || transitional.contains_key(&(old, new))
            {
                continue;
            }
            transitional.insert((old, new), self.next_class);
            self.next_class += 1;
        }
        let via = |old: u32, new: u32| transitional.get(&(old, new)).copied().unwrap_or(new);

        let mut plan = Plan::default();
        plan.writes.push(MapWrite::NsDefault {
            namespace: String::new(),
            flags: Some(POLICY_NS_F_SYNCED),
        });
        let mut ns: Vec<(&String, &u32)> = self.ns_defaults.iter().collect();
        ns.sort();
        for (name, flags) in ns {
            plan.writes.push(MapWrite::NsDefault {
                namespace: name.clone(),
                flags: Some(*flags),
            });
        }
        let mut sets: Vec<u32> = self.port_sets.keys().copied().collect();
        sets.sort_unstable();
        for id in sets {
            for (key, value) in self.port_set_blocks(id) {
                plan.writes.push(MapWrite::PortBlock {
                    key,
                    value: Some(value),
                });
            }
        }
        let mut rules: Vec<(PolicyRuleKey, PolicyPorts)> =
            self.rules.iter().map(|(k, v)| (*k, *v)).collect();
        // Transitional entries: copies of the old class's old entries and the new class's new ones.
        let mut by_class: HashMap<u32, Vec<(PolicyRuleKey, PolicyPorts)>> = HashMap::new();
        for (k, v) in existing.rules.iter().chain(self.rules.iter()) {
            by_class.entry(k.class).or_default().push((*k, *v));
        }
        let mut transitional_keys = Vec::new();
        for ((old, new), t) in &transitional {
            for class in [old, new] {
                for (k, v) in by_class.get(class).into_iter().flatten() {
                    let key = PolicyRuleKey { class: *t, ..*k };
                    transitional_keys.push(key);
                    rules.push((key, *v));
                }
            }
        }
        rules.sort_by_key(|(k, _)| *k);
        plan.writes
            .extend(rules.into_iter().map(|(key, v)| MapWrite::Rule {
                key,
                value: Some(v),
            }));
        // Pointers to the transitional classes.
        for (net, old, new) in &net_pairs {
            plan.writes.push(MapWrite::Cidr {
                net: *net,
                class: Some(via(*old, *new)),
            });
        }
        addr_pairs.sort();
        for (ip, old, new) in &addr_pairs {
            plan.writes.push(MapWrite::Addr {
                ip: *ip,
                class: Some(via(*old, *new)),
            });
        }
        // Endpoints.
        let mut endpoints: Vec<(&Ipv4Addr, &EndpointDesired)> = self.endpoints.iter().collect();
        endpoints.sort_by_key(|(ip, _)| **ip);
        for (ip, ep) in endpoints {
            plan.writes.push(MapWrite::Endpoint {
                ip: *ip,
                state: Some(self.endpoint_state(ep)),
            });
        }
        // Pointers to the new classes; old-only prefixes and addresses go.
        for (net, _, _) in &net_pairs {
            let w = match self.cidr_class.get(net) {
                Some(c) => MapWrite::Cidr {
                    net: *net,
                    class: Some(*c),
                },
                None => MapWrite::Cidr {
                    net: *net,
                    class: None,
                },
            };
            plan.writes.push(w);
        }
        for (ip, _, _) in &addr_pairs {
            plan.writes.push(MapWrite::Addr {
                ip: *ip,
                class: self.addr_class.get(ip).copied(),
            });
        }
        // Deletions.
        let mut old_eps: Vec<&Ipv4Addr> = existing
            .endpoints
            .iter()
            .filter(|(ip, st)| !self.endpoints.contains_key(ip) && st.flags & POLICY_F_PENDING == 0)
            .map(|(ip, _)| ip)
            .collect();
        old_eps.sort();
        plan.writes
            .extend(old_eps.into_iter().map(|ip| MapWrite::Endpoint {
                ip: *ip,
                state: None,
            }));
        let mut rule_deletes: BTreeSet<PolicyRuleKey> = existing
            .rules
            .keys()
            .filter(|k| !self.rules.contains_key(k))
            .copied()
            .collect();
        rule_deletes.extend(transitional_keys);
        plan.writes.extend(
            rule_deletes
                .into_iter()
                .map(|key| MapWrite::Rule { key, value: None }),
        );
        let mut block_deletes: Vec<PolicyPortBlockKey> = existing
            .blocks
            .keys()
            .filter(|k| !self.port_sets.contains_key(&k.set))
            .copied()
            .collect();
        block_deletes.sort();
        plan.writes.extend(
            block_deletes
                .into_iter()
                .map(|key| MapWrite::PortBlock { key, value: None }),
        );
        let mut ns_deletes: Vec<&String> = existing
            .ns_defaults
            .keys()
            .filter(|n| !n.is_empty() && !self.ns_defaults.contains_key(*n))
            .collect();
        ns_deletes.sort();
        plan.writes
            .extend(ns_deletes.into_iter().map(|n| MapWrite::NsDefault {
                namespace: n.clone(),
                flags: None,
            }));
        self.phase = Phase::default();
        plan
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    pub fn policies(&self) -> Vec<Policy> {
        self.active
            .values()
            .map(|r| (*self.revs[r].policy).clone())
            .collect()
    }

    /// Number of classes and rule sets and rule entries (for metrics and tests).
    pub fn stats(&self) -> (usize, usize, usize) {
        (self.classes.len(), self.rulesets.len(), self.rules.len())
    }

    /// Local endpoints closed in a direction because their rules did not fit (until a
    /// [`Self::retry_plan`] applies cleanly).
    pub fn failed_endpoints(&self) -> usize {
        self.endpoints
            .values()
            .filter(|ep| {
                let st = close_failed(self.endpoint_state(ep), &self.failed_rulesets);
                st.flags & (POLICY_F_INGRESS_FAILED | POLICY_F_EGRESS_FAILED) != 0
            })
            .count()
    }

    // ---- events -------------------------------------------------------------------------

    /// A pod was added or changed (labels, address, node, named ports).
    pub fn upsert_pod(&mut self, pod: PodRecord) -> Plan {
        let key = (pod.namespace.clone(), pod.name.clone());
        let new_ip = pod.ip.filter(|_| !pod.host_network);
        let old = self.world.pods.insert(key.clone(), pod);
        let mut plan = Plan::default();
        self.refresh_pods([key].iter());
        if let Some(old_ip) = old.filter(|o| !o.host_network).and_then(|o| o.ip)
            && Some(old_ip) != new_ip
        {
            self.release_ip_if_unused(old_ip);
        }
        self.end_phase(&mut plan);
        plan
    }

    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> Plan {
        let mut plan = Plan::default();
        if let Some(old) = self.world.pods.remove(&(namespace.into(), name.into()))
            && let Some(ip) = old.ip
        {
            self.release_ip_if_unused(ip);
        }
        self.end_phase(&mut plan);
        plan
    }

    /// A namespace was added or relabelled (the `kubernetes.io/metadata.name` label is added).
    pub fn upsert_namespace(&mut self, name: &str, mut labels: Labels) -> Plan {
        labels.insert(super::model::NAMESPACE_NAME_LABEL.into(), name.into());
        self.world.namespaces.insert(name.into(), labels);
        self.namespace_changed(name)
    }

    pub fn remove_namespace(&mut self, name: &str) -> Plan {
        self.world.namespaces.remove(name);
        self.namespace_changed(name)
    }

    /// A node's addresses (this node's get the host class).
    pub fn set_node_addrs(&mut self, node: &str, addrs: Vec<Ipv4Addr>) -> Plan {
        let old = self
            .world
            .nodes
            .insert(node.into(), addrs)
            .unwrap_or_default();
        let mut plan = Plan::default();
        self.refresh_node_addrs(&old);
        self.end_phase(&mut plan);
        plan
    }

    /// A policy was added or changed (already validated: see [`Policy::from_api`]).
    pub fn upsert_policy(&mut self, policy: Policy) -> Plan {
        let key = (policy.namespace.clone(), policy.name.clone());
        if let Some(old) = self.active.get(&key)
            && *self.revs[old].policy == policy
        {
            return Plan::default();
        }
        let mut plan = Plan::default();
        let new = self.new_rev(policy);
        // (1) the new revision's peers join the universe.
        let dirty = self.enter_universe(new);
        self.after_universe_change(dirty);
        self.end_phase(&mut plan);
        // (2) endpoints switch.
        let old = self.active.insert(key.clone(), new);
        self.policy_switched(&key.0);
        self.end_phase(&mut plan);
        // (3) the old revision's peers leave.
        if let Some(old) = old {
            let dirty = self.leave_universe(old);
            self.after_universe_change(dirty);
            self.end_phase(&mut plan);
        }
        plan
    }

    pub fn remove_policy(&mut self, namespace: &str, name: &str) -> Plan {
        let mut plan = Plan::default();
        let Some(old) = self.active.remove(&(namespace.into(), name.into())) else {
            return plan;
        };
        self.policy_switched(namespace);
        self.end_phase(&mut plan);
        let dirty = self.leave_universe(old);
        self.after_universe_change(dirty);
        self.end_phase(&mut plan);
        plan
    }

    /// Re-sends everything of the rule sets that failed to apply (call after capacity was freed or
    /// raised).
    pub fn retry_plan(&mut self) -> Plan {
        let mut plan = Plan::default();
        let failed: Vec<u32> = self.failed_rulesets.drain().collect();
        for rs in &failed {
            for (class, protos) in self.rule_index.get(rs).into_iter().flatten() {
                for proto in protos {
                    let key = rule_key(*rs, self.rulesets[rs].value.dir, *class, *proto);
                    let value = self.rules[&key];
                    if value.overflow != 0 {
                        for (k, v) in self.port_set_blocks(value.overflow) {
                            plan.writes.push(MapWrite::PortBlock {
                                key: k,
                                value: Some(v),
                            });
                        }
                    }
                    plan.writes.push(MapWrite::Rule {
                        key,
                        value: Some(value),
                    });
                }
            }
        }
        for (ip, ep) in &self.endpoints {
            if ep.ingress.is_some_and(|r| failed.contains(&r))
                || ep.egress.is_some_and(|r| failed.contains(&r))
            {
                plan.writes.push(MapWrite::Endpoint {
                    ip: *ip,
                    state: Some(self.endpoint_state(ep)),
                });
            }
        }
        plan
    }

    /// Applies a plan in order. A write refused because a map is full closes what depends on
    /// it: the endpoints using an incomplete rule set deny that direction (flagged as failed),
    /// a namespace default that did not fit removes the synced marker. Nothing fails open.
    pub fn apply(&mut self, plan: &Plan, maps: &mut impl PolicyMaps) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut failed: HashSet<u32> = HashSet::new();
        for w in &plan.writes {
            let w = match w {
                MapWrite::Endpoint {
                    ip,
                    state: Some(st),
                } if !failed.is_empty() => MapWrite::Endpoint {
                    ip: *ip,
                    state: Some(close_failed(*st, &failed)),
                },
                other => other.clone(),
            };
            let Err(MapFull(map)) = maps.write(&w) else {
                continue;
            };
            match &w {
                MapWrite::Rule { key, .. } => {
                    failed.insert(key.ruleset);
                }
                MapWrite::PortBlock { key, .. } => {
                    for w2 in &plan.writes {
                        if let MapWrite::Rule {
                            key: rk,
                            value: Some(v),
                        } = w2
                            && v.overflow == key.set
                        {
                            failed.insert(rk.ruleset);
                        }
                    }
                }
                MapWrite::Cidr { .. } => {
                    // A missing boundary could lend an enclosing block's class to an excepted
                    // range: every rule set using an ipBlock is closed.
                    for id in self.rulesets.keys() {
                        if self.ruleset_uses_ip_blocks(*id) {
                            failed.insert(*id);
                        }
                    }
                }
                MapWrite::Addr { ip, .. } => report.unclassified.push((*ip, map)),
                MapWrite::Endpoint { ip, .. } => report.stateless_endpoints.push((*ip, map)),
                MapWrite::NsDefault { namespace, .. } => {
                    report.ns_defaults_failed.push((namespace.clone(), map));
                    let _ = maps.write(&MapWrite::NsDefault {
                        namespace: String::new(),
                        flags: None,
                    });
                    self.synced = false;
                }
            }
        }
        if !failed.is_empty() {
            let mut ips: Vec<_> = self.endpoints.iter().collect();
            ips.sort_by_key(|(ip, _)| **ip);
            for (ip, ep) in ips {
                let st = self.endpoint_state(ep);
                let closed = close_failed(st, &failed);
                if closed != st {
                    let _ = maps.write(&MapWrite::Endpoint {
                        ip: *ip,
                        state: Some(closed),
                    });
                    let map = weft_common::map_names::POLICY_RULES;
                    if closed.flags & POLICY_F_INGRESS_FAILED != 0 {
                        report.failed_endpoints.push((*ip, Direction::Ingress, map));
                    }
                    if closed.flags & POLICY_F_EGRESS_FAILED != 0 {
                        report.failed_endpoints.push((*ip, Direction::Egress, map));
                    }
                }
            }
            self.failed_rulesets.extend(failed);
        }
        report
    }

    // ---- universe ----------------------------------------------------------------------

    fn new_rev(&mut self, policy: Policy) -> RevId {
        let id = self.next_rev;
        self.next_rev += 1;
        self.revs.insert(
            id,
            Rev {
                policy: Arc::new(policy),
                ingress: Vec::new(),
                egress: Vec::new(),
            },
        );
        id
    }

    /// Interns a revision's peers and names. Returns the pods whose signature may change.
    fn enter_universe(&mut self, rev: RevId) -> Dirty {
        let policy = self.revs[&rev].policy.clone();
        let mut dirty = Dirty::default();
        let mut compile = |this: &mut Self, dir: Direction| -> Vec<CRule> {
            policy
                .rules(dir)
                .unwrap_or(&[])
                .iter()
                .map(|r| {
                    let peers = r
                        .peers
                        .as_ref()
                        .map(|ps| ps.iter().map(|p| this.intern_peer(p, &mut dirty)).collect());
                    if dir == Direction::Egress {
                        for name in named_ports(r.ports.as_deref()) {
                            let n = this.egress_names.entry(name.clone()).or_insert(0);
                            *n += 1;
                            if *n == 1 {
                                dirty.names.push(name);
                            }
                        }
                    }
                    CRule {
                        peers,
                        ports: r.ports.clone(),
                    }
                })
                .collect()
        };
        let ingress = compile(self, Direction::Ingress);
        let egress = compile(self, Direction::Egress);
        let r = self.revs.get_mut(&rev).expect("rev");
        r.ingress = ingress;
        r.egress = egress;
        dirty
    }

    fn leave_universe(&mut self, rev: RevId) -> Dirty {
        let r = self.revs.remove(&rev).expect("rev");
        let mut dirty = Dirty::default();
        for (dir, rules) in [
            (Direction::Ingress, &r.ingress),
            (Direction::Egress, &r.egress),
        ] {
            for rule in rules {
                for p in rule.peers.iter().flatten() {
                    self.release_peer(*p, &mut dirty);
                }
                if dir == Direction::Egress {
                    for name in named_ports(rule.ports.as_deref()) {
                        let n = self.egress_names.get_mut(&name).expect("name");
                        *n -= 1;
                        if *n == 0 {
                            self.egress_names.remove(&name);
                            dirty.names.push(name);
                        }
                    }
                }
            }
        }
        dirty
    }

    fn intern_peer(&mut self, p: &Peer, dirty: &mut Dirty) -> PeerId {
        if let Some(id) = self.peer_ids.get(p) {
            self.peers.get_mut(id).expect("peer").refs += 1;
            return *id;
        }
        let id = self.next_peer;
        self.next_peer += 1;
        self.peer_ids.insert(p.clone(), id);
        self.peers.insert(
            id,
            Interned {
                value: p.clone(),
                refs: 1,
            },
        );
        match p {
            Peer::Pods {
                namespaces: NamespaceScope::Own(ns),
                ..
            } => {
                self.peers_own_ns
                    .entry(ns.clone())
                    .or_default()
                    .insert(id, p);
            }
            Peer::Pods {
                namespaces: NamespaceScope::Selected(_),
                ..
            } => {
                self.peers_ns_sel.insert(id);
                self.ns_sel_cache.clear();
            }
            Peer::IpBlock { .. } => {
                self.peers_ip_block.insert(id);
            }
        }
        dirty.peers.push(p.clone());
        id
    }

    fn release_peer(&mut self, id: PeerId, dirty: &mut Dirty) {
        let e = self.peers.get_mut(&id).expect("peer");
        e.refs -= 1;
        if e.refs > 0 {
            return;
        }
        let p = self.peers.remove(&id).expect("peer").value;
        self.peer_ids.remove(&p);
        match &p {
            Peer::Pods {
                namespaces: NamespaceScope::Own(ns),
                ..
            } => {
                if let Some(s) = self.peers_own_ns.get_mut(ns) {
                    s.remove(id, &p);
                    if s.is_empty() {
                        self.peers_own_ns.remove(ns);
                    }
                }
            }
            Peer::Pods {
                namespaces: NamespaceScope::Selected(_),
                ..
            } => {
                self.peers_ns_sel.remove(&id);
                self.ns_sel_cache.clear();
            }
            Peer::IpBlock { .. } => {
                self.peers_ip_block.remove(&id);
            }
        }
        dirty.peers.push(p);
    }

    /// Recomputes what a change of peers or names may have changed: pods in the peers' scope,
    /// the LPM regions when ipBlocks changed.
    fn after_universe_change(&mut self, dirty: Dirty) {
        let mut pods: BTreeSet<(String, String)> = BTreeSet::new();
        let mut cidrs = false;
        for p in &dirty.peers {
            match p {
                Peer::Pods {
                    namespaces: NamespaceScope::Own(ns),
                    ..
                } => {
                    pods.extend(self.pods_in_namespace(ns));
                }
                Peer::Pods {
                    namespaces: NamespaceScope::Selected(sel),
                    ..
                } => {
                    let namespaces: BTreeSet<String> =
                        self.world.pods.keys().map(|k| k.0.clone()).collect();
                    for ns in namespaces {
                        if sel.matches(&self.world.namespace_labels(&ns)) {
                            pods.extend(self.pods_in_namespace(&ns));
                        }
                    }
                }
                Peer::IpBlock { cidr, .. } => {
                    cidrs = true;
                    for (k, pod) in &self.world.pods {
                        if pod.ip.is_some_and(|ip| cidr.contains(&IpAddr::V4(ip))) {
                            pods.insert(k.clone());
                        }
                    }
                }
            }
        }
        for (name, proto) in &dirty.names {
            for (k, pod) in &self.world.pods {
                if pod.named_port(name, *proto).is_some() {
                    pods.insert(k.clone());
                }
            }
        }
        if cidrs {
            self.refresh_cidrs();
        }
        self.refresh_pods(pods.iter());
    }

    fn pods_in_namespace(&self, ns: &str) -> Vec<(String, String)> {
        self.world
            .pods
            .range((ns.to_string(), String::new())..)
            .take_while(|(k, _)| k.0 == ns)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn namespace_changed(&mut self, name: &str) -> Plan {
        self.ns_sel_cache.remove(name);
        let mut plan = Plan::default();
        if !self.peers_ns_sel.is_empty() {
            let pods = self.pods_in_namespace(name);
            self.refresh_pods(pods.iter());
        }
        self.end_phase(&mut plan);
        plan
    }

    fn policy_switched(&mut self, ns: &str) {
        let pods = self.pods_in_namespace(ns);
        for k in &pods {
            self.refresh_endpoint(k);
        }
        self.refresh_ns_default(ns);
    }

    // ---- classes -----------------------------------------------------------------------

    fn ns_sel_peers(&mut self, ns: &str) -> Vec<PeerId> {
        if let Some(v) = self.ns_sel_cache.get(ns) {
            return v.clone();
        }
        let labels = self.world.namespace_labels(ns);
        let v: Vec<PeerId> = self
            .peers_ns_sel
            .iter()
            .copied()
            .filter(|id| match &self.peers[id].value {
                Peer::Pods {
                    namespaces: NamespaceScope::Selected(s),
                    ..
                } => s.matches(&labels),
                _ => false,
            })
            .collect();
        self.ns_sel_cache.insert(ns.into(), v.clone());
        v
    }

    fn pod_class_sig(&mut self, pod: &PodRecord, ip: Ipv4Addr) -> ClassSig {
        let mut peers = Vec::new();
        let pod_sel_ok = |p: &Peer| match p {
            Peer::Pods { pods, .. } => pods.as_ref().is_none_or(|s| s.matches(&pod.labels)),
            Peer::IpBlock { .. } => false,
        };
        if let Some(ix) = self.peers_own_ns.get(&pod.namespace) {
            for id in ix.candidates(&pod.labels) {
                if pod_sel_ok(&self.peers[&id].value) {
                    peers.push(id);
                }
            }
        }
        for id in self.ns_sel_peers(&pod.namespace) {
            if pod_sel_ok(&self.peers[&id].value) {
                peers.push(id);
            }
        }
        for id in &self.peers_ip_block {
            if self.peers[id].value.ip_block_contains(ip) {
                peers.push(*id);
            }
        }
        peers.sort_unstable();
        let mut named: Vec<(String, Protocol, u16)> = self
            .egress_names
            .keys()
            .filter_map(|(n, p)| pod.named_port(n, *p).map(|port| (n.clone(), *p, port)))
            .collect();
        named.sort();
        ClassSig { peers, named }
    }

    /// Recomputes the classes of the given pods' addresses and the endpoints among them.
    fn refresh_pods<'a>(&mut self, keys: impl Iterator<Item = &'a (String, String)>) {
        for key in keys {
            let Some(pod) = self.world.pods.get(key).cloned() else {
                continue;
            };
            if let (Some(ip), false) = (pod.ip, pod.host_network)
                && !self.is_local_node_addr(ip)
            {
                let sig = self.pod_class_sig(&pod, ip);
                self.set_addr_class(ip, sig);
            }
            self.refresh_endpoint(key);
        }
    }

    fn is_local_node_addr(&self, ip: Ipv4Addr) -> bool {
        self.world.node_addrs(&self.node).contains(&ip)
    }

    fn refresh_node_addrs(&mut self, old: &[Ipv4Addr]) {
        let addrs = self.world.node_addrs(&self.node).to_vec();
        for ip in &addrs {
            if self.addr_class.get(ip) != Some(&POLICY_CLASS_HOST) {
                self.set_addr_class_id(*ip, POLICY_CLASS_HOST);
            }
        }
        for ip in old {
            if !addrs.contains(ip) {
                self.release_ip_if_unused(*ip);
            }
        }
    }

    /// An address no pod (or this node) has any more: forget its class and endpoint.
    fn release_ip_if_unused(&mut self, ip: Ipv4Addr) {
        let owner = self
            .world
            .pods
            .iter()
            .find(|(_, p)| p.ip == Some(ip) && !p.host_network)
            .map(|(k, _)| k.clone());
        if let Some(k) = owner {
            self.refresh_pods([k].iter());
            return;
        }
        if self.is_local_node_addr(ip) {
            return;
        }
        if let Some(old) = self.addr_class.remove(&ip) {
            self.phase.addrs.push(MapWrite::Addr { ip, class: None });
            self.class_decref(old);
        }
        if let Some(ep) = self.endpoints.remove(&ip) {
            self.phase
                .endpoints_del
                .push(MapWrite::Endpoint { ip, state: None });
            self.endpoint_decref(ep);
        }
    }

    fn set_addr_class(&mut self, ip: Ipv4Addr, sig: ClassSig) {
        let id = self.intern_class(sig);
        if self.addr_class.get(&ip) == Some(&id) {
            self.class_decref(id);
            return;
        }
        self.phase.addrs.push(MapWrite::Addr {
            ip,
            class: Some(id),
        });
        if let Some(old) = self.addr_class.insert(ip, id) {
            self.class_decref(old);
        }
    }

    fn set_addr_class_id(&mut self, ip: Ipv4Addr, id: u32) {
        self.phase.addrs.push(MapWrite::Addr {
            ip,
            class: Some(id),
        });
        if let Some(old) = self.addr_class.insert(ip, id) {
            self.class_decref(old);
        }
    }

    /// Recomputes the LPM regions from the ipBlocks in the universe.
    fn refresh_cidrs(&mut self) {
        let mut blocks: Vec<(PeerId, Ipv4Net, Vec<Ipv4Net>)> = Vec::new();
        for id in &self.peers_ip_block {
            if let Peer::IpBlock {
                cidr: IpNet::V4(c),
                except,
            } = &self.peers[id].value
            {
                let ex = except
                    .iter()
                    .filter_map(|e| if let IpNet::V4(e) = e { Some(*e) } else { None });
                blocks.push((*id, *c, ex.collect()));
            }
        }
        let mut prefixes: BTreeSet<Ipv4Net> = BTreeSet::new();
        for (_, c, ex) in &blocks {
            prefixes.insert(*c);
            prefixes.extend(ex.iter().copied());
        }
        let mut desired: BTreeMap<Ipv4Net, ClassSig> = BTreeMap::new();
        for p in &prefixes {
            let mut peers: Vec<PeerId> = blocks
                .iter()
                .filter(|(_, c, ex)| c.contains(p) && !ex.iter().any(|e| e.contains(p)))
                .map(|(id, _, _)| *id)
                .collect();
            peers.sort_unstable();
            desired.insert(
                *p,
                ClassSig {
                    peers,
                    named: Vec::new(),
                },
            );
        }
        let old: Vec<Ipv4Net> = self.cidr_class.keys().copied().collect();
        for net in old {
            if !desired.contains_key(&net) {
                let id = self.cidr_class.remove(&net).expect("cidr");
                self.phase.cidrs.push((net, None));
                self.class_decref(id);
            }
        }
        for (net, sig) in desired {
            let id = self.intern_class(sig);
            if self.cidr_class.get(&net) == Some(&id) {
                self.class_decref(id);
                continue;
            }
            self.phase.cidrs.push((net, Some(id)));
            if let Some(old) = self.cidr_class.insert(net, id) {
                self.class_decref(old);
            }
        }
    }

    /// Interns a class (taking a reference); a new class gets its rule entries in every live rule
    /// set.
    fn intern_class(&mut self, sig: ClassSig) -> u32 {
        if sig.peers.is_empty() && sig.named.is_empty() {
            return POLICY_CLASS_NONE;
        }
        if let Some(id) = self.class_ids.get(&sig) {
            self.classes.get_mut(id).expect("class").refs += 1;
            self.dead_classes.remove(id);
            return *id;
        }
        let id = self.next_class;
        self.next_class += 1;
        for p in &sig.peers {
            self.classes_by_peer.entry(*p).or_default().insert(id);
        }
        for (n, proto, _) in &sig.named {
            self.classes_by_name
                .entry((n.clone(), *proto))
                .or_default()
                .insert(id);
        }
        self.class_ids.insert(sig.clone(), id);
        self.classes.insert(
            id,
            Interned {
                value: sig,
                refs: 1,
            },
        );
        let rulesets: Vec<u32> = self.rulesets.keys().copied().collect();
        for rs in rulesets {
            self.add_entries(rs, id);
        }
        id
    }

    fn class_decref(&mut self, id: u32) {
        if id < POLICY_CLASS_FIRST_DYNAMIC {
            return;
        }
        let e = self.classes.get_mut(&id).expect("class");
        e.refs -= 1;
        if e.refs == 0 {
            self.dead_classes.insert(id);
        }
    }

    fn drop_class(&mut self, id: u32) {
        let sig = self.classes.remove(&id).expect("class").value;
        self.class_ids.remove(&sig);
        for p in &sig.peers {
            if let Some(s) = self.classes_by_peer.get_mut(p) {
                s.remove(&id);
                if s.is_empty() {
                    self.classes_by_peer.remove(p);
                }
            }
        }
        for (n, proto, _) in &sig.named {
            let k = (n.clone(), *proto);
            if let Some(s) = self.classes_by_name.get_mut(&k) {
                s.remove(&id);
                if s.is_empty() {
                    self.classes_by_name.remove(&k);
                }
            }
        }
        let rulesets: Vec<(u32, Direction)> = self
            .rulesets
            .iter()
            .map(|(id, r)| (*id, r.value.dir))
            .collect();
        for (rs, dir) in rulesets {
            self.delete_entries(rs, dir, id);
        }
    }

    // ---- endpoints and rule sets ---------------------------------------------------------

    fn refresh_endpoint(&mut self, key: &(String, String)) {
        let Some(pod) = self.world.pods.get(key) else {
            return;
        };
        let (Some(ip), false) = (pod.ip, pod.host_network) else {
            return;
        };
        if pod.node != self.node {
            if let Some(ep) = self.endpoints.remove(&ip) {
                self.phase
                    .endpoints_del
                    .push(MapWrite::Endpoint { ip, state: None });
                self.endpoint_decref(ep);
            }
            return;
        }
        let pod = pod.clone();
        let mut sigs = [None, None];
        for (i, dir) in [Direction::Ingress, Direction::Egress]
            .into_iter()
            .enumerate()
        {
            let mut revs: Vec<RevId> = self
                .active
                .range((pod.namespace.clone(), String::new())..)
                .take_while(|(k, _)| k.0 == pod.namespace)
                .map(|(_, r)| *r)
                .filter(|r| {
                    let p = &self.revs[r].policy;
                    p.rules(dir).is_some() && p.pod_selector.matches(&pod.labels)
                })
                .collect();
            if revs.is_empty() {
                continue;
            }
            revs.sort_unstable();
            let mut named = Vec::new();
            if dir == Direction::Ingress {
                for r in &revs {
                    for rule in self.revs[r].rules(dir) {
                        for (n, proto) in named_ports(rule.ports.as_deref()) {
                            if let Some(port) = pod.named_port(&n, proto) {
                                named.push((n, proto, port));
                            }
                        }
                    }
                }
                named.sort();
                named.dedup();
            }
            sigs[i] = Some(RulesetSig { dir, revs, named });
        }
        let [ingress, egress] = sigs.map(|s| s.map(|s| self.intern_ruleset(s)));
        let desired = EndpointDesired { ingress, egress };
        match self.endpoints.insert(ip, desired) {
            Some(old) if old == desired => {
                self.endpoint_decref(desired);
            }
            old => {
                self.phase.endpoints.push(MapWrite::Endpoint {
                    ip,
                    state: Some(self.endpoint_state(&desired)),
                });
                if let Some(old) = old {
                    self.endpoint_decref(old);
                }
            }
        }
    }

    fn endpoint_state(&self, ep: &EndpointDesired) -> PolicyEndpoint {
        let mut flags = 0;
        if ep.ingress.is_some() {
            flags |= POLICY_F_INGRESS_ISOLATED;
        }
        if ep.egress.is_some() {
            flags |= POLICY_F_EGRESS_ISOLATED;
        }
        PolicyEndpoint {
            ingress_ruleset: ep.ingress.unwrap_or(POLICY_RULESET_DENY),
            egress_ruleset: ep.egress.unwrap_or(POLICY_RULESET_DENY),
            flags,
        }
    }

    fn endpoint_decref(&mut self, ep: EndpointDesired) {
        for rs in [ep.ingress, ep.egress].into_iter().flatten() {
            self.ruleset_decref(rs);
        }
    }

    fn intern_ruleset(&mut self, sig: RulesetSig) -> u32 {
        if let Some(id) = self.ruleset_ids.get(&sig) {
            self.rulesets.get_mut(id).expect("ruleset").refs += 1;
            self.dead_rulesets.remove(id);
            return *id;
        }
        let id = self.next_ruleset;
        self.next_ruleset += 1;
        self.ruleset_ids.insert(sig.clone(), id);
        self.rulesets.insert(
            id,
            Interned {
                value: sig.clone(),
                refs: 1,
            },
        );
        let mut index = RuleIndex::default();
        for r in &sig.revs {
            for (i, rule) in self.revs[r].rules(sig.dir).iter().enumerate() {
                match &rule.peers {
                    Some(ps) => {
                        for p in ps {
                            index.by_peer.entry(*p).or_default().push((*r, i));
                        }
                    }
                    None => index.wild.push((*r, i)),
                }
            }
        }
        self.ruleset_rules.insert(id, index);
        // Candidate classes: those holding a peer the rules name, and (egress) those resolving a
        // name used by an "all destinations" rule.
        let mut candidates: BTreeSet<u32> = BTreeSet::new();
        for r in &sig.revs {
            for rule in self.revs[r].rules(sig.dir) {
                match &rule.peers {
                    Some(ps) => {
                        for p in ps {
                            candidates.extend(self.classes_by_peer.get(p).into_iter().flatten());
                        }
                    }
                    None if sig.dir == Direction::Egress => {
                        for n in named_ports(rule.ports.as_deref()) {
                            candidates.extend(self.classes_by_name.get(&n).into_iter().flatten());
                        }
                    }
                    None => {}
                }
            }
        }
        self.add_entries(id, POLICY_CLASS_ANY);
        for c in candidates {
            self.add_entries(id, c);
        }
        id
    }

    fn ruleset_decref(&mut self, id: u32) {
        let e = self.rulesets.get_mut(&id).expect("ruleset");
        e.refs -= 1;
        if e.refs == 0 {
            self.dead_rulesets.insert(id);
        }
    }

    fn drop_ruleset(&mut self, id: u32) {
        let sig = self.rulesets.remove(&id).expect("ruleset").value;
        self.ruleset_ids.remove(&sig);
        let classes: Vec<u32> = self
            .rule_index
            .get(&id)
            .into_iter()
            .flatten()
            .map(|(c, _)| *c)
            .collect();
        for c in classes {
            self.delete_entries(id, sig.dir, c);
        }
        self.rule_index.remove(&id);
        self.ruleset_rules.remove(&id);
        self.failed_rulesets.remove(&id);
    }

    fn ruleset_uses_ip_blocks(&self, id: u32) -> bool {
        self.ruleset_rules
            .get(&id)
            .is_some_and(|ix| ix.by_peer.keys().any(|p| self.peers_ip_block.contains(p)))
    }

    /// What rule set `rs` allows for class `class` (or ANY), per protocol.
    fn ports_for(&self, rs_id: u32, class: u32) -> BTreeMap<u8, RangeSet> {
        let mut out: BTreeMap<u8, RangeSet> = BTreeMap::new();
        let rs = &self.rulesets[&rs_id].value;
        let index = &self.ruleset_rules[&rs_id];
        let sig = (class != POLICY_CLASS_ANY).then(|| &self.classes[&class].value);
        let mut refs: Vec<(RevId, usize)> = match sig {
            None => index.wild.clone(),
            Some(s) => {
                let mut v: Vec<(RevId, usize)> = s
                    .peers
                    .iter()
                    .filter_map(|p| index.by_peer.get(p))
                    .flatten()
                    .copied()
                    .collect();
                if rs.dir == Direction::Egress && !s.named.is_empty() {
                    v.extend(index.wild.iter().copied());
                }
                v
            }
        };
        refs.sort_unstable();
        refs.dedup();
        {
            for (r, i) in refs {
                let rule = &self.revs[&r].rules(rs.dir)[i];
                // Does the rule's peer list cover this class? An "all peers" rule is written
                // once under ANY, except for egress named ports, which resolve per destination.
                let (peer_ok, only_named) = match (&rule.peers, sig) {
                    (None, None) => (true, false),
                    (None, Some(_)) => (rs.dir == Direction::Egress, true),
                    (Some(_), None) => (false, false),
                    (Some(ps), Some(s)) => (ps.iter().any(|p| s.has_peer(*p)), false),
                };
                if !peer_ok {
                    continue;
                }
                let Some(specs) = &rule.ports else {
                    if !only_named {
                        out.entry(POLICY_PROTO_ANY).or_default().add(0, u16::MAX);
                    }
                    continue;
                };
                for spec in specs {
                    let proto = spec.protocol.number();
                    match &spec.port {
                        PortMatch::All if !only_named => {
                            out.entry(proto).or_default().add(0, u16::MAX)
                        }
                        PortMatch::Range(a, b) if !only_named => {
                            out.entry(proto).or_default().add(*a, *b)
                        }
                        PortMatch::Named(n) => {
                            let port = match rs.dir {
                                Direction::Ingress => rs
                                    .named
                                    .iter()
                                    .find(|(x, p, _)| x == n && *p == spec.protocol)
                                    .map(|x| x.2),
                                Direction::Egress => sig.and_then(|s| s.resolve(n, spec.protocol)),
                            };
                            if let Some(port) = port {
                                out.entry(proto).or_default().add(port, port);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        out
    }

    fn add_entries(&mut self, rs: u32, class: u32) {
        let ports = self.ports_for(rs, class);
        if ports.is_empty() {
            return;
        }
        let dir = self.rulesets[&rs].value.dir;
        let mut protos = Vec::new();
        for (proto, set) in ports {
            let key = rule_key(rs, dir, class, proto);
            let value = self.port_value(set);
            self.phase.rules_add.push(MapWrite::Rule {
                key,
                value: Some(value),
            });
            self.rules.insert(key, value);
            protos.push(proto);
        }
        self.rule_index.entry(rs).or_default().insert(class, protos);
    }

    fn delete_entries(&mut self, rs: u32, dir: Direction, class: u32) {
        let Some(protos) = self.rule_index.get_mut(&rs).and_then(|m| m.remove(&class)) else {
            return;
        };
        for proto in protos {
            let key = rule_key(rs, dir, class, proto);
            let value = self.rules.remove(&key).expect("rule");
            self.phase
                .rules_del
                .push(MapWrite::Rule { key, value: None });
            if value.overflow != 0 {
                self.port_set_decref(value.overflow);
            }
        }
    }

    /// The map value for a port set: the largest ranges inline, the rest in bitmap blocks.
    fn port_value(&mut self, set: RangeSet) -> PolicyPorts {
        let mut ranges = set.0;
        if ranges.len() <= POLICY_INLINE_RANGES {
            let mut v = PolicyPorts::EMPTY;
            for (i, r) in ranges.iter().enumerate() {
                v.ranges[i] = *r;
            }
            v.count = ranges.len() as u8;
            return v;
        }
        ranges.sort_by_key(|r| (std::cmp::Reverse(r.last - r.first), r.first));
        let rest: Vec<PortRange> = {
            let mut rest = ranges.split_off(POLICY_INLINE_RANGES);
            rest.sort();
            rest
        };
        let mut v = PolicyPorts::EMPTY;
        for (i, r) in ranges.iter().enumerate() {
            v.ranges[i] = *r;
        }
        v.count = POLICY_INLINE_RANGES as u8;
        v.overflow = self.intern_port_set(rest);
        v
    }

    fn intern_port_set(&mut self, rest: Vec<PortRange>) -> u32 {
        if let Some(id) = self.port_set_ids.get(&rest) {
            self.port_sets.get_mut(id).expect("set").refs += 1;
            return *id;
        }
        let id = self.next_port_set;
        self.next_port_set += 1;
        self.port_set_ids.insert(rest.clone(), id);
        self.port_sets.insert(
            id,
            Interned {
                value: rest,
                refs: 1,
            },
        );
        for (key, value) in self.port_set_blocks(id) {
            self.phase.blocks_add.push(MapWrite::PortBlock {
                key,
                value: Some(value),
            });
        }
        id
    }

    fn port_set_blocks(&self, id: u32) -> Vec<(PolicyPortBlockKey, PolicyPortBlock)> {
        let mut blocks: BTreeMap<u16, PolicyPortBlock> = BTreeMap::new();
        for r in &self.port_sets[&id].value {
            for port in r.first..=r.last {
                let b = blocks
                    .entry(port >> 8)
                    .or_insert(PolicyPortBlock { bits: [0; 4] });
                let bit = (port & 0xff) as usize;
                b.bits[bit / 64] |= 1 << (bit % 64);
            }
        }
        blocks
            .into_iter()
            .map(|(block, v)| {
                (
                    PolicyPortBlockKey {
                        set: id,
                        block,
                        _pad: 0,
                    },
                    v,
                )
            })
            .collect()
    }

    fn port_set_decref(&mut self, id: u32) {
        let e = self.port_sets.get_mut(&id).expect("set");
        e.refs -= 1;
        if e.refs > 0 {
            return;
        }
        for (key, _) in self.port_set_blocks(id) {
            self.phase
                .blocks_del
                .push(MapWrite::PortBlock { key, value: None });
        }
        let rest = self.port_sets.remove(&id).expect("set").value;
        self.port_set_ids.remove(&rest);
    }

    fn refresh_ns_default(&mut self, ns: &str) {
        let mut flags = 0;
        for (_, r) in self
            .active
            .range((ns.to_string(), String::new())..)
            .take_while(|(k, _)| k.0 == ns)
        {
            let p = &self.revs[r].policy;
            if p.ingress.is_some() {
                flags |= POLICY_F_INGRESS_ISOLATED;
            }
            if p.egress.is_some() {
                flags |= POLICY_F_EGRESS_ISOLATED;
            }
        }
        let old = self.ns_defaults.get(ns).copied().unwrap_or(0);
        if old == flags {
            return;
        }
        let w = MapWrite::NsDefault {
            namespace: ns.into(),
            flags: (flags != 0).then_some(flags),
        };
        if flags & old == old {
            self.phase.ns_grow.push(w);
        } else {
            self.phase.ns_shrink.push(w);
        }
        if flags == 0 {
            self.ns_defaults.remove(ns);
        } else {
            self.ns_defaults.insert(ns.into(), flags);
        }
    }

    fn end_phase(&mut self, plan: &mut Plan) {
        // Endpoints first: a dead class's entries go with it, rule sets' remaining ones after.
        for id in std::mem::take(&mut self.dead_rulesets) {
            self.drop_ruleset(id);
        }
        for id in std::mem::take(&mut self.dead_classes) {
            self.drop_class(id);
        }
        std::mem::take(&mut self.phase).finish(plan);
    }
}

fn close_failed(mut st: PolicyEndpoint, failed: &HashSet<u32>) -> PolicyEndpoint {
    if st.flags & POLICY_F_INGRESS_ISOLATED != 0 && failed.contains(&st.ingress_ruleset) {
        st.ingress_ruleset = POLICY_RULESET_DENY;
        st.flags |= POLICY_F_INGRESS_FAILED;
    }
    if st.flags & POLICY_F_EGRESS_ISOLATED != 0 && failed.contains(&st.egress_ruleset) {
        st.egress_ruleset = POLICY_RULESET_DENY;
        st.flags |= POLICY_F_EGRESS_FAILED;
    }
    st
}

#[derive(Default)]
struct Dirty {
    peers: Vec<Peer>,
    names: Vec<Name>,
}

fn named_ports(ports: Option<&[super::model::PortSpec]>) -> Vec<Name> {
    ports
        .into_iter()
        .flatten()
        .filter_map(|s| match &s.port {
            PortMatch::Named(n) => Some((n.clone(), s.protocol)),
            _ => None,
        })
        .collect()
}

fn rule_key(ruleset: u32, dir: Direction, class: u32, protocol: u8) -> PolicyRuleKey {
    PolicyRuleKey {
        ruleset,
        class,
        protocol,
        direction: match dir {
            Direction::Ingress => POLICY_DIR_INGRESS,
            Direction::Egress => POLICY_DIR_EGRESS,
        },
        _pad: [0; 2],
    }
}

/// A set of inclusive port ranges, kept sorted and merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet(pub Vec<PortRange>);

impl RangeSet {
    pub fn add(&mut self, first: u16, last: u16) {
        self.0.push(PortRange { first, last });
        self.0.sort();
        let mut merged: Vec<PortRange> = Vec::with_capacity(self.0.len());
        for r in self.0.drain(..) {
            match merged.last_mut() {
                Some(m) if r.first as u32 <= m.last as u32 + 1 => m.last = m.last.max(r.last),
                _ => merged.push(r),
            }
        }
        self.0 = merged;
    }
}

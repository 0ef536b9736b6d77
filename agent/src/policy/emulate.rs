//! A userspace emulation of one node's policy maps and of the lookups the datapath makes on
//! them, so the compiled form can be checked against the reference evaluator without a kernel.
//! The LPM trie is emulated by its definition: the entry with the longest prefix containing the
//! address wins.
use std::{
    cell::Cell,
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use weft_common::{map_names, policy::*};

use super::compile::{Capacities, MapFull, MapWrite, PolicyMaps};

#[derive(Clone, Debug, Default)]
pub struct EmulatedMaps {
    pub caps: Capacities,
    pub endpoints: HashMap<Ipv4Addr, PolicyEndpoint>,
    pub addrs: HashMap<Ipv4Addr, u32>,
    pub cidrs: BTreeMap<Ipv4Net, u32>,
    pub rules: HashMap<PolicyRuleKey, PolicyPorts>,
    pub blocks: HashMap<PolicyPortBlockKey, PolicyPortBlock>,
    pub ns_defaults: HashMap<String, u32>,
    /// Map lookups made by verdicts so far (to show the per-packet cost is bounded).
    pub lookups: Cell<u64>,
}

fn put<K: std::hash::Hash + Eq, V>(
    m: &mut HashMap<K, V>,
    cap: u32,
    name: &'static str,
    k: K,
    v: Option<V>,
) -> Result<(), MapFull> {
    match v {
        None => {
            m.remove(&k);
        }
        Some(v) => {
            if !m.contains_key(&k) && m.len() >= cap as usize {
                return Err(MapFull(name));
            }
            m.insert(k, v);
        }
    }
    Ok(())
}

impl PolicyMaps for EmulatedMaps {
    fn write(&mut self, w: &MapWrite) -> Result<(), MapFull> {
        let c = self.caps;
        match w {
            MapWrite::NsDefault { namespace, flags } => put(
                &mut self.ns_defaults,
                c.ns_defaults,
                map_names::POLICY_NS_DEFAULTS,
                namespace.clone(),
                *flags,
            ),
            MapWrite::PortBlock { key, value } => put(
                &mut self.blocks,
                c.port_blocks,
                map_names::POLICY_PORT_BLOCKS,
                *key,
                *value,
            ),
            MapWrite::Rule { key, value } => put(
                &mut self.rules,
                c.rules,
                map_names::POLICY_RULES,
                *key,
                *value,
            ),
            MapWrite::Addr { ip, class } => put(
                &mut self.addrs,
                c.addrs,
                map_names::POLICY_ADDRS,
                *ip,
                *class,
            ),
            MapWrite::Endpoint { ip, state } => put(
                &mut self.endpoints,
                c.endpoints,
                map_names::POLICY_ENDPOINTS,
                *ip,
                *state,
            ),
            MapWrite::Cidr { net, class } => match class {
                None => {
                    self.cidrs.remove(net);
                    Ok(())
                }
                Some(class) => {
                    if !self.cidrs.contains_key(net) && self.cidrs.len() >= c.cidrs as usize {
                        return Err(MapFull(map_names::POLICY_CIDRS));
                    }
                    self.cidrs.insert(*net, *class);
                    Ok(())
                }
            },
        }
    }
}

impl EmulatedMaps {
    pub fn new(caps: Capacities) -> Self {
        Self {
            caps,
            ..Default::default()
        }
    }

    fn count(&self) {
        self.lookups.set(self.lookups.get() + 1);
    }

    /// The class of an address: the address map, else the LPM trie, else none.
    pub fn class_of(&self, ip: Ipv4Addr) -> u32 {
        self.count();
        if let Some(c) = self.addrs.get(&ip) {
            return *c;
        }
        self.count();
        (0..=32u8)
            .rev()
            .find_map(|len| {
                let net = Ipv4Net::new(ip, len).expect("len").trunc();
                self.cidrs.get(&net).copied()
            })
            .unwrap_or(POLICY_CLASS_NONE)
    }

    fn probe(&self, ruleset: u32, dir: u8, class: u32, proto: u8, port: u16) -> bool {
        self.count();
        let key = PolicyRuleKey {
            ruleset,
            class,
            protocol: proto,
            direction: dir,
            _pad: [0; 2],
        };
        let Some(v) = self.rules.get(&key) else {
            return false;
        };
        if v.inline_contains(port) {
            return true;
        }
        if v.overflow == 0 {
            return false;
        }
        self.count();
        let bk = PolicyPortBlockKey {
            set: v.overflow,
            block: port >> 8,
            _pad: 0,
        };
        self.blocks.get(&bk).is_some_and(|b| b.contains(port))
    }

    /// The four probes of a rule set: exact class and protocol, then the wildcards.
    pub fn ruleset_allows(&self, ruleset: u32, dir: u8, class: u32, proto: u8, port: u16) -> bool {
        self.probe(ruleset, dir, class, proto, port)
            || self.probe(ruleset, dir, POLICY_CLASS_ANY, proto, port)
            || self.probe(ruleset, dir, class, POLICY_PROTO_ANY, port)
            || self.probe(ruleset, dir, POLICY_CLASS_ANY, POLICY_PROTO_ANY, port)
    }

    fn direction(
        &self,
        endpoint: Ipv4Addr,
        remote: Ipv4Addr,
        dir: u8,
        proto: u8,
        port: u16,
    ) -> bool {
        if endpoint == remote {
            return true;
        }
        self.count();
        // A local pod without policy state (the CNI plugin writes one at ADD) is denied.
        let Some(st) = self.endpoints.get(&endpoint) else {
            return false;
        };
        let (isolated, ruleset) = if dir == POLICY_DIR_INGRESS {
            (
                st.flags & POLICY_F_INGRESS_ISOLATED != 0,
                st.ingress_ruleset,
            )
        } else {
            (st.flags & POLICY_F_EGRESS_ISOLATED != 0, st.egress_ruleset)
        };
        if !isolated {
            return true;
        }
        let class = self.class_of(remote);
        if class == POLICY_CLASS_HOST {
            return true;
        }
        self.ruleset_allows(ruleset, dir, class, proto, port)
    }

    /// Ingress verdict at local endpoint `dst` for a new flow from `src`.
    pub fn ingress(&self, dst: Ipv4Addr, src: Ipv4Addr, proto: u8, port: u16) -> bool {
        self.direction(dst, src, POLICY_DIR_INGRESS, proto, port)
    }

    /// Egress verdict at local endpoint `src` for a new flow to `dst`.
    pub fn egress(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, port: u16) -> bool {
        self.direction(src, dst, POLICY_DIR_EGRESS, proto, port)
    }

    /// What the CNI plugin does at ADD (it knows the namespace from `K8S_POD_NAMESPACE`, not the
    /// labels): unless the agent already wrote the endpoint, isolate the directions the
    /// namespace's policies could isolate (both before the agent's first sync), allowing nothing
    /// until the agent compiles the pod.
    pub fn cni_add(&mut self, ip: Ipv4Addr, namespace: &str) -> Result<(), MapFull> {
        if self.endpoints.contains_key(&ip) {
            return Ok(());
        }
        let state = new_endpoint_state(|ns| self.ns_defaults.get(ns).copied(), namespace);
        self.write(&MapWrite::Endpoint {
            ip,
            state: Some(state),
        })
    }

    /// The highest class, rule-set and port-set numbers in use (a restarting agent numbers
    /// above them).
    pub fn max_ids(&self) -> (u32, u32, u32) {
        let class = self
            .addrs
            .values()
            .chain(self.cidrs.values())
            .chain(
                self.rules
                    .keys()
                    .map(|k| &k.class)
                    .filter(|c| **c != POLICY_CLASS_ANY),
            )
            .copied()
            .max()
            .unwrap_or(0);
        let ruleset = self
            .endpoints
            .values()
            .flat_map(|e| [e.ingress_ruleset, e.egress_ruleset])
            .chain(self.rules.keys().map(|k| k.ruleset))
            .max()
            .unwrap_or(0);
        let set = self.blocks.keys().map(|k| k.set).max().unwrap_or(0);
        (class, ruleset, set)
    }

    /// Local endpoints with a policy state.
    pub fn endpoint_ips(&self) -> HashSet<Ipv4Addr> {
        self.endpoints.keys().copied().collect()
    }
}

/// The policy state the CNI plugin writes for a new endpoint, given a lookup of the namespace
/// defaults map (the all-zero key is the agent's synced marker).
/// (`weft_common::policy::new_endpoint_state`, which the plugin calls).
pub fn new_endpoint_state(lookup: impl Fn(&str) -> Option<u32>, namespace: &str) -> PolicyEndpoint {
    weft_common::policy::new_endpoint_state(lookup(""), lookup(namespace))
}

/// Every node of a cluster, each with its own compiler and emulated maps: the whole datapath's
/// policy decisions without a kernel. A connection is allowed when the source's node allows it
/// out (if the source is a pod there) and the destination's node allows it in.
pub struct EmulatedCluster {
    pub nodes: BTreeMap<String, (super::compile::Compiler, EmulatedMaps)>,
}

impl EmulatedCluster {
    /// Compiles `policies` over `world` on every node of the world and applies the plans.
    /// Returns the apply reports that were not clean.
    pub fn build(
        world: &super::model::World,
        policies: &[super::model::Policy],
        caps: Capacities,
    ) -> (Self, Vec<(String, super::compile::ApplyReport)>) {
        let mut names: std::collections::BTreeSet<String> = world.nodes.keys().cloned().collect();
        names.extend(world.pods.values().map(|p| p.node.clone()));
        let mut nodes = BTreeMap::new();
        let mut reports = Vec::new();
        for name in names {
            let (mut c, plan) =
                super::compile::Compiler::build(&name, world.clone(), policies.iter().cloned());
            let mut maps = EmulatedMaps::new(caps);
            let report = c.apply(&plan, &mut maps);
            if !report.is_clean() {
                reports.push((name.clone(), report));
            }
            nodes.insert(name, (c, maps));
        }
        (Self { nodes }, reports)
    }

    /// Runs an update on every node (the same event reaches every agent) and applies its plan.
    pub fn update(
        &mut self,
        mut event: impl FnMut(&mut super::compile::Compiler) -> super::compile::Plan,
    ) -> Vec<(String, super::compile::ApplyReport)> {
        let mut reports = Vec::new();
        for (name, (c, maps)) in &mut self.nodes {
            let plan = event(c);
            let report = c.apply(&plan, maps);
            if !report.is_clean() {
                reports.push((name.clone(), report));
            }
        }
        reports
    }

    fn local_node(&self, ip: Ipv4Addr) -> Option<&EmulatedMaps> {
        let (_, (c, maps)) = self.nodes.iter().find(|(name, (c, _))| {
            c.world()
                .pods
                .values()
                .any(|p| p.ip == Some(ip) && !p.host_network && &p.node == *name)
        })?;
        let _ = c;
        Some(maps)
    }

    /// The datapath's verdict for a new flow `src → dst`.
    pub fn allowed(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, port: u16) -> bool {
        if src == dst {
            return true;
        }
        let egress = self
            .local_node(src)
            .is_none_or(|m| m.egress(src, dst, proto, port));
        let ingress = self
            .local_node(dst)
            .is_none_or(|m| m.ingress(dst, src, proto, port));
        egress && ingress
    }
}

//! The policy controller: the world's events in (from Kubernetes or etcd), the compiler's
//! plans applied to the node's pinned maps, the revision bumped after every change (so the
//! datapath judges established flows again once), metrics out.
//!
//! Until every source has listed once, events only build the world; then the compiler is
//! built numbering above what the maps hold (a previous agent's pins) and the adoption plan
//! takes the maps over without a window (`policy::compile::Compiler::adoption_plan`). Every
//! event afterwards costs its own plan.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use anyhow::Result;
use weft_common::policy::{POLICY_CFG_F_READY, POLICY_CFG_F_SERVICE_NET, PolicyConfig};

use super::{
    PolicyMetrics,
    maps::{KernelMaps, capacities, snapshot},
};
use crate::{
    datapath::Maps,
    policy::{
        compile::{ApplyReport, Capacities, Compiler, Plan},
        model::{Direction, PodRecord, Policy, World},
        selector::Labels,
    },
};

/// A change of the world, as a source reports it.
#[derive(Clone, Debug)]
pub enum PolicyEvent {
    /// Every pod (after a (re)list): pods not in it are gone.
    Pods(Vec<PodRecord>),
    PodUpsert(PodRecord),
    PodRemove {
        namespace: String,
        name: String,
    },
    /// Every namespace with its labels (after a (re)list).
    Namespaces(Vec<(String, Labels)>),
    NamespaceUpsert(String, Labels),
    NamespaceRemove(String),
    /// Every valid policy (after a (re)list).
    Policies(Vec<Policy>),
    PolicyUpsert(Policy),
    PolicyRemove {
        namespace: String,
        name: String,
    },
    /// Every kind was listed at least once: the maps may be written.
    Synced,
    /// Every change up to this datastore revision (etcd) was sent.
    Revision(u64),
}

pub struct Controller {
    node: String,
    maps: Maps,
    caps: Capacities,
    metrics: Arc<PolicyMetrics>,
    service_net: Option<ipnet::Ipv4Net>,
    world: World,
    policies: BTreeMap<(String, String), Policy>,
    compiler: Option<Compiler>,
    config: PolicyConfig,
    pending_revision: Option<u64>,
    failed: bool,
    next_retry: Instant,
    next_addr_check: Instant,
}

impl Controller {
    pub fn new(
        node: &str,
        maps: Maps,
        metrics: Arc<PolicyMetrics>,
        service_net: Option<ipnet::Ipv4Net>,
    ) -> Result<Self> {
        let caps = capacities(&maps)?;
        let mut config = maps.policy_config().unwrap_or(PolicyConfig {
            revision: 0,
            flags: 0,
            service_net: [0; 4],
            service_mask: [0; 4],
            datastore_revision: 0,
        });
        // Keep the revision moving forward across restarts; the datastore revision is only
        // claimed once this agent has applied it.
        config.datastore_revision = 0;
        config.flags = POLICY_CFG_F_READY;
        if let Some(net) = service_net {
            config.flags |= POLICY_CFG_F_SERVICE_NET;
            config.service_net = net.network().octets();
            config.service_mask = net.netmask().octets();
        }
        let mut c = Self {
            node: node.to_string(),
            maps,
            caps,
            metrics,
            service_net,
            world: World::default(),
            policies: BTreeMap::new(),
            compiler: None,
            config,
            pending_revision: None,
            failed: false,
            next_retry: Instant::now(),
            next_addr_check: Instant::now(),
        };
        // The Service network is known before anything is compiled.
        c.maps.set_policy_config(&c.config)?;
        Ok(c)
    }

    /// The node's own addresses (the host class: always allowed both ways).
    fn node_addrs(&self) -> Vec<Ipv4Addr> {
        let mut addrs = super::local_ipv4_addrs().unwrap_or_default();
        addrs.sort();
        addrs.dedup();
        addrs
    }

    fn record(&mut self, ev: PolicyEvent) -> Option<PolicyEvent> {
        // Before the first sync: only the world.
        match ev {
            PolicyEvent::Pods(pods) => {
                self.world.pods = pods
                    .into_iter()
                    .map(|p| ((p.namespace.clone(), p.name.clone()), p))
                    .collect();
            }
            PolicyEvent::PodUpsert(p) => self.world.upsert_pod(p),
            PolicyEvent::PodRemove { namespace, name } => {
                self.world.pods.remove(&(namespace, name));
            }
            PolicyEvent::Namespaces(list) => {
                self.world.namespaces = list
                    .into_iter()
                    .map(|(n, mut l)| {
                        l.insert(crate::policy::model::NAMESPACE_NAME_LABEL.into(), n.clone());
                        (n, l)
                    })
                    .collect();
            }
            PolicyEvent::NamespaceUpsert(n, mut l) => {
                l.insert(crate::policy::model::NAMESPACE_NAME_LABEL.into(), n.clone());
                self.world.namespaces.insert(n, l);
            }
            PolicyEvent::NamespaceRemove(n) => {
                self.world.namespaces.remove(&n);
            }
            PolicyEvent::Policies(list) => {
                self.policies = list
                    .into_iter()
                    .map(|p| ((p.namespace.clone(), p.name.clone()), p))
                    .collect();
            }
            PolicyEvent::PolicyUpsert(p) => {
                self.policies
                    .insert((p.namespace.clone(), p.name.clone()), p);
            }
            PolicyEvent::PolicyRemove { namespace, name } => {
                self.policies.remove(&(namespace, name));
            }
            PolicyEvent::Revision(r) => self.pending_revision = Some(r),
            PolicyEvent::Synced => return Some(PolicyEvent::Synced),
        }
        None
    }

    /// The plans of one event on a built compiler.
    fn plans(c: &mut Compiler, ev: PolicyEvent, out: &mut Vec<Plan>) {
        match ev {
            PolicyEvent::Pods(pods) => {
                let keep: std::collections::BTreeSet<(String, String)> = pods
                    .iter()
                    .map(|p| (p.namespace.clone(), p.name.clone()))
                    .collect();
                let gone: Vec<(String, String)> = c
                    .world()
                    .pods
                    .keys()
                    .filter(|k| !keep.contains(*k))
                    .cloned()
                    .collect();
                for (ns, name) in gone {
                    out.push(c.remove_pod(&ns, &name));
                }
                for p in pods {
                    if c.world().pods.get(&(p.namespace.clone(), p.name.clone())) != Some(&p) {
                        out.push(c.upsert_pod(p));
                    }
                }
            }
            PolicyEvent::PodUpsert(p) => {
                if c.world().pods.get(&(p.namespace.clone(), p.name.clone())) != Some(&p) {
                    out.push(c.upsert_pod(p));
                }
            }
            PolicyEvent::PodRemove { namespace, name } => out.push(c.remove_pod(&namespace, &name)),
            PolicyEvent::Namespaces(list) => {
                let keep: std::collections::BTreeSet<String> =
                    list.iter().map(|(n, _)| n.clone()).collect();
                let gone: Vec<String> = c
                    .world()
                    .namespaces
                    .keys()
                    .filter(|n| !keep.contains(*n))
                    .cloned()
                    .collect();
                for n in gone {
                    out.push(c.remove_namespace(&n));
                }
                for (n, l) in list {
                    out.push(c.upsert_namespace(&n, l));
                }
            }
            PolicyEvent::NamespaceUpsert(n, l) => out.push(c.upsert_namespace(&n, l)),
            PolicyEvent::NamespaceRemove(n) => out.push(c.remove_namespace(&n)),
            PolicyEvent::Policies(list) => {
                let keep: std::collections::BTreeSet<(String, String)> = list
                    .iter()
                    .map(|p| (p.namespace.clone(), p.name.clone()))
                    .collect();
                for p in c.policies() {
                    if !keep.contains(&(p.namespace.clone(), p.name.clone())) {
                        out.push(c.remove_policy(&p.namespace, &p.name));
                    }
                }
                for p in list {
                    out.push(c.upsert_policy(p));
                }
            }
            PolicyEvent::PolicyUpsert(p) => out.push(c.upsert_policy(p)),
            PolicyEvent::PolicyRemove { namespace, name } => {
                out.push(c.remove_policy(&namespace, &name))
            }
            PolicyEvent::Synced | PolicyEvent::Revision(_) => {}
        }
    }

    /// Builds the compiler over what the maps hold and adopts them.
    fn build(&mut self) -> Result<Vec<Plan>> {
        let existing = snapshot(&self.maps, self.caps)?;
        let (class, ruleset, set) = existing.max_ids();
        let mut world = std::mem::take(&mut self.world);
        world.nodes.insert(self.node.clone(), self.node_addrs());
        let policies = std::mem::take(&mut self.policies).into_values();
        let (mut c, _) = Compiler::new(&self.node)
            .with_id_floor(class, ruleset, set)
            .build_from(world, policies);
        let plan = c.adoption_plan(&existing);
        tracing::info!(
            writes = plan.writes.len(),
            adopted_rules = existing.rules.len(),
            "policy maps adopted"
        );
        self.compiler = Some(c);
        Ok(vec![plan])
    }

    /// One batch of events: compiled, applied, the revision bumped when anything changed.
    pub fn turn(&mut self, events: Vec<PolicyEvent>) -> Result<()> {
        let started = Instant::now();
        let mut plans = Vec::new();
        for ev in events {
            if let PolicyEvent::Revision(r) = ev {
                self.pending_revision = Some(r);
                continue;
            }
            match self.compiler.as_mut() {
                Some(c) => Self::plans(c, ev, &mut plans),
                None => {
                    if self.record(ev).is_some() {
                        plans.extend(self.build()?);
                    }
                }
            }
        }
        let Some(c) = self.compiler.as_mut() else {
            return Ok(());
        };
        let now = Instant::now();
        if now >= self.next_addr_check {
            self.next_addr_check = now + Duration::from_secs(10);
            let addrs = {
                let mut a = super::local_ipv4_addrs().unwrap_or_default();
                a.sort();
                a.dedup();
                a
            };
            if c.world().node_addrs(&self.node) != addrs.as_slice() {
                plans.push(c.set_node_addrs(&self.node, addrs));
            }
        }
        if self.failed && now >= self.next_retry {
            self.next_retry = now + Duration::from_secs(10);
            plans.push(c.retry_plan());
        }
        let writes: usize = plans.iter().map(|p| p.writes.len()).sum();
        let mut report = ApplyReport::default();
        {
            let mut km = KernelMaps::new(&mut self.maps);
            for plan in &plans {
                let r = c.apply(plan, &mut km);
                report.failed_endpoints.extend(r.failed_endpoints);
                report.unclassified.extend(r.unclassified);
                report.stateless_endpoints.extend(r.stateless_endpoints);
                report.ns_defaults_failed.extend(r.ns_defaults_failed);
            }
        }
        if !plans.is_empty() && writes > 0 {
            // From the compiler's state, not this turn's report: a later clean turn about
            // something else leaves a closed endpoint closed (and retried).
            let failed_endpoints = c.failed_endpoints();
            self.failed = failed_endpoints > 0;
            for (ip, dir, map) in &report.failed_endpoints {
                let d = match dir {
                    Direction::Ingress => "ingress",
                    Direction::Egress => "egress",
                };
                tracing::warn!(endpoint = %ip, direction = d, map, "policy rules do not fit: the endpoint denies this direction until there is room");
            }
            for (ip, map) in &report.unclassified {
                tracing::warn!(address = %ip, map, "no room for the address's class: it matches ipBlocks only");
            }
            for (ip, map) in &report.stateless_endpoints {
                tracing::warn!(endpoint = %ip, map, "no room for the endpoint's policy state: it is denied both ways");
            }
            for (ns, map) in &report.ns_defaults_failed {
                tracing::warn!(namespace = %ns, map, "no room for the namespace default: new pods are isolated both ways");
            }
            self.metrics.failed_endpoints.set(failed_endpoints as i64);
            self.config.revision = self.config.revision.wrapping_add(1);
        }
        let synced_revision = self.pending_revision.take();
        if let Some(r) = synced_revision {
            self.config.datastore_revision = r;
        }
        if (writes > 0) || synced_revision.is_some() {
            self.maps.set_policy_config(&self.config)?;
        }
        if writes > 0 {
            let took = started.elapsed();
            self.metrics.apply_seconds.observe(took.as_secs_f64());
            let (classes, rulesets, rules) = c.stats();
            tracing::info!(writes, classes, rulesets, rules, revision = self.config.revision, took = ?took, "policy applied");
        }
        self.metrics.synced.set(1);
        self.metrics.revision.set(i64::from(self.config.revision));
        self.metrics
            .datastore_revision
            .set(self.config.datastore_revision as i64);
        Ok(())
    }

    /// Takes events and turns, forever (until every sender is gone).
    pub fn run(mut self, rx: mpsc::Receiver<PolicyEvent>) -> Result<()> {
        let _ = self.service_net;
        loop {
            let mut events = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(ev) => vec![ev],
                Err(mpsc::RecvTimeoutError::Timeout) => Vec::new(),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("the policy sources stopped")
                }
            };
            events.extend(rx.try_iter());
            if let Err(e) = self.turn(events) {
                tracing::warn!("applying policies: {e:#}");
            }
        }
    }
}

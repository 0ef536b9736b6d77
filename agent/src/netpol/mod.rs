//! NetworkPolicy in the agent: the world's sources (Kubernetes reflectors, or the same objects
//! in etcd), the controller that compiles them (`crate::policy`) into the node's pinned maps,
//! and its metrics.
//!
//! - [`kube_source`]: Pods, Namespaces and NetworkPolicies from the API server;
//! - [`etcd_source`]: the same objects from etcd ([`store`]'s layout), and the publisher of this
//!   node's pods' addresses;
//! - [`controller`]: events → compiler → plans → maps, revision bumps, adoption at start;
//! - [`maps`]: the compiler's map interface on the kernel's maps.
pub mod controller;
pub mod etcd_source;
pub mod kube_source;
pub mod maps;
pub mod show;
pub mod store;

use std::{net::Ipv4Addr, path::PathBuf};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::ConstCounter,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use weft_common::map_names;

use crate::datapath::Maps;

/// The controller's metrics (registered into the agent's registry).
#[derive(Debug)]
pub struct PolicyMetrics {
    /// 1 once the maps hold the first complete world.
    pub synced: Gauge,
    /// The maps' revision (bumped per change).
    pub revision: Gauge,
    /// The etcd revision whose state the maps hold (etcd datastore).
    pub datastore_revision: Gauge,
    /// Endpoints denying a direction because their rules did not fit.
    pub failed_endpoints: Gauge,
    /// Compile and apply time of a batch of changes.
    pub apply_seconds: Histogram,
}

impl PolicyMetrics {
    pub fn new() -> Self {
        Self {
            synced: Gauge::default(),
            revision: Gauge::default(),
            datastore_revision: Gauge::default(),
            failed_endpoints: Gauge::default(),
            // 100 µs .. ~26 s.
            apply_seconds: Histogram::new(exponential_buckets(1e-4, 4.0, 10)),
        }
    }

    /// Registers the metrics, and the collector that reads the pinned policy maps on each
    /// scrape (fill per map, denials per local endpoint: as many series as local pods).
    pub fn register(&self, r: &mut Registry, pin_root: PathBuf) {
        r.register(
            "weft_policy_synced",
            "1 once the policy maps hold the first complete world",
            self.synced.clone(),
        );
        r.register(
            "weft_policy_revision",
            "Revision of the policy maps (established flows are judged again after a change)",
            self.revision.clone(),
        );
        r.register(
            "weft_policy_datastore_revision",
            "The etcd revision whose policies the maps enforce",
            self.datastore_revision.clone(),
        );
        r.register(
            "weft_policy_failed_endpoints",
            "Endpoint directions denying everything because their rules did not fit a full map",
            self.failed_endpoints.clone(),
        );
        r.register(
            "weft_policy_apply_seconds",
            "Time to compile and apply a batch of policy changes",
            self.apply_seconds.clone(),
        );
        r.register_collector(Box::new(PolicyMapsCollector { pin_root }));
    }
}

impl Default for PolicyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
struct PolicyMapsCollector {
    pin_root: PathBuf,
}

impl Collector for PolicyMapsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(maps) = Maps::open_pinned(&self.pin_root) else {
            return Ok(());
        };
        let snap = maps.policy_snapshot().unwrap_or_default();
        {
            let mut fill = encoder.encode_descriptor(
                "weft_policy_map_fill_ratio",
                "Entries over capacity per policy map",
                None,
                MetricType::Gauge,
            )?;
            for (map, n) in [
                (map_names::POLICY_ENDPOINTS, snap.endpoints.len()),
                (map_names::POLICY_ADDRS, snap.addrs.len()),
                (map_names::POLICY_CIDRS, snap.cidrs.len()),
                (map_names::POLICY_RULES, snap.rules.len()),
                (map_names::POLICY_PORT_BLOCKS, snap.blocks.len()),
                (map_names::POLICY_NS_DEFAULTS, snap.ns_defaults.len()),
            ] {
                let cap = maps.capacity(map).unwrap_or(1).max(1);
                ConstGauge::new(n as f64 / f64::from(cap))
                    .encode(fill.encode_family(&[("map", map)])?)?;
            }
        }
        let names: std::collections::HashMap<Ipv4Addr, String> = maps
            .policy_pod_names()
            .unwrap_or_default()
            .into_iter()
            .map(|(ip, n)| (ip, format!("{}/{}", n.namespace(), n.name())))
            .collect();
        let mut drops = encoder.encode_descriptor(
            "weft_policy_drops",
            "Packets a NetworkPolicy denied, per local endpoint and direction",
            None,
            MetricType::Counter,
        )?;
        for (ip, d) in maps.policy_drops().unwrap_or_default() {
            let endpoint = ip.to_string();
            let pod = names.get(&ip).cloned().unwrap_or_default();
            for (direction, n) in [("ingress", d.ingress), ("egress", d.egress)] {
                ConstCounter::new(n).encode(drops.encode_family(&[
                    ("endpoint", endpoint.as_str()),
                    ("pod", pod.as_str()),
                    ("direction", direction),
                ])?)?;
            }
        }
        Ok(())
    }
}

/// Every IPv4 address of this network namespace's interfaces: the node's own addresses, which
/// policy always allows to and from its pods (kubelet probes come from one of them).
pub fn local_ipv4_addrs() -> anyhow::Result<Vec<Ipv4Addr>> {
    let nl = crate::netlink::BlockingNetlink::open()?;
    let links = nl.block_on(nl.links())?;
    let mut out = Vec::new();
    for l in links {
        for net in nl.block_on(nl.addresses(l.ifindex)).unwrap_or_default() {
            let a = net.addr();
            if !a.is_loopback() {
                out.push(a);
            }
        }
    }
    Ok(out)
}

//! Where the cluster's node records live. A datastore gives this node its pod subnet (a lease),
//! publishes the node's record for its peers, and streams every peer's record.
//!
//! Adapters: `etcd` (flannel's subnet leases, wire-compatible with flanneld), `kube` (Node
//! objects: `spec.podCIDR` and annotations, flannel's read too) and `static_file` (a fixed
//! topology). Adapters run their own threads and send [`Event`]s to the reconciler.
use std::{net::Ipv4Addr, sync::mpsc::Sender};

use anyhow::Result;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::{BackendType, FlannelNetConf};

pub mod etcd;
pub mod kube;
pub mod static_file;

/// One node's record: flannel's lease (`PublicIP`, `BackendType`, `BackendData`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLease {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    /// The backend the node announces (informational: this node's own config decides how it
    /// reaches the peer; both encapsulations are decapsulated everywhere).
    pub backend: Option<BackendType>,
    /// The node's VTEP MAC (flannel's `BackendData.VtepMAC`); absent for non-vxlan nodes.
    pub vtep_mac: Option<[u8; 6]>,
    /// The record's name, unique within its datastore: the Kubernetes node or the static
    /// file's entry; for etcd, whose leases name no node, the lease key (`10.244.1.0-24`).
    pub name: String,
    /// The node's own name, for people (`weft monitor`, `weft nodes`): the Kubernetes Node's
    /// name, the static entry's `name`, the `NodeName` a weft node adds to its etcd lease;
    /// None for a lease that carries none (flanneld's).
    pub node_name: Option<String>,
    /// Age among records claiming the same subnet, lower is older (the older one wins, see
    /// `crate::admission`): etcd's create revision of the key, the Node's creationTimestamp
    /// (Unix seconds), the entry's position in the static file.
    pub seniority: i64,
    /// The `BackendType` the record announces when it is none this node knows (a flannel node
    /// with `wireguard`, `udp`, ...): such a node cannot be reached, its record is refused.
    pub unknown_backend: Option<String>,
}

/// A lease value as flanneld writes it: `{"PublicIP":..,"BackendType":..,"BackendData":{..}}`,
/// plus weft's `NodeName`. flanneld decodes leases with Go's `encoding/json`, which ignores
/// keys its `LeaseAttrs` does not have, so flannel nodes read weft's leases unchanged; and a
/// lease without `NodeName` (flanneld's) is read as a node without a name.
#[derive(Debug, Serialize, Deserialize)]
struct FlannelLease {
    #[serde(rename = "PublicIP")]
    public_ip: Ipv4Addr,
    #[serde(
        rename = "NodeName",
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "text_or_none"
    )]
    node_name: Option<String>,
    #[serde(rename = "BackendType", default)]
    backend_type: Option<String>,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    backend_data: Option<FlannelBackendData>,
}

/// A text value, or None for anything else: a name is for people, so a lease whose name is
/// malformed is still a good lease (its node is shown by its address).
fn text_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(serde_json::Value::deserialize(d)?
        .as_str()
        .map(str::to_string))
}

/// `BackendData` of a lease (vxlan: the VNI and the node's VTEP MAC).
#[derive(Debug, Serialize, Deserialize)]
struct FlannelBackendData {
    #[serde(rename = "VNI", default, skip_serializing_if = "Option::is_none")]
    vni: Option<u32>,
    #[serde(rename = "VtepMAC", default, skip_serializing_if = "Option::is_none")]
    vtep_mac: Option<String>,
}

impl NodeLease {
    /// The lease value as flanneld writes it.
    pub fn to_flannel_json(&self, vni: u32) -> String {
        let backend = self.backend.unwrap_or(BackendType::Vxlan);
        serde_json::to_string(&FlannelLease {
            public_ip: self.public_ip,
            node_name: self.node_name.clone(),
            backend_type: Some(backend.name().into()),
            backend_data: self.vtep_mac.map(|mac| FlannelBackendData {
                vni: Some(vni),
                vtep_mac: Some(format_mac(&mac)),
            }),
        })
        .expect("a lease serializes")
    }

    /// Parses a lease value written by weft or flanneld (named by its key, `10.244.1.0-24`).
    pub fn from_flannel_json(subnet: Ipv4Net, value: &[u8]) -> Result<Self> {
        let lease: FlannelLease =
            crate::json::from_slice(value).map_err(|e| anyhow::anyhow!("lease {subnet}: {e}"))?;
        let (backend, unknown_backend) = parse_backend(lease.backend_type.as_deref());
        Ok(Self {
            subnet,
            public_ip: lease.public_ip,
            backend,
            vtep_mac: lease
                .backend_data
                .and_then(|d| d.vtep_mac)
                .as_deref()
                .and_then(parse_mac),
            name: subnet_key(subnet),
            node_name: lease.node_name.filter(|n| !n.is_empty()),
            seniority: 0,
            unknown_backend,
        })
    }
}

/// A record's backend type: one this node knows, or the unknown name as announced. An absent
/// or empty type is vxlan's peer (flannel's default) and no obstacle.
pub fn parse_backend(announced: Option<&str>) -> (Option<BackendType>, Option<String>) {
    match announced.map(str::trim) {
        None | Some("") => (None, None),
        Some(name) => match BackendType::parse(name) {
            Some(b) => (Some(b), None),
            None => (None, Some(name.to_string())),
        },
    }
}

/// A change in the cluster's node records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The complete set of records (after a (re)list): anything not in it is gone.
    Snapshot(Vec<NodeLease>),
    /// A record created or changed.
    Upsert(NodeLease),
    /// The record of this name ([`NodeLease::name`]) is gone.
    Remove(String),
    /// The record of this name is there but cannot be read (it is no route, and it is counted
    /// as refused until it is readable or gone). After a [`Event::Snapshot`], one of these
    /// follows for every unreadable record of the list.
    Unreadable { name: String, error: String },
    /// This node's own subnet changed (lease lost and re-acquired elsewhere).
    LocalSubnet(Ipv4Net),
    /// This node's lease on this subnet is gone, another node holds it, and no other subnet
    /// could be acquired yet: its addresses are the other node's now.
    SubnetLost(Ipv4Net),
    /// Whether the datastore is currently reachable (for metrics and logs).
    Connected(bool),
}

/// The pod subnet this node holds now (`None` while it holds none), shared between the code
/// that acquires or loses it and the code that must act only on this node's own addresses
/// (the etcd publisher of pod address records).
#[derive(Clone, Debug, Default)]
pub struct HeldSubnet(std::sync::Arc<std::sync::Mutex<Option<Ipv4Net>>>);

impl HeldSubnet {
    pub fn set(&self, subnet: Option<Ipv4Net>) {
        *self.0.lock().expect("held subnet lock") = subnet;
    }

    pub fn get(&self) -> Option<Ipv4Net> {
        *self.0.lock().expect("held subnet lock")
    }
}

/// What this node announces.
#[derive(Clone, Debug)]
pub struct LocalNode {
    pub name: String,
    pub public_ip: Ipv4Addr,
    pub backend: BackendType,
    pub vtep_mac: [u8; 6],
    /// The subnet this node had before (from its subnet file): reused when still free.
    pub previous_subnet: Option<Ipv4Net>,
}

pub trait Datastore: Send {
    /// The cluster's net-conf.json held by the datastore, if any (flannel's `<prefix>/config`).
    fn net_conf(&mut self) -> Result<Option<String>>;
    /// Acquires this node's subnet (reusing its previous one when possible) and publishes its
    /// record. Returns the subnet.
    fn acquire(&mut self, local: &LocalNode, conf: &FlannelNetConf) -> Result<Ipv4Net>;
    /// Starts the adapter's threads: keeping the lease alive and streaming peer records.
    fn run(self: Box<Self>, events: Sender<Event>) -> Result<()>;
}

pub use crate::mac::{format_mac, parse_mac};

/// flannel's key for a subnet: `10.244.1.0-24`.
pub fn subnet_key(subnet: Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

pub fn parse_subnet_key(key: &str) -> Option<Ipv4Net> {
    let (addr, len) = key.rsplit('/').next()?.split_once('-')?;
    Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()
}

/// Retry delays: 100 ms doubling to a cap.
pub struct Backoff {
    next: std::time::Duration,
    cap: std::time::Duration,
}

impl Backoff {
    pub fn new(cap: std::time::Duration) -> Self {
        Self {
            next: std::time::Duration::from_millis(100),
            cap,
        }
    }

    pub fn next_delay(&mut self) -> std::time::Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        d
    }

    pub fn reset(&mut self) {
        self.next = std::time::Duration::from_millis(100);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_lease_round_trip() {
        let lease = NodeLease {
            subnet: "10.244.3.0/24".parse().unwrap(),
            public_ip: Ipv4Addr::new(192, 168, 1, 5),
            backend: Some(BackendType::Vxlan),
            vtep_mac: Some([2, 0x57, 1, 2, 3, 4]),
            name: "10.244.3.0-24".into(),
            node_name: None,
            seniority: 0,
            unknown_backend: None,
        };
        let v = lease.to_flannel_json(1);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&v).unwrap(),
            serde_json::json!({"PublicIP":"192.168.1.5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:57:01:02:03:04"}})
        );
        let back = NodeLease::from_flannel_json(lease.subnet, v.as_bytes()).unwrap();
        assert_eq!(back, lease);
        assert_eq!(subnet_key(lease.subnet), "10.244.3.0-24");
        assert_eq!(
            parse_subnet_key("/coreos.com/network/subnets/10.244.3.0-24"),
            Some(lease.subnet)
        );
        let err = NodeLease::from_flannel_json(lease.subnet, b"{}").unwrap_err();
        assert!(format!("{err:#}").contains("PublicIP"), "{err:#}");
        assert_eq!(parse_mac("02:57:01:02:03"), None);
        // A backend this node does not speak is kept by name (the record is refused for it).
        let wg = NodeLease::from_flannel_json(
            lease.subnet,
            br#"{"PublicIP":"192.168.1.5","BackendType":"wireguard"}"#,
        )
        .unwrap();
        assert_eq!(wg.backend, None);
        assert_eq!(wg.unknown_backend.as_deref(), Some("wireguard"));
        let plain =
            NodeLease::from_flannel_json(lease.subnet, br#"{"PublicIP":"192.168.1.5"}"#).unwrap();
        assert_eq!((plain.backend, plain.unknown_backend), (None, None));
        assert_eq!(plain.node_name, None, "flanneld's leases name no node");
    }

    #[test]
    fn weft_leases_carry_the_node_name_in_a_key_flannel_ignores() {
        let lease = NodeLease {
            subnet: "10.244.3.0/24".parse().unwrap(),
            public_ip: Ipv4Addr::new(192, 168, 1, 5),
            backend: Some(BackendType::Vxlan),
            vtep_mac: Some([2, 0x57, 1, 2, 3, 4]),
            name: "10.244.3.0-24".into(),
            node_name: Some("worker-7".into()),
            seniority: 0,
            unknown_backend: None,
        };
        let v: serde_json::Value = serde_json::from_str(&lease.to_flannel_json(1)).unwrap();
        // flannel's keys unchanged, one more key: Go's decoder skips keys its struct lacks.
        assert_eq!(
            v,
            serde_json::json!({"PublicIP":"192.168.1.5","NodeName":"worker-7","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:57:01:02:03:04"}})
        );
        let back = NodeLease::from_flannel_json(lease.subnet, v.to_string().as_bytes()).unwrap();
        assert_eq!(back, lease);
        // A malformed or empty name leaves a good lease without a name.
        for bad in [r#"42"#, r#"{"x":1}"#, r#""""#, "null"] {
            let text = format!(r#"{{"PublicIP":"192.168.1.5","NodeName":{bad}}}"#);
            let l = NodeLease::from_flannel_json(lease.subnet, text.as_bytes()).unwrap();
            assert_eq!(l.node_name, None, "{bad}");
            assert_eq!(l.public_ip, lease.public_ip);
        }
    }
}

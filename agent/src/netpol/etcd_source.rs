//! The policy world from etcd (`super::store`'s layout): list, then watch from the next
//! revision, forever; after each batch the etcd revision it reached, so the controller can
//! report what it enforces. And the publisher of this node's pods: the CNI plugin records each
//! local pod's namespace and name in `WEFT_POLICY_PODS`; the agent writes them as address
//! records under its own etcd lease (a dead node's records go with its lease), only for the
//! addresses of the subnet it holds, never over or deleting another node's record
//! ([`PodPublisher`]).
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::mpsc::Sender,
    time::{Duration, Instant},
};

use anyhow::Result;
use ipnet::Ipv4Net;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use serde_json::json;
use weft_common::policy::PolicyPodName;

use super::{
    controller::PolicyEvent,
    store::{Key, PodAddress, PodIndex, k8s_prefix},
};
use crate::{
    datapath::Maps,
    datastore::{
        Backoff, HeldSubnet, NodeLease,
        etcd::{Compare, EtcdClient, Kv, TxnOp, WatchEvent, lease_key},
    },
    policy::{
        model::{PodRecord, Policy, namespace_labels},
        selector::Labels,
    },
};

/// What the source knows, to turn key changes into world events.
#[derive(Default)]
struct Index {
    pods: PodIndex,
    namespaces: BTreeMap<String, Labels>,
    policies: BTreeMap<(String, String), Policy>,
}

fn pod_record(v: &[u8], namespace: &str, name: &str) -> Result<PodRecord, String> {
    let mut pod: Pod = serde_json::from_slice(v).map_err(|e| e.to_string())?;
    pod.metadata.namespace = Some(namespace.to_string());
    pod.metadata.name = Some(name.to_string());
    PodRecord::from_api(&pod)
}

impl Index {
    /// Applies one put (`Some`) or delete (`None`) and returns the events it means.
    fn apply(&mut self, key: &Key, value: Option<&[u8]>, raw_key: &str) -> Vec<PolicyEvent> {
        match key {
            Key::NetworkPolicy { namespace, name } => {
                let k = (namespace.clone(), name.clone());
                let parsed = value.map(|v| {
                    serde_json::from_slice::<NetworkPolicy>(v)
                        .map_err(|e| e.to_string())
                        .and_then(|mut np| {
                            np.metadata.namespace = Some(namespace.clone());
                            np.metadata.name = Some(name.clone());
                            Policy::from_api(&np, namespace).map_err(|e| e.to_string())
                        })
                });
                match parsed {
                    Some(Ok(p)) => {
                        self.policies.insert(k, p.clone());
                        vec![PolicyEvent::PolicyUpsert(p)]
                    }
                    other => {
                        if let Some(Err(e)) = other {
                            // One bad record never stops the rest: it is as if absent.
                            tracing::warn!("ignoring {raw_key}: {e}");
                        }
                        if self.policies.remove(&k).is_some() {
                            vec![PolicyEvent::PolicyRemove {
                                namespace: namespace.clone(),
                                name: name.clone(),
                            }]
                        } else {
                            vec![]
                        }
                    }
                }
            }
            Key::Namespace(name) => {
                let parsed = value.map(|v| {
                    serde_json::from_slice::<Namespace>(v)
                        .map_err(|e| e.to_string())
                        .and_then(|mut ns| {
                            ns.metadata.name = Some(name.clone());
                            namespace_labels(&ns)
                        })
                });
                match parsed {
                    Some(Ok((n, labels))) => {
                        self.namespaces.insert(n.clone(), labels.clone());
                        vec![PolicyEvent::NamespaceUpsert(n, labels)]
                    }
                    other => {
                        if let Some(Err(e)) = other {
                            tracing::warn!("ignoring {raw_key}: {e}");
                        }
                        if self.namespaces.remove(name).is_some() {
                            vec![PolicyEvent::NamespaceRemove(name.clone())]
                        } else {
                            vec![]
                        }
                    }
                }
            }
            Key::Pod { namespace, name } => {
                let k = (namespace.clone(), name.clone());
                match value.map(|v| pod_record(v, namespace, name)) {
                    Some(Ok(r)) => {
                        self.pods.objects.insert(k, r);
                    }
                    other => {
                        if let Some(Err(e)) = other {
                            tracing::warn!("ignoring {raw_key}: {e}");
                        }
                        self.pods.objects.remove(&k);
                    }
                }
                vec![self.pod_event(namespace, name)]
            }
            Key::PodAddress(ip) => {
                let old = self.pods.addresses.remove(ip);
                let new = value.and_then(|v| match serde_json::from_slice::<PodAddress>(v) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        tracing::warn!("ignoring {raw_key}: {e}");
                        None
                    }
                });
                if let Some(a) = &new {
                    self.pods.addresses.insert(*ip, a.clone());
                }
                let mut out = Vec::new();
                for a in [old, new].into_iter().flatten() {
                    out.push(self.pod_event(&a.namespace, &a.name));
                }
                out
            }
        }
    }

    fn pod_event(&self, namespace: &str, name: &str) -> PolicyEvent {
        match self.pods.record(namespace, name) {
            Some(r) => PolicyEvent::PodUpsert(r),
            None => PolicyEvent::PodRemove {
                namespace: namespace.into(),
                name: name.into(),
            },
        }
    }

    fn snapshot(&self) -> Vec<PolicyEvent> {
        vec![
            PolicyEvent::Namespaces(
                self.namespaces
                    .iter()
                    .map(|(n, l)| (n.clone(), l.clone()))
                    .collect(),
            ),
            PolicyEvent::Pods(self.pods.all()),
            PolicyEvent::Policies(self.policies.values().cloned().collect()),
        ]
    }
}

/// Lists and watches the objects under `<prefix>/k8s/`, forever.
pub fn watch_loop(client: EtcdClient, prefix: String, events: Sender<PolicyEvent>) {
    let dir = k8s_prefix(&prefix);
    let mut backoff = Backoff::new(Duration::from_secs(2));
    let mut synced = false;
    loop {
        let (rev, kvs) = match client.range_prefix(&dir) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("listing the policy objects in etcd: {e:#}");
                std::thread::sleep(backoff.next_delay());
                continue;
            }
        };
        let mut index = Index::default();
        for kv in &kvs {
            if let Some(key) = Key::parse(&dir, &kv.key) {
                index.apply(&key, Some(&kv.value), &kv.key);
            }
        }
        let mut batch = index.snapshot();
        if !synced {
            batch.push(PolicyEvent::Synced);
            synced = true;
        }
        batch.push(PolicyEvent::Revision(rev as u64));
        for ev in batch {
            if events.send(ev).is_err() {
                return;
            }
        }
        let mut sent = false;
        let err = client.watch_prefix_revisions(&dir, rev + 1, |evs, revision| {
            sent = true;
            for ev in evs {
                let (kv, value): (&Kv, Option<&[u8]>) = match &ev {
                    WatchEvent::Put(kv) => (kv, Some(&kv.value)),
                    WatchEvent::Delete(kv) => (kv, None),
                };
                let Some(key) = Key::parse(&dir, &kv.key) else {
                    continue;
                };
                for e in index.apply(&key, value, &kv.key) {
                    let _ = events.send(e);
                }
            }
            let _ = events.send(PolicyEvent::Revision(revision as u64));
        });
        tracing::info!("etcd policy watch ended: {err:#}");
        if sent {
            backoff.reset();
        }
        std::thread::sleep(backoff.next_delay());
    }
}

/// The address records this node publishes: each named local pod (`WEFT_POLICY_PODS`) whose
/// address lies in the subnet the node holds, as the record's JSON. None while it holds no
/// subnet: a node that lost its subnet while away still has its old pods' names, but their
/// addresses are another node's now.
pub fn desired_records(
    names: &[(Ipv4Addr, PolicyPodName)],
    held: Option<Ipv4Net>,
    node: &str,
) -> HashMap<Ipv4Addr, Vec<u8>> {
    let Some(subnet) = held else {
        return HashMap::new();
    };
    names
        .iter()
        .filter(|(ip, n)| !n.name().is_empty() && subnet.contains(ip))
        .map(|(ip, n)| {
            let record = PodAddress {
                namespace: n.namespace().to_string(),
                name: n.name().to_string(),
                node: node.to_string(),
            };
            (*ip, json!(record).to_string().into_bytes())
        })
        .collect()
}

/// A record this node wrote: its exact value (a deletion only removes the key while it still
/// holds it) and the etcd lease it hangs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub value: Vec<u8>,
    pub lease: i64,
}

/// What to write (desired records not yet written under `lease`) and what to delete (records
/// written but no longer desired), in address order.
pub fn record_changes(
    written: &HashMap<Ipv4Addr, Written>,
    desired: &HashMap<Ipv4Addr, Vec<u8>>,
    lease: i64,
) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
    let mut puts: Vec<Ipv4Addr> = desired
        .iter()
        .filter(|(ip, value)| {
            written
                .get(ip)
                .is_none_or(|w| w.lease != lease || &w.value != *value)
        })
        .map(|(ip, _)| *ip)
        .collect();
    let mut deletes: Vec<Ipv4Addr> = written
        .keys()
        .filter(|ip| !desired.contains_key(ip))
        .copied()
        .collect();
    puts.sort_unstable();
    deletes.sort_unstable();
    (puts, deletes)
}

/// The subnet lease record `kv` (`<prefix>/subnets/<subnet>`) names `node_ip`: its
/// `mod_revision`, which a write made on the strength of it compares.
pub fn held_by(kv: Option<&Kv>, subnet: Ipv4Net, node_ip: Ipv4Addr) -> Option<i64> {
    let kv = kv?;
    let lease = NodeLease::from_flannel_json(subnet, &kv.value).ok()?;
    (lease.public_ip == node_ip).then_some(kv.mod_revision)
}

/// Publishes this node's pods as address records (`<prefix>/k8s/podips/<address>`) under an
/// etcd lease of its own (a dead node's records go with the lease).
///
/// Only the holder of an address's subnet writes its record: a node publishes the pods inside
/// the subnet it holds ([`desired_records`]), and each write is a transaction that also checks
/// that etcd's lease record of that subnet still names this node, so a node that has not yet
/// noticed that its subnet went to another node (it was away past its TTL) cannot overwrite the
/// new holder's records. A record is deleted only while it holds what this node wrote (a
/// transaction comparing the value), so a pod leaving this node never deletes another node's
/// record for the same address.
pub struct PodPublisher {
    client: EtcdClient,
    prefix: String,
    dir: String,
    node: String,
    node_ip: Ipv4Addr,
    ttl: u64,
    lease: i64,
    next_keepalive: Instant,
    written: HashMap<Ipv4Addr, Written>,
    /// The subnet last found held by another node in etcd (warned about once).
    refused: Option<Ipv4Net>,
}

/// etcd takes 128 operations per transaction by default; one is the holder check.
const PUTS_PER_TXN: usize = 127;

impl PodPublisher {
    pub fn new(client: EtcdClient, prefix: &str, node: &str, node_ip: Ipv4Addr, ttl: u64) -> Self {
        Self {
            client,
            prefix: prefix.to_string(),
            dir: k8s_prefix(prefix),
            node: node.to_string(),
            node_ip,
            ttl,
            lease: 0,
            next_keepalive: Instant::now(),
            written: HashMap::new(),
            refused: None,
        }
    }

    /// The records written so far, by address.
    pub fn written(&self) -> &HashMap<Ipv4Addr, Written> {
        &self.written
    }

    /// Keeps the lease alive; a new lease (the first, or after this node was away past its
    /// TTL) starts from the records etcd holds naming this node, from earlier leases too (an
    /// agent restarted within the TTL, whose pods may have gone meanwhile).
    fn keep_lease(&mut self) -> Result<()> {
        if self.lease != 0 && Instant::now() < self.next_keepalive {
            return Ok(());
        }
        if self.lease != 0 && self.client.lease_keepalive(self.lease)? <= 0 {
            self.lease = 0;
        }
        if self.lease == 0 {
            let (_, kvs) = self.client.range_prefix(&format!("{}podips/", self.dir))?;
            self.written = kvs
                .into_iter()
                .filter_map(|kv| {
                    let Some(Key::PodAddress(ip)) = Key::parse(&self.dir, &kv.key) else {
                        return None;
                    };
                    let a: PodAddress = serde_json::from_slice(&kv.value).ok()?;
                    (a.node == self.node).then_some((
                        ip,
                        Written {
                            value: kv.value,
                            lease: kv.lease,
                        },
                    ))
                })
                .collect();
            self.lease = self.client.lease_grant(self.ttl)?;
        }
        self.next_keepalive = Instant::now() + Duration::from_millis(self.ttl * 1000 / 3);
        Ok(())
    }

    /// One round: etcd's records of this node brought in line with `names` (the local pods'
    /// names) and `held` (the subnet this node holds).
    pub fn sync(
        &mut self,
        names: &[(Ipv4Addr, PolicyPodName)],
        held: Option<Ipv4Net>,
    ) -> Result<()> {
        self.keep_lease()?;
        let desired = desired_records(names, held, &self.node);
        let (puts, deletes) = record_changes(&self.written, &desired, self.lease);
        if let (Some(subnet), false) = (held, puts.is_empty()) {
            let subnet_key = lease_key(&self.prefix, subnet);
            let holder = self.client.get(&subnet_key)?;
            match held_by(holder.as_ref(), subnet, self.node_ip) {
                Some(revision) => {
                    self.refused = None;
                    for chunk in puts.chunks(PUTS_PER_TXN) {
                        let keys: Vec<String> = chunk
                            .iter()
                            .map(|ip| Key::PodAddress(*ip).path(&self.dir))
                            .collect();
                        let ops: Vec<TxnOp> = chunk
                            .iter()
                            .zip(&keys)
                            .map(|(ip, key)| TxnOp::Put {
                                key,
                                value: &desired[ip],
                                lease: self.lease,
                            })
                            .collect();
                        let check = Compare::ModRevision(&subnet_key, revision);
                        if !self.client.txn(&[check], &ops)? {
                            // The subnet's record changed meanwhile: judged again next round.
                            break;
                        }
                        for ip in chunk {
                            let value = desired[ip].clone();
                            let lease = self.lease;
                            self.written.insert(*ip, Written { value, lease });
                        }
                    }
                }
                None => {
                    if self.refused != Some(subnet) {
                        tracing::warn!(
                            %subnet,
                            "not publishing pod addresses: etcd's lease of this node's subnet \
                             names another node (or none)"
                        );
                        self.refused = Some(subnet);
                    }
                }
            }
        }
        for ip in deletes {
            let key = Key::PodAddress(ip).path(&self.dir);
            let mine = Compare::Value(&key, &self.written[&ip].value);
            // When the comparison fails the key is another node's now (or gone): left alone.
            self.client.txn(&[mine], &[TxnOp::Delete(&key)])?;
            self.written.remove(&ip);
        }
        Ok(())
    }
}

/// Runs `publisher` on this node's pods (`WEFT_POLICY_PODS`, written by the CNI plugin) and
/// the subnet it holds, every `period`, forever.
pub fn publish_loop(
    mut publisher: PodPublisher,
    pin_root: PathBuf,
    held: HeldSubnet,
    period: Duration,
) {
    let mut maps: Option<Maps> = None;
    loop {
        let result: Result<()> = (|| {
            if maps.is_none() {
                maps = Some(Maps::open_pinned(&pin_root)?);
            }
            let names = maps.as_ref().expect("opened").policy_pod_names()?;
            publisher.sync(&names, held.get())
        })();
        if let Err(e) = result {
            tracing::warn!("publishing this node's pods to etcd: {e:#}");
            maps = None;
            std::thread::sleep(Duration::from_secs(1));
        }
        std::thread::sleep(period);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn record(name: &str, node: &str) -> Vec<u8> {
        json!(PodAddress {
            namespace: "default".into(),
            name: name.into(),
            node: node.into(),
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn only_named_pods_of_the_held_subnet_are_published() {
        let names = [
            (ip("10.244.1.2"), PolicyPodName::new("default", "a-old")),
            (ip("10.244.3.2"), PolicyPodName::new("default", "a-new")),
            // A pod created without K8S_POD_NAME.
            (ip("10.244.3.3"), PolicyPodName::new("", "")),
        ];
        let held = "10.244.3.0/24".parse().ok();
        let desired = desired_records(&names, held, "a");
        assert_eq!(
            desired,
            HashMap::from([(ip("10.244.3.2"), record("a-new", "a"))]),
            "the pod of the subnet this node lost is not published"
        );
        assert!(desired_records(&names, None, "a").is_empty());
    }

    #[test]
    fn changes_rewrite_records_of_earlier_leases_and_delete_what_left() {
        let desired = HashMap::from([
            (ip("10.244.3.2"), record("same", "a")),
            (ip("10.244.3.3"), record("renamed", "a")),
            (ip("10.244.3.4"), record("earlier-lease", "a")),
            (ip("10.244.3.5"), record("new", "a")),
        ]);
        let written = |value: Vec<u8>, lease| Written { value, lease };
        let published = HashMap::from([
            (ip("10.244.3.2"), written(record("same", "a"), 7)),
            (ip("10.244.3.3"), written(record("before", "a"), 7)),
            (ip("10.244.3.4"), written(record("earlier-lease", "a"), 6)),
            (ip("10.244.1.2"), written(record("gone", "a"), 7)),
        ]);
        let (puts, deletes) = record_changes(&published, &desired, 7);
        assert_eq!(
            puts,
            vec![ip("10.244.3.3"), ip("10.244.3.4"), ip("10.244.3.5")]
        );
        assert_eq!(deletes, vec![ip("10.244.1.2")]);
    }

    #[test]
    fn a_subnet_is_held_while_its_lease_record_names_this_node() {
        let subnet: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let kv = |public_ip: &str| Kv {
            key: "/coreos.com/network/subnets/10.244.1.0-24".into(),
            value: json!({"PublicIP": public_ip, "BackendType": "vxlan"})
                .to_string()
                .into_bytes(),
            create_revision: 3,
            mod_revision: 9,
            lease: 5,
        };
        let me = ip("192.168.100.10");
        assert_eq!(held_by(Some(&kv("192.168.100.10")), subnet, me), Some(9));
        assert_eq!(held_by(Some(&kv("192.168.100.11")), subnet, me), None);
        assert_eq!(held_by(None, subnet, me), None);
        let unreadable = Kv {
            value: b"{not json".to_vec(),
            ..kv("192.168.100.10")
        };
        assert_eq!(held_by(Some(&unreadable), subnet, me), None);
    }
}

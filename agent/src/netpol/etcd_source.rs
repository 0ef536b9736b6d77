//! The policy world from etcd (`super::store`'s layout): list, then watch from the next
//! revision, forever; after each batch the etcd revision it reached, so the controller can
//! report what it enforces. And the publisher of this node's pods: the CNI plugin records each
//! local pod's namespace and name in `WEFT_POLICY_PODS`; the agent writes them as address
//! records under its own etcd lease (a dead node's records go with its lease).
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::mpsc::Sender,
    time::{Duration, Instant},
};

use anyhow::Result;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use serde_json::json;

use super::{
    controller::PolicyEvent,
    store::{Key, PodAddress, PodIndex, k8s_prefix},
};
use crate::{
    datapath::Maps,
    datastore::{
        Backoff,
        etcd::{EtcdClient, Kv, WatchEvent},
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

/// Publishes this node's pods (`WEFT_POLICY_PODS`, written by the CNI plugin) as address
/// records under an etcd lease, every `period`, forever.
pub fn publish_loop(
    client: EtcdClient,
    prefix: String,
    node: String,
    pin_root: PathBuf,
    ttl: u64,
    period: Duration,
) {
    let dir = k8s_prefix(&prefix);
    let mut lease = 0i64;
    let mut published: HashMap<Ipv4Addr, PodAddress> = HashMap::new();
    let mut next_keepalive = Instant::now();
    let mut maps: Option<Maps> = None;
    loop {
        let result: Result<()> = (|| {
            if maps.is_none() {
                maps = Some(Maps::open_pinned(&pin_root)?);
            }
            let m = maps.as_ref().expect("opened");
            if lease == 0 || Instant::now() >= next_keepalive {
                if lease != 0 && client.lease_keepalive(lease)? <= 0 {
                    lease = 0;
                }
                if lease == 0 {
                    lease = client.lease_grant(ttl)?;
                    published.clear();
                }
                next_keepalive = Instant::now() + Duration::from_millis(ttl * 1000 / 3);
            }
            let mut desired: HashMap<Ipv4Addr, PodAddress> = HashMap::new();
            for (ip, n) in m.policy_pod_names()? {
                if n.name().is_empty() {
                    continue;
                }
                desired.insert(
                    ip,
                    PodAddress {
                        namespace: n.namespace().to_string(),
                        name: n.name().to_string(),
                        node: node.clone(),
                    },
                );
            }
            for (ip, a) in &desired {
                if published.get(ip) != Some(a) {
                    let key = Key::PodAddress(*ip).path(&dir);
                    client.put(&key, json!(a).to_string().as_bytes(), lease)?;
                    published.insert(*ip, a.clone());
                }
            }
            let gone: Vec<Ipv4Addr> = published
                .keys()
                .filter(|ip| !desired.contains_key(ip))
                .copied()
                .collect();
            for ip in gone {
                client.delete(&Key::PodAddress(ip).path(&dir))?;
                published.remove(&ip);
            }
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!("publishing this node's pods to etcd: {e:#}");
            maps = None;
            std::thread::sleep(Duration::from_secs(1));
        }
        std::thread::sleep(period);
    }
}

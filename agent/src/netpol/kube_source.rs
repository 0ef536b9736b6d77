//! The policy world from Kubernetes: Pods, Namespaces and NetworkPolicies through kube-rs
//! reflectors fed by the datastore's watch loop (`datastore::kube::watch_kind`, with its relist
//! and token-rotation handling). Pods are stripped to what policy needs (labels, address,
//! node, named ports, hostNetwork) before the reflector stores them, so 10,000 pods cost little
//! memory; a relist is sent as the store's complete state.
use std::sync::{
    Arc,
    atomic::{AtomicU8, Ordering},
    mpsc::Sender,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Client, Resource, ResourceExt as _,
    runtime::{reflector, watcher},
};

use super::controller::PolicyEvent;
use crate::{
    datastore::kube::{KubeSource, watch_kind},
    policy::model::{PodRecord, Policy, namespace_labels},
};

/// Keeps only what policy reads of a Pod.
fn strip_pod(pod: &mut Pod) {
    pod.metadata.annotations = None;
    pod.metadata.managed_fields = None;
    pod.metadata.owner_references = None;
    if let Some(spec) = pod.spec.as_mut() {
        for c in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            let ports = c.ports.take();
            let restart = c.restart_policy.take();
            *c = Default::default();
            c.ports = ports;
            c.restart_policy = restart;
        }
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
    }
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
    }
}

/// How many of the three kinds have been listed; `Synced` goes out when all have.
#[derive(Clone, Default)]
struct Listed(Arc<AtomicU8>);

impl Listed {
    fn kind_listed(&self, events: &Sender<PolicyEvent>) {
        if self.0.fetch_add(1, Ordering::SeqCst) == 2 {
            let _ = events.send(PolicyEvent::Synced);
        }
    }
}

/// What a kind's objects become.
struct Convert<K> {
    /// Drops what policy does not read, before the store keeps it.
    strip: fn(&mut K),
    /// A (re)list: the store's complete state.
    snapshot: fn(Vec<Arc<K>>) -> PolicyEvent,
    upsert: fn(&K) -> Option<PolicyEvent>,
    remove: fn(&K) -> PolicyEvent,
}

/// Watches one kind into a reflector store, sending the events `convert` makes of it.
fn spawn_kind<K>(
    runtime: &tokio::runtime::Handle,
    source: KubeSource,
    client: Client,
    events: Sender<PolicyEvent>,
    listed: Listed,
    convert: Convert<K>,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    let mut first = true;
    let kind = K::kind(&()).to_string();
    runtime.spawn(watch_kind::<K>(
        source,
        client,
        move |ev| {
            let ev = ev.modify(convert.strip);
            writer.apply_watcher_event(&ev);
            let out = match &ev {
                watcher::Event::Init | watcher::Event::InitApply(_) => return true,
                watcher::Event::InitDone => {
                    let sent = events.send((convert.snapshot)(store.state())).is_ok();
                    if first {
                        first = false;
                        listed.kind_listed(&events);
                    }
                    return sent;
                }
                watcher::Event::Apply(o) => (convert.upsert)(o),
                watcher::Event::Delete(o) => Some((convert.remove)(o)),
            };
            match out {
                Some(e) => events.send(e).is_ok(),
                None => true,
            }
        },
        move |err| tracing::warn!("watching {kind}: {err}"),
    ));
}

fn pod_record(p: &Pod) -> Option<PodRecord> {
    PodRecord::from_api(p)
        .map_err(|e| tracing::warn!("ignoring a pod: {e}"))
        .ok()
}

fn policy(np: &NetworkPolicy) -> Option<Policy> {
    // The API server validated it; a refusal here means weft disagrees: log, skip.
    Policy::from_api(np, "default")
        .map_err(|e| {
            tracing::warn!(
                "ignoring NetworkPolicy {}/{}: {e}",
                np.namespace().unwrap_or_default(),
                np.name_any()
            )
        })
        .ok()
}

/// Starts the three watches on `runtime`.
pub fn spawn(
    runtime: &tokio::runtime::Handle,
    source: KubeSource,
    client: Client,
    events: Sender<PolicyEvent>,
) {
    let listed = Listed::default();
    spawn_kind::<Pod>(
        runtime,
        source.clone(),
        client.clone(),
        events.clone(),
        listed.clone(),
        Convert {
            strip: strip_pod,
            snapshot: |pods| PolicyEvent::Pods(pods.iter().filter_map(|p| pod_record(p)).collect()),
            upsert: |p| pod_record(p).map(PolicyEvent::PodUpsert),
            remove: |p| PolicyEvent::PodRemove {
                namespace: p.namespace().unwrap_or_default(),
                name: p.name_any(),
            },
        },
    );
    spawn_kind::<Namespace>(
        runtime,
        source.clone(),
        client.clone(),
        events.clone(),
        listed.clone(),
        Convert {
            strip: |ns| {
                ns.metadata.annotations = None;
                ns.metadata.managed_fields = None;
                ns.spec = None;
                ns.status = None;
            },
            snapshot: |list| {
                PolicyEvent::Namespaces(
                    list.iter()
                        .filter_map(|n| namespace_labels(n).ok())
                        .collect(),
                )
            },
            upsert: |n| {
                namespace_labels(n)
                    .ok()
                    .map(|(n, l)| PolicyEvent::NamespaceUpsert(n, l))
            },
            remove: |n| PolicyEvent::NamespaceRemove(n.name_any()),
        },
    );
    spawn_kind::<NetworkPolicy>(
        runtime,
        source,
        client,
        events,
        listed,
        Convert {
            strip: |np| {
                np.metadata.annotations = None;
                np.metadata.managed_fields = None;
            },
            snapshot: |list| PolicyEvent::Policies(list.iter().filter_map(|p| policy(p)).collect()),
            upsert: |p| policy(p).map(PolicyEvent::PolicyUpsert),
            remove: |p| PolicyEvent::PolicyRemove {
                namespace: p.namespace().unwrap_or_default(),
                name: p.name_any(),
            },
        },
    );
}

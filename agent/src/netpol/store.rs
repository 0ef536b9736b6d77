//! Kubernetes objects in etcd, for clusters without an API server: the same NetworkPolicy,
//! Namespace and Pod objects, as JSON, under the etcd prefix, so that every agent compiles
//! the same world as it would from Kubernetes.
//!
//! | key | value | written by |
//! | --- | --- | --- |
//! | `<prefix>/k8s/networkpolicies/<namespace>/<name>` | a NetworkPolicy | `weft policy apply` |
//! | `<prefix>/k8s/namespaces/<name>` | a Namespace (its labels) | `weft policy apply` |
//! | `<prefix>/k8s/pods/<namespace>/<name>` | a Pod (labels, container ports, hostNetwork) | `weft policy apply` |
//! | `<prefix>/k8s/podips/<address>` | `{"namespace", "name", "node"}` | the agent of the pod's node (from the CNI plugin's `K8S_POD_*`), attached to an etcd lease |
//!
//! A pod's record is its Pod object joined with the address record naming it: a pod without a
//! Pod object has no labels (its namespace is known); an object without an address record has
//! no address yet.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    datastore::etcd::EtcdClient,
    policy::model::{PodRecord, Policy},
};

/// The directory of Kubernetes objects under the etcd prefix.
pub fn k8s_prefix(prefix: &str) -> String {
    format!("{}/k8s/", prefix.trim_end_matches('/'))
}

/// An object `weft policy apply` accepts.
#[derive(Clone, Debug)]
pub enum Object {
    NetworkPolicy(Box<NetworkPolicy>),
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
}

/// The address record of a pod (`<prefix>/k8s/podips/<address>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAddress {
    pub namespace: String,
    pub name: String,
    pub node: String,
}

/// What a key under `<prefix>/k8s/` is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    NetworkPolicy { namespace: String, name: String },
    Namespace(String),
    Pod { namespace: String, name: String },
    PodAddress(Ipv4Addr),
}

impl Key {
    pub fn parse(k8s_prefix: &str, key: &str) -> Option<Self> {
        let rest = key.strip_prefix(k8s_prefix)?;
        let parts: Vec<&str> = rest.split('/').collect();
        Some(match parts.as_slice() {
            ["networkpolicies", ns, name] => Self::NetworkPolicy {
                namespace: ns.to_string(),
                name: name.to_string(),
            },
            ["namespaces", name] => Self::Namespace(name.to_string()),
            ["pods", ns, name] => Self::Pod {
                namespace: ns.to_string(),
                name: name.to_string(),
            },
            ["podips", ip] => Self::PodAddress(ip.parse().ok()?),
            _ => return None,
        })
    }

    pub fn path(&self, k8s_prefix: &str) -> String {
        match self {
            Self::NetworkPolicy { namespace, name } => {
                format!("{k8s_prefix}networkpolicies/{namespace}/{name}")
            }
            Self::Namespace(n) => format!("{k8s_prefix}namespaces/{n}"),
            Self::Pod { namespace, name } => format!("{k8s_prefix}pods/{namespace}/{name}"),
            Self::PodAddress(ip) => format!("{k8s_prefix}podips/{ip}"),
        }
    }
}

/// Reads YAML or JSON documents (several per file: `---` for YAML, concatenated or one `List`
/// for JSON) into objects. Unknown kinds are refused, naming the document.
pub fn parse_documents(text: &str) -> Result<Vec<Object>> {
    let mut values: Vec<Value> = Vec::new();
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        for v in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
            values.push(v.context("parsing JSON")?);
        }
    } else {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v = Value::deserialize(doc).context("parsing YAML")?;
            if !v.is_null() {
                values.push(v);
            }
        }
    }
    let mut flat = Vec::new();
    for v in values {
        match v {
            Value::Array(items) => flat.extend(items),
            v if v["kind"].as_str().is_some_and(|k| k.ends_with("List")) => {
                flat.extend(v["items"].as_array().cloned().unwrap_or_default())
            }
            v => flat.push(v),
        }
    }
    flat.into_iter()
        .enumerate()
        .map(|(i, v)| {
            let kind = v["kind"].as_str().unwrap_or("").to_string();
            let what = format!(
                "document {} ({kind} {:?})",
                i + 1,
                v["metadata"]["name"].as_str().unwrap_or("")
            );
            Ok(match kind.as_str() {
                "NetworkPolicy" => Object::NetworkPolicy(Box::new(
                    serde_json::from_value(v).with_context(|| what.clone())?,
                )),
                "Namespace" => Object::Namespace(Box::new(
                    serde_json::from_value(v).with_context(|| what.clone())?,
                )),
                "Pod" => Object::Pod(Box::new(
                    serde_json::from_value(v).with_context(|| what.clone())?,
                )),
                "" => bail!("{what}: no kind"),
                other => bail!(
                    "{what}: kind {other} is not stored by weft (NetworkPolicy, Namespace, Pod)"
                ),
            })
        })
        .collect()
}

impl Object {
    /// The object's key, after validation (policies with the API server's messages);
    /// `default_namespace` for namespaced objects without one (as `kubectl apply -n`).
    pub fn key(&self, default_namespace: &str) -> Result<Key, String> {
        let ns_of = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_string())
        };
        let name_ok = |kind: &str, name: Option<&String>| -> Result<String, String> {
            let name = name.cloned().unwrap_or_default();
            if name.is_empty()
                || name.len() > 253
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            {
                return Err(format!(
                    "{kind} {name:?}: metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
                ));
            }
            Ok(name)
        };
        match self {
            Object::NetworkPolicy(np) => {
                let p = Policy::from_api(np, default_namespace).map_err(|e| {
                    format!(
                        "NetworkPolicy {:?}: {e}",
                        np.metadata.name.as_deref().unwrap_or("")
                    )
                })?;
                Ok(Key::NetworkPolicy {
                    namespace: p.namespace,
                    name: p.name,
                })
            }
            Object::Namespace(ns) => Ok(Key::Namespace(name_ok(
                "Namespace",
                ns.metadata.name.as_ref(),
            )?)),
            Object::Pod(p) => {
                let name = name_ok("Pod", p.metadata.name.as_ref())?;
                Ok(Key::Pod {
                    namespace: ns_of(&p.metadata),
                    name,
                })
            }
        }
    }

    /// The JSON stored (the namespace filled in).
    pub fn to_json(&self, key: &Key) -> Value {
        let mut v = match self {
            Object::NetworkPolicy(o) => serde_json::to_value(o),
            Object::Namespace(o) => serde_json::to_value(o),
            Object::Pod(o) => serde_json::to_value(o),
        }
        .expect("serializable");
        if let Key::NetworkPolicy { namespace, .. } | Key::Pod { namespace, .. } = key {
            v["metadata"]["namespace"] = json!(namespace);
        }
        v
    }
}

/// Validates every object (all errors at once, in the API server's words) and returns their
/// keys.
pub fn validate(objects: &[Object], default_namespace: &str) -> Result<Vec<Key>> {
    let mut keys = Vec::new();
    let mut errors = Vec::new();
    for o in objects {
        match o.key(default_namespace) {
            Ok(k) => keys.push(k),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(keys)
}

/// The etcd revision of a transaction's response.
fn txn(client: &EtcdClient, ops: Vec<Value>) -> Result<i64> {
    #[derive(Deserialize)]
    struct Header {
        #[serde(default)]
        revision: Option<String>,
    }
    #[derive(Deserialize)]
    struct Resp {
        header: Header,
    }
    let mut revision = 0;
    // etcd takes 128 operations per transaction by default.
    for chunk in ops.chunks(128) {
        let resp: Resp = client.call("/v3/kv/txn", json!({"success": chunk}))?;
        revision = resp
            .header
            .revision
            .as_deref()
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
    }
    Ok(revision)
}

fn b64(s: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Validates and writes the objects (all or none are valid); returns the etcd revision of the
/// write (every agent reports the revision it enforces).
pub fn apply(
    client: &EtcdClient,
    prefix: &str,
    objects: &[Object],
    default_namespace: &str,
) -> Result<i64> {
    let keys = validate(objects, default_namespace)?;
    let dir = k8s_prefix(prefix);
    let ops = objects
        .iter()
        .zip(&keys)
        .map(|(o, k)| {
            let value = o.to_json(k).to_string();
            json!({"request_put": {"key": b64(k.path(&dir).as_bytes()), "value": b64(value.as_bytes())}})
        })
        .collect();
    txn(client, ops)
}

/// Deletes the objects' keys; returns the etcd revision of the deletion.
pub fn delete(client: &EtcdClient, prefix: &str, keys: &[Key]) -> Result<i64> {
    let dir = k8s_prefix(prefix);
    let ops = keys
        .iter()
        .map(|k| json!({"request_delete_range": {"key": b64(k.path(&dir).as_bytes())}}))
        .collect();
    txn(client, ops)
}

/// The pods' records from their objects and address records.
#[derive(Default)]
pub struct PodIndex {
    pub objects: BTreeMap<(String, String), PodRecord>,
    pub addresses: BTreeMap<Ipv4Addr, PodAddress>,
}

impl PodIndex {
    /// The record of pod (namespace, name), if it has an object or an address.
    pub fn record(&self, namespace: &str, name: &str) -> Option<PodRecord> {
        let key = (namespace.to_string(), name.to_string());
        let addr = self
            .addresses
            .iter()
            .find(|(_, a)| a.namespace == namespace && a.name == name);
        let mut rec = match (self.objects.get(&key), addr) {
            (None, None) => return None,
            (Some(r), _) => r.clone(),
            (None, Some(_)) => PodRecord {
                namespace: namespace.into(),
                name: name.into(),
                labels: Default::default(),
                ip: None,
                node: String::new(),
                host_network: false,
                ports: Vec::new(),
            },
        };
        if let Some((ip, a)) = addr
            && !rec.host_network
        {
            rec.ip = Some(*ip);
            rec.node = a.node.clone();
        }
        Some(rec)
    }

    pub fn all(&self) -> Vec<PodRecord> {
        let mut names: std::collections::BTreeSet<(String, String)> =
            self.objects.keys().cloned().collect();
        names.extend(
            self.addresses
                .values()
                .map(|a| (a.namespace.clone(), a.name.clone())),
        );
        names
            .iter()
            .filter_map(|(ns, n)| self.record(ns, n))
            .collect()
    }
}

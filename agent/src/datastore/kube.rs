//! Kubernetes datastore: Node objects. A node's pod subnet is `spec.podCIDRs` (its IPv4 entry)
//! or `spec.podCIDR`, allocated by kube-controller-manager (`--allocate-node-cidrs`); its
//! address is the `weft.io/public-ip` annotation, else flannel's `public-ip-overwrite` /
//! `public-ip` annotations, else its `InternalIP` (then `ExternalIP`) status address. weft
//! publishes its own data under `weft.io/` and, so that flannel nodes can reach weft nodes
//! during a migration, flannel's `flannel.alpha.coreos.com/` annotations too; it reads both.
//!
//! A minimal typed client (serde_json over `ureq`) instead of kube-rs + k8s-openapi: the agent
//! needs three calls (get/patch one node, list+watch nodes), and kube-rs with k8s-openapi
//! roughly triples the agent's build time on these 2-core machines. list+watch follows the API
//! conventions: list, watch from the list's resourceVersion with bookmarks, re-watch from the
//! last seen version when the server ends a watch, relist on `410 Gone`.
//!
//! Transport: HTTPS (rustls) trusting only the cluster's CA (in-cluster service account CA, or
//! the kubeconfig's `certificate-authority(-data)`), or plain HTTP (a `kubectl proxy`, tests).
use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, mpsc::Sender},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnet::Ipv4Net;
use serde_json::{Value, json};

use super::{Backoff, Datastore, Event, LocalNode, NodeLease, format_mac, parse_mac};
use crate::config::{BackendType, FlannelNetConf};

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// TLS trusting only the cluster's CA bundle (PEM).
pub fn tls_config(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| anyhow!("cluster CA: invalid PEM: {e:?}"))?;
        roots
            .add(cert)
            .map_err(|e| anyhow!("cluster CA: unusable certificate: {e}"))?;
    }
    if roots.is_empty() {
        bail!("cluster CA: no certificate in the bundle");
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

pub const WEFT_PREFIX: &str = "weft.io/";
pub const FLANNEL_PREFIX: &str = "flannel.alpha.coreos.com/";

#[derive(Clone)]
pub struct KubeClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
    watch_agent: ureq::Agent,
}

impl KubeClient {
    /// `api`: base URL; otherwise the `server:` of `kubeconfig`; otherwise the in-cluster
    /// service address. The token: `kubeconfig`'s `token:` or the service account's.
    pub fn new(api: Option<&str>, kubeconfig: Option<&Path>) -> Result<Self> {
        let mut base = api.map(str::to_string);
        let mut token = None;
        let mut ca: Option<Vec<u8>> = None;
        if let Some(path) = kubeconfig {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--kubeconfig: reading {}", path.display()))?;
            // The two fields the agent needs, without a YAML parser: the first cluster's
            // `server:` and the first user's `token:`.
            for line in text.lines().map(str::trim) {
                if let Some(s) = line.strip_prefix("server:")
                    && base.is_none()
                {
                    base = Some(s.trim().trim_matches('"').to_string());
                } else if let Some(t) = line.strip_prefix("token:")
                    && token.is_none()
                {
                    token = Some(t.trim().trim_matches('"').to_string());
                } else if let Some(d) = line.strip_prefix("certificate-authority-data:")
                    && ca.is_none()
                {
                    use base64::Engine as _;
                    ca = Some(
                        base64::engine::general_purpose::STANDARD
                            .decode(d.trim().trim_matches('"'))
                            .context("--kubeconfig: certificate-authority-data is not base64")?,
                    );
                } else if let Some(f) = line.strip_prefix("certificate-authority:")
                    && ca.is_none()
                {
                    let f = f.trim().trim_matches('"');
                    ca = Some(
                        std::fs::read(f).with_context(|| format!("--kubeconfig: reading {f}"))?,
                    );
                }
            }
        }
        if base.is_none()
            && let (Ok(host), Ok(port)) = (
                std::env::var("KUBERNETES_SERVICE_HOST"),
                std::env::var("KUBERNETES_SERVICE_PORT"),
            )
        {
            base = Some(format!("https://{host}:{port}"));
            token = std::fs::read_to_string(format!("{SERVICE_ACCOUNT}/token"))
                .ok()
                .map(|t| t.trim().to_string());
            ca = std::fs::read(format!("{SERVICE_ACCOUNT}/ca.crt")).ok();
        }
        let base = base
            .ok_or_else(|| {
                anyhow!("--kube-api: no API server address (nor --kubeconfig, nor in-cluster)")
            })?
            .trim_end_matches('/')
            .to_string();
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(2))
            .timeout(Duration::from_secs(10));
        let mut watch_agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(2))
            .timeout_read(Duration::from_secs(600));
        if base.starts_with("https://") {
            let ca = ca.ok_or_else(|| {
                anyhow!("--kube-api: {base:?} is HTTPS but no cluster CA is known (kubeconfig certificate-authority, or in-cluster)")
            })?;
            let tls = tls_config(&ca)?;
            agent = agent.tls_config(tls.clone());
            watch_agent = watch_agent.tls_config(tls);
        } else if !base.starts_with("http://") {
            bail!("--kube-api: {base:?} is not an http:// or https:// URL");
        }
        Ok(Self {
            base,
            token,
            agent: agent.build(),
            watch_agent: watch_agent.build(),
        })
    }

    fn request(&self, agent: &ureq::Agent, method: &str, path: &str) -> ureq::Request {
        let mut r = agent.request(method, &format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.set("Authorization", &format!("Bearer {t}"));
        }
        r
    }

    fn get_json(&self, path: &str) -> Result<Value> {
        let resp = self
            .request(&self.agent, "GET", path)
            .call()
            .map_err(|e| anyhow!("GET {path}: {e}"))?;
        resp.into_json()
            .with_context(|| format!("GET {path}: invalid JSON"))
    }

    pub fn get_node(&self, name: &str) -> Result<Value> {
        self.get_json(&format!("/api/v1/nodes/{name}"))
    }

    pub fn patch_node_annotations(&self, name: &str, annotations: Value) -> Result<()> {
        let path = format!("/api/v1/nodes/{name}");
        self.request(&self.agent, "PATCH", &path)
            .set("Content-Type", "application/merge-patch+json")
            .send_string(&json!({"metadata": {"annotations": annotations}}).to_string())
            .map_err(|e| anyhow!("PATCH {path}: {e}"))?;
        Ok(())
    }

    pub fn list_nodes(&self) -> Result<(String, Vec<Value>)> {
        let list = self.get_json("/api/v1/nodes")?;
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let items = list["items"].as_array().cloned().unwrap_or_default();
        Ok((rv, items))
    }
}

/// The record a Node object describes, if it has a subnet and an address.
pub fn node_lease(node: &Value) -> Option<NodeLease> {
    let spec = &node["spec"];
    let subnet: Ipv4Net = spec["podCIDRs"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(&spec["podCIDR"]))
        .filter_map(|c| c.as_str()?.parse::<Ipv4Net>().ok())
        .next()?
        .trunc();
    let ann = &node["metadata"]["annotations"];
    let annotation = |key: &str| -> Option<&str> {
        ann[format!("{WEFT_PREFIX}{key}")]
            .as_str()
            .or_else(|| ann[format!("{FLANNEL_PREFIX}{key}")].as_str())
    };
    let from_status = |kind: &str| -> Option<Ipv4Addr> {
        node["status"]["addresses"]
            .as_array()?
            .iter()
            .filter(|a| a["type"].as_str() == Some(kind))
            .find_map(|a| a["address"].as_str()?.parse().ok())
    };
    let public_ip = ann[format!("{WEFT_PREFIX}public-ip")]
        .as_str()
        .or_else(|| ann[format!("{FLANNEL_PREFIX}public-ip-overwrite")].as_str())
        .or_else(|| ann[format!("{FLANNEL_PREFIX}public-ip")].as_str())
        .and_then(|s| s.parse().ok())
        .or_else(|| from_status("InternalIP"))
        .or_else(|| from_status("ExternalIP"))?;
    let backend = annotation("backend-type").and_then(BackendType::parse);
    let vtep_mac = annotation("backend-data")
        .and_then(|d| serde_json::from_str::<Value>(d).ok())
        .and_then(|d| d["VtepMAC"].as_str().and_then(parse_mac));
    Some(NodeLease {
        subnet,
        public_ip,
        backend,
        vtep_mac,
    })
}

fn node_name(node: &Value) -> String {
    node["metadata"]["name"].as_str().unwrap_or("").to_string()
}

pub struct KubeDatastore {
    client: KubeClient,
    /// How long `acquire` waits for the node's podCIDR.
    pub cidr_wait: Duration,
}

impl KubeDatastore {
    pub fn new(client: KubeClient) -> Self {
        Self {
            client,
            cidr_wait: Duration::from_secs(300),
        }
    }
}

/// Why a watch ended.
enum WatchEnd {
    /// The server closed it (timeout): watch again from the last version.
    Closed(String),
    /// The version is too old (410 Gone): list again.
    Gone,
    Failed(anyhow::Error),
}

/// State of list+watch: which subnet each node had, to turn node events into record events.
struct NodeIndex {
    subnets: HashMap<String, Ipv4Net>,
}

impl NodeIndex {
    fn apply(&mut self, kind: &str, node: &Value, events: &Sender<Event>) {
        let name = node_name(node);
        let lease = if kind == "DELETED" {
            None
        } else {
            node_lease(node)
        };
        let old = self.subnets.remove(&name);
        if let Some(old) = old
            && lease.as_ref().is_none_or(|l| l.subnet != old)
        {
            let _ = events.send(Event::Remove(old));
        }
        if let Some(lease) = lease {
            self.subnets.insert(name, lease.subnet);
            let _ = events.send(Event::Upsert(lease));
        }
    }
}

fn watch(client: &KubeClient, rv: &str, index: &mut NodeIndex, events: &Sender<Event>) -> WatchEnd {
    let path = format!(
        "/api/v1/nodes?watch=true&allowWatchBookmarks=true&timeoutSeconds=300&resourceVersion={rv}"
    );
    let resp = match client.request(&client.watch_agent, "GET", &path).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(410, _)) => return WatchEnd::Gone,
        Err(e) => return WatchEnd::Failed(anyhow!("watch nodes: {e}")),
    };
    let mut last_rv = rv.to_string();
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = match line {
            Ok(l) => l,
            Err(e) => return WatchEnd::Failed(anyhow!("watch stream: {e}")),
        };
        if line.trim().is_empty() {
            continue;
        }
        let Ok(ev) = serde_json::from_str::<Value>(&line) else {
            return WatchEnd::Failed(anyhow!("watch: unparsable event {line}"));
        };
        let kind = ev["type"].as_str().unwrap_or("");
        let object = &ev["object"];
        match kind {
            "ERROR" => {
                if object["code"].as_u64() == Some(410) {
                    return WatchEnd::Gone;
                }
                return WatchEnd::Failed(anyhow!("watch error: {object}"));
            }
            "ADDED" | "MODIFIED" | "DELETED" => index.apply(kind, object, events),
            _ => {}
        }
        if let Some(v) = object["metadata"]["resourceVersion"].as_str() {
            last_rv = v.to_string();
        }
    }
    WatchEnd::Closed(last_rv)
}

fn list_watch_loop(client: KubeClient, events: Sender<Event>) {
    let mut backoff = Backoff::new(Duration::from_secs(5));
    let mut index = NodeIndex {
        subnets: HashMap::new(),
    };
    loop {
        let (mut rv, items) = match client.list_nodes() {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("listing nodes: {e:#}");
                let _ = events.send(Event::Connected(false));
                std::thread::sleep(backoff.next_delay());
                continue;
            }
        };
        let _ = events.send(Event::Connected(true));
        index.subnets.clear();
        let mut leases = Vec::new();
        for node in &items {
            if let Some(l) = node_lease(node) {
                index.subnets.insert(node_name(node), l.subnet);
                leases.push(l);
            }
        }
        if events.send(Event::Snapshot(leases)).is_err() {
            return;
        }
        loop {
            match watch(&client, &rv, &mut index, &events) {
                WatchEnd::Closed(last) => {
                    backoff.reset();
                    rv = last;
                }
                WatchEnd::Gone => {
                    tracing::info!("node watch expired (410 Gone): listing again");
                    break;
                }
                WatchEnd::Failed(e) => {
                    tracing::warn!("{e:#}");
                    std::thread::sleep(backoff.next_delay());
                    break;
                }
            }
        }
    }
}

impl Datastore for KubeDatastore {
    fn net_conf(&mut self) -> Result<Option<String>> {
        // In Kubernetes net-conf.json comes from a ConfigMap mounted as a file (--net-conf).
        Ok(None)
    }

    fn acquire(&mut self, local: &LocalNode, conf: &FlannelNetConf) -> Result<Ipv4Net> {
        let deadline = std::time::Instant::now() + self.cidr_wait;
        let mut backoff = Backoff::new(Duration::from_secs(5));
        let subnet = loop {
            match self.client.get_node(&local.name) {
                Ok(node) => {
                    if let Some(l) = node_lease(&node) {
                        break l.subnet;
                    }
                    tracing::info!(node = %local.name, "waiting for the node's podCIDR");
                }
                Err(e) => tracing::warn!("reading node {}: {e:#}", local.name),
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "node {}: no spec.podCIDR after {:?}",
                    local.name,
                    self.cidr_wait
                );
            }
            std::thread::sleep(backoff.next_delay());
        };
        if !conf.network.contains(&subnet) {
            bail!(
                "node {}: podCIDR {subnet} is outside Network {}",
                local.name,
                conf.network
            );
        }
        let data =
            json!({"VNI": conf.backend.vni, "VtepMAC": format_mac(&local.vtep_mac)}).to_string();
        let mut ann = serde_json::Map::new();
        for prefix in [WEFT_PREFIX, FLANNEL_PREFIX] {
            ann.insert(format!("{prefix}backend-type"), json!(local.backend.name()));
            ann.insert(format!("{prefix}backend-data"), json!(data));
            ann.insert(
                format!("{prefix}public-ip"),
                json!(local.public_ip.to_string()),
            );
        }
        ann.insert(
            format!("{FLANNEL_PREFIX}kube-subnet-manager"),
            json!("true"),
        );
        self.client
            .patch_node_annotations(&local.name, Value::Object(ann))
            .context("publishing the node's annotations")?;
        Ok(subnet)
    }

    fn run(self: Box<Self>, events: Sender<Event>) -> Result<()> {
        let client = self.client.clone();
        std::thread::Builder::new()
            .name("kube-watch".into())
            .spawn(move || list_watch_loop(client, events))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_records_from_status_and_annotations() {
        let node = json!({
            "metadata": {"name": "a", "annotations": {
                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"aa:bb:cc:dd:ee:ff\"}",
                "flannel.alpha.coreos.com/backend-type": "vxlan"}},
            "spec": {"podCIDR": "10.244.5.0/24", "podCIDRs": ["fd00::/64", "10.244.5.0/24"]},
            "status": {"addresses": [{"type": "Hostname", "address": "a"}, {"type": "InternalIP", "address": "192.168.1.5"}]}
        });
        let l = node_lease(&node).unwrap();
        assert_eq!(l.subnet, "10.244.5.0/24".parse().unwrap());
        assert_eq!(l.public_ip, Ipv4Addr::new(192, 168, 1, 5));
        assert_eq!(l.vtep_mac, Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]));
        assert_eq!(l.backend, Some(BackendType::Vxlan));
        let mut over = node.clone();
        over["metadata"]["annotations"]["weft.io/public-ip"] = json!("10.0.0.9");
        assert_eq!(
            node_lease(&over).unwrap().public_ip,
            Ipv4Addr::new(10, 0, 0, 9)
        );
        let mut no_cidr = node.clone();
        no_cidr["spec"] = json!({});
        assert!(node_lease(&no_cidr).is_none());
    }
}

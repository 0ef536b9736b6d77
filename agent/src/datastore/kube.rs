//! Kubernetes datastore: Node objects through kube-rs. A node's pod subnet is `spec.podCIDRs`
//! (its IPv4 entry) or `spec.podCIDR`, allocated by kube-controller-manager
//! (`--allocate-node-cidrs`); its address is the `weft.io/public-ip` annotation, else flannel's
//! `public-ip-overwrite` / `public-ip` annotations, else its `InternalIP` (then `ExternalIP`)
//! status address. weft publishes its own data under `weft.io/` and, so that flannel nodes can
//! reach weft nodes during a migration, flannel's `flannel.alpha.coreos.com/` annotations too;
//! it reads both.
//!
//! kube-rs does what the API conventions ask: the client comes from a kubeconfig (its
//! current-context, client certificates, exec plugins, token files) or the in-cluster service
//! account, and the watcher lists in pages, watches with bookmarks from the list's version and
//! relists when the version expired. Two cases the watcher does not cover are handled here:
//! a watch *refused* with HTTP 410 relists (the watcher would retry the expired version
//! forever), and an HTTP 401 rebuilds the client, which re-reads a rotated token file at once
//! (instead of within the minute kube-rs caches it).
//!
//! [`watch_kind`] is the one watch loop: Nodes use it here; Pods, Namespaces and
//! NetworkPolicies can be watched the same way (e.g. into a `kube::runtime::reflector` store).
use std::{
    collections::BTreeMap, fmt::Debug, net::Ipv4Addr, path::PathBuf, sync::mpsc::Sender,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::StreamExt as _;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, Config, Resource, ResourceExt as _,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{
    Backoff, Datastore, Event, LocalNode, NodeLease, format_mac, parse_backend, parse_mac,
};
use crate::config::FlannelNetConf;

pub const WEFT_PREFIX: &str = "weft.io/";
pub const FLANNEL_PREFIX: &str = "flannel.alpha.coreos.com/";

/// Where the API server and the credentials come from. Kept so that a client can be rebuilt
/// (rotated credentials) the same way it was first built.
#[derive(Clone, Debug, Default)]
pub struct KubeSource {
    /// `--kube-api`: overrides the server (e.g. a `kubectl proxy`).
    pub api: Option<String>,
    /// `--kubeconfig`; without it `KUBECONFIG`, `~/.kube/config`, then in-cluster.
    pub kubeconfig: Option<PathBuf>,
}

impl KubeSource {
    pub async fn config(&self) -> Result<Config> {
        let mut config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("--kubeconfig: reading {}", path.display()))?;
                Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .with_context(|| format!("--kubeconfig {}", path.display()))?
            }
            None => match &self.api {
                // A proxy needs no credentials.
                Some(api) => Config::new(
                    api.parse()
                        .with_context(|| format!("--kube-api: {api:?} is not a URL"))?,
                ),
                None => Config::infer().await.context(
                    "no --kubeconfig, no KUBECONFIG or ~/.kube/config, and not in a cluster",
                )?,
            },
        };
        if let Some(api) = &self.api {
            config.cluster_url = api
                .parse()
                .with_context(|| format!("--kube-api: {api:?} is not a URL"))?;
        }
        match config.cluster_url.scheme_str() {
            Some("https") | Some("http") => {}
            _ => bail!(
                "--kube-api: {} is not an http:// or https:// URL",
                config.cluster_url
            ),
        }
        Ok(config)
    }

    pub async fn client(&self) -> Result<Client> {
        let config = self.config().await?;
        Client::try_from(config).context("building the Kubernetes client")
    }
}

/// The `BackendData` annotation (flannel's format).
#[derive(Debug, Default, Serialize, Deserialize)]
struct BackendData {
    #[serde(rename = "VNI", default, skip_serializing_if = "Option::is_none")]
    vni: Option<u32>,
    #[serde(rename = "VtepMAC", default, skip_serializing_if = "Option::is_none")]
    vtep_mac: Option<String>,
}

/// The labels of Node `name` (the bgp backend matches them against `Peers[].NodeSelector`).
pub async fn node_labels(client: &Client, name: &str) -> Result<BTreeMap<String, String>> {
    let api: Api<Node> = Api::all(client.clone());
    let node = api
        .get(name)
        .await
        .with_context(|| format!("reading Node {name}"))?;
    Ok(node.labels().clone())
}

/// The record a Node object describes, if it has a subnet and an address.
pub fn node_lease(node: &Node) -> Option<NodeLease> {
    node_record(node)?.ok()
}

/// The record a Node object describes: None while it has no podCIDR yet (the controller
/// manager has not allocated one), an error naming the field when it has one but the record
/// cannot be made (no IPv4 podCIDR, no address, an address annotation that is not one).
pub fn node_record(node: &Node) -> Option<Result<NodeLease, String>> {
    let spec = node.spec.as_ref()?;
    let cidrs: Vec<&String> = spec
        .pod_cidrs
        .iter()
        .flatten()
        .chain(spec.pod_cidr.iter())
        .collect();
    if cidrs.is_empty() {
        return None;
    }
    let Some(subnet) = cidrs.iter().find_map(|c| c.parse::<Ipv4Net>().ok()) else {
        return Some(Err(format!("spec.podCIDRs: no IPv4 CIDR among {cidrs:?}")));
    };
    let subnet = subnet.trunc();
    let ann = node.annotations();
    let get = |key: String| ann.get(&key).map(String::as_str);
    let annotation = |key: &str| {
        get(format!("{WEFT_PREFIX}{key}")).or_else(|| get(format!("{FLANNEL_PREFIX}{key}")))
    };
    let from_status = |kind: &str| -> Option<Ipv4Addr> {
        node.status
            .as_ref()?
            .addresses
            .iter()
            .flatten()
            .filter(|a| a.type_ == kind)
            .find_map(|a| a.address.parse().ok())
    };
    // The first address annotation set wins; one that is set but not an address is an error
    // (falling back to the status would route to an address the operator overrode).
    let mut annotated = None;
    for key in [
        format!("{WEFT_PREFIX}public-ip"),
        format!("{FLANNEL_PREFIX}public-ip-overwrite"),
        format!("{FLANNEL_PREFIX}public-ip"),
    ] {
        match get(key.clone()).map(str::trim) {
            None | Some("") => continue,
            Some(v) => match v.parse::<Ipv4Addr>() {
                Ok(ip) => {
                    annotated = Some(ip);
                    break;
                }
                Err(_) => {
                    return Some(Err(format!(
                        "metadata.annotations[{key}]: {v:?} is not an IPv4 address"
                    )));
                }
            },
        }
    }
    let Some(public_ip) = annotated
        .or_else(|| from_status("InternalIP"))
        .or_else(|| from_status("ExternalIP"))
    else {
        return Some(Err(format!(
            "no address: no {WEFT_PREFIX}public-ip annotation and no IPv4 InternalIP or \
             ExternalIP in status.addresses"
        )));
    };
    let (backend, unknown_backend) = parse_backend(annotation("backend-type"));
    let vtep_mac = annotation("backend-data")
        .and_then(|d| serde_json::from_str::<BackendData>(d).ok())
        .and_then(|d| d.vtep_mac.as_deref().and_then(parse_mac));
    Some(Ok(NodeLease {
        subnet,
        public_ip,
        backend,
        vtep_mac,
        name: node.name_any(),
        node_name: Some(node.name_any()),
        // Nodes without a creation time (never from an API server) count as the youngest.
        seniority: node
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(i64::MAX, |t| t.0.as_second()),
        unknown_backend,
    }))
}

/// The annotations a weft node publishes (weft's and flannel's).
pub fn node_annotations(local: &LocalNode, vni: u32) -> BTreeMap<String, String> {
    let data = serde_json::to_string(&BackendData {
        vni: Some(vni),
        vtep_mac: Some(format_mac(&local.vtep_mac)),
    })
    .expect("serializable");
    let mut ann = BTreeMap::new();
    for prefix in [WEFT_PREFIX, FLANNEL_PREFIX] {
        ann.insert(format!("{prefix}backend-type"), local.backend.name().into());
        ann.insert(format!("{prefix}backend-data"), data.clone());
        ann.insert(format!("{prefix}public-ip"), local.public_ip.to_string());
    }
    ann.insert(
        format!("{FLANNEL_PREFIX}kube-subnet-manager"),
        "true".into(),
    );
    ann
}

/// The HTTP status of an API error, if the error is one.
fn api_status(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// What a watcher error calls for.
enum Recovery {
    /// The watcher retries by itself (after a pause).
    Retry,
    /// Start a new watcher: it relists.
    Relist,
    /// Rebuild the client (credentials rotated), then relist.
    Reauthenticate,
}

fn recovery(err: &watcher::Error) -> Recovery {
    let status = match err {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => api_status(e),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    };
    match status {
        Some(401) => Recovery::Reauthenticate,
        Some(410) => Recovery::Relist,
        _ => Recovery::Retry,
    }
}

/// Watches every object of kind `K`, forever: `on_event` gets the watcher's events (a relist is
/// `Init`, `InitApply`.., `InitDone`) and `on_error` every error (after which the loop pauses
/// with backoff). Returns when `on_event` returns false.
pub async fn watch_kind<K>(
    source: KubeSource,
    mut client: Client,
    mut on_event: impl FnMut(watcher::Event<K>) -> bool,
    mut on_error: impl FnMut(&watcher::Error),
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut backoff = Backoff::new(Duration::from_secs(5));
    loop {
        let api: Api<K> = Api::all(client.clone());
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        let mut reauthenticate = false;
        while let Some(item) = stream.next().await {
            match item {
                Ok(ev) => {
                    backoff.reset();
                    if !on_event(ev) {
                        return;
                    }
                }
                Err(err) => {
                    on_error(&err);
                    let pause = backoff.next_delay();
                    match recovery(&err) {
                        Recovery::Retry => {
                            tokio::time::sleep(pause).await;
                            continue;
                        }
                        Recovery::Relist => {}
                        Recovery::Reauthenticate => reauthenticate = true,
                    }
                    tokio::time::sleep(pause).await;
                    break;
                }
            }
        }
        if reauthenticate {
            match source.client().await {
                Ok(c) => client = c,
                Err(e) => tracing::warn!("rebuilding the Kubernetes client: {e:#}"),
            }
        }
    }
}

pub struct KubeDatastore {
    source: KubeSource,
    client: Client,
    runtime: tokio::runtime::Handle,
    /// How long `acquire` waits for the node's podCIDR.
    pub cidr_wait: Duration,
}

impl KubeDatastore {
    /// Builds the client on `runtime` (kube-rs needs one; its tasks run there).
    pub fn new(source: KubeSource, runtime: tokio::runtime::Handle) -> Result<Self> {
        let client = runtime.block_on(source.client())?;
        Ok(Self {
            source,
            client,
            runtime,
            cidr_wait: Duration::from_secs(300),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// Turns node events into record events: a Node is a record named after it (none while it
/// has no podCIDR or address).
#[derive(Default)]
struct NodeIndex {
    /// Nodes that have a record (readable or not).
    named: std::collections::HashSet<String>,
    /// Records of a relist in progress, and the unreadable ones (name, why).
    listing: Vec<NodeLease>,
    listing_unreadable: Vec<(String, String)>,
}

impl NodeIndex {
    fn apply(&mut self, node: &Node, deleted: bool, events: &Sender<Event>) -> bool {
        let name = node.name_any();
        let record = if deleted { None } else { node_record(node) };
        match record {
            Some(Ok(lease)) => {
                self.named.insert(name);
                events.send(Event::Upsert(lease)).is_ok()
            }
            Some(Err(error)) => {
                self.named.insert(name.clone());
                events.send(Event::Unreadable { name, error }).is_ok()
            }
            None if self.named.remove(&name) => events.send(Event::Remove(name)).is_ok(),
            None => true,
        }
    }

    fn on_event(&mut self, ev: watcher::Event<Node>, events: &Sender<Event>) -> bool {
        match ev {
            watcher::Event::Init => {
                self.listing.clear();
                self.listing_unreadable.clear();
                true
            }
            watcher::Event::InitApply(node) => {
                match node_record(&node) {
                    Some(Ok(lease)) => self.listing.push(lease),
                    Some(Err(error)) => self.listing_unreadable.push((node.name_any(), error)),
                    None => {}
                }
                true
            }
            watcher::Event::InitDone => {
                let mut leases = std::mem::take(&mut self.listing);
                let unreadable = std::mem::take(&mut self.listing_unreadable);
                self.named = leases
                    .iter()
                    .map(|l| l.name.clone())
                    .chain(unreadable.iter().map(|(n, _)| n.clone()))
                    .collect();
                leases.sort_by_key(|l| l.subnet);
                events.send(Event::Connected(true)).is_ok()
                    && events.send(Event::Snapshot(leases)).is_ok()
                    && unreadable
                        .into_iter()
                        .all(|(name, error)| events.send(Event::Unreadable { name, error }).is_ok())
            }
            watcher::Event::Apply(node) => self.apply(&node, false, events),
            watcher::Event::Delete(node) => self.apply(&node, true, events),
        }
    }
}

impl Datastore for KubeDatastore {
    fn net_conf(&mut self) -> Result<Option<String>> {
        // In Kubernetes net-conf.json comes from a ConfigMap mounted as a file (--net-conf).
        Ok(None)
    }

    fn acquire(&mut self, local: &LocalNode, conf: &FlannelNetConf) -> Result<Ipv4Net> {
        let api: Api<Node> = Api::all(self.client.clone());
        let deadline = std::time::Instant::now() + self.cidr_wait;
        let mut backoff = Backoff::new(Duration::from_secs(5));
        let subnet = loop {
            match self.runtime.block_on(api.get(&local.name)) {
                Ok(node) => match node_record(&node) {
                    Some(Ok(l)) => break l.subnet,
                    Some(Err(e)) => tracing::warn!(node = %local.name, "this node's record: {e}"),
                    None => tracing::info!(node = %local.name, "waiting for the node's podCIDR"),
                },
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
        if subnet.prefix_len() != conf.subnet_len {
            bail!(
                "node {}: podCIDR {subnet} is not a /{} (SubnetLen): set SubnetLen to \
                 kube-controller-manager's --node-cidr-mask-size",
                local.name,
                conf.subnet_len
            );
        }
        let patch = serde_json::json!({
            "metadata": {"annotations": node_annotations(local, conf.backend.vni)}
        });
        self.runtime
            .block_on(api.patch(&local.name, &PatchParams::default(), &Patch::Merge(&patch)))
            .map_err(|e| anyhow!("{e}"))
            .context("publishing the node's annotations")?;
        Ok(subnet)
    }

    fn run(self: Box<Self>, events: Sender<Event>) -> Result<()> {
        let mut index = NodeIndex::default();
        let errors = events.clone();
        self.runtime.spawn(watch_kind::<Node>(
            self.source.clone(),
            self.client.clone(),
            move |ev| index.on_event(ev, &events),
            move |err| {
                tracing::warn!("watching nodes: {err}");
                // An expired version is routine (a relist follows), not a lost API server.
                if !matches!(recovery(err), Recovery::Relist) {
                    let _ = errors.send(Event::Connected(false));
                }
            },
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::BackendType;

    #[test]
    fn node_records_from_status_and_annotations() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "a", "annotations": {
                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"aa:bb:cc:dd:ee:ff\"}",
                "flannel.alpha.coreos.com/backend-type": "vxlan"}},
            "spec": {"podCIDR": "10.244.5.0/24", "podCIDRs": ["fd00::/64", "10.244.5.0/24"]},
            "status": {"addresses": [{"type": "Hostname", "address": "a"}, {"type": "InternalIP", "address": "192.168.1.5"}]}
        }))
        .unwrap();
        let l = node_lease(&node).unwrap();
        assert_eq!(l.subnet, "10.244.5.0/24".parse().unwrap());
        assert_eq!(l.public_ip, Ipv4Addr::new(192, 168, 1, 5));
        assert_eq!(l.vtep_mac, Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]));
        assert_eq!(l.backend, Some(BackendType::Vxlan));
        let mut over = node.clone();
        over.annotations_mut()
            .insert("weft.io/public-ip".into(), "10.0.0.9".into());
        assert_eq!(
            node_lease(&over).unwrap().public_ip,
            Ipv4Addr::new(10, 0, 0, 9)
        );
        let mut no_cidr = node.clone();
        no_cidr.spec = Some(Default::default());
        assert!(
            node_record(&no_cidr).is_none(),
            "not allocated yet: no record, no error"
        );
        // A record that cannot be made names the field.
        let mut garbage = node.clone();
        garbage
            .annotations_mut()
            .insert("flannel.alpha.coreos.com/public-ip".into(), "10.0.0".into());
        let err = node_record(&garbage).unwrap().unwrap_err();
        assert!(
            err.contains("flannel.alpha.coreos.com/public-ip") && err.contains("10.0.0"),
            "{err}"
        );
        let mut no_addr = node.clone();
        no_addr.status = None;
        let err = node_record(&no_addr).unwrap().unwrap_err();
        assert!(err.contains("status.addresses"), "{err}");
        let mut v6 = node.clone();
        v6.spec.as_mut().unwrap().pod_cidr = None;
        v6.spec.as_mut().unwrap().pod_cidrs = Some(vec!["fd00::/64".into()]);
        let err = node_record(&v6).unwrap().unwrap_err();
        assert!(err.contains("spec.podCIDRs"), "{err}");
    }
}

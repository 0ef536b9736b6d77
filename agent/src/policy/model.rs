//! The policy world: namespaces, pods, nodes and validated NetworkPolicies, converted from the
//! k8s-openapi types into what the evaluator and the compiler need.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod},
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    selector::{Labels, Selector},
    validate::{self, ValidationErrors},
};

/// The label the API server puts on every namespace (since Kubernetes 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The API's spelling (`TCP`, `UDP`, `SCTP`); `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.number() == n)
    }
}

/// A named container port: what a named `NetworkPolicyPort` resolves to on a pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// The pod's IPv4 address (`status.podIPs`); `None` until it has one.
    pub ip: Option<Ipv4Addr>,
    pub node: String,
    /// A host-network pod is its node's address: no selector matches it, no policy isolates it.
    pub host_network: bool,
    /// Named container ports (unnamed ones cannot be referred to by a policy).
    pub ports: Vec<NamedPort>,
}

impl PodRecord {
    /// The port number this pod gives `name` for `protocol` (named-port resolution).
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }

    /// Converts a Pod as the API server returns it. Pods without a namespace or name are refused.
    pub fn from_api(pod: &Pod) -> Result<Self, String> {
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .ok_or("pod without metadata.namespace")?;
        let name = pod
            .metadata
            .name
            .clone()
            .ok_or("pod without metadata.name")?;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let ip = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|a| a.ip.as_str())
            .chain(status.and_then(|s| s.pod_ip.as_deref()))
            .filter_map(|s| s.parse::<Ipv4Addr>().ok())
            .next();
        let mut ports = Vec::new();
        // Regular containers and sidecars (restartable init containers) serve named ports.
        let containers = spec.into_iter().flat_map(|s| {
            s.containers.iter().chain(
                s.init_containers
                    .iter()
                    .flatten()
                    .filter(|c| c.restart_policy.as_deref() == Some("Always")),
            )
        });
        for c in containers {
            for p in c.ports.iter().flatten() {
                let (Some(pname), Ok(port)) = (&p.name, u16::try_from(p.container_port)) else {
                    continue;
                };
                let protocol = match p.protocol.as_deref() {
                    None => Protocol::Tcp,
                    Some(s) => match Protocol::parse(s) {
                        Some(p) => p,
                        None => continue,
                    },
                };
                ports.push(NamedPort {
                    name: pname.clone(),
                    protocol,
                    port,
                });
            }
        }
        Ok(Self {
            namespace,
            name,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ip,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ports,
        })
    }
}

/// Namespace labels, with the `kubernetes.io/metadata.name` label the API server always sets.
pub fn namespace_labels(ns: &Namespace) -> Result<(String, Labels), String> {
    let name = ns
        .metadata
        .name
        .clone()
        .ok_or("namespace without metadata.name")?;
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
    Ok((name, labels))
}

/// Everything policy decisions depend on besides the policies.
#[derive(Clone, Debug, Default)]
pub struct World {
    /// Namespace → labels. A namespace that has pods but no record here has only the
    /// `kubernetes.io/metadata.name` label.
    pub namespaces: BTreeMap<String, Labels>,
    /// (namespace, name) → pod.
    pub pods: BTreeMap<(String, String), PodRecord>,
    /// Node name → its addresses (underlay and any other address its own traffic may carry).
    pub nodes: BTreeMap<String, Vec<Ipv4Addr>>,
}

impl World {
    pub fn namespace_labels(&self, ns: &str) -> Labels {
        match self.namespaces.get(ns) {
            Some(l) => l.clone(),
            None => [(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())].into(),
        }
    }

    /// Index address → pod for pods with their own (non-host-network) address.
    pub fn pods_by_ip(&self) -> HashMap<Ipv4Addr, &PodRecord> {
        self.pods
            .values()
            .filter(|p| !p.host_network)
            .filter_map(|p| p.ip.map(|ip| (ip, p)))
            .collect()
    }

    pub fn node_addrs(&self, node: &str) -> &[Ipv4Addr] {
        self.nodes.get(node).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn upsert_pod(&mut self, pod: PodRecord) {
        self.pods
            .insert((pod.namespace.clone(), pod.name.clone()), pod);
    }
}

/// Where a selector peer looks for pods.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamespaceScope {
    /// `podSelector` alone: the policy's own namespace.
    Own(String),
    /// `namespaceSelector` (`{}`: every namespace).
    Selected(Selector),
}

/// One `NetworkPolicyPeer`, with its namespace made explicit. Equal peers of different policies
/// are equal values (the compiler shares them).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Pods {
        namespaces: NamespaceScope,
        /// `None`: every pod of the selected namespaces.
        pods: Option<Selector>,
    },
    IpBlock {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
}

impl Peer {
    /// Whether an address (not a pod's) is in this ipBlock.
    pub fn ip_block_contains(&self, ip: Ipv4Addr) -> bool {
        match self {
            Peer::IpBlock { cidr, except } => {
                cidr.contains(&IpAddr::V4(ip))
                    && !except.iter().any(|e| e.contains(&IpAddr::V4(ip)))
            }
            Peer::Pods { .. } => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// `port` absent: every port of the protocol.
    All,
    /// `port` (and `endPort`): an inclusive range.
    Range(u16, u16),
    /// A named port, resolved on the destination pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: PortMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// `None`: `from`/`to` empty or absent, every peer (also addresses outside the cluster).
    pub peers: Option<Vec<Peer>>,
    /// `None`: `ports` empty or absent, every port of every protocol.
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

/// A validated NetworkPolicy. `ingress`/`egress` are `Some` exactly when the policy has that
/// type (after the API's defaulting of `policyTypes`); `Some(vec![])` isolates and allows
/// nothing.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

pub type PolicyRef = Arc<Policy>;

impl Policy {
    pub fn rules(&self, dir: Direction) -> Option<&[Rule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Validates (with the API server's messages) and converts. `default_namespace` is used when
    /// the object has none (as `kubectl apply -n`).
    pub fn from_api(np: &NetworkPolicy, default_namespace: &str) -> Result<Self, ValidationErrors> {
        validate::validate_network_policy(np)?;
        let namespace = np
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| default_namespace.to_string());
        let spec = np.spec.clone().unwrap_or_default();
        let everything = Default::default();
        let pod_selector = Selector::from_api(spec.pod_selector.as_ref().unwrap_or(&everything))
            .expect("validated");
        // Defaulting (pkg/apis/networking/v1/defaults.go): no policyTypes means Ingress, plus
        // Egress when the policy has egress rules.
        let types: Vec<String> = match spec.policy_types.as_deref() {
            Some(t) if !t.is_empty() => t.to_vec(),
            _ => {
                let mut t = vec!["Ingress".to_string()];
                if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                    t.push("Egress".into());
                }
                t
            }
        };
        let peers = |list: &Option<Vec<NetworkPolicyPeer>>| -> Option<Vec<Peer>> {
            let list = list.as_ref().filter(|l| !l.is_empty())?;
            Some(list.iter().map(|p| convert_peer(p, &namespace)).collect())
        };
        let ingress = types.iter().any(|t| t == "Ingress").then(|| {
            spec.ingress
                .iter()
                .flatten()
                .map(|r| Rule {
                    peers: peers(&r.from),
                    ports: convert_ports(&r.ports),
                })
                .collect()
        });
        let egress = types.iter().any(|t| t == "Egress").then(|| {
            spec.egress
                .iter()
                .flatten()
                .map(|r| Rule {
                    peers: peers(&r.to),
                    ports: convert_ports(&r.ports),
                })
                .collect()
        });
        Ok(Self {
            name: np.metadata.name.clone().unwrap_or_default(),
            namespace,
            pod_selector,
            ingress,
            egress,
        })
    }
}

fn convert_peer(p: &NetworkPolicyPeer, namespace: &str) -> Peer {
    if let Some(b) = &p.ip_block {
        return Peer::IpBlock {
            cidr: validate::parse_cidr(&b.cidr).expect("validated"),
            except: b
                .except
                .iter()
                .flatten()
                .map(|e| validate::parse_cidr(e).expect("validated"))
                .collect(),
        };
    }
    let namespaces = match &p.namespace_selector {
        Some(s) => NamespaceScope::Selected(Selector::from_api(s).expect("validated")),
        None => NamespaceScope::Own(namespace.to_string()),
    };
    Peer::Pods {
        namespaces,
        pods: p
            .pod_selector
            .as_ref()
            .map(|s| Selector::from_api(s).expect("validated")),
    }
}

fn convert_ports(ports: &Option<Vec<NetworkPolicyPort>>) -> Option<Vec<PortSpec>> {
    let ports = ports.as_ref().filter(|p| !p.is_empty())?;
    Some(
        ports
            .iter()
            .map(|p| {
                let protocol = p
                    .protocol
                    .as_deref()
                    .map(|s| Protocol::parse(s).expect("validated"))
                    .unwrap_or(Protocol::Tcp);
                let port = match &p.port {
                    None => PortMatch::All,
                    Some(IntOrString::Int(n)) => {
                        let first = *n as u16;
                        PortMatch::Range(first, p.end_port.map_or(first, |e| e as u16))
                    }
                    Some(IntOrString::String(s)) => PortMatch::Named(s.clone()),
                };
                PortSpec { protocol, port }
            })
            .collect(),
    )
}

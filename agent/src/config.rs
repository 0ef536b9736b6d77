//! flannel's `net-conf.json`, read as flannel reads it: the same keys (`Network`, `SubnetLen`,
//! `SubnetMin`, `SubnetMax`, `Backend` with `Type`, `VNI`, `Port`, `DirectRouting`, `MTU`),
//! matched case-insensitively as Go's encoding/json does, unknown keys ignored (so a flannel
//! user's file with `EnableIPv6: false` works unchanged). Bad values are refused with an error
//! naming the key. The `bgp` backend's keys (`AS`, `Mesh`, `Peers`, `Encapsulation`, ...) sit in
//! `Backend` beside flannel's; they are read the same way and checked whatever the `Type` (a
//! typo is caught before the switch to bgp), and used only with `Type: "bgp"`
//! ([`crate::bgp::config`]).
use std::net::Ipv4Addr;

use anyhow::{Result, anyhow, bail};
use ipnet::Ipv4Net;
use serde::Deserialize;
use serde_json::{Map, Value};
pub use weft_common::max_pod_mtu;
use weft_common::{RouteMode, VXLAN_PORT_DEFAULT, VXLAN_VNI_DEFAULT};

/// How this node reaches its peers by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendType {
    Vxlan,
    Ipip,
    HostGw,
    /// Calico's BGP mode: BIRD distributes pod routes (see `crate::bgp`).
    Bgp,
}

impl BackendType {
    /// The name used in net-conf.json and in lease records (`BackendType`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Vxlan => "vxlan",
            Self::Ipip => "ipip",
            Self::HostGw => "host-gw",
            Self::Bgp => "bgp",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "vxlan" => Some(Self::Vxlan),
            "ipip" => Some(Self::Ipip),
            "host-gw" => Some(Self::HostGw),
            "bgp" => Some(Self::Bgp),
            _ => None,
        }
    }

    /// The route mode for a peer that is not reached directly.
    pub fn route_mode(self) -> RouteMode {
        match self {
            Self::Vxlan => RouteMode::Vxlan,
            Self::Ipip => RouteMode::Ipip,
            Self::HostGw => RouteMode::Direct,
            Self::Bgp => RouteMode::Bgp,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub kind: BackendType,
    pub vni: u32,
    pub port: u16,
    /// flannel's DirectRouting (Calico's CrossSubnet): peers on this node's underlay subnet are
    /// routed without encapsulation.
    pub direct_routing: bool,
    /// Explicit pod MTU; otherwise derived from the underlay MTU.
    pub mtu: Option<u32>,
    /// The bgp backend's keys (`Type: "bgp"` only).
    pub bgp: Option<crate::bgp::BgpConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlannelNetConf {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    /// First subnet that may be leased (flannel: the second subnet of the network).
    pub subnet_min: Ipv4Addr,
    /// Last subnet that may be leased (flannel: the last subnet of the network).
    pub subnet_max: Ipv4Addr,
    pub backend: Backend,
}

impl FlannelNetConf {
    pub fn parse(text: &str) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| anyhow!("net-conf is not valid JSON: {e}"))?;
        if !value.is_object() {
            bail!("net-conf must be a JSON object");
        }
        let raw: RawNetConf = serde_path_to_error::deserialize(lowercase_keys(value))
            .map_err(|e| anyhow!("{}: {}", canonical_path(e.path()), e.inner()))?;
        let network: Ipv4Net = match raw.network {
            Some(s) => s.parse().map_err(|_| {
                anyhow!("Network: {s:?} is not an IPv4 CIDR (e.g. \"10.244.0.0/16\")")
            })?,
            None => bail!("Network: missing (the cluster's pod network, e.g. \"10.244.0.0/16\")"),
        };
        let network = network.trunc();
        let subnet_len = raw.subnetlen.unwrap_or(24);
        if subnet_len > 32 {
            bail!("SubnetLen: {subnet_len} is not a prefix length (0-32)");
        }
        if subnet_len <= network.prefix_len() {
            bail!(
                "SubnetLen: {subnet_len} must be longer than the Network prefix /{}",
                network.prefix_len()
            );
        }
        if subnet_len > 30 {
            bail!("SubnetLen: {subnet_len} leaves no room for pods (at most 30)");
        }
        let size = 1u32 << (32 - subnet_len);
        let first = u32::from(network.network());
        let last_subnet = u32::from(network.broadcast()) - size + 1;
        let subnet_min = subnet_bound(raw.subnetmin.as_deref(), "SubnetMin", network, subnet_len)?
            .unwrap_or(Ipv4Addr::from(first + size));
        let subnet_max = subnet_bound(raw.subnetmax.as_deref(), "SubnetMax", network, subnet_len)?
            .unwrap_or(Ipv4Addr::from(last_subnet));
        if u32::from(subnet_min) > u32::from(subnet_max) {
            bail!("SubnetMin: {subnet_min} is after SubnetMax {subnet_max}");
        }
        let backend = backend(raw.backend.unwrap_or_default())?;
        Ok(Self {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
        })
    }

    /// Every subnet that may be leased, in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let size = 1u64 << (32 - self.subnet_len);
        (u32::from(self.subnet_min) as u64..=u32::from(self.subnet_max) as u64)
            .step_by(size as usize)
            .map(|a| Ipv4Net::new(Ipv4Addr::from(a as u32), self.subnet_len).expect("valid prefix"))
    }

    /// Whether `subnet` is one this config may lease.
    pub fn is_leasable(&self, subnet: Ipv4Net) -> bool {
        subnet.prefix_len() == self.subnet_len
            && subnet.network() == subnet.addr()
            && u32::from(subnet.network()) >= u32::from(self.subnet_min)
            && u32::from(subnet.network()) <= u32::from(self.subnet_max)
    }

    /// The MTU of pods' interfaces: `Backend.MTU` when given, else the underlay's. By default
    /// the backend's encapsulation overhead is taken off the pods' default route instead
    /// ([`Self::path_mtu`], as Cilium's route MTU), so that a live backend switch changes a
    /// route metric in each running pod and never needs pods rebuilt, and host-gw pods send
    /// full-size packets as flannel's host-gw gives them. `Backend.MTU` fixes both at one value
    /// for the configured backend's own bound (`check_mtu`).
    pub fn pod_mtu(&self, underlay_mtu: u32) -> u32 {
        self.backend.mtu.unwrap_or(underlay_mtu)
    }

    /// What a pod's packet may be long to cross the cluster with the configured backend:
    /// `Backend.MTU` when given, else the underlay MTU minus the backend's encapsulation
    /// overhead. Pods get it as the MTU of their default route when it is below their
    /// interface's.
    pub fn path_mtu(&self, underlay_mtu: u32) -> u32 {
        self.backend
            .mtu
            .unwrap_or(underlay_mtu.saturating_sub(self.encap_overhead()))
    }

    /// Bytes the configured backend adds to a pod's packet toward some peer: its tunnel's
    /// overhead (VXLAN 50, with or without DirectRouting; IPIP 20), none for host-gw, and for
    /// bgp its tunnel's when `Encapsulation` is CrossSubnet or Always.
    pub fn encap_overhead(&self) -> u32 {
        match (&self.backend.kind, &self.backend.bgp) {
            (BackendType::Bgp, Some(bgp)) => match bgp.encapsulation {
                crate::bgp::config::Encapsulation::None => 0,
                _ => bgp.tunnel.overhead(),
            },
            (kind, _) => kind.route_mode().overhead(),
        }
    }

    /// Refuses a `Backend.MTU` above the underlay MTU minus the configured backend's overhead
    /// (its packets would not fit once encapsulated). A pod MTU above the default gives up live
    /// switches to a backend that adds more (`NetConfWatch` refuses them).
    pub fn check_mtu(&self, underlay_mtu: u32) -> Result<()> {
        let overhead = self.encap_overhead();
        let max = underlay_mtu.saturating_sub(overhead);
        match self.backend.mtu {
            Some(mtu) if mtu > max => bail!(
                "Backend.MTU: {mtu} is above the underlay MTU {underlay_mtu} minus {overhead} \
                 (the encapsulation overhead of backend {}): at most {max}",
                self.backend.kind.name()
            ),
            _ => Ok(()),
        }
    }
}

/// net-conf.json as written, keys lowercased (Go's encoding/json matches keys
/// case-insensitively; flannel users rely on it). Unknown keys are ignored. Public only so the
/// configuration reference test can list the keys from the type itself.
#[doc(hidden)]
#[derive(Debug, Default, Deserialize)]
pub struct RawNetConf {
    network: Option<String>,
    subnetlen: Option<u8>,
    subnetmin: Option<String>,
    subnetmax: Option<String>,
    backend: Option<RawBackend>,
}

#[doc(hidden)]
#[derive(Debug, Default, Deserialize)]
pub struct RawBackend {
    #[serde(rename = "type")]
    kind: Option<String>,
    vni: Option<u32>,
    port: Option<u16>,
    directrouting: Option<bool>,
    mtu: Option<u32>,
    // The bgp backend's keys, read by `crate::bgp::config`.
    #[serde(rename = "as")]
    pub(crate) asn: Option<u32>,
    pub(crate) mesh: Option<bool>,
    pub(crate) peers: Option<Vec<crate::bgp::config::RawPeer>>,
    pub(crate) encapsulation: Option<String>,
    pub(crate) tunnel: Option<String>,
    pub(crate) routetable: Option<u32>,
    pub(crate) holdtime: Option<u16>,
    pub(crate) restarttime: Option<u16>,
}

/// The keys of a JSON object, lowercased.
fn lowercase_object(map: Map<String, Value>, mut value: impl FnMut(&str, Value) -> Value) -> Value {
    Value::Object(
        map.into_iter()
            .map(|(k, v)| {
                let k = k.to_ascii_lowercase();
                let v = value(&k, v);
                (k, v)
            })
            .collect(),
    )
}

/// Lowercases the keys flannel and weft define: the object's, `Backend`'s and those of each
/// `Backend.Peers` entry. Label names under `NodeSelector` keep their case (labels are
/// case-sensitive).
fn lowercase_keys(value: Value) -> Value {
    let Value::Object(top) = value else {
        return value;
    };
    lowercase_object(top, |k, v| match (k, v) {
        ("backend", Value::Object(backend)) => lowercase_object(backend, |k, v| match (k, v) {
            ("peers", Value::Array(peers)) => Value::Array(
                peers
                    .into_iter()
                    .map(|p| match p {
                        Value::Object(peer) => lowercase_object(peer, |_, v| v),
                        other => other,
                    })
                    .collect(),
            ),
            (_, v) => v,
        }),
        (_, v) => v,
    })
}

/// The spelling of a lowercased key in the docs and errors (`vni` -> `VNI`).
fn canonical_key(key: &str) -> &str {
    match key {
        "network" => "Network",
        "subnetlen" => "SubnetLen",
        "subnetmin" => "SubnetMin",
        "subnetmax" => "SubnetMax",
        "backend" => "Backend",
        "type" => "Type",
        "vni" => "VNI",
        "port" => "Port",
        "directrouting" => "DirectRouting",
        "mtu" => "MTU",
        "as" => "AS",
        "mesh" => "Mesh",
        "peers" => "Peers",
        "encapsulation" => "Encapsulation",
        "tunnel" => "Tunnel",
        "routetable" => "RouteTable",
        "holdtime" => "HoldTime",
        "restarttime" => "RestartTime",
        "address" => "Address",
        "nodeselector" => "NodeSelector",
        "nodesubnet" => "NodeSubnet",
        other => other,
    }
}

/// flannel's spelling of a lowercased key path (`backend.vni` -> `Backend.VNI`,
/// `backend.peers[0].as` -> `Backend.Peers[0].AS`). Keys under `NodeSelector` are label names,
/// printed as written.
fn canonical_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    let mut in_labels = false;
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                if in_labels {
                    out.push_str(key);
                } else {
                    out.push_str(canonical_key(key));
                    in_labels = key == "nodeselector";
                }
            }
            Segment::Unknown => out.push_str(".?"),
        }
    }
    out
}

fn subnet_bound(
    value: Option<&str>,
    key: &str,
    network: Ipv4Net,
    subnet_len: u8,
) -> Result<Option<Ipv4Addr>> {
    let Some(s) = value else {
        return Ok(None);
    };
    // flannel accepts either an address or a CIDR here.
    let addr: Ipv4Addr = s
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow!("{key}: {s:?} is not an IPv4 address"))?;
    if !network.contains(&addr) {
        bail!("{key}: {addr} is outside Network {network}");
    }
    let mask = u32::MAX << (32 - subnet_len);
    if u32::from(addr) & !mask != 0 {
        bail!("{key}: {addr} is not aligned to SubnetLen /{subnet_len}");
    }
    Ok(Some(addr))
}

fn backend(raw: RawBackend) -> Result<Backend> {
    let kind = match raw.kind.as_deref() {
        None => BackendType::Vxlan,
        Some(s) => BackendType::parse(s).ok_or_else(|| {
            anyhow!("Backend.Type: {s:?} is not supported (vxlan, ipip, host-gw or bgp)")
        })?,
    };
    // Checked whatever the type; kept for the bgp backend only.
    let bgp = crate::bgp::BgpConfig::from_raw(&raw)?;
    let vni = match raw.vni {
        None => VXLAN_VNI_DEFAULT,
        Some(v) if v < (1 << 24) => v,
        Some(v) => bail!("Backend.VNI: {v} is not a VXLAN network identifier (0-16777215)"),
    };
    // flannel: 0 means the kernel's default port.
    let port = match raw.port {
        None | Some(0) => VXLAN_PORT_DEFAULT,
        Some(p) => p,
    };
    let mtu = match raw.mtu {
        None | Some(0) => None,
        Some(n) if (576..=65535).contains(&n) => Some(n),
        Some(n) => bail!("Backend.MTU: {n} is not an MTU (576-65535)"),
    };
    Ok(Backend {
        kind,
        vni,
        port,
        direct_routing: raw.directrouting.unwrap_or(false),
        mtu,
        bgp: (kind == BackendType::Bgp).then_some(bgp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        format!("{:#}", FlannelNetConf::parse(text).unwrap_err())
    }

    #[test]
    fn flannel_defaults() {
        let c =
            FlannelNetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#)
                .unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(c.backend.kind, BackendType::Vxlan);
        assert_eq!(c.backend.vni, 1);
        assert_eq!(c.backend.port, 8472);
        assert!(!c.backend.direct_routing);
        assert_eq!(c.subnets().count(), 255);
        // The interface takes the underlay's MTU, the default route the path's.
        assert_eq!(c.pod_mtu(1500), 1500);
        assert_eq!(c.path_mtu(1500), 1450);
    }

    #[test]
    fn every_key_and_go_case_insensitivity() {
        let c = FlannelNetConf::parse(
            r#"{"network": "10.10.0.0/16", "SubnetLen": 26, "SubnetMin": "10.10.4.0",
                "SubnetMax": "10.10.8.0/26", "EnableIPv6": false,
                "Backend": {"Type": "ipip", "VNI": 4096, "Port": 4789, "DirectRouting": true, "MTU": 1400}}"#,
        )
        .unwrap();
        assert_eq!(c.network, "10.10.0.0/16".parse().unwrap());
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.backend.kind, BackendType::Ipip);
        assert_eq!(c.backend.vni, 4096);
        assert_eq!(c.backend.port, 4789);
        assert!(c.backend.direct_routing);
        assert_eq!(c.pod_mtu(9000), 1400);
        let subnets: Vec<_> = c.subnets().collect();
        assert_eq!(subnets.first().unwrap().to_string(), "10.10.4.0/26");
        assert_eq!(subnets.last().unwrap().to_string(), "10.10.8.0/26");
        assert_eq!(subnets.len(), 17);
        assert!(c.is_leasable("10.10.4.64/26".parse().unwrap()));
        assert!(!c.is_leasable("10.10.9.0/26".parse().unwrap()));
        assert!(!c.is_leasable("10.10.4.0/24".parse().unwrap()));
        let hg = FlannelNetConf::parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"host-gw"}}"#)
            .unwrap();
        assert_eq!(hg.backend.kind.route_mode(), RouteMode::Direct);
        assert!(hg.backend.bgp.is_none());
        let bgp = FlannelNetConf::parse(
            r#"{"Network":"10.1.0.0/16","Backend":{"Type":"bgp","Peers":[{"Address":"10.9.0.1"}]}}"#,
        )
        .unwrap();
        assert_eq!(bgp.backend.kind, BackendType::Bgp);
        assert_eq!(bgp.backend.bgp.unwrap().peers.len(), 1);
        let e = format!(
            "{:#}",
            FlannelNetConf::parse(
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"bgp","Peers":[{"Address":"x"}]}}"#
            )
            .unwrap_err()
        );
        assert!(e.contains("Backend.Peers[0].Address"), "{e}");
        // Checked before the switch to bgp too; used only with Type bgp.
        assert!(
            err(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","AS":0}}"#)
                .starts_with("Backend.AS")
        );
        let vx = FlannelNetConf::parse(
            r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","AS":65001}}"#,
        )
        .unwrap();
        assert!(vx.backend.bgp.is_none());
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("{}").contains("Network"));
        assert!(err("[1]").contains("object"));
        assert!(err("not json").contains("JSON"));
        assert!(err(r#"{"Network": "10.0.0.0/33"}"#).contains("Network"));
        assert!(err(r#"{"Network": 5}"#).contains("Network"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "SubnetLen": 16}"#).contains("SubnetLen"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "SubnetLen": "x"}"#).contains("SubnetLen"));
        assert!(
            err(r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"}"#).contains("SubnetMin")
        );
        assert!(
            err(r#"{"Network": "10.0.0.0/16", "SubnetMax": "10.0.3.7"}"#).contains("SubnetMax")
        );
        assert!(
            err(r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.0.9.0", "SubnetMax": "10.0.3.0"}"#)
                .contains("SubnetMin")
        );
        assert!(
            err(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "udp"}}"#)
                .contains("Backend.Type")
        );
        assert!(
            err(r#"{"Network": "10.0.0.0/16", "Backend": {"VNI": -1}}"#).contains("Backend.VNI")
        );
        assert!(
            err(r#"{"Network": "10.0.0.0/16", "Backend": {"Port": 70000}}"#)
                .contains("Backend.Port")
        );
        assert!(
            err(r#"{"Network": "10.0.0.0/16", "Backend": {"DirectRouting": "yes"}}"#)
                .contains("Backend.DirectRouting")
        );
        assert!(
            err(r#"{"Network": "10.0.0.0/16", "Backend": {"MTU": 10}}"#).contains("Backend.MTU")
        );
        assert!(err(r#"{"Network": "10.0.0.0/16", "Backend": 3}"#).contains("Backend"));
    }

    #[test]
    fn mtu_above_the_underlay_minus_the_overhead_is_refused() {
        let conf = |mtu: u32| {
            FlannelNetConf::parse(&format!(
                r#"{{"Network": "10.0.0.0/16", "Backend": {{"Type": "host-gw", "MTU": {mtu}}}}}"#
            ))
            .unwrap()
        };
        let conf_of = |backend: &str, mtu: u32| {
            FlannelNetConf::parse(&format!(
                r#"{{"Network": "10.0.0.0/16", "Backend": {{{backend}, "MTU": {mtu}}}}}"#
            ))
            .unwrap()
        };
        assert!(conf(1450).check_mtu(1500).is_ok());
        assert!(conf(1400).check_mtu(1500).is_ok());
        // host-gw adds nothing: up to the underlay MTU, as flannel's host-gw gives pods.
        assert!(conf(1500).check_mtu(1500).is_ok());
        for (mtu, underlay) in [(1501, 1500), (8950, 1500), (1450, 1400)] {
            let e = format!("{:#}", conf(mtu).check_mtu(underlay).unwrap_err());
            assert!(e.contains("Backend.MTU") && e.contains("at most"), "{e}");
        }
        // Each backend's own overhead bounds it.
        for (backend, max) in [
            (r#""Type": "vxlan""#, 1450),
            (r#""Type": "vxlan", "DirectRouting": true"#, 1450),
            (r#""Type": "ipip""#, 1480),
            (r#""Type": "bgp""#, 1500),
            (r#""Type": "bgp", "Encapsulation": "CrossSubnet""#, 1480),
            (
                r#""Type": "bgp", "Encapsulation": "Always", "Tunnel": "vxlan""#,
                1450,
            ),
        ] {
            assert!(
                conf_of(backend, max).check_mtu(1500).is_ok(),
                "{backend} {max}"
            );
            let e = format!(
                "{:#}",
                conf_of(backend, max + 1).check_mtu(1500).unwrap_err()
            );
            assert!(e.contains(&format!("at most {max}")), "{backend}: {e}");
            // Without Backend.MTU the interface gets the underlay's MTU and the path is the
            // backend's own bound; with it, both are Backend.MTU.
            let derived = FlannelNetConf::parse(&format!(
                r#"{{"Network": "10.0.0.0/16", "Backend": {{{backend}}}}}"#
            ))
            .unwrap();
            assert!(derived.check_mtu(1500).is_ok());
            assert_eq!(
                (derived.pod_mtu(1500), derived.path_mtu(1500)),
                (1500, max),
                "{backend}"
            );
            let fixed = conf_of(backend, max - 10);
            assert_eq!(
                (fixed.pod_mtu(1500), fixed.path_mtu(1500)),
                (max - 10, max - 10)
            );
        }
        assert_eq!(conf(1400).path_mtu(9000), 1400);
        let derived = FlannelNetConf::parse(r#"{"Network": "10.0.0.0/16"}"#).unwrap();
        assert_eq!(
            (derived.pod_mtu(9000), derived.path_mtu(9000)),
            (9000, 8950)
        );
    }
}

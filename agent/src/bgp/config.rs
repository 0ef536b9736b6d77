//! The `bgp` backend's keys in net-conf.json, beside flannel's (`Backend.Type: "bgp"`):
//!
//! ```json
//! "Backend": {
//!   "Type": "bgp",
//!   "AS": 64512,
//!   "Mesh": true,
//!   "Peers": [
//!     {"Address": "192.168.100.1", "AS": 64512, "NodeSubnet": "192.168.100.0/24"},
//!     {"Address": "10.0.0.1", "AS": 65001, "NodeSelector": {"rack": "r1"}, "Port": 179}
//!   ],
//!   "Encapsulation": "None",
//!   "Tunnel": "ipip",
//!   "RouteTable": 2500,
//!   "HoldTime": 90,
//!   "RestartTime": 120
//! }
//! ```
//!
//! As Calico: every node speaks iBGP in one AS (default 64512, Calico's); `Mesh` (default on)
//! peers every node with every other, as Calico's node-to-node mesh; `Peers` are route
//! reflectors or top-of-rack routers, each for every node or only for the nodes whose labels
//! match `NodeSelector` and/or whose underlay address is in `NodeSubnet` (one router per rack).
//! `Encapsulation` is Calico's IPIP/VXLAN mode: `None` routes everything natively, `CrossSubnet`
//! tunnels (with `Tunnel`: ipip or vxlan) to peers outside the node's underlay subnet while BGP
//! still carries every route, `Always` tunnels to every peer. Keys match case-insensitively, as
//! the rest of net-conf.json; bad values are refused with an error naming the key.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Result, anyhow, bail};
use ipnet::Ipv4Net;
use serde::Deserialize;
use weft_common::{BGP_TABLE_DEFAULT, RouteMode};

use crate::config::RawBackend;

/// Calico's default AS number (a private one, RFC 6996).
pub const AS_DEFAULT: u32 = 64512;
pub const BGP_PORT: u16 = 179;
/// Hold time (s): a peer that sent nothing for this long is declared down. Keepalives go every
/// third of it (RFC 4271's suggestion).
pub const HOLD_TIME_DEFAULT: u16 = 90;
/// How long peers keep forwarding along this node's routes while its BGP speaker restarts
/// (graceful restart, RFC 4724): an agent or BIRD restart must complete within it. BIRD's and
/// Calico's value.
pub const RESTART_TIME_DEFAULT: u16 = 120;

/// Which peers are reached through a tunnel (Calico's `ipipMode`/`vxlanMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encapsulation {
    /// Native routing to every peer.
    None,
    /// Native on the node's underlay subnet, tunnelled across subnets.
    CrossSubnet,
    /// Tunnelled to every peer (BGP still distributes the routes).
    Always,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub address: Ipv4Addr,
    pub asn: u32,
    pub port: u16,
    /// Labels this node must carry for the peering to apply (all of them; empty: any node).
    pub node_selector: BTreeMap<String, String>,
    /// The peering applies only to nodes whose underlay address is in this subnet.
    pub node_subnet: Option<Ipv4Net>,
}

impl Peer {
    /// Whether this peering applies to a node with these labels and this underlay address.
    pub fn applies_to(&self, labels: &BTreeMap<String, String>, node_ip: Ipv4Addr) -> bool {
        self.node_selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.node_subnet.is_none_or(|s| s.contains(&node_ip))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpConfig {
    pub asn: u32,
    pub mesh: bool,
    pub peers: Vec<Peer>,
    pub encapsulation: Encapsulation,
    /// The tunnel of `CrossSubnet` and `Always`: `RouteMode::Ipip` or `RouteMode::Vxlan`.
    pub tunnel: RouteMode,
    /// Kernel routing table BIRD writes learned routes to (weft's own).
    pub table: u32,
    pub hold_time: u16,
    pub restart_time: u16,
}

impl Default for BgpConfig {
    fn default() -> Self {
        Self {
            asn: AS_DEFAULT,
            mesh: true,
            peers: Vec::new(),
            encapsulation: Encapsulation::None,
            tunnel: RouteMode::Ipip,
            table: BGP_TABLE_DEFAULT,
            hold_time: HOLD_TIME_DEFAULT,
            restart_time: RESTART_TIME_DEFAULT,
        }
    }
}

impl BgpConfig {
    /// How this node reaches a peer at `peer` given its own underlay subnet: natively along
    /// BGP's routes, or through the tunnel.
    pub fn mode_for(&self, peer: Ipv4Addr, underlay_subnet: Ipv4Net) -> RouteMode {
        match self.encapsulation {
            Encapsulation::None => RouteMode::Bgp,
            Encapsulation::CrossSubnet if underlay_subnet.contains(&peer) => RouteMode::Bgp,
            Encapsulation::CrossSubnet | Encapsulation::Always => self.tunnel,
        }
    }

    /// The bgp keys of `Backend` as read (keys lowercased, types checked by serde): values
    /// checked, defaults filled in.
    pub(crate) fn from_raw(raw: &RawBackend) -> Result<Self> {
        let mut c = Self::default();
        if let Some(n) = raw.asn {
            c.asn = asn(n, "Backend.AS")?;
        }
        if let Some(mesh) = raw.mesh {
            c.mesh = mesh;
        }
        for (i, p) in raw.peers.iter().flatten().enumerate() {
            c.peers
                .push(peer(p, &format!("Backend.Peers[{i}]"), c.asn)?);
        }
        if let Some(v) = &raw.encapsulation {
            c.encapsulation = match v.as_str() {
                s if s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("never") => {
                    Encapsulation::None
                }
                s if s.eq_ignore_ascii_case("crosssubnet") => Encapsulation::CrossSubnet,
                s if s.eq_ignore_ascii_case("always") => Encapsulation::Always,
                _ => bail!(
                    "Backend.Encapsulation: {v:?} is not \"None\", \"CrossSubnet\" or \"Always\""
                ),
            };
        }
        if let Some(v) = &raw.tunnel {
            c.tunnel = match v.as_str() {
                s if s.eq_ignore_ascii_case("ipip") => RouteMode::Ipip,
                s if s.eq_ignore_ascii_case("vxlan") => RouteMode::Vxlan,
                _ => bail!("Backend.Tunnel: {v:?} is not \"ipip\" or \"vxlan\""),
            };
        }
        if let Some(n) = raw.routetable {
            // 0 is unspecified, 253-255 are the kernel's default, main and local tables.
            if n == 0 || (253..=255).contains(&n) {
                bail!(
                    "Backend.RouteTable: {n} is not a routing table of weft's own (1-4294967295, not 253-255)"
                );
            }
            c.table = n;
        }
        if let Some(n) = raw.holdtime {
            // RFC 4271: zero (no keepalives) or at least three seconds.
            if n < 3 {
                bail!("Backend.HoldTime: {n} is not a hold time in seconds (3-65535)");
            }
            c.hold_time = n;
        }
        if let Some(n) = raw.restarttime {
            // The graceful restart capability carries it in 12 bits.
            if !(1..=4095).contains(&n) {
                bail!("Backend.RestartTime: {n} is not a restart time in seconds (1-4095)");
            }
            c.restart_time = n;
        }
        Ok(c)
    }
}

/// One `Backend.Peers` entry as written (keys lowercased; `NodeSelector`'s label names keep
/// their case). Public only so the configuration reference test can list the keys.
#[doc(hidden)]
#[derive(Debug, Default, Deserialize)]
pub struct RawPeer {
    address: Option<Ipv4Addr>,
    #[serde(rename = "as")]
    asn: Option<u32>,
    port: Option<u16>,
    nodeselector: Option<BTreeMap<String, String>>,
    nodesubnet: Option<String>,
}

fn asn(n: u32, key: &str) -> Result<u32> {
    // 0 is reserved (RFC 7607); serde refuses anything beyond 4-octet AS numbers (2^32 - 1).
    if n == 0 {
        bail!("{key}: 0 is not an AS number (1-4294967295)");
    }
    Ok(n)
}

fn peer(raw: &RawPeer, key: &str, default_asn: u32) -> Result<Peer> {
    let address = match raw.address {
        None => bail!("{key}.Address: missing (the peer's IPv4 address)"),
        Some(a) if a.is_unspecified() || a.is_broadcast() || a.is_multicast() => {
            bail!("{key}.Address: {a} is not a unicast IPv4 address")
        }
        Some(a) => a,
    };
    let asn = match raw.asn {
        None => default_asn,
        Some(n) => asn(n, &format!("{key}.AS"))?,
    };
    let port = match raw.port {
        None => BGP_PORT,
        Some(0) => bail!("{key}.Port: 0 is not a TCP port"),
        Some(p) => p,
    };
    let node_selector = raw.nodeselector.clone().unwrap_or_default();
    if node_selector.keys().any(String::is_empty) {
        bail!("{key}.NodeSelector: an empty label name");
    }
    let node_subnet = match &raw.nodesubnet {
        None => None,
        Some(v) => Some(
            v.parse::<Ipv4Net>()
                .map(|n| n.trunc())
                .map_err(|_| anyhow!("{key}.NodeSubnet: {v:?} is not an IPv4 CIDR"))?,
        ),
    };
    Ok(Peer {
        address,
        asn,
        port,
        node_selector,
        node_subnet,
    })
}

/// Parses `--node-labels` (`key=value,key=value`): this node's labels, matched by `NodeSelector`.
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| anyhow!("--node-labels: {item:?} is not key=value"))?;
        if k.trim().is_empty() {
            bail!("--node-labels: {item:?} has an empty label name");
        }
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bgp config of a `Backend` object (its `Type` set to bgp).
    fn parse(backend: &str) -> Result<BgpConfig> {
        let mut backend: serde_json::Value = serde_json::from_str(backend).unwrap();
        backend["Type"] = "bgp".into();
        let conf = serde_json::json!({"Network": "10.244.0.0/16", "Backend": backend});
        Ok(crate::config::FlannelNetConf::parse(&conf.to_string())?
            .backend
            .bgp
            .expect("Type bgp"))
    }

    fn err(backend: &str) -> String {
        format!("{:#}", parse(backend).unwrap_err())
    }

    #[test]
    fn calico_defaults() {
        let c = parse(r#"{"Type": "bgp"}"#).unwrap();
        assert_eq!(c, BgpConfig::default());
        assert_eq!(c.asn, 64512);
        assert!(c.mesh);
        assert!(c.peers.is_empty());
        assert_eq!(c.encapsulation, Encapsulation::None);
        assert_eq!(c.table, BGP_TABLE_DEFAULT);
    }

    #[test]
    fn every_key_case_insensitively() {
        let c = parse(
            r#"{"as": 65010, "mesh": false, "encapsulation": "crossSubnet", "tunnel": "VXLAN",
                "routeTable": 100, "holdTime": 9, "restartTime": 30,
                "peers": [
                  {"address": "192.168.100.1", "nodeSubnet": "192.168.100.7/24"},
                  {"Address": "10.0.0.1", "AS": 4200000000, "Port": 1179,
                   "NodeSelector": {"rack": "r1", "zone": "a"}}
                ]}"#,
        )
        .unwrap();
        assert_eq!(c.asn, 65010);
        assert!(!c.mesh);
        assert_eq!(c.encapsulation, Encapsulation::CrossSubnet);
        assert_eq!(c.tunnel, RouteMode::Vxlan);
        assert_eq!((c.table, c.hold_time, c.restart_time), (100, 9, 30));
        assert_eq!(
            c.peers[0].asn, 65010,
            "a peer's AS defaults to the node's: iBGP"
        );
        assert_eq!(c.peers[0].port, 179);
        assert_eq!(
            c.peers[0].node_subnet,
            Some("192.168.100.0/24".parse().unwrap())
        );
        assert_eq!(c.peers[1].asn, 4_200_000_000);
        assert_eq!(c.peers[1].port, 1179);
        assert_eq!(c.peers[1].node_selector.len(), 2);
    }

    #[test]
    fn peers_apply_by_label_and_subnet() {
        let c = parse(
            r#"{"Peers": [
                {"Address": "192.168.100.1", "NodeSubnet": "192.168.100.0/24"},
                {"Address": "192.168.101.1", "NodeSubnet": "192.168.101.0/24",
                 "NodeSelector": {"rack": "r2"}},
                {"Address": "192.168.102.1"}]}"#,
        )
        .unwrap();
        let labels = parse_labels("rack=r2, zone=a").unwrap();
        let none = BTreeMap::new();
        let a: Ipv4Addr = "192.168.100.5".parse().unwrap();
        let b: Ipv4Addr = "192.168.101.5".parse().unwrap();
        assert!(c.peers[0].applies_to(&none, a));
        assert!(!c.peers[0].applies_to(&labels, b));
        assert!(c.peers[1].applies_to(&labels, b));
        assert!(!c.peers[1].applies_to(&none, b), "label missing");
        assert!(!c.peers[1].applies_to(&labels, a), "subnet mismatch");
        assert!(c.peers[2].applies_to(&none, a) && c.peers[2].applies_to(&labels, b));
    }

    #[test]
    fn route_modes_per_encapsulation() {
        let own: Ipv4Net = "192.168.100.0/24".parse().unwrap();
        let near: Ipv4Addr = "192.168.100.9".parse().unwrap();
        let far: Ipv4Addr = "192.168.101.9".parse().unwrap();
        let mut c = BgpConfig::default();
        assert_eq!(c.mode_for(far, own), RouteMode::Bgp);
        c.encapsulation = Encapsulation::CrossSubnet;
        assert_eq!(c.mode_for(near, own), RouteMode::Bgp);
        assert_eq!(c.mode_for(far, own), RouteMode::Ipip);
        c.tunnel = RouteMode::Vxlan;
        c.encapsulation = Encapsulation::Always;
        assert_eq!(c.mode_for(near, own), RouteMode::Vxlan);
    }

    #[test]
    fn bad_peers_are_refused_naming_the_key() {
        for (backend, key) in [
            (
                r#"{"Peers": [{"Address": "not-an-ip"}]}"#,
                "Backend.Peers[0].Address",
            ),
            (
                r#"{"Peers": [{"Address": "10.0.0.1"}, {"Address": "10.0.0.256"}]}"#,
                "Backend.Peers[1].Address",
            ),
            (
                r#"{"Peers": [{"Address": "224.0.0.5"}]}"#,
                "Backend.Peers[0].Address",
            ),
            (r#"{"Peers": [{"Address": 5}]}"#, "Backend.Peers[0].Address"),
            (r#"{"Peers": [{"AS": 64512}]}"#, "Backend.Peers[0].Address"),
            (
                r#"{"Peers": [{"Address": "10.0.0.1", "AS": 4294967296}]}"#,
                "Backend.Peers[0].AS",
            ),
            (
                r#"{"Peers": [{"Address": "10.0.0.1", "AS": 0}]}"#,
                "Backend.Peers[0].AS",
            ),
            (
                r#"{"Peers": [{"Address": "10.0.0.1", "AS": -1}]}"#,
                "Backend.Peers[0].AS",
            ),
            (
                r#"{"Peers": [{"Address": "10.0.0.1", "AS": "64512"}]}"#,
                "Backend.Peers[0].AS",
            ),
            (
                r#"{"Peers": [{"Address": "10.0.0.1", "Port": 0}]}"#,
                "Backend.Peers[0].Port",
            ),
            (
                r#"{"Peers": [{"Address": "10.0.0.1", "NodeSubnet": "x"}]}"#,
                "Backend.Peers[0].NodeSubnet",
            ),
            (
                r#"{"Peers": [{"Address": "10.0.0.1", "NodeSelector": "rack=1"}]}"#,
                "Backend.Peers[0].NodeSelector",
            ),
            (
                r#"{"Peers": [{"Address": "10.0.0.1", "NodeSelector": {"rack": 1}}]}"#,
                "Backend.Peers[0].NodeSelector.rack",
            ),
            (r#"{"Peers": ["10.0.0.1"]}"#, "Backend.Peers[0]"),
            (r#"{"Peers": {"Address": "10.0.0.1"}}"#, "Backend.Peers"),
            (r#"{"AS": 4294967296}"#, "Backend.AS"),
            (r#"{"AS": 0}"#, "Backend.AS"),
            (r#"{"Mesh": "yes"}"#, "Backend.Mesh"),
            (r#"{"Encapsulation": "IPIP"}"#, "Backend.Encapsulation"),
            (r#"{"Tunnel": "gre"}"#, "Backend.Tunnel"),
            (r#"{"RouteTable": 254}"#, "Backend.RouteTable"),
            (r#"{"RouteTable": 0}"#, "Backend.RouteTable"),
            (r#"{"HoldTime": 2}"#, "Backend.HoldTime"),
            (r#"{"RestartTime": 5000}"#, "Backend.RestartTime"),
        ] {
            let e = err(backend);
            assert!(
                e.starts_with(key),
                "{backend}: {e:?} does not start with {key}"
            );
        }
        assert!(parse_labels("rack").is_err());
        assert!(parse_labels("=x").is_err());
        assert!(parse_labels("").unwrap().is_empty());
    }
}

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
use serde_json::{Map, Value};
use weft_common::{BGP_TABLE_DEFAULT, RouteMode};

use crate::config::get;

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

    /// Reads the bgp keys of a `Backend` object.
    pub fn parse(backend: &Map<String, Value>) -> Result<Self> {
        let mut c = Self::default();
        if let Some(v) = get(backend, "AS") {
            c.asn = asn(v, "Backend.AS")?;
        }
        if let Some(v) = get(backend, "Mesh") {
            c.mesh = v
                .as_bool()
                .ok_or_else(|| anyhow!("Backend.Mesh: {v} is not true or false"))?;
        }
        if let Some(v) = get(backend, "Peers") {
            let list = v
                .as_array()
                .ok_or_else(|| anyhow!("Backend.Peers: {v} is not a list of peers"))?;
            for (i, p) in list.iter().enumerate() {
                c.peers
                    .push(peer(p, &format!("Backend.Peers[{i}]"), c.asn)?);
            }
        }
        if let Some(v) = get(backend, "Encapsulation") {
            c.encapsulation = match v.as_str() {
                Some(s) if s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("never") => {
                    Encapsulation::None
                }
                Some(s) if s.eq_ignore_ascii_case("crosssubnet") => Encapsulation::CrossSubnet,
                Some(s) if s.eq_ignore_ascii_case("always") => Encapsulation::Always,
                _ => bail!(
                    "Backend.Encapsulation: {v} is not \"None\", \"CrossSubnet\" or \"Always\""
                ),
            };
        }
        if let Some(v) = get(backend, "Tunnel") {
            c.tunnel = match v.as_str() {
                Some(s) if s.eq_ignore_ascii_case("ipip") => RouteMode::Ipip,
                Some(s) if s.eq_ignore_ascii_case("vxlan") => RouteMode::Vxlan,
                _ => bail!("Backend.Tunnel: {v} is not \"ipip\" or \"vxlan\""),
            };
        }
        if let Some(v) = get(backend, "RouteTable") {
            // 0 is unspecified, 253-255 are the kernel's default, main and local tables.
            c.table = v
                .as_u64()
                .filter(|n| (1..=u32::MAX as u64).contains(n) && !(253..=255).contains(n))
                .ok_or_else(|| {
                    anyhow!(
                        "Backend.RouteTable: {v} is not a routing table of weft's own (1-4294967295, not 253-255)"
                    )
                })? as u32;
        }
        if let Some(v) = get(backend, "HoldTime") {
            // RFC 4271: zero (no keepalives) or at least three seconds.
            c.hold_time = v
                .as_u64()
                .filter(|n| (3..=u16::MAX as u64).contains(n))
                .ok_or_else(|| {
                    anyhow!("Backend.HoldTime: {v} is not a hold time in seconds (3-65535)")
                })? as u16;
        }
        if let Some(v) = get(backend, "RestartTime") {
            // The graceful restart capability carries it in 12 bits.
            c.restart_time = v
                .as_u64()
                .filter(|n| (1..=4095).contains(n))
                .ok_or_else(|| {
                    anyhow!("Backend.RestartTime: {v} is not a restart time in seconds (1-4095)")
                })? as u16;
        }
        Ok(c)
    }
}

fn asn(v: &Value, key: &str) -> Result<u32> {
    // 0 is reserved (RFC 7607), and 4-octet AS numbers end at 2^32 - 1.
    v.as_u64()
        .filter(|n| (1..=u32::MAX as u64).contains(n))
        .map(|n| n as u32)
        .ok_or_else(|| anyhow!("{key}: {v} is not an AS number (1-4294967295)"))
}

fn peer(v: &Value, key: &str, default_asn: u32) -> Result<Peer> {
    let obj = v
        .as_object()
        .ok_or_else(|| anyhow!("{key}: {v} is not a JSON object"))?;
    let address = match get(obj, "Address") {
        None => bail!("{key}.Address: missing (the peer's IPv4 address)"),
        Some(a) => a
            .as_str()
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
            .filter(|a| !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast())
            .ok_or_else(|| anyhow!("{key}.Address: {a} is not a unicast IPv4 address"))?,
    };
    let asn = match get(obj, "AS") {
        None => default_asn,
        Some(v) => asn(v, &format!("{key}.AS"))?,
    };
    let port = match get(obj, "Port") {
        None => BGP_PORT,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=u16::MAX as u64).contains(n))
            .ok_or_else(|| anyhow!("{key}.Port: {v} is not a TCP port"))? as u16,
    };
    let mut node_selector = BTreeMap::new();
    if let Some(v) = get(obj, "NodeSelector") {
        let labels = v.as_object().ok_or_else(|| {
            anyhow!(
                "{key}.NodeSelector: {v} is not an object of labels (e.g. {{\"rack\": \"r1\"}})"
            )
        })?;
        for (k, val) in labels {
            let val = val.as_str().ok_or_else(|| {
                anyhow!("{key}.NodeSelector.{k}: {val} is not a string label value")
            })?;
            if k.is_empty() {
                bail!("{key}.NodeSelector: an empty label name");
            }
            node_selector.insert(k.clone(), val.to_string());
        }
    }
    let node_subnet = match get(obj, "NodeSubnet") {
        None => None,
        Some(v) => Some(
            v.as_str()
                .and_then(|s| s.parse::<Ipv4Net>().ok())
                .map(|n| n.trunc())
                .ok_or_else(|| anyhow!("{key}.NodeSubnet: {v} is not an IPv4 CIDR"))?,
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

    fn parse(backend: &str) -> Result<BgpConfig> {
        let v: Value = serde_json::from_str(backend).unwrap();
        BgpConfig::parse(v.as_object().unwrap())
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

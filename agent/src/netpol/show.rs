//! `weft policy`: what the datapath enforces for an endpoint, read back from the pinned maps
//! (not from the datastore): isolation per direction and, per rule entry of its rule sets, the
//! peers (the addresses and ipBlock regions of the entry's class) and the protocol and ports.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Result, bail};
use serde::Serialize;
use weft_common::policy::{
    POLICY_CFG_F_READY, POLICY_CLASS_ANY, POLICY_DIR_EGRESS, POLICY_DIR_INGRESS,
    POLICY_F_EGRESS_FAILED, POLICY_F_EGRESS_ISOLATED, POLICY_F_INGRESS_FAILED,
    POLICY_F_INGRESS_ISOLATED, POLICY_F_PENDING, POLICY_NS_F_SYNCED, POLICY_PROTO_ANY,
    PolicyPortBlockKey, PolicyPorts,
};

use crate::datapath::{Maps, PolicySnapshot};

#[derive(Debug, Serialize)]
pub struct Effective {
    /// The maps' revision and the datastore revision they hold.
    pub revision: u32,
    pub datastore_revision: u64,
    /// The agent has written the maps at least once (else new pods are isolated both ways).
    pub synced: bool,
    pub endpoints: Vec<EndpointRules>,
}

#[derive(Debug, Serialize)]
pub struct EndpointRules {
    pub address: Ipv4Addr,
    /// `namespace/name`, as the CNI plugin recorded it.
    pub pod: String,
    /// Written by the CNI plugin, not compiled by the agent yet.
    pub pending: bool,
    pub ingress: DirectionRules,
    pub egress: DirectionRules,
    /// Packets denied so far.
    pub denied_ingress: u64,
    pub denied_egress: u64,
}

#[derive(Debug, Serialize)]
pub struct DirectionRules {
    pub isolated: bool,
    /// The rules did not fit a full map: everything is denied.
    pub failed: bool,
    pub ruleset: u32,
    /// Empty for an isolated direction: nothing is allowed (but replies and the node).
    pub allow: Vec<Allow>,
}

#[derive(Debug, Serialize)]
pub struct Allow {
    /// `any` (every address, outside the cluster too), pod addresses, ipBlock regions.
    pub peers: Vec<String>,
    /// `TCP`, `UDP`, `SCTP` or `any` (every protocol, ICMP too).
    pub protocol: String,
    pub ports: Vec<String>,
}

fn protocol(p: u8) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        POLICY_PROTO_ANY => "any".into(),
        p => p.to_string(),
    }
}

fn ports(snap: &PolicySnapshot, v: &PolicyPorts) -> Vec<String> {
    let mut ranges: Vec<(u16, u16)> = v.ranges[..v.count as usize]
        .iter()
        .map(|r| (r.first, r.last))
        .collect();
    if v.overflow != 0 {
        let mut blocks: Vec<(&PolicyPortBlockKey, _)> = snap
            .blocks
            .iter()
            .filter(|(k, _)| k.set == v.overflow)
            .collect();
        blocks.sort_by_key(|(k, _)| k.block);
        for (k, b) in blocks {
            for i in 0..256u32 {
                let port = (u32::from(k.block) << 8 | i) as u16;
                if b.contains(port) {
                    match ranges.last_mut() {
                        Some(r) if u32::from(r.1) + 1 == u32::from(port) && r.1 >= r.0 => {
                            r.1 = port
                        }
                        _ => ranges.push((port, port)),
                    }
                }
            }
        }
    }
    ranges.sort();
    ranges
        .into_iter()
        .map(|(a, b)| match (a, b) {
            (0, 65535) => "all".to_string(),
            (a, b) if a == b => a.to_string(),
            (a, b) => format!("{a}-{b}"),
        })
        .collect()
}

fn direction(
    snap: &PolicySnapshot,
    dir: u8,
    ruleset: u32,
    isolated: bool,
    failed: bool,
) -> DirectionRules {
    let mut allow = Vec::new();
    if isolated {
        let mut by_class: BTreeMap<(u32, u8), PolicyPorts> = BTreeMap::new();
        for (k, v) in &snap.rules {
            if k.ruleset == ruleset && k.direction == dir {
                by_class.insert((k.class, k.protocol), *v);
            }
        }
        for ((class, proto), v) in by_class {
            let peers = if class == POLICY_CLASS_ANY {
                vec!["any".to_string()]
            } else {
                let mut p: Vec<String> = snap
                    .addrs
                    .iter()
                    .filter(|(_, c)| **c == class)
                    .map(|(ip, _)| ip.to_string())
                    .collect();
                p.sort();
                p.extend(
                    snap.cidrs
                        .iter()
                        .filter(|(_, c)| **c == class)
                        .map(|(n, _)| format!("{n} (ipBlock region)")),
                );
                p
            };
            if peers.is_empty() {
                continue;
            }
            allow.push(Allow {
                peers,
                protocol: protocol(proto),
                ports: ports(snap, &v),
            });
        }
    }
    DirectionRules {
        isolated,
        failed,
        ruleset,
        allow,
    }
}

/// The effective rules of `endpoint` (an address or `namespace/name`), or of every local
/// endpoint.
pub fn effective(maps: &Maps, endpoint: Option<&str>) -> Result<Effective> {
    let snap = maps.policy_snapshot()?;
    let names: BTreeMap<Ipv4Addr, String> = maps
        .policy_pod_names()?
        .into_iter()
        .map(|(ip, n)| (ip, format!("{}/{}", n.namespace(), n.name())))
        .collect();
    let drops: BTreeMap<Ipv4Addr, (u64, u64)> = maps
        .policy_drops()?
        .into_iter()
        .map(|(ip, d)| (ip, (d.ingress, d.egress)))
        .collect();
    let mut ips: Vec<Ipv4Addr> = snap.endpoints.keys().copied().collect();
    ips.sort();
    if let Some(want) = endpoint {
        let ip = match want.parse::<Ipv4Addr>() {
            Ok(ip) => ip,
            Err(_) => match names.iter().find(|(_, n)| n.as_str() == want) {
                Some((ip, _)) => *ip,
                None => bail!("no local endpoint named {want:?} (namespace/name or an address)"),
            },
        };
        if !snap.endpoints.contains_key(&ip) {
            bail!("{ip} has no policy state on this node (not a local pod?)");
        }
        ips = vec![ip];
    }
    let cfg = maps.policy_config().ok();
    let mut out = Effective {
        revision: cfg.map_or(0, |c| c.revision),
        datastore_revision: cfg.map_or(0, |c| c.datastore_revision),
        synced: snap
            .ns_defaults
            .get("")
            .is_some_and(|f| f & POLICY_NS_F_SYNCED != 0)
            && cfg.is_some_and(|c| c.flags & POLICY_CFG_F_READY != 0),
        endpoints: Vec::new(),
    };
    for ip in ips {
        let st = snap.endpoints[&ip];
        let (di, de) = drops.get(&ip).copied().unwrap_or_default();
        out.endpoints.push(EndpointRules {
            address: ip,
            pod: names.get(&ip).cloned().unwrap_or_default(),
            pending: st.flags & POLICY_F_PENDING != 0,
            ingress: direction(
                &snap,
                POLICY_DIR_INGRESS,
                st.ingress_ruleset,
                st.flags & POLICY_F_INGRESS_ISOLATED != 0,
                st.flags & POLICY_F_INGRESS_FAILED != 0,
            ),
            egress: direction(
                &snap,
                POLICY_DIR_EGRESS,
                st.egress_ruleset,
                st.flags & POLICY_F_EGRESS_ISOLATED != 0,
                st.flags & POLICY_F_EGRESS_FAILED != 0,
            ),
            denied_ingress: di,
            denied_egress: de,
        });
    }
    Ok(out)
}

/// The table `weft policy` prints.
pub fn render(e: &Effective) -> String {
    let mut s = format!(
        "policy maps: revision {}, etcd revision {}, {}\n",
        e.revision,
        e.datastore_revision,
        if e.synced {
            "synced"
        } else {
            "NOT SYNCED (new pods are isolated both ways)"
        }
    );
    for ep in &e.endpoints {
        s += &format!(
            "\n{} {}{}  (denied: {} in, {} out)\n",
            ep.address,
            ep.pod,
            if ep.pending {
                "  PENDING (isolated until the agent compiles it)"
            } else {
                ""
            },
            ep.denied_ingress,
            ep.denied_egress
        );
        for (name, d, word) in [
            ("ingress", &ep.ingress, "from"),
            ("egress", &ep.egress, "to"),
        ] {
            if !d.isolated {
                s += &format!("  {name}: not isolated (everything allowed)\n");
                continue;
            }
            s += &format!(
                "  {name}: isolated (rule set {}){}\n",
                d.ruleset,
                if d.failed {
                    ": RULES DID NOT FIT, everything denied"
                } else {
                    ""
                }
            );
            if d.allow.is_empty() {
                s += "    nothing allowed (replies of allowed flows and this node still pass)\n";
            }
            for a in &d.allow {
                s += &format!(
                    "    allow {word} {}  {} {}\n",
                    a.peers.join(", "),
                    a.protocol,
                    a.ports.join(",")
                );
            }
        }
    }
    s
}

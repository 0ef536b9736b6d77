//! A fixed topology from a JSON file, for a single node or a cluster without a datastore:
//!
//! ```json
//! {"nodes": [
//!   {"name": "node-a", "publicIP": "192.168.1.10", "subnet": "10.244.1.0/24"},
//!   {"name": "node-b", "publicIP": "192.168.1.11", "subnet": "10.244.2.0/24",
//!    "vtepMAC": "02:57:c0:a8:01:0b", "backendType": "vxlan"}
//! ]}
//! ```
//! This node is the entry whose `name` is `--node-name` (or whose `publicIP` is the node's
//! address). A missing `vtepMAC` is derived from `publicIP` as every weft node derives its own.
//! The file is re-read when it changes.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::mpsc::Sender,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnet::Ipv4Net;
use serde::Deserialize;

use super::{Datastore, Event, LocalNode, NodeLease, parse_backend, parse_mac};
use crate::{config::FlannelNetConf, node_net::vtep_mac_for};

pub struct StaticFile {
    path: PathBuf,
}

#[derive(Debug)]
struct Entry {
    name: String,
    lease: NodeLease,
}

/// The file as written.
#[derive(Debug, Deserialize)]
struct Topology {
    nodes: Vec<StaticNode>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StaticNode {
    name: String,
    #[serde(rename = "publicIP")]
    public_ip: Ipv4Addr,
    subnet: Ipv4Net,
    #[serde(rename = "vtepMAC", default)]
    vtep_mac: Option<String>,
    #[serde(default)]
    backend_type: Option<String>,
}

fn parse(text: &str) -> Result<Vec<Entry>> {
    let topology: Topology = crate::json::from_str(text)?;
    let mut out = Vec::new();
    for (i, n) in topology.nodes.into_iter().enumerate() {
        let vtep_mac = match &n.vtep_mac {
            None => vtep_mac_for(n.public_ip),
            Some(m) => parse_mac(m)
                .ok_or_else(|| anyhow!("nodes[{i}].vtepMAC: {m:?} is not a MAC address"))?,
        };
        // An unknown backend refuses the entry, not the file (one bad record never stops the
        // others): see `crate::admission`.
        let (backend, unknown_backend) = parse_backend(n.backend_type.as_deref());
        out.push(Entry {
            name: n.name.clone(),
            lease: NodeLease {
                subnet: n.subnet.trunc(),
                public_ip: n.public_ip,
                backend,
                vtep_mac: Some(vtep_mac),
                node_name: Some(n.name.clone()),
                name: n.name,
                // The earlier entry is the older record.
                seniority: i as i64,
                unknown_backend,
            },
        });
    }
    Ok(out)
}

fn read(path: &Path) -> Result<Vec<Entry>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("parsing {}", path.display()))
}

impl StaticFile {
    pub fn new(path: &Path) -> Result<Self> {
        read(path)?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

impl Datastore for StaticFile {
    fn net_conf(&mut self) -> Result<Option<String>> {
        Ok(None)
    }

    fn acquire(&mut self, local: &LocalNode, conf: &FlannelNetConf) -> Result<Ipv4Net> {
        let entries = read(&self.path)?;
        let me = entries
            .iter()
            .find(|e| e.name == local.name)
            .or_else(|| {
                entries
                    .iter()
                    .find(|e| e.lease.public_ip == local.public_ip)
            })
            .ok_or_else(|| {
                anyhow!(
                    "{}: no entry for node {:?} ({})",
                    self.path.display(),
                    local.name,
                    local.public_ip
                )
            })?;
        if !conf.network.contains(&me.lease.subnet) {
            bail!(
                "{}: subnet {} of {} is outside Network {}",
                self.path.display(),
                me.lease.subnet,
                me.name,
                conf.network
            );
        }
        if me.lease.subnet.prefix_len() != conf.subnet_len {
            bail!(
                "{}: subnet {} of {} is not a /{} (SubnetLen)",
                self.path.display(),
                me.lease.subnet,
                me.name,
                conf.subnet_len
            );
        }
        Ok(me.lease.subnet)
    }

    fn run(self: Box<Self>, events: Sender<Event>) -> Result<()> {
        std::thread::Builder::new()
            .name("static-file".into())
            .spawn(move || {
                let mut seen: Option<SystemTime> = None;
                loop {
                    let mtime = std::fs::metadata(&self.path)
                        .and_then(|m| m.modified())
                        .ok();
                    if mtime != seen {
                        match read(&self.path) {
                            Ok(entries) => {
                                seen = mtime;
                                let leases = entries.into_iter().map(|e| e.lease).collect();
                                if events.send(Event::Snapshot(leases)).is_err() {
                                    return;
                                }
                            }
                            Err(err) => tracing::warn!("{err:#}"),
                        }
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_bad_fields() {
        let e =
            parse(r#"{"nodes":[{"name":"a","publicIP":"192.168.1.10","subnet":"10.244.1.0/24"}]}"#)
                .unwrap();
        assert_eq!(e[0].lease.vtep_mac, Some([0x02, 0x57, 192, 168, 1, 10]));
        assert_eq!(e[0].lease.subnet, "10.244.1.0/24".parse().unwrap());
        assert_eq!(
            e[0].lease.node_name.as_deref(),
            Some("a"),
            "the entry names its node"
        );
        let err = |t: &str| format!("{:#}", parse(t).unwrap_err());
        assert!(
            err(r#"{"nodes":[{"name":"a","publicIP":"x","subnet":"10.244.1.0/24"}]}"#)
                .contains("nodes[0].publicIP")
        );
        assert!(
            err(r#"{"nodes":[{"name":"a","publicIP":"1.2.3.4"}]}"#).contains("nodes[0].subnet")
        );
        assert!(err(r#"{"nodes":[{"name":"a","publicIP":"1.2.3.4","subnet":"10.0.0.0/24","vtepMAC":"zz"}]}"#).contains("vtepMAC"));
        assert!(err(r#"{}"#).contains("nodes"));
    }
}

//! The node's subnet file: the agent writes it, the CNI plugin reads it (flannel's
//! `subnet.env` contract). Keys are `WEFT_*`; a flannel `subnet.env` (`FLANNEL_*`) is read too,
//! so a node migrating from flannel works before the agent first writes the file.
use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnet::Ipv4Net;

/// Default location (flannel keeps `/run/flannel/subnet.env`).
pub const DEFAULT_PATH: &str = "/run/weft/subnet.env";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The cluster's pod network.
    pub network: Ipv4Net,
    /// This node's pod subnet.
    pub subnet: Ipv4Net,
    /// MTU for pod interfaces: the underlay's by default, `Backend.MTU` when the operator set
    /// one (flannel's `FLANNEL_MTU`).
    pub mtu: u32,
    /// MTU of each pod's default route (`WEFT_ROUTE_MTU`), when below `mtu`: what a pod's
    /// packets may be long to cross the cluster with the current backend (the underlay MTU
    /// minus its encapsulation overhead). The agent rewrites it, and the routes of running
    /// pods, when a live backend switch changes it. None: no route MTU, pods send up to `mtu`.
    pub route_mtu: Option<u32>,
    /// The underlay's MTU (`WEFT_UNDERLAY_MTU`): the CNI plugin refuses an `mtu` above it minus
    /// the largest encapsulation overhead. None in files that do not say (flannel's).
    pub underlay_mtu: Option<u32>,
    /// Whether traffic leaving the cluster network is masqueraded.
    pub ipmasq: bool,
    /// Root of the node's BPF pins (the schema directory lives below it).
    pub pin_root: PathBuf,
}

impl SubnetEnv {
    pub fn to_env_string(&self) -> String {
        let mut text = format!(
            "WEFT_NETWORK={}\nWEFT_SUBNET={}\nWEFT_MTU={}\nWEFT_IPMASQ={}\nWEFT_PIN_ROOT={}\n",
            self.network,
            self.subnet,
            self.mtu,
            self.ipmasq,
            self.pin_root.display()
        );
        if let Some(m) = self.underlay_mtu {
            text += &format!("WEFT_UNDERLAY_MTU={m}\n");
        }
        if let Some(m) = self.route_mtu {
            text += &format!("WEFT_ROUTE_MTU={m}\n");
        }
        text
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut network = None;
        let mut subnet = None;
        let mut mtu = None;
        let mut underlay_mtu = None;
        let mut route_mtu = None;
        let mut ipmasq = false;
        let mut pin_root = PathBuf::from(weft_common::DEFAULT_PIN_ROOT);
        for (lineno, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| anyhow!("line {}: expected KEY=VALUE, got {line:?}", lineno + 1))?;
            let key = key
                .strip_prefix("WEFT_")
                .or_else(|| key.strip_prefix("FLANNEL_"))
                .unwrap_or(key);
            match key {
                "NETWORK" => network = Some(parse_net(key, value)?),
                // flannel writes the gateway address with the prefix (10.244.1.1/24).
                "SUBNET" => subnet = Some(parse_net(key, value)?.trunc()),
                "MTU" => {
                    mtu = Some(
                        value
                            .parse()
                            .with_context(|| format!("MTU: {value:?} is not a number"))?,
                    )
                }
                "UNDERLAY_MTU" => {
                    underlay_mtu = Some(
                        value
                            .parse()
                            .with_context(|| format!("UNDERLAY_MTU: {value:?} is not a number"))?,
                    )
                }
                "ROUTE_MTU" => {
                    route_mtu = Some(
                        value
                            .parse()
                            .with_context(|| format!("ROUTE_MTU: {value:?} is not a number"))?,
                    )
                }
                "IPMASQ" => ipmasq = value == "true",
                "PIN_ROOT" => pin_root = PathBuf::from(value),
                _ => {}
            }
        }
        let network = network.ok_or_else(|| anyhow!("NETWORK missing"))?;
        let subnet = subnet.ok_or_else(|| anyhow!("SUBNET missing"))?;
        let mtu = mtu.ok_or_else(|| anyhow!("MTU missing"))?;
        if !network.contains(&subnet) {
            bail!("SUBNET {subnet} is not inside NETWORK {network}");
        }
        Ok(Self {
            network,
            subnet,
            mtu,
            underlay_mtu,
            route_mtu,
            ipmasq,
            pin_root,
        })
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes the file atomically (temporary file, fsync, rename): readers never see half a file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let dir = path
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!(".subnet.env.{}", std::process::id()));
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(self.to_env_string().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }

    /// The address every pod on this node uses as its gateway: the subnet's first address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }
}

fn parse_net(key: &str, value: &str) -> Result<Ipv4Net> {
    value
        .parse()
        .with_context(|| format!("{key}: {value:?} is not an IPv4 CIDR"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_flannel_files() {
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            mtu: 1500,
            underlay_mtu: Some(1500),
            route_mtu: Some(1450),
            ipmasq: true,
            pin_root: "/sys/fs/bpf/weft-x".into(),
        };
        assert_eq!(SubnetEnv::parse(&env.to_env_string()).unwrap(), env);
        let flannel = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        let parsed = SubnetEnv::parse(flannel).unwrap();
        assert_eq!(parsed.subnet, "10.244.3.0/24".parse().unwrap());
        assert_eq!(parsed.mtu, 1450);
        assert_eq!(parsed.underlay_mtu, None);
        assert_eq!(parsed.route_mtu, None);
        assert_eq!(parsed.gateway(), Ipv4Addr::new(10, 244, 3, 1));
    }

    #[test]
    fn names_the_bad_key() {
        let err =
            SubnetEnv::parse("WEFT_NETWORK=10.244.0.0/16\nWEFT_SUBNET=bogus\nWEFT_MTU=1450\n")
                .unwrap_err();
        assert!(format!("{err:#}").contains("SUBNET"), "{err:#}");
        let err = SubnetEnv::parse(
            "WEFT_NETWORK=10.244.0.0/16\nWEFT_SUBNET=10.9.0.0/24\nWEFT_MTU=1450\n",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("not inside"), "{err:#}");
    }
}

//! The node's own networking around the datapath: the underlay interface and address, the
//! sysctls the datapath needs, the `weft_host`/`weft_net` pair through which the node's own
//! traffic to remote pods enters the datapath, and the masquerade rule for pod traffic leaving
//! the cluster.
//!
//! Node -> remote pod: one kernel route `<Network> dev weft_host src <node ip>` covers every
//! remote subnet whatever its mode (vxlan, ipip or direct): `from_host` on `weft_net` looks the
//! destination up in the route map and encapsulates or routes it like pod traffic. Local pods
//! have /32 routes (written by the CNI plugin), which win. So the agent keeps no per-peer kernel
//! routes or neighbours: nothing to go stale when a peer changes.
//!
//! Links, addresses and routes are read and changed over rtnetlink ([`weft_node::netlink`]) in
//! the agent's network namespace; sysctls are written under /proc/sys/net (per netns). Not
//! sysfs: `/sys/class/net` shows the namespace sysfs was mounted in, not necessarily the agent's.
//! The masquerade rule is the one thing written by a tool (`nft`, else `iptables`).
use std::{
    collections::HashSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnet::Ipv4Net;
use weft_common::{HOST_DEV, HOST_PEER_DEV, VXLAN_DEV};
use weft_node::{
    cni::names::POD_GATEWAY,
    ipam,
    netlink::{self, BlockingNetlink, LinkInfo, Netlink, Scope},
    ns,
    subnet_env::SubnetEnv,
};

use crate::control_loop::PathMtuControl;

/// This node's VTEP MAC: stable, derived from its address, locally administered and unicast
/// (`02:57` = 'W', then the IPv4 address). A restarted agent, a peer reading the lease and the
/// static-file datastore all compute the same value.
pub fn vtep_mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x57, o[0], o[1], o[2], o[3]]
}

fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_stdin(cmd: &str, args: &[&str], input: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd}"))?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The interface tunnels and direct routes go through.
#[derive(Clone, Debug)]
pub struct Underlay {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
    /// The node's address (announced to peers; tunnels are addressed to it).
    pub node_ip: Ipv4Addr,
    /// The on-link subnet of the interface's address: peers inside it are reachable directly
    /// (DirectRouting, host-gw).
    pub subnet: Ipv4Net,
}

/// Finds the underlay: `iface` or the default route's interface; the address: `public_ip` or
/// the interface's first IPv4 address.
pub async fn detect_underlay(
    nl: &Netlink,
    iface: Option<&str>,
    public_ip: Option<Ipv4Addr>,
) -> Result<Underlay> {
    let link = match iface {
        Some(name) => nl
            .link(name)
            .await
            .with_context(|| format!("--iface: interface {name:?}"))?
            .ok_or_else(|| anyhow!("--iface: interface {name:?} not found"))?,
        None => {
            let routes = nl.routes().await.context("reading the routing table")?;
            let oif = routes
                .iter()
                .find(|r| r.dst.prefix_len() == 0 && r.oif.is_some())
                .and_then(|r| r.oif)
                .ok_or_else(|| {
                    anyhow!("no default route to take the underlay interface from: pass --iface")
                })?;
            nl.link_by_index(oif)
                .await?
                .ok_or_else(|| anyhow!("the default route's interface {oif} vanished"))?
        }
    };
    let name = link.name.clone();
    let addrs = nl
        .addresses(link.ifindex)
        .await
        .with_context(|| format!("addresses of {name}"))?;
    let (node_ip, subnet) = match public_ip {
        Some(ip) => {
            let subnet = addrs
                .iter()
                .find(|a| a.contains(&ip))
                .or(addrs.first())
                .map(|a| a.trunc())
                .unwrap_or_else(|| Ipv4Net::new(ip, 32).expect("/32"));
            (ip, subnet)
        }
        None => {
            let a = addrs
                .first()
                .ok_or_else(|| anyhow!("{name} has no IPv4 address: pass --public-ip"))?;
            (a.addr(), a.trunc())
        }
    };
    Ok(Underlay {
        name,
        ifindex: link.ifindex,
        mtu: if link.mtu == 0 { 1500 } else { link.mtu },
        node_ip,
        subnet,
    })
}

/// Where `net.*` sysctls are written (`--sysctl-net-dir`): `/proc/sys/net` unless a container
/// mounts the host's `/proc/sys/net` elsewhere (runtimes mount `/proc/sys` read-only in every
/// container that is not privileged).
static SYSCTL_NET_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Sets the directory `net.*` sysctls are written under (once, at start).
pub fn set_sysctl_net_dir(dir: std::path::PathBuf) {
    let _ = SYSCTL_NET_DIR.set(dir);
}

/// Writes `net.<path>` only when its value differs, so a node whose sysctls are already right
/// needs no write access to them.
fn write_sysctl(path: &str, value: &str) -> Result<()> {
    let dir = SYSCTL_NET_DIR
        .get()
        .map(std::path::PathBuf::as_path)
        .unwrap_or(std::path::Path::new("/proc/sys/net"));
    let rest = path.strip_prefix("net.").unwrap_or(path);
    let full = dir.join(rest.replace('.', "/"));
    if std::fs::read_to_string(&full).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&full, value)
        .with_context(|| format!("setting {path}={value} ({})", full.display()))
}

/// What the datapath needs from the kernel:
/// - forwarding (Kubernetes requires it; the FIB helper refuses to route otherwise);
/// - loose reverse-path filtering (`rp_filter=2`) on the underlay, and nowhere else: packets
///   from other nodes' pods that the stack must see (replies of flows it translated, a node's
///   traffic answered by a pod) arrive on the underlay, while the route back to those pods is
///   the cluster network's route through `weft_host`. Strict mode would drop them; loose mode
///   still drops sources no route reaches. The kernel applies the larger of `all` and the
///   interface's value, so a host-wide strict setting (1) stays in force everywhere else.
pub fn set_sysctls(underlay: &Underlay) -> Result<()> {
    write_sysctl("net.ipv4.ip_forward", "1")?;
    write_sysctl(&format!("net.ipv4.conf.{}.rp_filter", underlay.name), "2")?;
    Ok(())
}

/// Creates (or adopts) the `weft_host`/`weft_net` pair with the pod MTU (node traffic is
/// encapsulated like pod traffic) and routes the cluster network through it. `weft_host` also
/// carries the node's address (as `cilium_host` does): traffic the stack masquerades on its way
/// out through `weft_host` (a NodePort or a node's Service connection to a remote backend) gets
/// the node's address, which `from_host` accepts, whatever other addresses the node has.
pub async fn ensure_host_link(
    nl: &Netlink,
    network: Ipv4Net,
    node_ip: Ipv4Addr,
    pod_mtu: u32,
) -> Result<()> {
    if nl.link(HOST_DEV).await?.is_none() {
        nl.create_veth(HOST_DEV, None, HOST_PEER_DEV, None, pod_mtu, None)
            .await
            .with_context(|| format!("creating {HOST_DEV}/{HOST_PEER_DEV}"))?;
    }
    let host = netlink::ifindex(HOST_DEV)?;
    let peer = netlink::ifindex(HOST_PEER_DEV)?;
    nl.set_link(host, Some(pod_mtu), Some(false))
        .await
        .with_context(|| format!("setting {HOST_DEV} up"))?;
    nl.set_link(peer, Some(pod_mtu), None)
        .await
        .with_context(|| format!("setting {HOST_PEER_DEV} up"))?;
    nl.replace_address(host, Ipv4Net::new(node_ip, 32).expect("/32"))
        .await
        .with_context(|| format!("adding {node_ip}/32 to {HOST_DEV}"))?;
    nl.replace_route(network, None, host, Scope::Link, false, Some(node_ip))
        .await
        .with_context(|| format!("routing {network} through {HOST_DEV}"))?;
    Ok(())
}

/// Whether `e` is the kernel refusing a permission (EPERM, EACCES).
fn is_permission(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<nix::errno::Errno>(),
            Some(nix::errno::Errno::EPERM | nix::errno::Errno::EACCES)
        ) || c
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
    })
}

/// Gives the `weft_host`/`weft_net` pair the path MTU (node traffic is encapsulated like pod
/// traffic).
pub async fn set_host_link_mtu(nl: &Netlink, mtu: u32) -> Result<()> {
    for dev in [HOST_DEV, HOST_PEER_DEV] {
        let index = netlink::ifindex(dev)?;
        nl.set_link(index, Some(mtu), None)
            .await
            .with_context(|| format!("setting the MTU of {dev} to {mtu}"))?;
    }
    Ok(())
}

/// What [`set_pod_route_mtu`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodRoute {
    /// The route's MTU was changed.
    Changed,
    /// The route already had it.
    Unchanged,
    /// No interface `ifname` or no weft default route (yet: an ADD in flight; or the pod or a
    /// chained plugin replaced it): nothing was done.
    Missing,
}

/// Gives the default route of the pod in `netns` (weft's, via the pod gateway out of
/// `ifname`) the MTU `path_mtu` when that is below the interface's MTU, and no MTU otherwise.
pub fn set_pod_route_mtu(netns: &Path, ifname: &str, path_mtu: u32) -> Result<PodRoute> {
    ns::run_in(netns, || {
        let nl = BlockingNetlink::open()?;
        let Some(link) = nl.block_on(nl.link(ifname))? else {
            return Ok(PodRoute::Missing);
        };
        let want = (path_mtu < link.mtu).then_some(path_mtu);
        let routes = nl.block_on(nl.routes())?;
        let Some(route) = routes
            .iter()
            .find(|r| r.is_default_via(POD_GATEWAY, link.ifindex))
        else {
            return Ok(PodRoute::Missing);
        };
        if route.mtu == want {
            return Ok(PodRoute::Unchanged);
        }
        nl.block_on(nl.replace_default_route(POD_GATEWAY, link.ifindex, want))?;
        Ok(PodRoute::Changed)
    })
}

/// The pods' path MTU ([`PathMtuControl`]) on this node: the subnet file's `WEFT_ROUTE_MTU`
/// (pods created from now on), the host link, and the default route of every pod the CNI
/// plugin's IPAM stores under `cni_data_dir` name a network namespace for. A pod is visited
/// until its route is found right, then again only when the path MTU changes: a resync costs
/// nothing per settled pod.
pub struct PodPathMtu {
    pub subnet_file: PathBuf,
    pub cni_data_dir: PathBuf,
    /// The path MTU the subnet file and the host link have, shared with whatever else writes
    /// the subnet file.
    pub current: Arc<AtomicU32>,
    /// Pods (namespace, interface) whose route has the current path MTU.
    pub settled: HashSet<(String, String)>,
    /// Entering pods' namespaces was refused (no CAP_SYS_ADMIN, as the shipped DaemonSet
    /// runs): no pod is visited again until the path MTU changes.
    pub denied: bool,
}

impl PodPathMtu {
    pub fn new(subnet_file: PathBuf, cni_data_dir: PathBuf, current: Arc<AtomicU32>) -> Self {
        Self {
            subnet_file,
            cni_data_dir,
            current,
            settled: HashSet::new(),
            denied: false,
        }
    }
}

impl PathMtuControl for PodPathMtu {
    fn apply(&mut self, path_mtu: u32) -> Result<()> {
        // The subnet file and the host link are written at start with the path MTU, so only
        // a change touches them; recorded once both took it (a failure is retried).
        let change = self.current.load(Ordering::Relaxed) != path_mtu;
        if change {
            self.settled.clear();
            self.denied = false;
            // No file: the node holds no subnet, and the file is written with the current
            // value once it does.
            if let Ok(mut env) = SubnetEnv::read(&self.subnet_file) {
                env.route_mtu = (path_mtu < env.mtu).then_some(path_mtu);
                env.write(&self.subnet_file)?;
            }
            let nl = BlockingNetlink::open()?;
            nl.block_on(set_host_link_mtu(&nl, path_mtu))?;
            self.current.store(path_mtu, Ordering::Relaxed);
        }
        if self.denied {
            return Ok(());
        }
        let (mut changed, mut failed) = (0, 0);
        let pods = ipam::read_all(&self.cni_data_dir);
        // Deleted pods leave the set.
        let present: HashSet<(&str, &str)> = pods
            .iter()
            .filter_map(|p| Some((p.netns.as_deref()?, p.ifname.as_str())))
            .collect();
        self.settled
            .retain(|(netns, ifname)| present.contains(&(netns.as_str(), ifname.as_str())));
        for pod in pods {
            let Some(netns) = pod.netns else {
                continue;
            };
            let key = (netns, pod.ifname);
            if self.settled.contains(&key) {
                continue;
            }
            match set_pod_route_mtu(Path::new(&key.0), &key.1, path_mtu) {
                Ok(PodRoute::Changed) => {
                    changed += 1;
                    self.settled.insert(key);
                }
                Ok(PodRoute::Unchanged) => {
                    self.settled.insert(key);
                }
                Ok(PodRoute::Missing) => {}
                Err(e) if is_permission(&e) => {
                    // The same for every pod: said, and tried, once per change.
                    self.denied = true;
                    if change {
                        tracing::warn!(
                            "cannot enter pods' network namespaces to set the MTU of their \
                             default routes to {path_mtu} (entering one needs CAP_SYS_ADMIN): \
                             running pods learn it from the datapath's fragmentation-needed, \
                             new pods get it at creation: {e:#}"
                        );
                    }
                    return Ok(());
                }
                Err(e) => {
                    failed += 1;
                    // Said once per change, not at every resync.
                    if change {
                        tracing::warn!(pod = %pod.ip, "setting the MTU of the pod's default route: {e:#}");
                    }
                }
            }
        }
        if changed > 0 || change {
            tracing::info!(
                path_mtu,
                pods_changed = changed,
                pods_failed = failed,
                "pods' path MTU set"
            );
        }
        Ok(())
    }
}

/// What `weft_vxlan` must be: a metadata-mode VXLAN device on the configured port, with the
/// node's VTEP MAC (inner frames from peers are addressed to it, so what goes to the stack is
/// the host's), the pod MTU (nothing is ever sent through it) and the node's address as /32,
/// as `weft_host` has it: the kernel's reverse-path filter, loose mode included, refuses every
/// packet arriving on a device without an IPv4 address unless the route back to its source
/// goes out of that device (measured: `IPReversePathFilter` counted each of a peer node's
/// pings to a local pod).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanDevice {
    pub port: u16,
    pub mtu: u32,
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
}

impl VxlanDevice {
    /// Whether the link `link` is this device as it must be.
    pub fn fits(&self, link: &LinkInfo) -> bool {
        link.vxlan
            .is_some_and(|v| v.external && v.port == self.port)
            && link.mac == Some(self.mac)
    }

    /// Whether `weft_vxlan` exists, up, as it must be, with `from_vxlan` attached: VXLAN can go
    /// through it right now.
    pub fn ready(&self, nl: &BlockingNetlink) -> bool {
        nl.block_on(nl.link(VXLAN_DEV))
            .ok()
            .flatten()
            .is_some_and(|l| self.fits(&l) && l.up)
            && weft_node::datapath::vxlan_program_attached(VXLAN_DEV)
    }

    /// Makes `weft_vxlan` what it must be (creating it, or re-creating it when its port or MAC
    /// differ), up, with loose reverse-path filtering (decapsulated packets the stack takes
    /// come from other nodes' pods, routed back through `weft_host`) and no IPv6, and
    /// `from_vxlan` (pinned under `pin_root`) on its ingress. Fails when the kernel has no
    /// VXLAN or another VXLAN device holds the port (e.g. flannel's `flannel.1` on a node being
    /// migrated).
    pub fn ensure(&self, nl: &BlockingNetlink, pin_root: &std::path::Path) -> Result<()> {
        let link = nl.block_on(nl.link(VXLAN_DEV))?;
        let link = match link {
            Some(l) if self.fits(&l) => l,
            other => {
                if other.is_some() {
                    weft_node::datapath::detach_pinned_vxlan(pin_root, VXLAN_DEV)?;
                    nl.block_on(nl.delete_link(VXLAN_DEV))
                        .with_context(|| format!("deleting the outdated {VXLAN_DEV}"))?;
                }
                nl.block_on(nl.create_vxlan_external(VXLAN_DEV, self.port, self.mtu, &self.mac))
                    .map_err(|e| {
                        let hint = if e.is(libc::EADDRINUSE) {
                            " (another VXLAN device listens on that port)"
                        } else {
                            ""
                        };
                        anyhow!(
                            "creating {VXLAN_DEV} (VXLAN, external, port {}): {e}{hint}",
                            self.port
                        )
                    })?;
                nl.block_on(nl.link(VXLAN_DEV))?
                    .ok_or_else(|| anyhow!("{VXLAN_DEV} vanished after its creation"))?
            }
        };
        if !link.up || link.mtu != self.mtu {
            nl.block_on(nl.set_link(link.ifindex, Some(self.mtu), None))
                .with_context(|| format!("setting {VXLAN_DEV} up"))?;
        }
        let address = Ipv4Net::new(self.address, 32).expect("/32");
        if !nl.block_on(nl.addresses(link.ifindex))?.contains(&address) {
            nl.block_on(nl.replace_address(link.ifindex, address))
                .with_context(|| format!("adding {address} to {VXLAN_DEV}"))?;
        }
        write_sysctl(&format!("net.ipv4.conf.{VXLAN_DEV}.rp_filter"), "2")?;
        // Without IPv6 nothing tries to send through it (link-local addresses, solicitations);
        // a host without IPv6 has no such setting.
        let _ = write_sysctl(&format!("net.ipv6.conf.{VXLAN_DEV}.disable_ipv6"), "1");
        weft_node::datapath::attach_pinned_vxlan(pin_root, VXLAN_DEV)
            .with_context(|| format!("attaching from_vxlan to {VXLAN_DEV}"))
    }

    /// Removes `weft_vxlan` and its program's link pin (the hook is XDP now).
    pub fn remove(nl: &BlockingNetlink, pin_root: &std::path::Path) -> Result<()> {
        weft_node::datapath::detach_pinned_vxlan(pin_root, VXLAN_DEV)?;
        nl.block_on(nl.delete_link(VXLAN_DEV))
            .with_context(|| format!("deleting {VXLAN_DEV}"))?;
        Ok(())
    }
}

/// Which firewall tool installed the masquerade rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firewall {
    Nftables,
    Iptables,
}

/// Masquerades pod traffic leaving the cluster network (to the node's address), as flannel's
/// `--ip-masq` does; traffic between pods and to multicast is untouched. nftables when `nft`
/// exists, iptables otherwise. Idempotent (the nft table is replaced atomically; the iptables
/// rule is checked first).
pub fn ensure_masquerade(network: Ipv4Net) -> Result<Firewall> {
    if Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let rules = format!(
            "table ip weft_nat {{}}\n\
             delete table ip weft_nat\n\
             table ip weft_nat {{\n\
               chain postrouting {{\n\
                 type nat hook postrouting priority srcnat; policy accept;\n\
                 ip saddr {network} ip daddr != {network} ip daddr != 224.0.0.0/4 masquerade\n\
               }}\n\
             }}\n"
        );
        run_stdin("nft", &["-f", "-"], &rules)
            .context("installing the nftables masquerade rule")?;
        return Ok(Firewall::Nftables);
    }
    let net = network.to_string();
    let rule = [
        "POSTROUTING",
        "-s",
        &net,
        "!",
        "-d",
        &net,
        "-m",
        "comment",
        "--comment",
        "weft masquerade",
        "-j",
        "MASQUERADE",
    ];
    let with = |op: &'static str| -> Vec<&str> {
        let mut v = vec!["-t", "nat", op];
        v.extend_from_slice(&rule);
        v
    };
    if run("iptables", &with("-C")).is_err() {
        run("iptables", &with("-A")).context("installing the iptables masquerade rule")?;
    }
    Ok(Firewall::Iptables)
}

/// Cuts off the local pods whose addresses are not this node's any more: their endpoint entries
/// and their host routes go, so the datapath no longer delivers to them or accepts their traffic
/// and the node's stack routes their addresses like any other node's (toward the subnet's new
/// holder). The pods' links stay (a CNI DEL removes them as usual). A pod's address is not this
/// node's when it lies outside `keep` (the node's current subnet) or inside `lost` (a subnet
/// another node holds now). Returns the addresses cut off.
///
/// Why: a node away longer than its lease TTL may find its subnet handed to another node whose
/// pods use the same addresses. Its own old pods must stop using them (they get new addresses
/// only when recreated).
pub fn fence_endpoints(
    maps: &mut weft_node::datapath::Maps,
    nl: &netlink::BlockingNetlink,
    keep: Option<Ipv4Net>,
    lost: Option<Ipv4Net>,
) -> Result<Vec<Ipv4Addr>> {
    let foreign = |ip: &Ipv4Addr| {
        keep.is_some_and(|k| !k.contains(ip)) || lost.is_some_and(|l| l.contains(ip))
    };
    let mut fenced = Vec::new();
    for (ip, ep) in maps.endpoints()? {
        if !foreign(&ip) {
            continue;
        }
        maps.remove_endpoint(ip)?;
        let host = Ipv4Net::new(ip, 32).expect("/32");
        nl.block_on(nl.delete_route(host, ep.host_ifindex))
            .with_context(|| format!("removing the host route of {ip}"))?;
        tracing::warn!(
            pod = %ip,
            subnet = ?keep,
            "a local pod's address is not this node's any more (its subnet is another node's): \
             the pod is cut off; delete it so that it is recreated with an address of this \
             node's subnet"
        );
        fenced.push(ip);
    }
    Ok(fenced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_mac_is_local_unicast_and_stable() {
        let mac = vtep_mac_for(Ipv4Addr::new(192, 168, 100, 10));
        assert_eq!(mac, [0x02, 0x57, 192, 168, 100, 10]);
        assert_eq!(mac[0] & 0x01, 0, "unicast");
        assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
    }
}

//! ADD, DEL, CHECK, GC, STATUS and VERSION. The plugin runs in the node's network namespace
//! (bpffs visible); pod-side configuration runs on a thread inside the pod's namespace.
use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use serde::Serialize;
use serde_json::Value;
use weft_common::{
    CONFIG_F_READY, EP_F_STACK_ONLY, EndpointInfo,
    policy::{PolicyPodName, new_endpoint_state},
};

use super::{
    Log,
    error::{CniError, CniResult, code},
    names::{AttachmentNames, HOST_IF_PREFIX, POD_GATEWAY},
    recover,
    result::{AddResult, Interface, IpConfig, Route},
    spec::{self, Env, NetworkConfig},
};
use crate::{
    datapath::{self, Maps},
    ipam::{Ipam, IpamError},
    mac::format_mac,
    netlink::{self, BlockingNetlink, Scope},
    ns,
    subnet_env::SubnetEnv,
};

/// How long a plugin waits for another one holding the IPAM lock before answering "try again".
const LOCK_TIMEOUT: Duration = Duration::from_secs(20);

/// VERSION's answer: the versions spoken, in the version asked for (else the newest).
#[derive(Debug, Serialize)]
struct VersionReply {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    #[serde(rename = "supportedVersions")]
    supported_versions: &'static [&'static str],
}

pub fn version(stdin: &[u8]) -> Value {
    let asked = spec::requested_version(stdin).unwrap_or_else(|| spec::CURRENT_VERSION.to_string());
    serde_json::to_value(VersionReply {
        cni_version: asked,
        supported_versions: &spec::SUPPORTED_VERSIONS,
    })
    .expect("serializable")
}

/// The node's subnet file; missing means the agent has not set the node up yet.
fn node_subnet(conf: &NetworkConfig, missing_code: u32) -> CniResult<SubnetEnv> {
    SubnetEnv::read(&conf.subnet_file).map_err(|e| {
        CniError::with_cause(
            missing_code,
            format!(
                "the node's subnet file {} is not readable: is weft-agent running on this node?",
                conf.subnet_file.display()
            ),
            &e,
        )
    })
}

/// The pod's MTU: the config's `mtu`, else the node's. An `mtu` above the node's underlay MTU
/// minus the largest tunnel overhead (the pod MTU rule) is refused, its large packets would not
/// fit once encapsulated, unless the node's own MTU is as large (`Backend.MTU` of a backend
/// that adds less, which the agent checked against it).
fn pod_mtu(conf: &NetworkConfig, subnet: &SubnetEnv) -> CniResult<u32> {
    let Some(mtu) = conf.mtu else {
        return Ok(subnet.mtu);
    };
    if let Some(underlay) = subnet.underlay_mtu {
        let max = weft_common::max_pod_mtu(underlay).max(subnet.mtu.min(underlay));
        if mtu > max {
            return Err(CniError::invalid_config(format!(
                "field `mtu`: {mtu} is above the node's underlay MTU {underlay} minus {} (the \
                 largest encapsulation overhead) and the node's pod MTU {}: at most {max}",
                weft_common::VXLAN_OVERHEAD,
                subnet.mtu
            )));
        }
    }
    Ok(mtu)
}

fn pin_root(conf: &NetworkConfig, subnet: Option<&SubnetEnv>) -> PathBuf {
    conf.pin_root
        .clone()
        .or_else(|| subnet.map(|s| s.pin_root.clone()))
        .unwrap_or_else(|| PathBuf::from(weft_common::DEFAULT_PIN_ROOT))
}

/// The node's pinned maps, provided the agent marked the config ready.
fn ready_maps(pin_root: &Path, not_ready_code: u32) -> CniResult<Maps> {
    let maps = Maps::open_pinned(pin_root).map_err(|e| {
        CniError::with_cause(
            not_ready_code,
            format!(
                "the datapath maps under {} are missing: is weft-agent running on this node?",
                pin_root.display()
            ),
            &e,
        )
    })?;
    let config = maps.config().map_err(|e| {
        CniError::with_cause(not_ready_code, "reading the node config map failed", &e)
    })?;
    if config.flags & CONFIG_F_READY == 0 {
        return Err(CniError::new(
            not_ready_code,
            format!(
                "the datapath under {} is not configured yet (config map not READY)",
                pin_root.display()
            ),
        ));
    }
    for (name, _) in datapath::POD_PROGRAMS {
        let prog = datapath::pin_dir(pin_root).join("progs").join(name);
        if !prog.exists() {
            return Err(CniError::new(
                not_ready_code,
                format!(
                    "the pinned program {} is missing: weft-agent has not pinned its programs",
                    prog.display()
                ),
            ));
        }
    }
    Ok(maps)
}

fn ipam_error(e: IpamError) -> CniError {
    match &e {
        IpamError::Exhausted { .. } => CniError::new(
            code::ADDRESSES_EXHAUSTED,
            format!("{e}: delete unused pods or give the node a larger subnet"),
        ),
        IpamError::LockTimeout { .. } => CniError::new(code::TRY_AGAIN_LATER, e.to_string()),
        IpamError::Unavailable { .. } => CniError::new(code::ADDRESS_UNAVAILABLE, e.to_string()),
        IpamError::Store { .. } | IpamError::Corrupt { .. } => {
            CniError::new(code::IPAM_STORE, format!("{e:#}"))
        }
    }
}

fn prev_result(conf: &NetworkConfig) -> CniResult<Option<AddResult>> {
    conf.prev_result
        .as_ref()
        .map(|v| AddResult::parse(v).map_err(CniError::invalid_config))
        .transpose()
}

/// What ADD has done so far, undone in reverse order when a later step fails.
#[derive(Default)]
struct Undo {
    release: Option<(Ipam, String, String)>,
    link: Option<String>,
    endpoint: Option<Ipv4Addr>,
    attached: Option<(PathBuf, String)>,
    /// The policy state and name written for this address.
    policy: Option<Ipv4Addr>,
}

impl Undo {
    fn run(self, maps: &mut Maps, log: &Log) {
        if let Some(ip) = self.policy {
            forget_policy(maps, ip, log);
        }
        if let Some((root, dev)) = self.attached
            && let Err(e) = datapath::detach_pinned_pod(&root, &dev)
        {
            log.line(&format!(
                "undo: detaching the pod programs from {dev}: {e:#}"
            ));
        }
        if let Some(ip) = self.endpoint
            && let Err(e) = maps.remove_endpoint(ip)
        {
            log.line(&format!("undo: removing endpoint {ip}: {e:#}"));
        }
        if let Some(dev) = self.link
            && let Err(e) = BlockingNetlink::open().and_then(|nl| nl.block_on(nl.delete_link(&dev)))
        {
            log.line(&format!("undo: deleting {dev}: {e:#}"));
        }
        if let Some((ipam, cid, ifname)) = self.release {
            let released = ipam
                .lock(LOCK_TIMEOUT)
                .map_err(anyhow::Error::from)
                .and_then(|mut l| {
                    l.release(&cid, &ifname);
                    l.commit().map_err(anyhow::Error::from)
                });
            if let Err(e) = released {
                log.line(&format!("undo: releasing the address: {e:#}"));
            }
        }
    }
}

pub fn add(env: &Env, conf: &NetworkConfig, log: &Log) -> CniResult<Value> {
    let netns = env.netns.clone().expect("ADD has CNI_NETNS");
    if !ns::is_netns(&netns) {
        return Err(CniError::invalid_env(format!(
            "CNI_NETNS {} is not a network namespace",
            netns.display()
        )));
    }
    let prev = prev_result(conf)?;
    let subnet = node_subnet(conf, code::TRY_AGAIN_LATER)?;
    let pin_root = pin_root(conf, Some(&subnet));
    let mtu = pod_mtu(conf, &subnet)?;
    // Below the interface's MTU, the node's route MTU caps what the pod sends (the backend's
    // encapsulation overhead is taken off the route, not the interface, so that a live switch
    // changes only the route).
    let route_mtu = subnet.route_mtu.filter(|r| *r < mtu);
    let mut maps = ready_maps(&pin_root, code::TRY_AGAIN_LATER)?;
    let names = AttachmentNames::of(&env.container_id, &env.ifname);
    let mut undo = Undo::default();
    let wiring = Wiring {
        env,
        conf,
        subnet: &subnet,
        netns: &netns,
        names: &names,
        mtu,
        route_mtu,
        pin_root: &pin_root,
    };
    let ip = match wiring.wire(&mut maps, &mut undo, log) {
        Ok(ip) => ip,
        Err(e) => {
            undo.run(&mut maps, log);
            return Err(e);
        }
    };
    let ours = AddResult {
        interfaces: vec![
            Interface {
                name: names.host_ifname.clone(),
                mac: format_mac(&names.host_mac),
                sandbox: None,
                mtu: Some(mtu),
            },
            Interface {
                name: env.ifname.clone(),
                mac: format_mac(&names.pod_mac),
                sandbox: Some(netns.display().to_string()),
                mtu: Some(mtu),
            },
        ],
        ips: vec![IpConfig {
            address: Ipv4Net::new(ip, 32).expect("/32"),
            gateway: Some(POD_GATEWAY),
            interface: Some(1),
        }],
        routes: vec![Route {
            dst: Ipv4Net::default(),
            gw: Some(POD_GATEWAY),
        }],
        ..Default::default()
    };
    let result = match prev {
        Some(prev) => prev.merge(ours),
        None => ours,
    };
    Ok(result.render(&conf.cni_version))
}

/// Everything ADD needs to wire one attachment.
struct Wiring<'a> {
    env: &'a Env,
    conf: &'a NetworkConfig,
    subnet: &'a SubnetEnv,
    netns: &'a Path,
    names: &'a AttachmentNames,
    mtu: u32,
    /// The `mtu` metric of the pod's default route, when below `mtu`.
    route_mtu: Option<u32>,
    pin_root: &'a Path,
}

impl Wiring<'_> {
    fn setup_err(what: String, e: &anyhow::Error) -> CniError {
        CniError::with_cause(code::INTERFACE_SETUP, what, e)
    }

    /// The veth (host side up), the pod side created directly in the pod's namespace under
    /// its final name (no address needed yet).
    fn create_veth(&self, nl: &BlockingNetlink) -> CniResult<()> {
        let host = &self.names.host_ifname;
        let pod_if = &self.env.ifname;
        let netns = std::fs::File::open(self.netns).map_err(|e| {
            CniError::invalid_env(format!("CNI_NETNS {}: {e}", self.netns.display()))
        })?;
        let create = || {
            nl.block_on(nl.create_veth(
                host,
                Some(&self.names.host_mac),
                pod_if,
                Some(&self.names.pod_mac),
                self.mtu,
                Some(netns.as_raw_fd()),
            ))
        };
        match create() {
            Ok(()) => Ok(()),
            // A previous ADD of this attachment may have been killed half way: its host link
            // (and with it the peer) goes, and the ADD is tried once more.
            Err(e) if e.is(libc::EEXIST) => {
                if !nl.block_on(nl.delete_link(host)).unwrap_or(false) {
                    return Err(Self::setup_err(
                        format!(
                            "creating veth {host} <-> {pod_if} in {} failed: {pod_if} already exists there",
                            self.netns.display()
                        ),
                        &e.into(),
                    ));
                }
                create().map_err(|e| {
                    Self::setup_err(format!("creating veth {host} <-> {pod_if}"), &e.into())
                })
            }
            Err(e) => Err(Self::setup_err(
                format!("creating veth {host} <-> {pod_if}"),
                &e.into(),
            )),
        }
    }

    /// Allocates the address (under the IPAM lock, committed before anything else exists: a GC
    /// running meanwhile sees the allocation and keeps what this ADD creates), creates the veth,
    /// then attaches `from_pod` (ingress) and `to_pod` (egress) on a second thread while both
    /// sides are configured (`pod_hook`: a clsact qdisc with cls_bpf filters takes ~0.2 ms; TCX
    /// links, for shaped pods, wait for an RCU grace period each, ~13 ms, holding rtnl, so the
    /// netlink steps queue behind them). Each step is recorded in `undo` once done. Returns the
    /// pod address.
    fn wire(&self, maps: &mut Maps, undo: &mut Undo, log: &Log) -> CniResult<Ipv4Addr> {
        let env = self.env;
        let ipam = Ipam::new(&self.conf.data_dir, &self.conf.name);
        let args = env.cni_args()?;
        let (ip, new) = {
            let mut locked = ipam.lock(LOCK_TIMEOUT).map_err(ipam_error)?;
            let reserved = [self.subnet.gateway()];
            let got = match args.ip.or(self.conf.requested_ip) {
                Some(want) => locked.allocate_requested(
                    self.subnet.subnet,
                    &reserved,
                    want,
                    &env.container_id,
                    &env.ifname,
                ),
                None => locked.allocate(
                    self.subnet.subnet,
                    &reserved,
                    &env.container_id,
                    &env.ifname,
                ),
            }
            .map_err(ipam_error)?;
            let named = locked.set_pod(
                &env.container_id,
                &env.ifname,
                args.pod(),
                Some(self.netns.display().to_string()),
            );
            if got.1 || named {
                locked.commit().map_err(ipam_error)?;
            }
            got
        };
        log.line(&format!("address {ip} (new: {new})"));
        if new {
            undo.release = Some((ipam, env.container_id.clone(), env.ifname.clone()));
        }
        // Isolation before the pod has a route or an endpoint: nothing reaches it or leaves it
        // before its policy state is in place.
        if isolate(maps, ip, &args)? {
            undo.policy = Some(ip);
        }
        let host = self.names.host_ifname.clone();
        // The node's side of the wiring goes through one connection (this thread, the node's
        // namespace); the pod's side opens its own in the pod's namespace.
        let nl = BlockingNetlink::open()
            .map_err(|e| Self::setup_err("opening rtnetlink".into(), &e.into()))?;
        self.create_veth(&nl)?;
        undo.link = Some(host.clone());
        let host_ifindex = nix::net::if_::if_nametoindex(host.as_str())
            .map_err(|e| Self::setup_err(format!("ifindex of {host}"), &anyhow::Error::from(e)))?;
        // Pins left by an earlier, interrupted ADD hold links severed with their device.
        let _ = datapath::detach_pinned_pod(self.pin_root, &host);
        let (pin_root, dev) = (self.pin_root.to_path_buf(), host.clone());
        let hook = pod_hook(self.conf);
        let attach = std::thread::spawn(move || datapath::attach_pinned_pod(&pin_root, &dev, hook));
        let configured = self.configure(&nl, host_ifindex, ip, maps, undo);
        let attached = attach
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the attach thread panicked")));
        match attached {
            Ok(()) => undo.attached = Some((self.pin_root.to_path_buf(), host.clone())),
            Err(e) => {
                configured?;
                return Err(CniError::with_cause(
                    code::DATAPATH,
                    format!("attaching from_pod and to_pod to {host}"),
                    &e,
                ));
            }
        }
        configured.map(|()| ip)
    }

    /// The attachment's name on the host link, address, routes and neighbours on both sides,
    /// and the endpoint entry.
    fn configure(
        &self,
        nl: &BlockingNetlink,
        host_ifindex: u32,
        ip: Ipv4Addr,
        maps: &mut Maps,
        undo: &mut Undo,
    ) -> CniResult<()> {
        let env = self.env;
        let host = &self.names.host_ifname;
        let pod_if = &env.ifname;
        let pod_addr = Ipv4Net::new(ip, 32).expect("/32");
        let host_side = || -> anyhow::Result<()> {
            // Which attachment the link is, so that the IPAM store can be rebuilt from the
            // node's links (`recover`).
            if let Some(alias) = recover::alias(&env.container_id, &env.ifname) {
                nl.block_on(nl.set_alias(host_ifindex, &alias))
                    .context("alias")?;
            }
            // Router advertisements from the pod never configure the node.
            ipv6_sysctl(host, "accept_ra", "0").context("accept_ra")?;
            nl.block_on(nl.replace_route(pod_addr, None, host_ifindex, Scope::Link, false, None))
                .context("route")?;
            nl.block_on(nl.replace_neighbour(host_ifindex, ip, &self.names.pod_mac))
                .context("neighbour")?;
            Ok(())
        };
        let pod_side = || -> anyhow::Result<()> {
            let nl = BlockingNetlink::open()?;
            let index = netlink::ifindex(pod_if)?;
            nl.block_on(nl.replace_address(index, pod_addr))
                .context("address")?;
            // The cluster network is IPv4: the pod's interface sends no IPv6 (router and
            // neighbour solicitations, MLD) for the datapath to drop.
            ipv6_sysctl(pod_if, "disable_ipv6", "1").context("disable_ipv6")?;
            nl.block_on(nl.set_link(index, None, None))
                .context("link up")?;
            nl.block_on(nl.replace_neighbour(index, POD_GATEWAY, &self.names.host_mac))
                .context("gateway neighbour")?;
            nl.block_on(nl.replace_default_route(POD_GATEWAY, index, self.route_mtu))
                .context("default route")?;
            Ok(())
        };
        let (host_done, pod_done) = std::thread::scope(|s| {
            let pod = s.spawn(|| ns::run_in(self.netns, pod_side));
            let host = host_side();
            (
                host,
                pod.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the pod thread panicked"))),
            )
        });
        host_done.map_err(|e| Self::setup_err(format!("routing {ip} to {host}"), &e))?;
        pod_done.map_err(|e| {
            Self::setup_err(
                format!("configuring {pod_if} in {}", self.netns.display()),
                &e,
            )
        })?;
        maps.upsert_endpoint(
            ip,
            &EndpointInfo {
                host_ifindex,
                pod_mac: self.names.pod_mac,
                host_mac: self.names.host_mac,
                flags: endpoint_flags(self.conf),
            },
        )
        .map_err(|e| {
            CniError::with_cause(code::DATAPATH, format!("registering endpoint {ip}"), &e)
        })?;
        undo.endpoint = Some(ip);
        Ok(())
    }
}

/// NetworkPolicy for a new pod, before it has a route: its namespace and name (from the
/// runtime's `K8S_POD_NAMESPACE` and `K8S_POD_NAME`) and the isolation its namespace's
/// policies give a new pod (both ways before the agent's first sync), allowing nothing until
/// the agent compiles it: allows may lag, isolation may not. A repeated ADD of the same pod
/// keeps the state the agent wrote. Returns whether it wrote a new state.
fn isolate(maps: &mut Maps, ip: Ipv4Addr, args: &super::spec::CniArgs) -> CniResult<bool> {
    let datapath_err =
        |what: &str, e: anyhow::Error| CniError::with_cause(code::DATAPATH, what.to_string(), &e);
    let namespace = args.pod_namespace.as_deref().unwrap_or("");
    let name = PolicyPodName::new(namespace, args.pod_name.as_deref().unwrap_or(""));
    let known = maps
        .policy_pod_name(ip)
        .map_err(|e| datapath_err("reading the pod name map", e))?;
    let state = maps
        .policy_endpoint(ip)
        .map_err(|e| datapath_err("reading the policy endpoint map", e))?;
    if known == Some(name) && state.is_some() {
        return Ok(false);
    }
    let lookup = |ns: &str| maps.policy_ns_default(ns);
    let marker = lookup("").map_err(|e| datapath_err("reading the namespace defaults", e))?;
    let ns_flags =
        lookup(namespace).map_err(|e| datapath_err("reading the namespace defaults", e))?;
    let state = new_endpoint_state(marker, ns_flags);
    maps.put_policy_pod_name(ip, Some(&name))
        .map_err(|e| datapath_err(&format!("recording the name of {ip}"), e.into()))?;
    maps.put_policy_endpoint(ip, Some(&state))
        .map_err(|e| datapath_err(&format!("writing the policy state of {ip}"), e.into()))?;
    Ok(true)
}

/// Removes a pod's policy state, name and drop counters (every step tolerates absence).
fn forget_policy(maps: &mut Maps, ip: Ipv4Addr, log: &Log) {
    if let Err(e) = maps.put_policy_endpoint(ip, None) {
        log.line(&format!("removing the policy state of {ip}: {e:#}"));
    }
    if let Err(e) = maps.put_policy_pod_name(ip, None) {
        log.line(&format!("removing the name of {ip}: {e:#}"));
    }
    if let Err(e) = maps.remove_policy_drops(ip) {
        log.line(&format!("removing the policy counters of {ip}: {e:#}"));
    }
}

/// Sets `net.ipv6.conf.<dev>.<key>` in the calling thread's network namespace; nothing to do
/// on a kernel without IPv6.
fn ipv6_sysctl(dev: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let path = PathBuf::from(format!("/proc/sys/net/ipv6/conf/{dev}/{key}"));
    if !Path::new("/proc/sys/net/ipv6").exists() {
        return Ok(());
    }
    std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))
}

/// The endpoint's `EP_F_*` flags: a pod the runtime asks to shape (`runtimeConfig.bandwidth`,
/// for the `bandwidth` plugin chained after weft) takes the host stack both ways, where the
/// plugin's qdiscs are.
fn endpoint_flags(conf: &NetworkConfig) -> u32 {
    if conf.bandwidth { EP_F_STACK_ONLY } else { 0 }
}

/// How the pod's programs hook into its veth: clsact filters (no RCU grace period to wait
/// for), except for a pod the runtime asks to shape, whose `bandwidth` plugin adds an
/// `ingress` qdisc that cannot coexist with clsact: TCX links there.
fn pod_hook(conf: &NetworkConfig) -> datapath::PodHook {
    if conf.bandwidth {
        datapath::PodHook::Tcx
    } else {
        datapath::PodHook::Clsact
    }
}

/// Removes what ADD set up for one attachment except the allocation; every step tolerates
/// its object being gone already. Without the address (the IPAM store is unreadable), the
/// endpoint is found by the host link it points to.
fn teardown(
    maps: Option<&mut Maps>,
    pin_root: &Path,
    host_ifname: &str,
    ip: Option<Ipv4Addr>,
    log: &Log,
) -> CniResult<()> {
    if let Some(maps) = maps {
        let endpoints = maps.endpoints().ok();
        let ip = ip.or_else(|| {
            let ifindex = nix::net::if_::if_nametoindex(host_ifname).ok()?;
            endpoints
                .as_ref()?
                .iter()
                .find(|(_, e)| e.host_ifindex == ifindex)
                .map(|(a, _)| *a)
        });
        if let Some(ip) = ip {
            let present = endpoints.is_none_or(|eps| eps.iter().any(|(a, _)| *a == ip));
            if present && let Err(e) = maps.remove_endpoint(ip) {
                log.line(&format!("removing endpoint {ip}: {e:#}"));
            }
            forget_policy(maps, ip, log);
        }
    }
    // The device first: its removal detaches the program as part of the device's own
    // teardown, whereas detaching a live TCX link waits for an RCU grace period of its own.
    BlockingNetlink::open()
        .and_then(|nl| nl.block_on(nl.delete_link(host_ifname)))
        .map_err(|e| {
            let e = anyhow::Error::from(e);
            CniError::with_cause(code::INTERFACE_SETUP, format!("deleting {host_ifname}"), &e)
        })?;
    datapath::detach_pinned_pod(pin_root, host_ifname).map_err(|e| {
        CniError::with_cause(
            code::DATAPATH,
            format!("detaching from_pod and to_pod from {host_ifname}"),
            &e,
        )
    })?;
    Ok(())
}

pub fn del(env: &Env, conf: &NetworkConfig, log: &Log) -> CniResult<()> {
    // DEL works without the agent: the subnet file only supplies the pin root.
    let subnet = SubnetEnv::read(&conf.subnet_file).ok();
    let pin_root = pin_root(conf, subnet.as_ref());
    let names = AttachmentNames::of(&env.container_id, &env.ifname);
    let ipam = Ipam::new(&conf.data_dir, &conf.name);
    // A corrupt store does not keep the pod's link, endpoint and programs alive: they go, and
    // the allocation with them once the store is rebuilt from the links that remain.
    let (ip, corrupt) = match ipam.lock(LOCK_TIMEOUT) {
        Ok(locked) => (
            locked.find(&env.container_id, &env.ifname).map(|a| a.ip),
            false,
        ),
        Err(e @ IpamError::Corrupt { .. }) => {
            log.line(&format!("DEL without the allocation: {e}"));
            (None, true)
        }
        Err(e) => return Err(ipam_error(e)),
    };
    let mut maps = match Maps::open_pinned(&pin_root) {
        Ok(m) => Some(m),
        Err(e) => {
            log.line(&format!("no datapath maps, skipping the endpoint: {e:#}"));
            None
        }
    };
    teardown(maps.as_mut(), &pin_root, &names.host_ifname, ip, log)?;
    if corrupt {
        return Ok(());
    }
    if ip.is_some() {
        let mut locked = ipam.lock(LOCK_TIMEOUT).map_err(ipam_error)?;
        if locked.release(&env.container_id, &env.ifname).is_some() {
            locked.commit().map_err(ipam_error)?;
        }
    }
    Ok(())
}

fn mismatch(msg: String) -> CniError {
    CniError::new(code::CHECK_MISMATCH, msg)
}

pub fn check(env: &Env, conf: &NetworkConfig, _log: &Log) -> CniResult<()> {
    let netns = env.netns.clone().expect("CHECK has CNI_NETNS");
    let prev = prev_result(conf)?;
    let subnet = node_subnet(conf, code::TRY_AGAIN_LATER)?;
    let pin_root = pin_root(conf, Some(&subnet));
    let mtu = conf.mtu.unwrap_or(subnet.mtu);
    let ipam = Ipam::new(&conf.data_dir, &conf.name);
    let ip = ipam
        .lock(LOCK_TIMEOUT)
        .map_err(ipam_error)?
        .find(&env.container_id, &env.ifname)
        .map(|a| a.ip)
        .ok_or_else(|| {
            CniError::new(
                code::UNKNOWN_CONTAINER,
                format!(
                    "no address is allocated to container {} interface {}: ADD never ran or DEL already did",
                    env.container_id, env.ifname
                ),
            )
        })?;
    let want = Ipv4Net::new(ip, 32).expect("/32");
    if let Some(prev) = &prev
        && !prev.ips.iter().any(|c| c.address == want)
    {
        return Err(mismatch(format!(
            "prevResult does not list the allocated address {want}"
        )));
    }
    let names = AttachmentNames::of(&env.container_id, &env.ifname);
    let host = &names.host_ifname;
    let io =
        |what: &str, e: anyhow::Error| CniError::with_cause(code::IO_FAILURE, what.to_string(), &e);

    let nl = BlockingNetlink::open().map_err(|e| io("opening rtnetlink", e.into()))?;
    let link = nl
        .block_on(nl.link(host))
        .map_err(|e| io("reading the host link", e.into()))?
        .ok_or_else(|| mismatch(format!("host interface {host} is missing")))?;
    expect_link(&link, &names.host_mac, mtu, "host interface")?;
    let routes = nl
        .block_on(nl.routes())
        .map_err(|e| io("reading host routes", e.into()))?;
    if !routes
        .iter()
        .any(|r| r.dst == want && r.oif == Some(link.ifindex))
    {
        return Err(mismatch(format!(
            "the host route {want} dev {host} is missing"
        )));
    }

    let pod_if = env.ifname.clone();
    let host_mac = names.host_mac;
    let pod_mac = names.pod_mac;
    ns::run_in(&netns, || -> anyhow::Result<Result<(), CniError>> {
        let nl = BlockingNetlink::open()?;
        let Some(l) = nl.block_on(nl.link(&pod_if))? else {
            return Ok(Err(mismatch(format!(
                "interface {pod_if} is missing in {}",
                netns.display()
            ))));
        };
        if let Err(e) = expect_link(&l, &pod_mac, mtu, "pod interface") {
            return Ok(Err(e));
        }
        let addrs = nl.block_on(nl.addresses(l.ifindex))?;
        if !addrs.contains(&want) {
            return Ok(Err(mismatch(format!(
                "{pod_if} has addresses {addrs:?}, expected {want}"
            ))));
        }
        let routes = nl.block_on(nl.routes())?;
        let gw = POD_GATEWAY;
        if !routes.iter().any(|r| r.is_default_via(gw, l.ifindex)) {
            return Ok(Err(mismatch(format!(
                "the pod's default route via {gw} dev {pod_if} is missing (routes: {routes:?})"
            ))));
        }
        match nl.block_on(nl.permanent_neighbour(l.ifindex, POD_GATEWAY))? {
            Some(mac) if mac == host_mac => {}
            other => {
                return Ok(Err(mismatch(format!(
                    "the pod's neighbour entry for {gw} is {:?}, expected permanent {}",
                    other.map(|m| format_mac(&m)),
                    format_mac(&host_mac)
                ))));
            }
        }
        Ok(Ok(()))
    })
    .map_err(|e| io(&format!("inspecting {}", netns.display()), e))??;

    let maps = ready_maps(&pin_root, code::TRY_AGAIN_LATER)?;
    let endpoints = maps
        .endpoints()
        .map_err(|e| io("reading the endpoint map", e))?;
    let expected = EndpointInfo {
        host_ifindex: link.ifindex,
        pod_mac: names.pod_mac,
        host_mac: names.host_mac,
        flags: endpoint_flags(conf),
    };
    match endpoints.iter().find(|(a, _)| *a == ip) {
        Some((_, info)) if *info == expected => {}
        Some((_, info)) => {
            return Err(mismatch(format!(
                "endpoint map entry of {ip} is {info:?}, expected {expected:?}"
            )));
        }
        None => return Err(mismatch(format!("endpoint map has no entry for {ip}"))),
    }
    match pod_hook(conf) {
        datapath::PodHook::Tcx => {
            for (name, _) in datapath::POD_PROGRAMS {
                let pin = datapath::link_pin_path(&pin_root, name, host);
                if !pin.exists() {
                    return Err(mismatch(format!(
                        "{name} is not attached to {host} (no link pin at {})",
                        pin.display()
                    )));
                }
            }
        }
        datapath::PodHook::Clsact => {
            for (name, direction) in datapath::POD_PROGRAMS {
                let egress = direction == aya::programs::TcAttachType::Egress;
                let filters = nl
                    .block_on(nl.bpf_filters(link.ifindex, egress))
                    .map_err(|e| io("reading tc filters", e.into()))?;
                if !filters
                    .iter()
                    .any(|f| f.priority == datapath::POD_FILTER_PRIORITY && f.name == name)
                {
                    return Err(mismatch(format!(
                        "{name} is not attached to {host} (no cls_bpf filter of priority {} \
                         on its {} hook: {filters:?})",
                        datapath::POD_FILTER_PRIORITY,
                        if egress { "egress" } else { "ingress" }
                    )));
                }
            }
        }
    }
    Ok(())
}

fn expect_link(l: &netlink::LinkInfo, mac: &[u8; 6], mtu: u32, what: &str) -> CniResult<()> {
    if l.mac != Some(*mac) {
        return Err(mismatch(format!(
            "{what} {} has MAC {}, expected {}",
            l.name,
            l.mac.map(|m| format_mac(&m)).unwrap_or_default(),
            format_mac(mac)
        )));
    }
    if l.mtu != mtu {
        return Err(mismatch(format!(
            "{what} {} has MTU {}, expected {mtu}",
            l.name, l.mtu
        )));
    }
    if !l.up {
        return Err(mismatch(format!("{what} {} is down", l.name)));
    }
    Ok(())
}

pub fn gc(conf: &NetworkConfig, log: &Log) -> CniResult<()> {
    let valid = conf.valid_attachments.clone().ok_or_else(|| {
        CniError::invalid_config("field `cni.dev/valid-attachments` is missing (required by GC)")
    })?;
    let subnet = SubnetEnv::read(&conf.subnet_file).ok();
    let pin_root = pin_root(conf, subnet.as_ref());
    let mut maps = Maps::open_pinned(&pin_root)
        .map_err(|e| log.line(&format!("GC without datapath maps: {e:#}")))
        .ok();
    let ipam = Ipam::new(&conf.data_dir, &conf.name);
    let locked = match ipam.lock(LOCK_TIMEOUT) {
        Err(e @ IpamError::Corrupt { .. }) => {
            // Rebuilt from the node's links (the valid attachments name links made before
            // aliases), then collected as usual.
            log.line(&format!("GC: {e}; rebuilding it from the node's links"));
            let known: Vec<(String, String)> = valid
                .iter()
                .map(|v| (v.container_id.clone(), v.ifname.clone()))
                .collect();
            let rebuilt = recover::rebuild(
                &ipam,
                maps.as_ref(),
                &known,
                subnet.as_ref().map(|s| s.subnet),
                LOCK_TIMEOUT,
            )
            .map_err(|e| CniError::with_cause(code::IPAM_STORE, "rebuilding the IPAM store", &e))?;
            log.line(&format!(
                "GC: rebuilt {} with {} allocations (old file kept at {:?}); left out: {:?}",
                ipam.path().display(),
                rebuilt.state.allocations.len(),
                rebuilt.kept,
                rebuilt.skipped
            ));
            ipam.lock(LOCK_TIMEOUT)
        }
        other => other,
    };
    let mut locked = locked.map_err(ipam_error)?;
    let stale = locked.retain(|a| {
        valid
            .iter()
            .any(|v| v.container_id == a.container_id && v.ifname == a.ifname)
    });
    for a in &stale {
        let names = AttachmentNames::of(&a.container_id, &a.ifname);
        log.line(&format!(
            "GC: releasing {} of {}/{}",
            a.ip, a.container_id, a.ifname
        ));
        teardown(
            maps.as_mut(),
            &pin_root,
            &names.host_ifname,
            Some(a.ip),
            log,
        )?;
    }
    locked.commit().map_err(ipam_error)?;

    // What no allocation accounts for any more (a plugin killed between steps): endpoints of
    // this node's subnet, host-side links and link pins.
    let live_ips: Vec<Ipv4Addr> = locked.state.allocations.iter().map(|a| a.ip).collect();
    let live_links: Vec<String> = locked
        .state
        .allocations
        .iter()
        .map(|a| AttachmentNames::of(&a.container_id, &a.ifname).host_ifname)
        .collect();
    if let Some(maps) = maps.as_mut() {
        let endpoints = maps
            .endpoints()
            .map_err(|e| CniError::with_cause(code::DATAPATH, "reading endpoints", &e))?;
        for (ip, _) in endpoints {
            let ours = subnet.as_ref().is_some_and(|s| s.subnet.contains(&ip));
            if ours && !live_ips.contains(&ip) {
                log.line(&format!("GC: removing orphan endpoint {ip}"));
                let _ = maps.remove_endpoint(ip);
            }
        }
        for (ip, _) in maps.policy_pod_names().unwrap_or_default() {
            let ours = subnet.as_ref().is_some_and(|s| s.subnet.contains(&ip));
            if ours && !live_ips.contains(&ip) {
                log.line(&format!("GC: removing the orphan policy state of {ip}"));
                forget_policy(maps, ip, log);
            }
        }
    }
    let links = BlockingNetlink::open()
        .and_then(|nl| nl.block_on(nl.links()))
        .map_err(|e| CniError::with_cause(code::IO_FAILURE, "listing links", &e.into()))?;
    for l in links {
        if l.name.starts_with(HOST_IF_PREFIX) && !live_links.contains(&l.name) {
            log.line(&format!("GC: deleting orphan link {}", l.name));
            teardown(None, &pin_root, &l.name, None, log)?;
        }
    }
    let links_dir = datapath::pin_dir(&pin_root).join("links");
    if let Ok(entries) = std::fs::read_dir(&links_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let orphan = datapath::POD_PROGRAMS.iter().any(|(prog, _)| {
                name.strip_prefix(&format!("{prog}@")).is_some_and(|dev| {
                    dev.starts_with(HOST_IF_PREFIX) && !live_links.iter().any(|l| l == dev)
                })
            });
            if orphan {
                log.line(&format!("GC: removing orphan link pin {name}"));
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}

pub fn status(conf: &NetworkConfig) -> CniResult<()> {
    let subnet = node_subnet(conf, code::NOT_AVAILABLE)?;
    let pin_root = pin_root(conf, Some(&subnet));
    ready_maps(&pin_root, code::NOT_AVAILABLE)?;
    // Where ADD will write: a full or read-only data directory is "not available" too.
    std::fs::create_dir_all(&conf.data_dir)
        .with_context(|| format!("creating {}", conf.data_dir.display()))
        .map_err(|e| {
            CniError::with_cause(
                code::NOT_AVAILABLE,
                "the IPAM data directory is not writable",
                &e,
            )
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn conf(mtu: u32) -> NetworkConfig {
        NetworkConfig::parse(json!({
            "cniVersion": "1.1.0", "name": "weft", "type": "weft-cni", "mtu": mtu,
        }))
        .unwrap()
    }

    fn node(mtu: u32, underlay_mtu: u32) -> SubnetEnv {
        SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            mtu,
            underlay_mtu: Some(underlay_mtu),
            route_mtu: None,
            ipmasq: true,
            pin_root: PathBuf::from("/sys/fs/bpf/weft"),
        }
    }

    #[test]
    fn mtu_is_bounded_by_the_pod_mtu_rule_or_the_nodes_own() {
        // The default node: room for the largest overhead.
        assert_eq!(pod_mtu(&conf(1450), &node(1450, 1500)).unwrap(), 1450);
        let e = pod_mtu(&conf(1451), &node(1450, 1500)).unwrap_err();
        assert!(
            e.msg.contains("field `mtu`") && e.msg.contains("at most 1450"),
            "{}",
            e.msg
        );
        // A host-gw node whose Backend.MTU takes the whole underlay MTU: as large, not larger.
        assert_eq!(pod_mtu(&conf(1500), &node(1500, 1500)).unwrap(), 1500);
        let e = pod_mtu(&conf(1501), &node(1500, 1500)).unwrap_err();
        assert!(e.msg.contains("at most 1500"), "{}", e.msg);
    }
}

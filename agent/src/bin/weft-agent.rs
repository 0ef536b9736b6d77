//! `weft-agent`: the node daemon. Loads (or adopts) the pinned datapath, attaches it to the
//! underlay, acquires the node's pod subnet from the datastore, writes the subnet file for the
//! CNI plugin, and keeps the maps in line with the cluster's nodes. Never flushes anything on
//! exit: a restarted agent adopts pins and links and writes only what changed.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{
    Parser, ValueEnum,
    builder::{PossibleValuesParser, TypedValueParser},
};
use weft_agent::{
    bgp,
    config::FlannelNetConf,
    conntrack,
    control_loop::{ControlLoop, mode_policy, node_config},
    datapath::{Datapath, LoadOptions, Maps, XdpSetting},
    datastore::{
        Backoff, Datastore, HeldSubnet, LocalNode,
        etcd::{EtcdArgs, EtcdDatastore, SubnetTaken},
        kube::{KubeDatastore, KubeSource},
        static_file::StaticFile,
    },
    metrics::{self, Metrics},
    netlink::BlockingNetlink,
    netpol::{
        PolicyMetrics,
        controller::{Controller, PolicyEvent},
        etcd_source, kube_source,
    },
    node_net::{self, Underlay},
    reconcile::Reconciler,
    subnet_env::{self, SubnetEnv},
};
use weft_common::{
    CONFIG_DECAP_HOOK_MASK, CONFIG_F_ACCEPT_ROUTED, CONFIG_F_VXLAN_DEV, DEFAULT_PIN_ROOT,
    DecapHook, ENDPOINTS_MAX, HOST_PEER_DEV, NODES_MAX, ROUTES_MAX,
    conntrack::CT_MAX_DEFAULT,
    policy::{
        POLICY_ADDRS_MAX, POLICY_CIDRS_MAX, POLICY_ENDPOINTS_MAX, POLICY_NS_DEFAULTS_MAX,
        POLICY_PORT_BLOCKS_MAX, POLICY_RULES_MAX,
    },
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DatastoreKind {
    Etcd,
    Kube,
    Static,
}

#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about = "weft node agent: cluster state into the eBPF datapath"
)]
struct Args {
    /// Where node records live.
    #[arg(long, value_enum, default_value = "etcd")]
    datastore: DatastoreKind,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// flannel's net-conf.json; with etcd and without this flag, read from `<prefix>/config`.
    #[arg(long)]
    net_conf: Option<PathBuf>,
    /// Topology file for `--datastore static`.
    #[arg(long)]
    static_file: Option<PathBuf>,
    /// Underlay interface (default: the default route's).
    #[arg(long)]
    iface: Option<String>,
    /// Address announced to peers (default: the underlay interface's first IPv4 address).
    #[arg(long)]
    public_ip: Option<Ipv4Addr>,
    /// This node's name (Kubernetes node name; default: the hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// Root of the BPF pins.
    #[arg(long, default_value = DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// Subnet file the CNI plugin reads.
    #[arg(long, default_value = subnet_env::DEFAULT_PATH)]
    subnet_file: PathBuf,
    /// Address of the /healthz, /readyz and /metrics server (default: the node's address, port
    /// 9402).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Kubernetes API server URL (overrides the kubeconfig's; http:// for a `kubectl proxy`).
    #[arg(long)]
    kube_api: Option<String>,
    /// kubeconfig (its current context); default: KUBECONFIG, ~/.kube/config, in-cluster.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Install the CNI plugin binary and conflist (the DaemonSet's init step).
    #[arg(long)]
    install_cni: bool,
    /// With --install-cni: exit once installed.
    #[arg(long)]
    install_cni_only: bool,
    /// The CNI plugin binary to install (default: `weft-cni` beside this binary).
    #[arg(long)]
    cni_binary: Option<PathBuf>,
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// The CNI plugin's IPAM directory (`dataDir`, the one `--install-cni` writes): the agent
    /// finds its pods' network namespaces there, to change the MTU of their default routes on
    /// a live backend switch.
    #[arg(long, default_value = "/var/lib/cni/weft")]
    cni_data_dir: PathBuf,
    /// TTL of the etcd subnet lease in seconds (flannel's 24 h). A node away longer loses its
    /// subnet: it may be handed to another node once no never-used subnet is left.
    #[arg(long, default_value_t = 86_400)]
    lease_ttl: u64,
    /// Full resync period in seconds (re-reads the maps and repairs drift).
    #[arg(long, default_value_t = 30)]
    resync_interval: u64,
    /// Do not masquerade pod traffic leaving the cluster network.
    #[arg(long)]
    no_ip_masq: bool,
    /// Where tunnel packets are decapsulated: `auto` uses XDP where the underlay's driver runs
    /// it natively (not on a veth, not in generic mode) and tc elsewhere; `on` always XDP
    /// (generic mode if need be); `off` tc only.
    #[arg(long, default_value = "auto", value_parser = PossibleValuesParser::new(["auto", "on", "off"]).map(|s| s.parse::<XdpSetting>().expect("a listed value")))]
    xdp: XdpSetting,
    /// The same as `--xdp=off` (the flag of earlier versions).
    #[arg(long, conflicts_with = "xdp")]
    no_xdp: bool,
    /// Capacity of the datapath's conntrack map (flows). Applies when the map is created; a
    /// pinned map keeps its size until its pin is removed (e.g. at the next boot).
    #[arg(long, default_value_t = CT_MAX_DEFAULT, value_parser = clap::value_parser!(u32).range(1024..))]
    conntrack_max: u32,
    /// Capacity of the route map (other nodes' subnets). Applies when the map is created; a
    /// pinned map keeps its size until its pin is removed.
    #[arg(long, default_value_t = ROUTES_MAX, value_parser = clap::value_parser!(u32).range(1..))]
    routes_max: u32,
    /// Capacity of the node map (other nodes' addresses). As --routes-max.
    #[arg(long, default_value_t = NODES_MAX, value_parser = clap::value_parser!(u32).range(1..))]
    nodes_max: u32,
    /// Capacity of the endpoint map (this node's pods). As --routes-max.
    #[arg(long, default_value_t = ENDPOINTS_MAX, value_parser = clap::value_parser!(u32).range(1..))]
    endpoints_max: u32,
    /// Let plain traffic from hosts that are not cluster nodes reach this node's pods through
    /// the host stack (routed access to pod addresses, as BGP setups want). Off: only nodes
    /// on the underlay may send plain (unencapsulated) packets to pods.
    #[arg(long)]
    accept_routed_pod_traffic: bool,
    /// The cluster's Service network (kube-apiserver's `--service-cluster-ip-range`): a pod's
    /// connection to a Service address is judged by NetworkPolicy after kube-proxy translated
    /// it, against its backend. Without it, egress policies judge the Service address itself.
    #[arg(long)]
    service_cluster_ip_range: Option<ipnet::Ipv4Net>,
    /// Capacity of the NetworkPolicy endpoint map (local pods). Applies when the map is created.
    #[arg(long, default_value_t = POLICY_ENDPOINTS_MAX, value_parser = clap::value_parser!(u32).range(16..))]
    policy_endpoints_max: u32,
    /// Capacity of the NetworkPolicy address map (every pod address of the cluster).
    #[arg(long, default_value_t = POLICY_ADDRS_MAX, value_parser = clap::value_parser!(u32).range(16..))]
    policy_addrs_max: u32,
    /// Capacity of the NetworkPolicy ipBlock map (cidr and except boundaries).
    #[arg(long, default_value_t = POLICY_CIDRS_MAX, value_parser = clap::value_parser!(u32).range(16..))]
    policy_cidrs_max: u32,
    /// Capacity of the NetworkPolicy rule map.
    #[arg(long, default_value_t = POLICY_RULES_MAX, value_parser = clap::value_parser!(u32).range(16..))]
    policy_rules_max: u32,
    /// Capacity of the NetworkPolicy port bitmap map (port sets of more than 6 ranges).
    #[arg(long, default_value_t = POLICY_PORT_BLOCKS_MAX, value_parser = clap::value_parser!(u32).range(16..))]
    policy_port_blocks_max: u32,
    /// Capacity of the NetworkPolicy namespace map (isolation of new pods per namespace).
    #[arg(long, default_value_t = POLICY_NS_DEFAULTS_MAX, value_parser = clap::value_parser!(u32).range(16..))]
    policy_namespaces_max: u32,
    /// Directory of the `net.*` sysctls (a container mounts the host's /proc/sys/net elsewhere:
    /// /proc/sys is read-only in unprivileged containers).
    #[arg(long, default_value = "/proc/sys/net")]
    sysctl_net_dir: PathBuf,
    /// bgp backend: directory of the node's BIRD files (configuration, control socket, pid
    /// file).
    #[arg(long, default_value = "/run/weft/bird")]
    bgp_dir: PathBuf,
    /// bgp backend: this node's labels, matched by `Backend.Peers[].NodeSelector`
    /// (`key=value,...`; with `--datastore kube`, the Node object's labels when empty).
    #[arg(long)]
    node_labels: Option<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("weft-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn install_cni(args: &Args, conf_subnet_file: &Path) -> Result<()> {
    let binary = match &args.cni_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("agent binary has no directory")?
            .join("weft-cni"),
    };
    std::fs::create_dir_all(&args.cni_bin_dir)?;
    std::fs::create_dir_all(&args.cni_conf_dir)?;
    // Copy then rename: a runtime never executes half a binary.
    let tmp = args.cni_bin_dir.join(".weft-cni.tmp");
    std::fs::copy(&binary, &tmp)
        .with_context(|| format!("--install-cni: copying {}", binary.display()))?;
    std::fs::rename(&tmp, args.cni_bin_dir.join("weft-cni"))?;
    let conflist = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "weft",
        "plugins": [{
            "type": "weft-cni",
            "subnetFile": conf_subnet_file,
            "dataDir": args.cni_data_dir,
            "pinRoot": args.pin_root,
            // A `bandwidth` plugin appended to this list shapes a pod only if weft knows
            // (the pod then takes the stack, where the plugin's qdiscs are, and gets TCX
            // links, which coexist with the plugin's ingress qdisc).
            "capabilities": {"bandwidth": true},
        }]
    });
    let path = args.cni_conf_dir.join("10-weft.conflist");
    let tmp = args.cni_conf_dir.join(".10-weft.conflist.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&conflist)?)?;
    std::fs::rename(&tmp, &path)?;
    tracing::info!(bin = %args.cni_bin_dir.display(), conf = %path.display(), "installed the CNI plugin");
    Ok(())
}

fn open_datastore(args: &Args, runtime: &tokio::runtime::Handle) -> Result<Box<dyn Datastore>> {
    Ok(match args.datastore {
        DatastoreKind::Etcd => Box::new(EtcdDatastore::with_options(
            &args.etcd.etcd_endpoints,
            &args.etcd.options(),
            &args.etcd.etcd_prefix,
            args.lease_ttl,
        )?),
        DatastoreKind::Kube => Box::new(KubeDatastore::new(
            KubeSource {
                api: args.kube_api.clone(),
                kubeconfig: args.kubeconfig.clone(),
            },
            runtime.clone(),
        )?),
        DatastoreKind::Static => {
            let path = args
                .static_file
                .as_ref()
                .context("--static-file is required with --datastore static")?;
            Box::new(StaticFile::new(path)?)
        }
    })
}

fn load_net_conf(args: &Args, ds: &mut dyn Datastore) -> Result<FlannelNetConf> {
    if let Some(path) = &args.net_conf {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--net-conf: reading {}", path.display()))?;
        return FlannelNetConf::parse(&text)
            .with_context(|| format!("--net-conf {}", path.display()));
    }
    let mut backoff = Backoff::new(Duration::from_secs(5));
    loop {
        match ds.net_conf() {
            Ok(Some(text)) => {
                return FlannelNetConf::parse(&text).context("net-conf from the datastore");
            }
            Ok(None) => bail!("no --net-conf given and the datastore holds no config"),
            Err(e) => tracing::warn!("reading the net-conf from the datastore: {e:#}"),
        }
        std::thread::sleep(backoff.next_delay());
    }
}

/// This node's labels, matched by `Backend.Peers[].NodeSelector`: `--node-labels`, or with the
/// Kubernetes datastore (and selectors in use) the Node object's labels, read at start.
fn node_labels(
    args: &Args,
    conf: &FlannelNetConf,
    name: &str,
    runtime: &tokio::runtime::Handle,
) -> Result<BTreeMap<String, String>> {
    let labels = bgp::config::parse_labels(args.node_labels.as_deref().unwrap_or(""))?;
    let selectors = conf
        .backend
        .bgp
        .as_ref()
        .is_some_and(|b| b.peers.iter().any(|p| !p.node_selector.is_empty()));
    if !labels.is_empty() || !selectors || !matches!(args.datastore, DatastoreKind::Kube) {
        return Ok(labels);
    }
    let source = KubeSource {
        api: args.kube_api.clone(),
        kubeconfig: args.kubeconfig.clone(),
    };
    runtime
        .block_on(async {
            let client = source.client().await?;
            weft_agent::datastore::kube::node_labels(&client, name).await
        })
        .context("reading this node's labels (Backend.Peers[].NodeSelector)")
}

/// The `CONFIG_F_*` flags the agent's flags ask for.
fn config_flags(args: &Args) -> u16 {
    if args.accept_routed_pod_traffic {
        CONFIG_F_ACCEPT_ROUTED
    } else {
        0
    }
}

/// Collects expired conntrack entries in its own thread, a chunk per second, through its own
/// handle on the pinned map (the control loop owns the other maps).
fn spawn_conntrack_gc(pin_root: PathBuf, metrics: Arc<Metrics>) -> Result<()> {
    let mut maps = Maps::open_pinned(&pin_root)?;
    std::thread::Builder::new()
        .name("weft-ct-gc".into())
        .spawn(move || {
            let mut gc = conntrack::Gc::default();
            loop {
                match gc.step(&mut maps, conntrack::GC_BUDGET, conntrack::now_s()) {
                    Ok(step) => {
                        metrics.conntrack_gc_deleted.inc_by(step.deleted as u64);
                        if let Some(live) = step.pass_live {
                            metrics.conntrack_entries.set(live as i64);
                        }
                    }
                    Err(e) => tracing::warn!("conntrack GC: {e:#}"),
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })?;
    Ok(())
}

/// `weft_vxlan` as the control loop keeps it (`node_net::VxlanDevice`), warning once per
/// distinct failure.
struct AgentVxlanDevice {
    device: node_net::VxlanDevice,
    pin_root: PathBuf,
    nl: BlockingNetlink,
    last_error: Option<String>,
}

impl AgentVxlanDevice {
    fn new(device: node_net::VxlanDevice, pin_root: PathBuf) -> Result<Self> {
        Ok(Self {
            device,
            pin_root,
            nl: BlockingNetlink::open()?,
            last_error: None,
        })
    }

    /// Sets the device up (or, unless `refresh`, checks it is), logging why it cannot be.
    /// `refresh` attaches this agent's `from_vxlan` even to a device that has one (a restart
    /// switches the program in place).
    fn ensure_logged(&mut self, refresh: bool) -> bool {
        if !refresh && self.device.ready(&self.nl) {
            self.last_error = None;
            return true;
        }
        match self.device.ensure(&self.nl, &self.pin_root) {
            Ok(()) => {
                self.last_error = None;
                true
            }
            Err(e) => {
                let e = format!("{e:#}");
                if self.last_error.as_ref() != Some(&e) {
                    tracing::warn!(
                        "VXLAN is decapsulated in tc on the underlay, without GRO (slower TCP), until {} can be set up: {e}",
                        weft_common::VXLAN_DEV
                    );
                }
                self.last_error = Some(e);
                false
            }
        }
    }
}

impl weft_agent::control_loop::VxlanDeviceControl for AgentVxlanDevice {
    fn ensure(&mut self, port: u16) -> bool {
        self.device.port = port;
        self.ensure_logged(false)
    }
}

/// The datapath as `program_datapath` left it.
struct Programmed {
    dp: Datapath,
    /// The decapsulation hook chosen.
    hook: DecapHook,
    /// With the tc hook: `weft_vxlan`, and whether VXLAN goes through it.
    vxlan_device: Option<(AgentVxlanDevice, bool)>,
}

/// Loads or adopts the datapath and attaches it. On a restart every step swaps in place: the
/// maps are the pinned ones, the links are atomically switched to the new programs, the device
/// is adopted.
fn program_datapath(
    args: &Args,
    conf: &FlannelNetConf,
    underlay: &Underlay,
    path_mtu: u32,
    nl: &BlockingNetlink,
) -> Result<Programmed> {
    let options = LoadOptions {
        conntrack_max: args.conntrack_max,
        policy: weft_agent::datapath::PolicyCapacities {
            endpoints: args.policy_endpoints_max,
            addrs: args.policy_addrs_max,
            cidrs: args.policy_cidrs_max,
            rules: args.policy_rules_max,
            port_blocks: args.policy_port_blocks_max,
            ns_defaults: args.policy_namespaces_max,
        },
        routes_max: args.routes_max,
        nodes_max: args.nodes_max,
        endpoints_max: args.endpoints_max,
    };
    let mut dp = Datapath::load_pinned_with(&args.pin_root, &options).with_context(|| {
        format!(
            "loading the datapath pinned under {}",
            args.pin_root.display()
        )
    })?;
    for (map, requested) in options.sizes() {
        let capacity = dp.capacity(map)?;
        if capacity != requested {
            tracing::warn!(
                map,
                pinned = capacity,
                requested,
                "a pinned map keeps its size: the requested one applies once its pin is removed (e.g. at the next boot)"
            );
        }
    }
    dp.pin_programs()?;
    let mut config = node_config(conf, underlay);
    config.flags |= config_flags(args);
    // The programs read the config once attached, so it is written first; with the pinned
    // config's hook bits, so a restart that keeps the hook writes the same config twice (a
    // restart changes nothing the datapath reads, not even for a moment). VXLAN keeps going
    // through `weft_vxlan` if the device is still there as it must be.
    let vxlan = node_net::VxlanDevice {
        port: conf.backend.port,
        // What VXLAN leaves room for, whatever the backend now.
        mtu: weft_common::max_pod_mtu(underlay.mtu).min(path_mtu),
        mac: node_net::vtep_mac_for(underlay.node_ip),
        address: underlay.node_ip,
    };
    if let Ok(pinned) = dp.maps.config() {
        config.flags |= pinned.flags & CONFIG_DECAP_HOOK_MASK;
        if pinned.flags & CONFIG_F_VXLAN_DEV != 0 && vxlan.ready(nl) {
            config.flags |= CONFIG_F_VXLAN_DEV;
        }
    }
    dp.maps.set_config(&config)?;
    let xdp = if args.no_xdp {
        XdpSetting::Off
    } else {
        args.xdp
    };
    let hook = dp.attach_underlay(&underlay.name, xdp)?;
    tracing::info!(
        hook = hook.hook(),
        reason = hook.reason(),
        "tunnel decapsulation"
    );
    config.flags = (config.flags & !CONFIG_DECAP_HOOK_MASK) | hook.flags();
    // The tc hook sends VXLAN through `weft_vxlan` (the kernel's vxlan socket aggregates it
    // before decapsulating: GRO); XDP decapsulates before GRO and needs no device.
    let device = if hook.hook() == "tc" {
        let mut device = AgentVxlanDevice::new(vxlan, args.pin_root.clone())?;
        let up = device.ensure_logged(true);
        if up {
            config.flags |= CONFIG_F_VXLAN_DEV;
        } else {
            config.flags &= !CONFIG_F_VXLAN_DEV;
        }
        tracing::info!(
            device = weft_common::VXLAN_DEV,
            up,
            "VXLAN decapsulation through the kernel's vxlan socket"
        );
        Some((device, up))
    } else {
        None
    };
    if device.is_none() {
        config.flags &= !CONFIG_F_VXLAN_DEV;
    }
    dp.maps.set_config(&config)?;
    if device.is_none() && nl.block_on(nl.link(weft_common::VXLAN_DEV))?.is_some() {
        // XDP decapsulates now, and the config no longer sends VXLAN to the device.
        node_net::VxlanDevice::remove(nl, &args.pin_root)?;
    }
    nl.block_on(node_net::ensure_host_link(
        nl,
        conf.network,
        underlay.node_ip,
        path_mtu,
    ))?;
    dp.attach_from_host(HOST_PEER_DEV)?;
    let pods = dp.reattach_pods()?;
    tracing::info!(pods, "datapath programmed");
    Ok(Programmed {
        dp,
        hook,
        vxlan_device: device,
    })
}

/// NetworkPolicy: the world's source for the datastore in use, and the controller writing the
/// policy maps, each on its own thread (the control loop is untouched by policy changes).
fn start_policy(
    args: &Args,
    local: &LocalNode,
    held: HeldSubnet,
    runtime: &tokio::runtime::Handle,
    metrics: Arc<PolicyMetrics>,
) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    match args.datastore {
        DatastoreKind::Etcd => {
            let client = args.etcd.client()?;
            let (c, prefix) = (client.clone(), args.etcd.etcd_prefix.clone());
            std::thread::Builder::new()
                .name("policy-etcd".into())
                .spawn(move || etcd_source::watch_loop(c, prefix, tx))?;
            let publisher = etcd_source::PodPublisher::new(
                client,
                &args.etcd.etcd_prefix,
                &local.name,
                local.public_ip,
                args.lease_ttl,
            );
            let pins = args.pin_root.clone();
            std::thread::Builder::new()
                .name("policy-pods".into())
                .spawn(move || {
                    etcd_source::publish_loop(publisher, pins, held, Duration::from_millis(100))
                })?;
        }
        DatastoreKind::Kube => {
            let source = KubeSource {
                api: args.kube_api.clone(),
                kubeconfig: args.kubeconfig.clone(),
            };
            let client = runtime.block_on(source.client())?;
            kube_source::spawn(runtime, source, client, tx);
        }
        DatastoreKind::Static => {
            // No policy source: no pod is isolated.
            let _ = tx.send(PolicyEvent::Synced);
            std::mem::forget(tx);
        }
    }
    let controller = Controller::new(
        &local.name,
        Maps::open_pinned(&args.pin_root)?,
        metrics,
        args.service_cluster_ip_range,
    )?;
    std::thread::Builder::new()
        .name("policy".into())
        .spawn(move || {
            if let Err(e) = controller.run(rx) {
                tracing::error!("the policy controller stopped: {e:#}");
            }
        })?;
    Ok(())
}

fn run(args: Args) -> Result<()> {
    if args.install_cni {
        install_cni(&args, &args.subnet_file)?;
        if args.install_cni_only {
            return Ok(());
        }
    }
    node_net::set_sysctl_net_dir(args.sysctl_net_dir.clone());
    // Kubernetes, the metrics server and netlink run on this runtime; the control loop runs on
    // the main thread and takes datastore events from a channel.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("weft-io")
        .build()?;
    let mut ds = open_datastore(&args, runtime.handle())?;
    let conf = load_net_conf(&args, ds.as_mut())?;
    let nl = BlockingNetlink::open()?;
    let underlay = nl.block_on(node_net::detect_underlay(
        &nl,
        args.iface.as_deref(),
        args.public_ip,
    ))?;
    conf.check_mtu(underlay.mtu).with_context(|| {
        format!(
            "net-conf (the underlay {} has MTU {})",
            underlay.name, underlay.mtu
        )
    })?;
    let pod_mtu = conf.pod_mtu(underlay.mtu);
    let path_mtu = conf.path_mtu(underlay.mtu);
    tracing::info!(
        iface = %underlay.name, node_ip = %underlay.node_ip, network = %conf.network,
        backend = conf.backend.kind.name(), direct_routing = conf.backend.direct_routing, pod_mtu,
        path_mtu, "starting"
    );
    node_net::set_sysctls(&underlay)?;
    let Programmed {
        dp,
        hook,
        vxlan_device,
    } = program_datapath(&args, &conf, &underlay, path_mtu, &nl)?;

    let mut metrics = Metrics::new(Some(args.pin_root.clone()));
    let policy_metrics = Arc::new(PolicyMetrics::new());
    policy_metrics.register(metrics.registry_mut(), args.pin_root.clone());
    let metrics = Arc::new(metrics);
    let metrics_addr = args
        .metrics_addr
        .unwrap_or_else(|| SocketAddr::from((underlay.node_ip, metrics::DEFAULT_PORT)));
    let addr = runtime.block_on(metrics::serve(metrics_addr, metrics.clone()))?;
    tracing::info!(%addr, "serving /healthz /readyz /metrics");
    metrics
        .conntrack_capacity
        .set(i64::from(dp.conntrack_capacity()?));
    spawn_conntrack_gc(args.pin_root.clone(), metrics.clone())?;

    let local = LocalNode {
        name: args.node_name.clone().unwrap_or_else(hostname),
        public_ip: underlay.node_ip,
        backend: conf.backend.kind,
        vtep_mac: node_net::vtep_mac_for(underlay.node_ip),
        previous_subnet: SubnetEnv::read(&args.subnet_file).ok().map(|e| e.subnet),
    };
    let fence = Fence {
        pin_root: args.pin_root.clone(),
        subnet_file: args.subnet_file.clone(),
        metrics: metrics.clone(),
        held: HeldSubnet::default(),
    };
    let mut backoff = Backoff::new(Duration::from_secs(5));
    let subnet = loop {
        match ds.acquire(&local, &conf) {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!("acquiring the node's subnet: {e:#}");
                if let Some(taken) = e.downcast_ref::<SubnetTaken>() {
                    fence.lost(taken.subnet, &taken.to_string());
                }
            }
        }
        metrics.beat();
        std::thread::sleep(backoff.next_delay());
    };
    tracing::info!(%subnet, "subnet acquired");
    // The pods' path MTU now: the control loop changes it on a live backend switch.
    let current_path_mtu = Arc::new(AtomicU32::new(path_mtu));
    let subnet_env = {
        let current = current_path_mtu.clone();
        move |args: &Args, conf: &FlannelNetConf, subnet| SubnetEnv {
            network: conf.network,
            subnet,
            mtu: pod_mtu,
            underlay_mtu: Some(underlay.mtu),
            route_mtu: Some(current.load(Ordering::Relaxed)).filter(|m| *m < pod_mtu),
            ipmasq: !args.no_ip_masq,
            pin_root: args.pin_root.clone(),
        }
    };
    subnet_env(&args, &conf, subnet).write(&args.subnet_file)?;
    fence.holds(subnet);
    if !args.no_ip_masq {
        let fw = node_net::ensure_masquerade(conf.network)?;
        tracing::info!(?fw, "masquerading pod traffic leaving {}", conf.network);
    }

    start_policy(
        &args,
        &local,
        fence.held.clone(),
        runtime.handle(),
        policy_metrics,
    )?;

    // BIRD for the bgp backend, driven by the control loop (idle for other backends, ready for
    // a live switch to bgp).
    let bgp = bgp::Controller::new(
        bgp::Files {
            dir: args.bgp_dir.clone(),
        },
        bgp::LocalNode {
            name: local.name.clone(),
            ip: underlay.node_ip,
            underlay_subnet: underlay.subnet,
            underlay_iface: underlay.name.clone(),
            subnets: vec![subnet],
            labels: node_labels(&args, &conf, &local.name, runtime.handle())?,
        },
        conf.network,
    );

    let (tx, rx) = mpsc::channel();
    ds.run(tx)?;
    let rec = Reconciler::new(
        mode_policy(&conf, &underlay, Arc::default()),
        subnet,
        underlay.node_ip,
    )
    .with_local_name(&local.name);
    let on_local_subnet = {
        let (args, conf, fence) = (args.clone(), conf.clone(), fence.clone());
        move |subnet| {
            subnet_env(&args, &conf, subnet).write(&args.subnet_file)?;
            fence.holds(subnet);
            Ok(())
        }
    };
    let on_subnet_lost = move |subnet: ipnet::Ipv4Net| {
        fence.lost(
            subnet,
            &format!("subnet {subnet}, this node's before, is leased to another node now"),
        );
        Ok(())
    };
    let fixed_mtu = conf.backend.mtu;
    let mut control = ControlLoop::new(
        dp.maps,
        rec,
        conf,
        underlay,
        metrics,
        Duration::from_secs(args.resync_interval),
        Instant::now(),
    )
    // The hook's bits too, so a live backend switch keeps them for `weft status`.
    .config_flags(config_flags(&args) | hook.flags())
    .bgp(Box::new(bgp))
    .watch_net_conf(args.net_conf.clone(), fixed_mtu)
    // Pods from before a restart get the path MTU at the loop's first resync too.
    .path_mtu(Box::new(node_net::PodPathMtu::new(
        args.subnet_file.clone(),
        args.cni_data_dir.clone(),
        current_path_mtu,
    )))
    .on_local_subnet(on_local_subnet)
    .on_subnet_lost(on_subnet_lost);
    if let Some((device, up)) = vxlan_device {
        control = control.vxlan_device(Box::new(device), up);
    }
    control.run(rx)
}

/// What the agent does when this node's subnet changes hands: local pods whose addresses are
/// not this node's any more are cut off (`node_net::fence_endpoints`), and while the node holds
/// no subnet the subnet file is gone (the CNI plugin then answers "try again later" instead of
/// handing out another node's addresses) and `/readyz` says why. `held` tells the etcd
/// publisher of pod addresses which addresses are this node's.
#[derive(Clone)]
struct Fence {
    pin_root: PathBuf,
    subnet_file: PathBuf,
    metrics: Arc<Metrics>,
    held: HeldSubnet,
}

impl Fence {
    /// This node holds `subnet`: pods outside it are not this node's.
    fn holds(&self, subnet: ipnet::Ipv4Net) {
        self.held.set(Some(subnet));
        self.metrics.set_subnet_lost(None);
        self.fence(Some(subnet), None);
    }

    /// This node lost `subnet` to another node and holds none.
    fn lost(&self, subnet: ipnet::Ipv4Net, why: &str) {
        self.held.set(None);
        match std::fs::remove_file(&self.subnet_file) {
            Ok(()) => tracing::warn!(
                file = %self.subnet_file.display(),
                "removed the subnet file: no pod can be created until this node holds a subnet"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::error!("removing {}: {e}", self.subnet_file.display()),
        }
        self.metrics
            .set_subnet_lost(Some(format!("{why}, and no other subnet is free")));
        self.fence(None, Some(subnet));
    }

    fn fence(&self, keep: Option<ipnet::Ipv4Net>, lost: Option<ipnet::Ipv4Net>) {
        let fenced = Maps::open_pinned(&self.pin_root).and_then(|mut maps| {
            let nl = BlockingNetlink::open()?;
            node_net::fence_endpoints(&mut maps, &nl, keep, lost)
        });
        match fenced {
            Ok(ips) => {
                self.metrics.fenced_endpoints.inc_by(ips.len() as u64);
            }
            Err(e) => tracing::error!("cutting off pods of a subnet this node lost: {e:#}"),
        }
    }
}

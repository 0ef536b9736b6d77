//! `weft-agent`: the node daemon. Loads (or adopts) the pinned datapath, attaches it to the
//! underlay, acquires the node's pod subnet from the datastore, writes the subnet file for the
//! CNI plugin, and keeps the maps in line with the cluster's nodes. Never flushes anything on
//! exit: a restarted agent adopts pins and links and writes only what changed.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, atomic::Ordering::Relaxed, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, ValueEnum};
use weft_agent::{
    bgp,
    config::NetConf,
    datapath::Datapath,
    datastore::{
        Backoff, Datastore, Event, LocalNode,
        etcd::{DEFAULT_PREFIX, EtcdDatastore},
        kube::{KubeClient, KubeDatastore},
        static_file::StaticFile,
    },
    metrics::{self, Metrics},
    node_net::{self, Underlay},
    reconcile::{ModePolicy, Reconciler},
    subnet_env::{self, SubnetEnv},
};
use weft_common::{CONFIG_F_READY, DEFAULT_PIN_ROOT, HOST_PEER_DEV, NodeConfig};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DatastoreKind {
    Etcd,
    Kube,
    Static,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "weft node agent: cluster state into the eBPF datapath"
)]
struct Args {
    /// Where node records live.
    #[arg(long, value_enum, default_value = "etcd")]
    datastore: DatastoreKind,
    /// etcd client URLs, comma-separated (http://).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: Vec<String>,
    /// etcd key prefix (flannel's layout).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    etcd_prefix: String,
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
    /// Address of the /healthz, /readyz and /metrics server.
    #[arg(long, default_value = "127.0.0.1:9402")]
    metrics_addr: SocketAddr,
    /// Kubernetes API base URL (http://, e.g. a `kubectl proxy`).
    #[arg(long)]
    kube_api: Option<String>,
    /// kubeconfig to take the API server and token from.
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
    /// TTL of the etcd subnet lease in seconds (renewed every third of it).
    #[arg(long, default_value_t = 60)]
    lease_ttl: u64,
    /// Full resync period in seconds (re-reads the maps and repairs drift).
    #[arg(long, default_value_t = 30)]
    resync_interval: u64,
    /// Do not masquerade pod traffic leaving the cluster network.
    #[arg(long)]
    no_ip_masq: bool,
    /// Attach the underlay decapsulation in tc only (no XDP).
    #[arg(long)]
    no_xdp: bool,
    /// [bgp] Directory of the node's BIRD files: configuration, control socket, pid file.
    #[arg(long, default_value = "/run/weft/bird")]
    bgp_dir: PathBuf,
    /// [bgp] This node's labels, matched by `Peers[].NodeSelector` (`key=value,...`).
    #[arg(long, default_value = "")]
    node_labels: String,
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
            "dataDir": "/var/lib/cni/weft",
            "pinRoot": args.pin_root,
        }]
    });
    let path = args.cni_conf_dir.join("10-weft.conflist");
    let tmp = args.cni_conf_dir.join(".10-weft.conflist.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&conflist)?)?;
    std::fs::rename(&tmp, &path)?;
    tracing::info!(bin = %args.cni_bin_dir.display(), conf = %path.display(), "installed the CNI plugin");
    Ok(())
}

fn open_datastore(args: &Args) -> Result<Box<dyn Datastore>> {
    Ok(match args.datastore {
        DatastoreKind::Etcd => Box::new(EtcdDatastore::new(
            &args.etcd_endpoints,
            &args.etcd_prefix,
            args.lease_ttl,
        )?),
        DatastoreKind::Kube => Box::new(KubeDatastore::new(KubeClient::new(
            args.kube_api.as_deref(),
            args.kubeconfig.as_deref(),
        )?)),
        DatastoreKind::Static => {
            let path = args
                .static_file
                .as_ref()
                .context("--static-file is required with --datastore static")?;
            Box::new(StaticFile::new(path)?)
        }
    })
}

fn load_net_conf(args: &Args, ds: &mut dyn Datastore) -> Result<NetConf> {
    if let Some(path) = &args.net_conf {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--net-conf: reading {}", path.display()))?;
        return NetConf::parse(&text).with_context(|| format!("--net-conf {}", path.display()));
    }
    let mut backoff = Backoff::new(Duration::from_secs(5));
    loop {
        match ds.net_conf() {
            Ok(Some(text)) => {
                return NetConf::parse(&text).context("net-conf from the datastore");
            }
            Ok(None) => bail!("no --net-conf given and the datastore holds no config"),
            Err(e) => tracing::warn!("reading the net-conf from the datastore: {e:#}"),
        }
        std::thread::sleep(backoff.next_delay());
    }
}

fn node_config(conf: &NetConf, underlay: &Underlay) -> NodeConfig {
    NodeConfig {
        node_ip: underlay.node_ip.octets(),
        underlay_ifindex: underlay.ifindex,
        vni: conf.backend.vni,
        vxlan_port: conf.backend.port,
        flags: CONFIG_F_READY,
        vtep_mac: node_net::vtep_mac_for(underlay.node_ip),
        _pad: [0; 2],
        // [bgp] The table bgp routes are looked up in.
        bgp_table: conf
            .backend
            .bgp
            .as_ref()
            .map_or(weft_common::BGP_TABLE_DEFAULT, |b| b.table),
    }
}

/// [bgp] This node's labels, matched by `Peers[].NodeSelector`: `--node-labels`, or with the
/// Kubernetes datastore (and selectors in use) the Node object's labels, read at start.
fn node_labels(
    args: &Args,
    conf: &NetConf,
    name: &str,
) -> Result<std::collections::BTreeMap<String, String>> {
    let mut labels = bgp::config::parse_labels(&args.node_labels)?;
    let selectors = conf
        .backend
        .bgp
        .as_ref()
        .is_some_and(|b| b.peers.iter().any(|p| !p.node_selector.is_empty()));
    if labels.is_empty() && selectors && matches!(args.datastore, DatastoreKind::Kube) {
        let node = KubeClient::new(args.kube_api.as_deref(), args.kubeconfig.as_deref())?
            .get_node(name)
            .context("reading this node's labels (Peers[].NodeSelector)")?;
        for (k, v) in node["metadata"]["labels"].as_object().into_iter().flatten() {
            if let Some(v) = v.as_str() {
                labels.insert(k.clone(), v.to_string());
            }
        }
    }
    Ok(labels)
}

/// How peers are reached: the backend's policy, and [bgp] the routes BIRD installed.
fn mode_policy(conf: &NetConf, underlay: &Underlay, bgp: &bgp::Controller) -> ModePolicy {
    ModePolicy {
        backend: conf.backend.kind,
        direct_routing: conf.backend.direct_routing,
        underlay_subnet: underlay.subnet,
        bgp: bgp.route_modes(),
    }
}

/// Watches `--net-conf` for changes a node can apply live: the backend (type, DirectRouting,
/// VNI, port). Pods are untouched: their MTU already leaves room for the largest overhead.
struct NetConfWatch {
    path: Option<PathBuf>,
    mtime: Option<std::time::SystemTime>,
}

impl NetConfWatch {
    fn mtime(path: &Path) -> Option<std::time::SystemTime> {
        std::fs::metadata(path).and_then(|m| m.modified()).ok()
    }

    /// The new config when the file changed to a valid one.
    fn poll(&mut self, current: &NetConf) -> Option<NetConf> {
        let path = self.path.as_ref()?;
        let mtime = Self::mtime(path);
        if mtime == self.mtime {
            return None;
        }
        self.mtime = mtime;
        let new = match std::fs::read_to_string(path)
            .map_err(anyhow::Error::from)
            .and_then(|t| NetConf::parse(&t))
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("ignoring the changed {}: {e:#}", path.display());
                return None;
            }
        };
        if new.network != current.network
            || new.subnet_len != current.subnet_len
            || new.backend.mtu != current.backend.mtu
        {
            tracing::warn!(
                "Network, SubnetLen and MTU changes take effect at the next agent start"
            );
        }
        if new.backend == current.backend {
            return None;
        }
        Some(NetConf {
            backend: new.backend,
            ..current.clone()
        })
    }
}

/// Loads or adopts the datapath and attaches it. On a restart every step swaps in place: the
/// maps are the pinned ones, the links are atomically switched to the new programs.
fn program_datapath(
    args: &Args,
    conf: &NetConf,
    underlay: &Underlay,
    pod_mtu: u32,
) -> Result<Datapath> {
    let mut dp = Datapath::load_pinned(&args.pin_root).with_context(|| {
        format!(
            "loading the datapath pinned under {}",
            args.pin_root.display()
        )
    })?;
    dp.pin_programs()?;
    dp.maps.set_config(&node_config(conf, underlay))?;
    dp.attach_underlay(&underlay.name, !args.no_xdp)?;
    node_net::ensure_host_link(conf.network, underlay.node_ip, pod_mtu)?;
    dp.attach_from_host(HOST_PEER_DEV)?;
    let pods = dp.reattach_pods()?;
    tracing::info!(pods, "datapath programmed");
    Ok(dp)
}

fn write_subnet_file(
    args: &Args,
    conf: &NetConf,
    subnet: ipnet::Ipv4Net,
    pod_mtu: u32,
) -> Result<()> {
    SubnetEnv {
        network: conf.network,
        subnet,
        mtu: pod_mtu,
        ipmasq: !args.no_ip_masq,
        pin_root: args.pin_root.clone(),
    }
    .write(&args.subnet_file)
}

fn run(args: Args) -> Result<()> {
    if args.install_cni {
        install_cni(&args, &args.subnet_file)?;
        if args.install_cni_only {
            return Ok(());
        }
    }
    let mut ds = open_datastore(&args)?;
    let conf = load_net_conf(&args, ds.as_mut())?;
    let underlay = node_net::detect_underlay(args.iface.as_deref(), args.public_ip)?;
    let pod_mtu = conf.pod_mtu(underlay.mtu);
    tracing::info!(
        iface = %underlay.name, node_ip = %underlay.node_ip, network = %conf.network,
        backend = conf.backend.kind.name(), direct_routing = conf.backend.direct_routing, pod_mtu,
        "starting"
    );
    node_net::set_sysctls(&underlay)?;
    let mut dp = program_datapath(&args, &conf, &underlay, pod_mtu)?;

    let metrics = Arc::new(Metrics::default());
    metrics.beat();
    let addr = metrics::serve(args.metrics_addr, metrics.clone(), args.pin_root.clone())?;
    tracing::info!(%addr, "serving /healthz /readyz /metrics");

    let local = LocalNode {
        name: args.node_name.clone().unwrap_or_else(hostname),
        public_ip: underlay.node_ip,
        backend: conf.backend.kind,
        vtep_mac: node_net::vtep_mac_for(underlay.node_ip),
        previous_subnet: SubnetEnv::read(&args.subnet_file).ok().map(|e| e.subnet),
    };
    let mut backoff = Backoff::new(Duration::from_secs(5));
    let subnet = loop {
        match ds.acquire(&local, &conf) {
            Ok(s) => break s,
            Err(e) => tracing::warn!("acquiring the node's subnet: {e:#}"),
        }
        metrics.beat();
        std::thread::sleep(backoff.next_delay());
    };
    tracing::info!(%subnet, "subnet acquired");
    write_subnet_file(&args, &conf, subnet, pod_mtu)?;
    if !args.no_ip_masq {
        let fw = node_net::ensure_masquerade(conf.network)?;
        tracing::info!(?fw, "masquerading pod traffic leaving {}", conf.network);
    }

    // [bgp] BIRD for the bgp backend, driven by the reconcile loop (idle for other backends).
    let mut bgp = bgp::Controller::new(
        bgp::Files {
            dir: args.bgp_dir.clone(),
        },
        bgp::LocalNode {
            name: local.name.clone(),
            ip: underlay.node_ip,
            underlay_subnet: underlay.subnet,
            underlay_iface: underlay.name.clone(),
            subnets: vec![subnet],
            labels: node_labels(&args, &conf, &local.name)?,
        },
        conf.network,
    );
    bgp.set_config(conf.backend.bgp.as_ref());

    let (tx, rx) = mpsc::channel();
    ds.run(tx)?;
    let mut rec = Reconciler::new(
        mode_policy(&conf, &underlay, &bgp),
        subnet,
        underlay.node_ip,
    );
    reconcile_loop(
        &args, &conf, &underlay, pod_mtu, &mut dp, &mut rec, &mut bgp, rx, &metrics,
    )
}

#[allow(clippy::too_many_arguments)]
fn reconcile_loop(
    args: &Args,
    conf: &NetConf,
    underlay: &Underlay,
    pod_mtu: u32,
    dp: &mut Datapath,
    rec: &mut Reconciler,
    bgp: &mut bgp::Controller,
    rx: mpsc::Receiver<Event>,
    metrics: &Metrics,
) -> Result<()> {
    let resync_every = Duration::from_secs(args.resync_interval.max(1));
    // The first apply is a resync: it adopts what the maps hold.
    let mut next_resync = Instant::now();
    let mut retry_at: Option<Instant> = None;
    let mut dirty = false;
    let mut backoff = Backoff::new(Duration::from_secs(10));
    let mut conf = conf.clone();
    let mut conf_watch = NetConfWatch {
        path: args.net_conf.clone(),
        mtime: args.net_conf.as_deref().and_then(NetConfWatch::mtime),
    };
    loop {
        let now = Instant::now();
        let wake = retry_at.map_or(next_resync, |r| r.min(next_resync));
        // Wakes at least every second to notice net-conf changes.
        let timeout = wake
            .saturating_duration_since(now)
            .min(Duration::from_secs(1));
        let mut first = match rx.recv_timeout(timeout) {
            Ok(ev) => Some(ev),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the datastore stopped"),
        };
        // Take everything queued at once: a relist and a burst of events is one apply.
        while let Some(ev) = first.take().or_else(|| rx.try_recv().ok()) {
            match &ev {
                Event::Connected(c) => {
                    metrics.datastore_connected.store(*c, Relaxed);
                }
                Event::LocalSubnet(s) => {
                    tracing::warn!(subnet = %s, "this node's subnet changed");
                    write_subnet_file(args, &conf, *s, pod_mtu)?;
                }
                _ => {}
            }
            dirty |= rec.handle(ev);
        }
        if let Some(new) = conf_watch.poll(&conf) {
            tracing::info!(
                backend = new.backend.kind.name(),
                direct_routing = new.backend.direct_routing,
                vni = new.backend.vni,
                port = new.backend.port,
                "backend changed: re-programming every peer"
            );
            dp.maps.set_config(&node_config(&new, underlay))?;
            // [bgp] Starts, reconfigures or retires BIRD.
            bgp.set_config(new.backend.bgp.as_ref());
            rec.set_policy(mode_policy(&new, underlay, bgp));
            conf = new;
            dirty = true;
        }
        // [bgp] The complete node list for BIRD's sessions and filters; BIRD's routes back.
        if dirty && rec.synced {
            let nodes = rec
                .remote_leases()
                .fold(
                    std::collections::BTreeMap::<Ipv4Addr, Vec<_>>::new(),
                    |mut m, l| {
                        m.entry(l.public_ip).or_default().push(l.subnet);
                        m
                    },
                )
                .into_iter()
                .map(|(ip, subnets)| bgp::PeerNode { ip, subnets })
                .collect();
            bgp.set_cluster(vec![rec.local_subnet], nodes);
        }
        let table = bgp.poll();
        if table.routes {
            // Next hops cached from weft's table may be stale.
            dp.maps.flush_next_hops()?;
        }
        if table.learned {
            rec.set_policy(mode_policy(&conf, underlay, bgp));
            dirty = true;
        }
        if let Ok(mut status) = metrics.bgp.lock() {
            *status = bgp.status();
        }
        metrics.beat();
        let now = Instant::now();
        let resync = now >= next_resync;
        let retry = retry_at.is_some_and(|r| now >= r);
        if !(dirty || resync || retry) || !rec.synced {
            continue;
        }
        let result = if resync {
            next_resync = now + resync_every;
            rec.resync(&mut dp.maps)
        } else {
            rec.apply(&mut dp.maps)
        };
        metrics.peers.store(rec.peer_count() as u64, Relaxed);
        metrics
            .offlink_peers
            .store(rec.offlink_count() as u64, Relaxed);
        match result {
            Ok(report) => {
                metrics.record_reconcile(report.duration, report.writes, true);
                if report.writes > 0 {
                    tracing::info!(writes = report.writes, peers = rec.peer_count(), took = ?report.duration, "reconciled");
                }
                dirty = false;
                retry_at = None;
                backoff.reset();
                if !metrics.ready.swap(true, Relaxed) {
                    tracing::info!("ready");
                }
            }
            Err(e) => {
                metrics.record_reconcile(now.elapsed(), 0, false);
                let delay = backoff.next_delay();
                tracing::warn!("reconcile failed (retrying in {delay:?}): {e:#}");
                retry_at = Some(Instant::now() + delay);
            }
        }
    }
}

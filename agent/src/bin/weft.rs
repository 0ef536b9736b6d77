//! `weft`: the operator's view of a node's datapath, read from the pinned maps (no agent
//! needed): status, routes, endpoints, nodes, next hops, drops and path counters.
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::json;
use weft_agent::{
    bgp, datapath::Maps, datastore::etcd::EtcdArgs, mac::format_mac as mac, netpol::store,
};
use weft_common::{
    CONFIG_F_READY, RouteMode,
    conntrack::{CT_F_INIT_HI, CT_F_SEEN_HI, CT_F_SEEN_LO, CtOrigin, closing},
};

#[derive(Parser)]
#[command(name = "weft", about = "Inspect a node's weft datapath")]
struct Cli {
    /// Root of the node's BPF pins.
    #[arg(long, global = true, default_value = weft_common::DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// [bgp] The node's BIRD control socket: `status` shows its sessions and routes.
    #[arg(long, global = true, default_value = "/run/weft/bird/bird.ctl")]
    bird_socket: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Node configuration, map fill and (bgp backend) BGP sessions and learned prefixes.
    Status,
    /// Pod CIDRs of other nodes and how they are reached.
    Routes,
    /// Pods on this node.
    Endpoints,
    /// Known tunnel peers.
    Nodes,
    /// Cached underlay next hops.
    NextHops,
    /// Dropped packets by reason.
    Drops,
    /// Packets by datapath path.
    Stats,
    /// Tracked flows: which ones take the fast path and which the host stack.
    Conntrack,
    /// Stream datapath events: drops (reason, hook, 5-tuple, pod and node names), and with
    /// --trace sampled forwarding decisions. Up to 4 monitors per node at once, each with its
    /// own options; Ctrl-C detaches.
    Monitor(MonitorArgs),
    /// Run weft's real programs on a synthetic packet against this node's live maps
    /// (BPF_PROG_TEST_RUN) and print each step: lookups, verdict, the bytes that leave. Changes
    /// no state: the programs run as a private instance sharing only the maps they read.
    Trace(TraceArgs),
    /// NetworkPolicy: the effective rules of an endpoint (by pod name or address) as the
    /// datapath enforces them, every endpoint without one; `apply`/`delete` write objects to
    /// etcd.
    #[command(args_conflicts_with_subcommands = true)]
    Policy {
        /// A local pod: `namespace/name` or its address.
        endpoint: Option<String>,
        #[command(subcommand)]
        action: Option<Box<PolicyCmd>>,
    },
    /// The CNI plugin's address store.
    #[command(subcommand)]
    Ipam(IpamCmd),
}

#[derive(clap::Args)]
struct TraceArgs {
    /// The sending pod (`namespace/name`, `name` or address), or any address with --via; a
    /// pod of another node: its packet arrives here from the underlay.
    #[arg(long, value_name = "POD|IP")]
    from: String,
    /// The destination pod or address.
    #[arg(long, value_name = "POD|IP")]
    to: String,
    /// tcp (a SYN), udp or icmp (an echo request).
    #[arg(long, default_value = "tcp", value_name = "PROTO")]
    proto: String,
    /// Destination port (default: 80 for tcp, 53 for udp).
    #[arg(long, value_name = "N")]
    port: Option<u16>,
    /// Send the packet from this pod's interface (when --from is not its address).
    #[arg(long, value_name = "POD|IP")]
    via: Option<String>,
    /// Pin root of another node whose maps are reachable from here: the trace follows the
    /// packet into that node's underlay programs. Repeatable.
    #[arg(long, value_name = "DIR")]
    peer_pin_root: Vec<PathBuf>,
    /// The CNI plugin's IPAM directory (`dataDir`), where pods' names are recorded.
    #[arg(long, default_value = weft_agent::cni::spec::DEFAULT_DATA_DIR, value_name = "DIR")]
    cni_data_dir: PathBuf,
}

#[derive(clap::Args)]
struct MonitorArgs {
    /// Also report forwarding decisions (sampled: see --sample).
    #[arg(long)]
    trace: bool,
    /// With --trace: report one forwarding decision in N.
    #[arg(long, default_value_t = 1, value_name = "N")]
    sample: u32,
    /// In-kernel budget of this monitor: events per second per CPU (each monitor has its own);
    /// what exceeds it is counted, not sent.
    #[arg(long, default_value_t = weft_common::monitor::MONITOR_RATE_DEFAULT, value_name = "N")]
    budget: u32,
    /// Largest burst of this monitor's events per CPU, at most twice the budget (default: the
    /// budget).
    #[arg(long, value_name = "N")]
    burst: Option<u32>,
    /// Only events about this pod (`namespace/name`, `name` or address); repeatable.
    #[arg(long, value_name = "POD")]
    pod: Vec<String>,
    /// Only events involving this node (its name or address: the source's or the
    /// destination's node, or a tunnel end); repeatable.
    #[arg(long, value_name = "NODE")]
    node: Vec<String>,
    /// Only drops with this reason (as `weft drops` names them); repeatable.
    #[arg(long, value_name = "REASON")]
    reason: Vec<String>,
    /// Only this protocol (tcp, udp, icmp, sctp or a number).
    #[arg(long, value_name = "PROTO")]
    protocol: Option<String>,
    /// Only packets from or to this port.
    #[arg(long, value_name = "N")]
    port: Option<u16>,
    /// Exit after printing N events.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// The CNI plugin's IPAM directory (`dataDir`), where pods' names are recorded.
    #[arg(long, default_value = weft_agent::cni::spec::DEFAULT_DATA_DIR, value_name = "DIR")]
    cni_data_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Validate (with the API server's messages) and write NetworkPolicy, Namespace and Pod
    /// objects (YAML or JSON, several documents) to etcd, where every agent reads them.
    Apply {
        /// The file (`-` for standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Namespace of objects that name none.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Delete the objects a file names, or one object (`networkpolicy NAMESPACE/NAME`,
    /// `namespace NAME`, `pod NAMESPACE/NAME`).
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Kind and name, without -f.
        #[arg(num_args = 0..=2)]
        object: Vec<String>,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

#[derive(Subcommand)]
enum IpamCmd {
    /// Rebuilds the store from the node's pod links (their aliases and host routes), e.g. after
    /// it was found corrupt. The old file is kept beside it.
    Rebuild {
        /// The CNI conflist naming weft-cni's dataDir, network name and subnetFile.
        #[arg(long, default_value = "/etc/cni/net.d/10-weft.conflist")]
        conflist: PathBuf,
    },
}

/// weft-cni's configuration in a conflist (its entry, with the list's name and version).
fn cni_conf(conflist: &std::path::Path) -> Result<weft_agent::cni::spec::NetworkConfig> {
    use anyhow::Context as _;
    let text = std::fs::read(conflist)
        .with_context(|| format!("--conflist: reading {}", conflist.display()))?;
    let list: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("--conflist {}: not JSON", conflist.display()))?;
    let mut entry = list["plugins"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["type"] == "weft-cni"))
        .cloned()
        .with_context(|| format!("--conflist {}: no weft-cni plugin", conflist.display()))?;
    entry["name"] = list["name"].clone();
    entry["cniVersion"] = list["cniVersion"].clone();
    weft_agent::cni::spec::NetworkConfig::parse(entry)
        .map_err(|e| anyhow::anyhow!("--conflist {}: {e}", conflist.display()))
}

/// `weft ipam rebuild`: works without the agent (the maps only add addresses a route lacks).
fn ipam_rebuild(pin_root: &std::path::Path, conflist: &std::path::Path, json: bool) -> Result<()> {
    let conf = cni_conf(conflist)?;
    let ipam = weft_agent::ipam::Ipam::new(&conf.data_dir, &conf.name);
    let maps = Maps::open_pinned(pin_root).ok();
    let subnet = weft_agent::subnet_env::SubnetEnv::read(&conf.subnet_file)
        .ok()
        .map(|e| e.subnet);
    let rebuilt = weft_agent::cni::recover::rebuild(
        &ipam,
        maps.as_ref(),
        &[],
        subnet,
        std::time::Duration::from_secs(20),
    )?;
    if json {
        let allocations: Vec<_> = rebuilt
            .state
            .allocations
            .iter()
            .map(|a| json!({"ip": a.ip.to_string(), "containerID": a.container_id, "ifname": a.ifname}))
            .collect();
        println!(
            "{}",
            json!({"store": ipam.path(), "allocations": allocations, "skipped": rebuilt.skipped,
                "kept": rebuilt.kept})
        );
        return Ok(());
    }
    println!(
        "rebuilt {} with {} allocations",
        ipam.path().display(),
        rebuilt.state.allocations.len()
    );
    for a in &rebuilt.state.allocations {
        println!("  {:<16} {} {}", a.ip.to_string(), a.container_id, a.ifname);
    }
    for s in &rebuilt.skipped {
        println!("  left out: {s}");
    }
    if let Some(kept) = &rebuilt.kept {
        println!("the old file is kept at {}", kept.display());
    }
    Ok(())
}

fn mode(m: u8) -> String {
    match RouteMode::from_u8(m) {
        Some(RouteMode::Vxlan) => "vxlan".into(),
        Some(RouteMode::Ipip) => "ipip".into(),
        Some(RouteMode::Direct) => "direct".into(),
        Some(RouteMode::Bgp) => "bgp".into(),
        None => format!("unknown({m})"),
    }
}

/// Set by SIGINT/SIGTERM: the monitor detaches and exits.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn monitor(maps: Maps, args: MonitorArgs, json: bool) -> Result<()> {
    use std::{io::Write as _, time::Duration};

    use weft_agent::monitor::{
        Attached, Filter, Names, Options, format_text, parse_protocol, record,
    };

    let filter = Filter {
        pods: args.pod,
        nodes: args.node,
        reasons: args.reason,
        protocol: args.protocol.as_deref().map(parse_protocol).transpose()?,
        port: args.port,
    };
    filter.validate()?;
    let burst = args.burst.unwrap_or(args.budget);
    if burst as u64 > 2 * args.budget as u64 {
        anyhow::bail!(
            "--burst {burst}: at most two seconds' budget (2 x --budget {})",
            args.budget
        );
    }
    let vxlan_port = maps.config()?.vxlan_port;
    let mut names = Names::load(&maps, &args.cni_data_dir)?;
    for node in &filter.nodes {
        if !names.knows_node(node) {
            let mut known: Vec<&str> = names.node_names.values().map(String::as_str).collect();
            known.sort();
            eprintln!(
                "weft monitor: --node {node}: no node of that name is known here yet (known: {}); \
                 it matches once the agent records it",
                if known.is_empty() {
                    "none, nodes show as addresses".to_string()
                } else {
                    known.join(", ")
                }
            );
        }
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
    let mut mon = Attached::attach(
        maps,
        &Options {
            trace: args.trace,
            sample_every: args.sample,
            rate_per_sec: args.budget,
            burst,
        },
    )?;
    let realtime_offset = || {
        let clock = |id| {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: a valid timespec.
            unsafe { libc::clock_gettime(id, &mut ts) };
            ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
        };
        clock(libc::CLOCK_REALTIME) - clock(libc::CLOCK_MONOTONIC)
    };
    if !json {
        eprintln!(
            "weft monitor: listening for drops{} (budget {}/s per CPU, slot {} of {}); Ctrl-C to stop",
            if args.trace { " and forwarding" } else { "" },
            args.budget,
            mon.slot(),
            weft_common::monitor::MONITOR_SLOTS
        );
    }
    let mut out = std::io::stdout().lock();
    let mut printed = 0u64;
    let mut reported = weft_agent::monitor::Losses::default();
    let mut last_refresh = std::time::Instant::now();
    while !STOP.load(std::sync::atomic::Ordering::Relaxed) {
        let ev = mon.next(Duration::from_millis(200))?;
        if last_refresh.elapsed() > Duration::from_secs(2) {
            // Pods come and go.
            names = Names::load(mon.maps(), &args.cni_data_dir).unwrap_or(names);
            last_refresh = std::time::Instant::now();
            let losses = mon.losses()?;
            if losses != reported {
                if json {
                    writeln!(
                        out,
                        "{}",
                        json!({"type": "lost", "over_budget": losses.over_budget, "ring_full": losses.ring_full})
                    )?;
                } else {
                    eprintln!(
                        "weft monitor: {} events over the budget, {} lost to a full ring, since start",
                        losses.over_budget, losses.ring_full
                    );
                }
                reported = losses;
            }
        }
        let Some(ev) = ev else { continue };
        let rec = record(&ev, &mut names, vxlan_port, realtime_offset());
        if !filter.matches(&rec) {
            continue;
        }
        let line = if json {
            serde_json::to_string(&rec)?
        } else {
            format_text(&rec)
        };
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            break;
        }
        printed += 1;
        if args.count.is_some_and(|c| printed >= c) {
            break;
        }
    }
    Ok(())
}

/// [bgp] BGP as the node's BIRD reports it (`birdc`): sessions, learned and refused prefixes.
struct BgpView {
    socket: PathBuf,
    table: u32,
    /// `None`: BIRD does not answer on the socket.
    sessions: Option<Vec<bgp::birdc::Session>>,
    learned: Vec<bgp::birdc::Route>,
    refused: Vec<bgp::birdc::Route>,
}

/// The BGP view when BIRD answers on `socket`, or when routes use bgp (then its absence is
/// news); `None` for nodes that do not run BGP.
fn bgp_view(socket: &std::path::Path, uses_bgp: bool, table: u32) -> Option<BgpView> {
    use bgp::birdc;
    let sessions = birdc::run(socket, true, "show protocols")
        .ok()
        .map(|t| birdc::parse_protocols(&t));
    if sessions.is_none() && !uses_bgp {
        return None;
    }
    let routes = |cmd: &str| {
        birdc::run(socket, true, cmd)
            .map(|t| birdc::parse_routes(&t))
            .unwrap_or_default()
    };
    let learned = routes("show route")
        .into_iter()
        .filter(|r| birdc::session_kind(&r.from).is_some())
        .collect();
    Some(BgpView {
        socket: socket.to_path_buf(),
        table,
        sessions,
        learned,
        refused: routes("show route filtered"),
    })
}

impl BgpView {
    fn json(&self) -> serde_json::Value {
        let route = |r: &bgp::birdc::Route| {
            json!({"prefix": r.prefix.to_string(), "from": r.from, "primary": r.primary,
                "via": r.via.iter().map(|v| v.to_string()).collect::<Vec<_>>()})
        };
        json!({
            "socket": self.socket,
            "table": self.table,
            "running": self.sessions.is_some(),
            "sessions": self.sessions.iter().flatten().map(|s| json!({
                "name": s.name, "peer": s.peer.to_string(), "kind": s.kind.name(),
                "state": s.state, "info": s.info, "established": s.established(), "since": s.since,
            })).collect::<Vec<_>>(),
            "learned": self.learned.iter().map(route).collect::<Vec<_>>(),
            "refused": self.refused.iter().map(route).collect::<Vec<_>>(),
        })
    }

    fn print(&self) {
        let Some(sessions) = &self.sessions else {
            println!(
                "bgp        BIRD NOT ANSWERING on {} (routes use bgp)",
                self.socket.display()
            );
            return;
        };
        let established = sessions.iter().filter(|s| s.established()).count();
        println!(
            "bgp        {established}/{} sessions established, {} prefixes learned (kernel table {}), {} refused",
            sessions.len(),
            self.learned.iter().filter(|r| r.primary).count(),
            self.table,
            self.refused.len()
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for s in sessions {
            let since = s
                .since
                .map(|t| format!("for {}s", now.saturating_sub(t)))
                .unwrap_or_default();
            println!(
                "  session  {:<16} {:<5} {:<6} {} {since}",
                s.peer.to_string(),
                s.kind.name(),
                s.state,
                s.info
            );
        }
        for r in &self.learned {
            let via: Vec<String> = r.via.iter().map(|v| v.to_string()).collect();
            println!(
                "  learned  {:<18} via {:<16} from {}{}",
                r.prefix.to_string(),
                via.join(","),
                r.from,
                if r.primary { "" } else { " (not preferred)" }
            );
        }
        for r in &self.refused {
            println!(
                "  refused  {:<18} from {} (import filter: not a known node's pod subnet from its owner)",
                r.prefix.to_string(),
                r.from
            );
        }
    }
}

fn read_objects(file: &std::path::Path) -> Result<Vec<store::Object>> {
    let text = if file == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    store::parse_documents(&text).with_context(|| format!("{}", file.display()))
}

fn policy_action(action: PolicyCmd) -> Result<()> {
    match action {
        PolicyCmd::Apply {
            file,
            namespace,
            etcd,
        } => {
            let objects = read_objects(&file)?;
            let keys = store::validate(&objects, &namespace)?;
            let rev = store::apply(&etcd.client()?, &etcd.etcd_prefix, &objects, &namespace)?;
            for k in keys {
                println!("{} configured", describe(&k));
            }
            println!("etcd revision {rev}");
        }
        PolicyCmd::Delete {
            file,
            namespace,
            object,
            etcd,
        } => {
            let keys = match (file, object.as_slice()) {
                (Some(f), []) => {
                    let objects = read_objects(&f)?;
                    objects
                        .iter()
                        .map(|o| o.key(&namespace).map_err(anyhow::Error::msg))
                        .collect::<Result<Vec<_>>>()?
                }
                (None, [kind, name]) => {
                    let (ns, n) = name
                        .split_once('/')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .unwrap_or((namespace.clone(), name.clone()));
                    vec![match kind.to_ascii_lowercase().as_str() {
                        "networkpolicy" | "networkpolicies" | "netpol" => {
                            store::Key::NetworkPolicy {
                                namespace: ns,
                                name: n,
                            }
                        }
                        "namespace" | "namespaces" | "ns" => store::Key::Namespace(name.clone()),
                        "pod" | "pods" => store::Key::Pod {
                            namespace: ns,
                            name: n,
                        },
                        other => bail!("unknown kind {other:?} (networkpolicy, namespace, pod)"),
                    }]
                }
                _ => bail!("weft policy delete: give -f FILE or KIND NAME"),
            };
            let rev = store::delete(&etcd.client()?, &etcd.etcd_prefix, &keys)?;
            for k in keys {
                println!("{} deleted", describe(&k));
            }
            println!("etcd revision {rev}");
        }
    }
    Ok(())
}

fn describe(k: &store::Key) -> String {
    match k {
        store::Key::NetworkPolicy { namespace, name } => {
            format!("networkpolicy {namespace}/{name}")
        }
        store::Key::Namespace(n) => format!("namespace {n}"),
        store::Key::Pod { namespace, name } => format!("pod {namespace}/{name}"),
        store::Key::PodAddress(ip) => format!("pod address {ip}"),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Cmd::Trace(args) = &cli.command {
        use weft_agent::trace::{Proto, Request, format_text, trace};
        let report = trace(
            &cli.pin_root,
            &Request {
                from: args.from.clone(),
                to: args.to.clone(),
                proto: Proto::parse(&args.proto)?,
                port: args.port,
                via: args.via.clone(),
                cni_data_dir: args.cni_data_dir.clone(),
                peer_pin_roots: args.peer_pin_root.clone(),
            },
        )?;
        if cli.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", format_text(&report));
        }
        return Ok(());
    }
    if let Cmd::Ipam(IpamCmd::Rebuild { conflist }) = &cli.command {
        return ipam_rebuild(&cli.pin_root, conflist, cli.json);
    }
    if let Cmd::Policy {
        action: Some(action),
        ..
    } = cli.command
    {
        return policy_action(*action);
    }
    let maps = Maps::open_pinned(&cli.pin_root)?;
    match cli.command {
        Cmd::Monitor(args) => return monitor(maps, args, cli.json),
        Cmd::Trace(_) => unreachable!("handled above"),
        Cmd::Status => {
            let cfg = maps.config()?;
            let ready = cfg.flags & CONFIG_F_READY != 0;
            let (routes, endpoints, nodes) = (
                maps.routes()?.len(),
                maps.endpoints()?.len(),
                maps.nodes()?.len(),
            );
            let drops: u64 = maps.drops()?.iter().map(|(_, n)| n).sum();
            let node_ip = std::net::Ipv4Addr::from(cfg.node_ip);
            let decap = weft_common::DecapHook::of_flags(cfg.flags);
            // [bgp]
            let uses_bgp = maps
                .routes()?
                .iter()
                .any(|(_, r)| r.mode == RouteMode::Bgp as u8);
            let bgp = bgp_view(&cli.bird_socket, uses_bgp, cfg.bgp_table);
            let node_name = maps
                .node_names()?
                .into_iter()
                .find(|(ip, _)| *ip == node_ip)
                .map(|(_, n)| n);
            // Slots whose monitor asked for events and is still running (a killed monitor's
            // flags stay until the datapath's next event clears them).
            let monitors: Vec<(u32, u32)> = maps
                .monitor_configs()?
                .iter()
                .zip(maps.monitor_flags()?)
                .enumerate()
                .filter(|(_, (c, flags))| {
                    *flags != 0 && std::path::Path::new(&format!("/proc/{}", c.owner_pid)).exists()
                })
                .map(|(slot, (c, _))| (slot as u32, c.owner_pid))
                .collect();
            if cli.json {
                println!(
                    "{}",
                    json!({"ready": ready, "node_ip": node_ip.to_string(), "node_name": node_name, "underlay_ifindex": cfg.underlay_ifindex,
                        "vni": cfg.vni, "vxlan_port": cfg.vxlan_port, "vtep_mac": mac(&cfg.vtep_mac),
                        "decap_hook": decap.hook(), "decap_reason": decap.reason(),
                        "vxlan_decap": weft_common::vxlan_decap(cfg.flags),
                        "routes": routes, "endpoints": endpoints, "nodes": nodes, "drops": drops,
                        "monitors": monitors.iter().map(|(slot, pid)| json!({"slot": slot, "pid": pid})).collect::<Vec<_>>(),
                        "bgp": bgp.as_ref().map(BgpView::json)})
                );
            } else {
                println!(
                    "datapath   {}",
                    if ready {
                        "ready"
                    } else {
                        "NOT READY (no config written)"
                    }
                );
                println!(
                    "node       {}{node_ip}  (underlay ifindex {})",
                    node_name.map(|n| format!("{n}, ")).unwrap_or_default(),
                    cfg.underlay_ifindex
                );
                println!(
                    "vxlan      VNI {}, port {}, VTEP {}",
                    cfg.vni,
                    cfg.vxlan_port,
                    mac(&cfg.vtep_mac)
                );
                println!("decap      {} ({})", decap.hook(), decap.reason());
                println!(
                    "           VXLAN: {}",
                    match weft_common::vxlan_decap(cfg.flags) {
                        "xdp" => "in XDP, before GRO",
                        "tc" =>
                            "in tc on the underlay, without GRO (weft_vxlan could not be set up: see the agent's log)",
                        "unknown" => "not recorded",
                        _ =>
                            "TCP by the kernel's vxlan socket after GRO (weft_vxlan), delivered by from_vxlan; other protocols in tc on the underlay",
                    }
                );
                println!("maps       {routes} routes, {endpoints} endpoints, {nodes} nodes");
                println!("drops      {drops}");
                println!(
                    "monitors   {} of {} slots in use{}",
                    monitors.len(),
                    weft_common::monitor::MONITOR_SLOTS,
                    if monitors.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (pids {})",
                            monitors
                                .iter()
                                .map(|(_, pid)| pid.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                );
                println!(
                    "pins       {}",
                    weft_agent::datapath::pin_dir(&cli.pin_root).display()
                );
                if let Some(bgp) = bgp {
                    bgp.print();
                }
            }
        }
        Cmd::Routes => {
            let routes = maps.routes()?;
            if cli.json {
                let v: Vec<_> = routes
                    .iter()
                    .map(|(net, r)| json!({"cidr": net.to_string(), "node_ip": std::net::Ipv4Addr::from(r.node_ip).to_string(), "mode": mode(r.mode), "vtep_mac": mac(&r.vtep_mac)}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{:<20} {:<16} {:<8} VTEP MAC", "CIDR", "NODE", "MODE");
                for (net, r) in routes {
                    println!(
                        "{:<20} {:<16} {:<8} {}",
                        net.to_string(),
                        std::net::Ipv4Addr::from(r.node_ip).to_string(),
                        mode(r.mode),
                        mac(&r.vtep_mac)
                    );
                }
            }
        }
        Cmd::Endpoints => {
            let eps = maps.endpoints()?;
            if cli.json {
                let v: Vec<_> = eps
                    .iter()
                    .map(|(ip, e)| json!({"ip": ip.to_string(), "host_ifindex": e.host_ifindex, "pod_mac": mac(&e.pod_mac), "host_mac": mac(&e.host_mac)}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<16} {:>8} {:<18} HOST MAC",
                    "POD IP", "IFINDEX", "POD MAC"
                );
                for (ip, e) in eps {
                    println!(
                        "{:<16} {:>8} {:<18} {}",
                        ip.to_string(),
                        e.host_ifindex,
                        mac(&e.pod_mac),
                        mac(&e.host_mac)
                    );
                }
            }
        }
        Cmd::Nodes => {
            let nodes = maps.nodes()?;
            let names: std::collections::HashMap<_, _> = maps.node_names()?.into_iter().collect();
            let name = |ip| names.get(ip).cloned();
            if cli.json {
                let v: Vec<_> = nodes.iter().map(|(ip, n)| json!({"ip": ip.to_string(), "name": name(ip), "mode": mode(n.mode), "vtep_mac": mac(&n.vtep_mac)})).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{:<16} {:<8} {:<18} NAME", "NODE", "MODE", "VTEP MAC");
                for (ip, n) in &nodes {
                    println!(
                        "{:<16} {:<8} {:<18} {}",
                        ip.to_string(),
                        mode(n.mode),
                        mac(&n.vtep_mac),
                        name(ip).unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        Cmd::NextHops => {
            let hops = maps.next_hops()?;
            if cli.json {
                let v: Vec<_> = hops.iter().map(|(ip, h)| json!({"node": ip.to_string(), "ifindex": h.ifindex, "smac": mac(&h.smac), "dmac": mac(&h.dmac)})).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{:<16} {:>8} {:<18} DST MAC", "NODE", "IFINDEX", "SRC MAC");
                for (ip, h) in hops {
                    println!(
                        "{:<16} {:>8} {:<18} {}",
                        ip.to_string(),
                        h.ifindex,
                        mac(&h.smac),
                        mac(&h.dmac)
                    );
                }
            }
        }
        Cmd::Drops => {
            let drops = maps.drops()?;
            if cli.json {
                let v: serde_json::Map<_, _> = drops
                    .iter()
                    .map(|(r, n)| (r.name().to_string(), json!(n)))
                    .collect();
                println!("{}", serde_json::Value::Object(v));
            } else {
                let total: u64 = drops.iter().map(|(_, n)| n).sum();
                println!("{:<30} {:>12}", "REASON", "PACKETS");
                for (r, n) in drops.iter().filter(|(_, n)| *n > 0) {
                    println!("{:<30} {:>12}", r.name(), n);
                }
                println!("{:<30} {:>12}", "total", total);
            }
        }
        Cmd::Stats => {
            let stats = maps.stats()?;
            if cli.json {
                let v: serde_json::Map<_, _> = stats
                    .iter()
                    .map(|(s, n)| (s.name().to_string(), json!(n)))
                    .collect();
                println!("{}", serde_json::Value::Object(v));
            } else {
                println!("{:<24} {:>12}", "PATH", "PACKETS");
                for (s, n) in stats {
                    println!("{:<24} {:>12}", s.name(), n);
                }
            }
        }
        Cmd::Ipam(_) => unreachable!("handled before the maps are opened"),
        Cmd::Conntrack => {
            let now = weft_agent::conntrack::now_s();
            let flows = maps.conntrack()?;
            let proto = |p: u8| match p {
                1 => "icmp".to_string(),
                6 => "tcp".to_string(),
                17 => "udp".to_string(),
                132 => "sctp".to_string(),
                p => p.to_string(),
            };
            let rows: Vec<_> = flows
                .iter()
                .filter(|(_, e)| e.expires_s >= now)
                .map(|(k, e)| {
                    let lo = format!(
                        "{}:{}",
                        std::net::Ipv4Addr::from(k.addr_lo),
                        u16::from_be_bytes(k.port_lo)
                    );
                    let hi = format!(
                        "{}:{}",
                        std::net::Ipv4Addr::from(k.addr_hi),
                        u16::from_be_bytes(k.port_hi)
                    );
                    // The initiator first.
                    let (from, to) = if e.flags & CT_F_INIT_HI != 0 {
                        (hi, lo)
                    } else {
                        (lo, hi)
                    };
                    let origin = match CtOrigin::from_u8(e.origin) {
                        Some(CtOrigin::Fast) => "fast",
                        Some(CtOrigin::Stack) => "stack",
                        None => "unknown",
                    };
                    let state = if closing(k.protocol, e.flags) {
                        "closing"
                    } else if e.flags & (CT_F_SEEN_LO | CT_F_SEEN_HI) == CT_F_SEEN_LO | CT_F_SEEN_HI
                    {
                        "replied"
                    } else {
                        "new"
                    };
                    (
                        proto(k.protocol),
                        from,
                        to,
                        origin,
                        state,
                        e.expires_s - now,
                    )
                })
                .collect();
            if cli.json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(p, f, t, o, s, x)| json!({"protocol": p, "from": f, "to": t, "path": o, "state": s, "expires_in_s": x}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<5} {:<22} {:<22} {:<6} {:<8} {:>8}",
                    "PROTO", "FROM", "TO", "PATH", "STATE", "EXPIRES"
                );
                for (p, f, t, o, s, x) in rows {
                    println!("{p:<5} {f:<22} {t:<22} {o:<6} {s:<8} {x:>7}s");
                }
            }
        }
        Cmd::Policy { endpoint, .. } => {
            let out = weft_agent::netpol::show::effective(&maps, endpoint.as_deref())?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!("{}", weft_agent::netpol::show::render(&out));
            }
        }
    }
    Ok(())
}

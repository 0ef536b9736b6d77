//! `weft`: the operator's view of a node's datapath, read from the pinned maps (no agent
//! needed): status, routes, endpoints, nodes, next hops, drops and path counters.
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::json;
use weft_agent::netpol::store;
use weft_agent::{datapath::Maps, mac::format_mac as mac};
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
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Node configuration and map fill.
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
}

#[derive(clap::Args, Debug)]
struct EtcdArgs {
    /// etcd client URLs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: Vec<String>,
    /// The agents' `--etcd-prefix`.
    #[arg(long, default_value = weft_agent::datastore::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    #[arg(long)]
    etcd_cafile: Option<PathBuf>,
    #[arg(long, requires = "etcd_keyfile")]
    etcd_certfile: Option<PathBuf>,
    #[arg(long, requires = "etcd_certfile")]
    etcd_keyfile: Option<PathBuf>,
    #[arg(long, requires = "etcd_password")]
    etcd_username: Option<String>,
    #[arg(
        long,
        requires = "etcd_username",
        env = "WEFT_ETCD_PASSWORD",
        hide_env_values = true
    )]
    etcd_password: Option<String>,
}

impl EtcdArgs {
    fn client(&self) -> Result<weft_agent::datastore::etcd::EtcdClient> {
        weft_agent::datastore::etcd::EtcdClient::with_options(
            &self.etcd_endpoints,
            &weft_agent::datastore::etcd::EtcdOptions {
                ca_file: self.etcd_cafile.clone(),
                cert_file: self.etcd_certfile.clone(),
                key_file: self.etcd_keyfile.clone(),
                username: self.etcd_username.clone(),
                password: self.etcd_password.clone(),
            },
        )
    }
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

fn mode(m: u8) -> String {
    match RouteMode::from_u8(m) {
        Some(RouteMode::Vxlan) => "vxlan".into(),
        Some(RouteMode::Ipip) => "ipip".into(),
        Some(RouteMode::Direct) => "direct".into(),
        None => format!("unknown({m})"),
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
    if let Cmd::Policy {
        action: Some(action),
        ..
    } = cli.command
    {
        return policy_action(*action);
    }
    let maps = Maps::open_pinned(&cli.pin_root)?;
    match cli.command {
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
            if cli.json {
                println!(
                    "{}",
                    json!({"ready": ready, "node_ip": node_ip.to_string(), "underlay_ifindex": cfg.underlay_ifindex,
                        "vni": cfg.vni, "vxlan_port": cfg.vxlan_port, "vtep_mac": mac(&cfg.vtep_mac),
                        "routes": routes, "endpoints": endpoints, "nodes": nodes, "drops": drops})
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
                    "node ip    {node_ip}  (underlay ifindex {})",
                    cfg.underlay_ifindex
                );
                println!(
                    "vxlan      VNI {}, port {}, VTEP {}",
                    cfg.vni,
                    cfg.vxlan_port,
                    mac(&cfg.vtep_mac)
                );
                println!("maps       {routes} routes, {endpoints} endpoints, {nodes} nodes");
                println!("drops      {drops}");
                println!(
                    "pins       {}",
                    weft_agent::datapath::pin_dir(&cli.pin_root).display()
                );
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
            if cli.json {
                let v: Vec<_> = nodes.iter().map(|(ip, n)| json!({"ip": ip.to_string(), "mode": mode(n.mode), "vtep_mac": mac(&n.vtep_mac)})).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{:<16} {:<8} VTEP MAC", "NODE", "MODE");
                for (ip, n) in nodes {
                    println!(
                        "{:<16} {:<8} {}",
                        ip.to_string(),
                        mode(n.mode),
                        mac(&n.vtep_mac)
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

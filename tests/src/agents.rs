//! Nodes running the real `weft-agent` (etcd datastore) on one underlay, without pods: what the
//! agent tests and the agent benchmark need. An underlay namespace holds a bridge and the
//! cluster's etcd (on the bridge's address, reachable from every node); each node is a
//! namespace with `eth0` on the bridge, its own pin directory, subnet file and metrics address.
//! Agents run with `nsenter --net` (bpffs stays visible) and are killed by pid on drop.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use weft_agent::{datapath::Maps, subnet_env::SubnetEnv};

use crate::{
    etcd::Etcd,
    netns::{Netns, unique_name},
    pins::PinDir,
    process::{NsProcess, wait_until},
};

pub const METRICS_PORT: u16 = 9402;
const ETCD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);

/// The `weft-agent` built beside the running executable: a binary in `target/<profile>/` (the
/// benchmark) or a test in `target/<profile>/deps/`.
pub fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe directory");
    [dir.join("weft-agent"), dir.join("../weft-agent")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "weft-agent is missing beside {}: build the workspace first (`cargo build --workspace --exclude node-ebpf`, or --release for benchmarks)",
                exe.display()
            )
        })
}

pub struct AgentNode {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub pins: PinDir,
    pub dir: PathBuf,
    pub agent: Option<NsProcess>,
}

impl AgentNode {
    pub fn maps(&self) -> Maps {
        Maps::open_pinned(&self.pins.path).expect("opening the node's pinned maps")
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    pub fn subnet_env(&self) -> SubnetEnv {
        SubnetEnv::read(&self.subnet_file()).expect("reading the node's subnet file")
    }

    /// Number of routes in the node's map (0 when the maps do not exist yet).
    pub fn route_count(&self) -> usize {
        Maps::open_pinned(&self.pins.path)
            .and_then(|m| m.routes())
            .map(|r| r.len())
            .unwrap_or(0)
    }

    /// GET on the agent's metrics server, from inside the node: (status, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let addr = SocketAddr::from((self.ip, METRICS_PORT));
        let request = format!("GET {path} HTTP/1.0\r\n\r\n");
        let ns_path = self.ns.path();
        std::thread::spawn(move || {
            crate::netns::enter(&ns_path);
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
            s.write_all(request.as_bytes()).ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            let status = out.split_whitespace().nth(1)?.parse().ok()?;
            let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
            Some((status, body))
        })
        .join()
        .ok()
        .flatten()
    }

    /// A metric's value from /metrics (first sample of that name).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    pub fn log(&self) -> String {
        self.agent.as_ref().map(|a| a.log()).unwrap_or_default()
    }
}

pub struct AgentCluster {
    // Field order is drop order: agents go before the underlay and etcd.
    pub nodes: Vec<AgentNode>,
    pub etcd: Etcd,
    pub underlay: Netns,
    pub net_conf: PathBuf,
    pub lease_ttl: u64,
    next_node: u8,
}

impl AgentCluster {
    /// An underlay with etcd and `nodes` agents configured by `net_conf` (net-conf.json).
    pub fn new(nodes: usize, net_conf: serde_json::Value, lease_ttl: u64) -> Self {
        let underlay = Netns::new("aul");
        underlay.ip("link add br0 type bridge");
        underlay.ip(&format!("addr add {ETCD_IP}/24 dev br0"));
        underlay.ip("link set br0 up");
        let etcd = Etcd::start(&underlay, ETCD_IP, 2379);
        let path = std::env::temp_dir()
            .join(unique_name("weft-agent-net-conf-"))
            .with_extension("json");
        std::fs::write(&path, net_conf.to_string()).unwrap();
        let mut cluster = Self {
            nodes: Vec::new(),
            etcd,
            underlay,
            net_conf: path,
            lease_ttl,
            next_node: 0,
        };
        for _ in 0..nodes {
            cluster.add_node();
        }
        cluster
    }

    /// A node namespace on the underlay with a running agent; returns its index.
    pub fn add_node(&mut self) -> usize {
        let n = self.next_node;
        self.next_node += 1;
        let ip = Ipv4Addr::new(192, 168, 100, 10 + n);
        let ns = Netns::new("anode");
        let port = unique_name("au");
        self.underlay.ip(&format!(
            "link add {port} type veth peer name eth0 netns {}",
            ns.name
        ));
        self.underlay.ip(&format!("link set {port} master br0 up"));
        ns.ip("link set eth0 up");
        ns.ip(&format!("addr add {ip}/24 dev eth0"));
        ns.ip(&format!("route add default via {ETCD_IP}"));
        let dir = std::env::temp_dir().join(unique_name("weft-agent-node-"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut node = AgentNode {
            name: format!("node-{n}"),
            ns,
            ip,
            pins: PinDir::new("agent"),
            dir,
            agent: None,
        };
        node.agent = Some(self.spawn_agent(&node));
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    pub fn spawn_agent(&self, node: &AgentNode) -> NsProcess {
        let args: Vec<String> = [
            "--datastore",
            "etcd",
            "--etcd-endpoints",
            &self.etcd.endpoint(),
            "--net-conf",
            &self.net_conf.display().to_string(),
            "--iface",
            "eth0",
            "--node-name",
            &node.name,
            "--pin-root",
            &node.pins.path.display().to_string(),
            "--subnet-file",
            &node.subnet_file().display().to_string(),
            "--metrics-addr",
            &format!("{}:{METRICS_PORT}", node.ip),
            "--lease-ttl",
            &self.lease_ttl.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Appends: a restarted agent's log follows the previous one's.
        let log = node.dir.join(format!("agent-{}.log", unique_name("")));
        NsProcess::spawn(
            &node.ns,
            &agent_binary(),
            &args,
            &[("RUST_LOG", "info".into())],
            &log,
        )
    }

    /// SIGKILLs node `i`'s agent (no clean-up can run) and starts a new one.
    pub fn restart_agent(&mut self, i: usize) {
        self.nodes[i].agent.as_mut().unwrap().kill();
        let agent = self.spawn_agent(&self.nodes[i]);
        self.nodes[i].agent = Some(agent);
    }

    /// Waits until every node has its subnet file and a route to every other node.
    pub fn wait_converged(&self, timeout: Duration) {
        let others = self.nodes.len() - 1;
        for node in &self.nodes {
            wait_until(
                &format!("{} to route to {others} peers\n{}", node.name, self.logs()),
                timeout,
                || node.subnet_file().exists() && node.route_count() == others,
            );
        }
    }

    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs `f` on a thread inside the underlay namespace (where etcd is reachable).
    pub fn in_underlay<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.underlay.run(f)
    }
}

impl Drop for AgentCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(agent) = node.agent.as_mut() {
                agent.kill();
            }
            let _ = std::fs::remove_dir_all(&node.dir);
        }
        let _ = std::fs::remove_file(&self.net_conf);
    }
}

/// Removes a node's directory when the node is dropped outside a cluster.
impl Drop for AgentNode {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.as_mut() {
            agent.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A pod wired on an agent's node as the CNI plugin wires one (veth with `from_pod` from the
/// agent's pinned program, /32 address, static gateway neighbour, host route, endpoint entry),
/// with the address `.<host>` of the node's subnet and the node's pod MTU.
pub fn add_pod(node: &AgentNode, host: u8) -> crate::agentless::Pod {
    use crate::{agentless::POD_GATEWAY, netns::format_mac};
    use weft_common::EndpointInfo;
    let env = node.subnet_env();
    let ip = Ipv4Addr::from(u32::from(env.subnet.network()) + host as u32);
    let ns = Netns::new("apod");
    let host_ifname = unique_name("wa");
    let mtu = env.mtu;
    node.ns.ip(&format!(
        "link add {host_ifname} mtu {mtu} type veth peer name eth0 netns {}",
        ns.name
    ));
    node.ns.ip(&format!("link set {host_ifname} up"));
    ns.ip(&format!("link set eth0 mtu {mtu} up"));
    ns.ip(&format!("addr add {ip}/32 dev eth0"));
    let host_mac = node.ns.mac(&host_ifname);
    ns.ip(&format!(
        "neigh replace {POD_GATEWAY} lladdr {} dev eth0 nud permanent",
        format_mac(&host_mac)
    ));
    ns.ip(&format!(
        "route add default via {POD_GATEWAY} dev eth0 onlink"
    ));
    node.ns
        .ip(&format!("route add {ip}/32 dev {host_ifname} scope link"));
    node.maps()
        .upsert_endpoint(
            ip,
            &EndpointInfo {
                host_ifindex: node.ns.ifindex(&host_ifname),
                pod_mac: ns.mac("eth0"),
                host_mac,
                flags: 0,
            },
        )
        .expect("registering the endpoint");
    let root = node.pins.path.clone();
    let dev = host_ifname.clone();
    node.ns.run(move || {
        weft_agent::datapath::attach_pinned_from_pod(&root, &dev).expect("attaching from_pod")
    });
    crate::agentless::Pod {
        ns,
        ip,
        host_ifname,
    }
}

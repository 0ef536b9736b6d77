//! A weft cluster in network namespaces: an underlay (bridges in an underlay namespace that also
//! routes between two node subnets), N nodes each running the real `weft-agent` with its own pin
//! directory and files, one etcd for the cluster, and pods created by calling the real `weft-cni`
//! binary as a container runtime does. Everything is torn down on drop, also after a panic.
//!
//! The one harness for every test that runs agents: the agent suites use it with no pods (or no
//! nodes at all, for the etcd datastore alone), the end-to-end suites with pods.
use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use weft_agent::{datapath::Maps, subnet_env::SubnetEnv};

use crate::{
    agentless::{FlannelNode, mtu_wire},
    etcd::Etcd,
    netns::{Netns, unique_name},
    pins::PinDir,
    process::{NsProcess, wait_until_else},
};

/// The cluster network every test cluster uses.
pub const CLUSTER_NETWORK: &str = "10.244.0.0/16";
/// The Service network (kube-apiserver's `--service-cluster-ip-range`) of test clusters.
pub const SERVICE_NETWORK: &str = "10.96.0.0/16";
/// Underlay subnets: nodes are spread over both, routed by the underlay namespace.
pub const UNDERLAY_SUBNETS: [[u8; 3]; 2] = [[192, 168, 100], [192, 168, 101]];
/// etcd listens on the underlay router's address of the first subnet.
const ETCD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const ETCD_PORT: u16 = 2379;
/// flannel's default etcd prefix; weft's etcd datastore uses the same layout.
pub const FLANNEL_PREFIX: &str = "/coreos.com/network";
/// How long an agent gets to come up (subnet, routes, readiness). Its start is CPU-bound: it
/// loads and verifies the datapath's programs, about 1.5 s of CPU per agent; on this 2-core
/// machine at load 15 to 20 with five agents starting at once, `starting` to `datapath
/// programmed` took 30 s. An agent that exits fails a wait at once, whatever this says.
pub const AGENT_START: Duration = Duration::from_secs(90);
/// Where every agent serves `/healthz`, `/readyz` and `/metrics` (on its node's address).
pub const METRICS_PORT: u16 = weft_agent::metrics::DEFAULT_PORT;

/// Directory of the workspace's built binaries (`target/<profile>`), found from the running
/// executable: a test (`target/<profile>/deps/<test>`) or a binary (`target/<profile>/<bin>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("target/<profile>");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A built binary of the workspace; `cargo xtask test` builds them all before testing.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --exclude node-ebpf` first (`cargo xtask test` does; --release for benchmarks)",
        path.display()
    );
    path
}

/// Wraps the agent's command line, e.g. to run it with the capabilities and mounts of the
/// DaemonSet: given the node's directory, the program and arguments to put before the agent
/// binary and its arguments.
pub type AgentWrapper = std::sync::Arc<dyn Fn(&std::path::Path) -> Vec<String> + Send + Sync>;

pub struct ClusterOptions {
    pub nodes: usize,
    /// Backend `Type` in net-conf.json: vxlan, ipip, host-gw.
    pub backend: String,
    pub direct_routing: bool,
    /// Put every other node in the second underlay subnet.
    pub two_subnets: bool,
    /// More `Backend` keys for net-conf.json (the bgp backend's `Peers`, `Mesh`, ...).
    pub backend_extra: serde_json::Value,
    /// Run BIRD on the underlay router as a route reflector for the nodes (bgp backend).
    pub route_reflector: bool,
    /// MTU of the second underlay subnet: its nodes' links, their bridge and the router's port
    /// toward it (the router answers larger DF packets with ICMP fragmentation-needed).
    pub second_subnet_mtu: Option<u32>,
    /// Agents run with the default `--xdp=auto`, which decapsulates in tc on these veth
    /// underlays (as on NICs without native XDP); otherwise `--xdp=on`.
    pub default_xdp: bool,
    /// Where `weft-agent` and `weft-cni` come from (default: the workspace's build,
    /// [`bin_dir`]); e.g. an unpacked release tarball.
    pub bin_dir: Option<PathBuf>,
    pub agent_wrapper: Option<AgentWrapper>,
    /// A whole net-conf.json instead of the one `backend` and `direct_routing` describe.
    pub net_conf: Option<serde_json::Value>,
    /// TTL of the agents' etcd leases (s).
    pub lease_ttl: u64,
    /// Whether `Cluster::new` waits until every node routes to every other node.
    pub wait_converged: bool,
    /// Node N (from 1) is `node-N` with pod subnet 10.244.N.0/24 (the agent reuses the subnet
    /// of its subnet file, written before it starts), as the NetworkPolicy runner's layout wants.
    pub numbered_subnets: bool,
    /// More `weft-agent` flags for every node (e.g. `--routes-max 2`).
    pub agent_args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            backend: "vxlan".into(),
            direct_routing: false,
            two_subnets: false,
            backend_extra: serde_json::Value::Null,
            route_reflector: false,
            second_subnet_mtu: None,
            default_xdp: false,
            bin_dir: None,
            agent_wrapper: None,
            net_conf: None,
            lease_ttl: 20,
            wait_converged: true,
            numbered_subnets: false,
            agent_args: Vec::new(),
        }
    }
}

impl ClusterOptions {
    /// `nodes` agents configured by `net_conf`, leases of `lease_ttl` s, not waited for: what
    /// the agent suites start from.
    pub fn agents(nodes: usize, net_conf: serde_json::Value, lease_ttl: u64) -> Self {
        Self {
            nodes,
            net_conf: Some(net_conf),
            lease_ttl,
            wait_converged: false,
            ..Default::default()
        }
    }
}

pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub pins: PinDir,
    pub dir: PathBuf,
    pub agent: Option<NsProcess>,
    pub pods: Vec<Pod>,
    /// Where this node's `weft-agent` and `weft-cni` come from.
    pub bin_dir: PathBuf,
}

pub struct Pod {
    pub ns: Netns,
    pub container_id: String,
    pub ip: Ipv4Addr,
}

pub struct Cluster {
    // Field order is drop order: pods and agents go before the underlay and etcd.
    pub nodes: Vec<Node>,
    /// BIRD on the underlay router (`ClusterOptions::route_reflector`).
    pub router: Option<crate::bird::Bird>,
    /// Pod subnets the router announces itself (hijack attempts), see `reconfigure_router`.
    pub router_announces: Vec<ipnet::Ipv4Net>,
    pub flannel: Vec<FlannelNode>,
    pub etcd: Etcd,
    pub underlay: Netns,
    pub net_conf: PathBuf,
    pub options: ClusterOptions,
    next_node: usize,
}

impl Node {
    pub fn maps(&self) -> Maps {
        Maps::open_pinned(&self.pins.path).expect("opening the node's pinned maps")
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    /// The control socket of the BIRD the node's agent runs (bgp backend).
    pub fn bird_socket(&self) -> PathBuf {
        self.dir.join("bird").join("bird.ctl")
    }

    /// The node's pod subnet (from its subnet file).
    pub fn subnet(&self) -> ipnet::Ipv4Net {
        self.subnet_env().subnet
    }

    /// Prefixes in the node's BGP routing table (what BIRD installed for the datapath).
    pub fn bgp_learned(&self) -> std::collections::BTreeSet<ipnet::Ipv4Net> {
        self.ns.run(|| {
            weft_agent::bgp::table::read(weft_common::BGP_TABLE_DEFAULT)
                .expect("reading the BGP table")
                .into_keys()
                .collect()
        })
    }

    /// Whether the node has routes and every one is in `mode`.
    pub fn routes_all_in(&self, mode: weft_common::RouteMode) -> bool {
        Maps::open_pinned(&self.pins.path)
            .and_then(|m| m.routes())
            .is_ok_and(|r| !r.is_empty() && r.iter().all(|(_, r)| r.mode == mode as u8))
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

    /// The agent's metrics server.
    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, METRICS_PORT))
    }

    /// GET on the agent's metrics server, from inside the node: (status, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.ns, self.metrics_addr(), path)
    }

    /// A metric's value from /metrics (first sample of that name).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// The current agent's log.
    pub fn log(&self) -> String {
        self.agent.as_ref().map(|a| a.log()).unwrap_or_default()
    }

    /// Waits up to [`AGENT_START`] until `check` holds, while the node's agent runs: an agent
    /// that exits fails the wait at once. `context` (state, logs) closes the failure message.
    pub fn wait_agent(
        &self,
        what: &str,
        mut check: impl FnMut() -> bool,
        context: impl Fn() -> String,
    ) {
        wait_until_else(
            what,
            AGENT_START,
            || {
                assert!(
                    self.agent.as_ref().is_some_and(NsProcess::alive),
                    "{}'s agent exited while waiting for {what}\n{}",
                    self.name,
                    context()
                );
                check()
            },
            &context,
        );
    }

    pub fn cni_conf(&self) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "weft",
            "type": "weft-cni",
            "subnetFile": self.subnet_file(),
            "dataDir": self.dir.join("ipam"),
            "pinRoot": self.pins.path,
        })
    }
}

impl Cluster {
    /// `nodes` agents (no pods) configured by `net_conf`, leases of `lease_ttl` s, without
    /// waiting for them to converge.
    pub fn agents(nodes: usize, net_conf: serde_json::Value, lease_ttl: u64) -> Self {
        Self::new(ClusterOptions::agents(nodes, net_conf, lease_ttl))
    }

    pub fn new(options: ClusterOptions) -> Self {
        let underlay = Netns::new("wul");
        underlay.sysctl("net.ipv4.ip_forward", "1");
        for (i, subnet) in UNDERLAY_SUBNETS.iter().enumerate() {
            // A fixed MAC: a bridge otherwise takes its lowest port's MAC and changes it when that
            // port leaves (a node removed), which silently breaks every neighbour's ARP entry for
            // the router and etcd address.
            underlay.ip(&format!(
                "link add br{i} address 02:00:5e:00:01:{i:02x} type bridge"
            ));
            underlay.ip(&format!(
                "addr add {}.{}.{}.1/24 dev br{i}",
                subnet[0], subnet[1], subnet[2]
            ));
            underlay.ip(&format!("link set br{i} up"));
        }
        if let Some(mtu) = options.second_subnet_mtu {
            underlay.ip(&format!("link set br1 mtu {mtu}"));
        }
        let etcd = Etcd::start(&underlay, ETCD_IP, ETCD_PORT);
        let net_conf = std::env::temp_dir()
            .join(unique_name("weft-net-conf-"))
            .with_extension("json");
        let router = options.route_reflector.then(|| {
            crate::bird::Bird::start(&underlay, Self::route_reflector_spec(&[], &[]).config())
        });
        let mut cluster = Self {
            nodes: Vec::new(),
            router,
            router_announces: Vec::new(),
            flannel: Vec::new(),
            etcd,
            underlay,
            net_conf,
            options,
            next_node: 0,
        };
        cluster.write_net_conf();
        for _ in 0..cluster.options.nodes {
            cluster.add_node();
        }
        if cluster.options.wait_converged {
            for i in 0..cluster.nodes.len() {
                cluster.wait_converged(i);
            }
        }
        cluster
    }

    /// The route reflector on the underlay router: iBGP (AS 64512) with the nodes at
    /// `clients`, announcing `announce` itself; it announces a 10 s graceful restart time, so
    /// nodes forget its routes 10 s after it died.
    pub fn route_reflector_spec(
        clients: &[Ipv4Addr],
        announce: &[ipnet::Ipv4Net],
    ) -> crate::bird::RouteReflector {
        crate::bird::RouteReflector {
            asn: 64512,
            subnets: UNDERLAY_SUBNETS
                .iter()
                .map(|s| {
                    (
                        Ipv4Addr::new(s[0], s[1], s[2], 1),
                        format!("{}.{}.{}.0/24", s[0], s[1], s[2]).parse().unwrap(),
                    )
                })
                .collect(),
            clients: clients.to_vec(),
            restart_time: 10,
            announce: announce.to_vec(),
        }
    }

    /// Renders the router's configuration for the current nodes (plus `extra`) and
    /// `router_announces`, and reloads it in place.
    pub fn reconfigure_router(&mut self, extra: Option<Ipv4Addr>) {
        let mut clients: Vec<Ipv4Addr> = self.nodes.iter().map(|n| n.ip).collect();
        clients.extend(extra);
        let config = Self::route_reflector_spec(&clients, &self.router_announces).config();
        if let Some(router) = self.router.as_mut() {
            router.reconfigure(config);
        }
    }

    /// `Backend.Peers` for the route reflector: each node peers with the router's address on
    /// its own subnet (per node by `NodeSubnet`).
    pub fn route_reflector_peers() -> serde_json::Value {
        serde_json::Value::Array(
            UNDERLAY_SUBNETS
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "Address": format!("{}.{}.{}.1", s[0], s[1], s[2]),
                        "AS": 64512,
                        "NodeSubnet": format!("{}.{}.{}.0/24", s[0], s[1], s[2]),
                    })
                })
                .collect(),
        )
    }

    /// Writes flannel's net-conf.json for the current options (`backend_extra` joins the
    /// `Backend` object).
    pub fn write_net_conf(&self) {
        let conf = self.options.net_conf.clone().unwrap_or_else(|| {
            let mut backend = serde_json::json!({
                "Type": self.options.backend,
                "DirectRouting": self.options.direct_routing,
            });
            if let Some(extra) = self.options.backend_extra.as_object() {
                for (k, v) in extra {
                    backend[k] = v.clone();
                }
            }
            serde_json::json!({
                "Network": CLUSTER_NETWORK,
                "SubnetLen": 24,
                "Backend": backend,
            })
        });
        std::fs::write(&self.net_conf, serde_json::to_vec_pretty(&conf).unwrap()).unwrap();
    }

    /// Adds a node (namespace, underlay link, agent) and returns its index.
    pub fn add_node(&mut self) -> usize {
        let index = self.next_node;
        self.next_node += 1;
        let (ns, ip) = self.node_namespace(index);
        let name = if self.options.numbered_subnets {
            format!("node-{}", index + 1)
        } else {
            format!("node-{index}")
        };
        self.adopt_node(ns, ip, name)
    }

    /// Starts a weft agent in an existing node namespace whose underlay address is `ip` (a node
    /// that ran something else before, e.g. flannel) and returns its index in `nodes`.
    pub fn adopt_node(&mut self, ns: Netns, ip: Ipv4Addr, name: String) -> usize {
        let dir = std::env::temp_dir().join(unique_name("weft-node-"));
        std::fs::create_dir_all(&dir).unwrap();
        // The route reflector peers with the new node before its agent starts.
        self.reconfigure_router(Some(ip));
        let mut node = Node {
            name,
            ns,
            ip,
            pins: PinDir::new("node"),
            dir,
            agent: None,
            pods: Vec::new(),
            bin_dir: self.options.bin_dir.clone().unwrap_or_else(bin_dir),
        };
        if self.options.numbered_subnets
            && let Some(n) = node
                .name
                .strip_prefix("node-")
                .and_then(|n| n.parse::<u8>().ok())
        {
            SubnetEnv {
                network: CLUSTER_NETWORK.parse().unwrap(),
                subnet: format!("10.244.{n}.0/24").parse().unwrap(),
                mtu: 1450,
                underlay_mtu: None,
                route_mtu: None,
                ipmasq: true,
                pin_root: node.pins.path.clone(),
            }
            .write(&node.subnet_file())
            .expect("writing the node's subnet file");
        }
        let agent = self.start_agent(&node);
        node.agent = Some(agent);
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// A node namespace with `eth0` on the underlay (subnet by index when two subnets are in
    /// use), a default route through the underlay router, and an MTU-sized wire.
    fn node_namespace(&self, index: usize) -> (Netns, Ipv4Addr) {
        let (subnet, bridge) = if self.options.two_subnets {
            (UNDERLAY_SUBNETS[index % 2], index % 2)
        } else {
            (UNDERLAY_SUBNETS[0], 0)
        };
        let ip = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 10 + index as u8);
        let ns = Netns::new("wn");
        // Strict reverse-path filtering host-wide, as many distributions configure it: weft
        // must work with it and change it only per interface.
        ns.sysctl("net.ipv4.conf.all.rp_filter", "1");
        ns.sysctl("net.ipv4.conf.default.rp_filter", "1");
        let port = unique_name("u");
        self.underlay.ip(&format!(
            "link add {port} type veth peer name eth0 netns {}",
            ns.name
        ));
        if let (1, Some(mtu)) = (bridge, self.options.second_subnet_mtu) {
            self.underlay.ip(&format!("link set {port} mtu {mtu}"));
            ns.ip(&format!("link set eth0 mtu {mtu}"));
        }
        self.underlay
            .ip(&format!("link set {port} master br{bridge} up"));
        ns.ip("link set eth0 up");
        ns.ip(&format!("addr add {ip}/24 dev eth0"));
        ns.ip(&format!(
            "route add default via {}.{}.{}.1",
            subnet[0], subnet[1], subnet[2]
        ));
        mtu_wire(&ns, "eth0");
        (ns, ip)
    }

    /// Adds a node configured as flannel's vxlan backend configures one (kernel `flannel.1`,
    /// `cni0` bridge, one pod), with its lease in etcd as flanneld writes it. Returns its index
    /// in `flannel`.
    pub fn add_flannel_node(&mut self, subnet: ipnet::Ipv4Net) -> usize {
        let index = self.next_node;
        self.next_node += 1;
        let (ns, ip) = self.node_namespace(index);
        let node = FlannelNode::new(ns, ip, "eth0", subnet, 1450);
        let lease = serde_json::json!({
            "PublicIP": ip.to_string(),
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": crate::netns::format_mac(&node.vtep_mac)},
        });
        let key = format!(
            "{FLANNEL_PREFIX}/subnets/{}-{}",
            subnet.network(),
            subnet.prefix_len()
        );
        self.etcd.put(&key, &lease.to_string());
        self.flannel.push(node);
        self.flannel.len() - 1
    }

    /// What flanneld does on a flannel node: program every other lease found in etcd.
    pub fn sync_flannel_nodes(&self) {
        for node in &self.flannel {
            for (key, value) in self.etcd.get_prefix(&format!("{FLANNEL_PREFIX}/subnets/")) {
                let Some(cidr) = key.rsplit('/').next().map(|k| k.replacen('-', "/", 1)) else {
                    continue;
                };
                let Ok(cidr) = cidr.parse::<ipnet::Ipv4Net>() else {
                    continue;
                };
                if cidr == node.subnet {
                    continue;
                }
                let lease: serde_json::Value = serde_json::from_str(&value)
                    .unwrap_or_else(|e| panic!("lease {key} is not JSON ({e}): {value}"));
                let ip: Ipv4Addr = lease["PublicIP"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("lease {key} has no PublicIP: {value}"));
                let mac = lease["BackendData"]["VtepMAC"]
                    .as_str()
                    .unwrap_or_else(|| panic!("lease {key} has no VtepMAC: {value}"));
                node.add_peer(cidr, ip, crate::netns::parse_mac(mac));
            }
        }
    }

    /// Starts `weft-agent` in the node (etcd datastore). Each start logs to its own file.
    pub fn start_agent(&self, node: &Node) -> NsProcess {
        let mut args: Vec<String> = vec![
            "--datastore".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            self.etcd.endpoint(),
            "--net-conf".into(),
            self.net_conf.display().to_string(),
            "--iface".into(),
            "eth0".into(),
            "--node-name".into(),
            node.name.clone(),
            "--pin-root".into(),
            node.pins.path.display().to_string(),
            "--subnet-file".into(),
            node.subnet_file().display().to_string(),
            "--cni-data-dir".into(),
            node.dir.join("ipam").display().to_string(),
            "--metrics-addr".into(),
            node.metrics_addr().to_string(),
            "--lease-ttl".into(),
            self.options.lease_ttl.to_string(),
            "--conntrack-max".into(),
            crate::TEST_CONNTRACK_MAX.to_string(),
            "--bgp-dir".into(),
            node.dir.join("bird").display().to_string(),
        ];
        // XDP unless asked otherwise, so the clusters cover the XDP path: the default (`auto`)
        // picks tc on these veth underlays.
        if !self.options.default_xdp {
            args.push("--xdp=on".into());
        }
        args.extend(self.options.agent_args.iter().cloned());
        let log = node.dir.join(format!("agent-{}.log", unique_name("")));
        let agent = node.bin_dir.join("weft-agent");
        assert!(
            agent.exists(),
            "{} is missing: run `cargo build --workspace --exclude node-ebpf` first (`cargo xtask test` does)",
            agent.display()
        );
        let (program, args) = match &self.options.agent_wrapper {
            None => (agent, args),
            Some(wrap) => {
                let mut all = wrap(&node.dir);
                assert!(!all.is_empty(), "the agent wrapper names no program");
                let program = PathBuf::from(all.remove(0));
                all.push(agent.display().to_string());
                all.extend(args);
                (program, all)
            }
        };
        NsProcess::spawn(
            &node.ns,
            &program,
            &args,
            &[("RUST_LOG", "info".into())],
            &log,
        )
    }

    /// Kills a node's agent with SIGKILL (no clean-up can run) and starts it again.
    pub fn restart_agent(&mut self, index: usize) {
        self.nodes[index].agent.as_mut().unwrap().kill();
        let agent = self.start_agent(&self.nodes[index]);
        self.nodes[index].agent = Some(agent);
    }

    /// Removes a node: agent stopped, lease deleted or expired, namespace gone.
    pub fn remove_node(&mut self, index: usize) -> Node {
        let mut node = self.nodes.remove(index);
        if let Some(agent) = node.agent.as_mut() {
            agent.terminate(Duration::from_secs(5));
        }
        // What an operator does when a node leaves for good (as `kubectl delete node`): its
        // lease goes now rather than when its TTL runs out. An agent that merely restarts keeps
        // its lease, as flannel's does.
        let env = weft_agent::subnet_env::SubnetEnv::read(&node.subnet_file())
            .expect("the leaving node's subnet file");
        self.etcd.delete(&format!(
            "{FLANNEL_PREFIX}/subnets/{}-{}",
            env.subnet.network(),
            env.subnet.prefix_len()
        ));
        node
    }

    /// Pod subnets (/24s of the cluster network, from the top down) that no node and no
    /// flannel node of this cluster holds: for the leases and announcements a test makes up.
    /// Agents lease a subnet at random from the whole network (as flanneld does), so a fixed
    /// made-up subnet is a node's own now and then (three nodes: one run in 85). Call it once
    /// the nodes hold their leases.
    pub fn unheld_subnets(&self) -> Vec<ipnet::Ipv4Net> {
        let mut held: std::collections::BTreeSet<ipnet::Ipv4Net> =
            self.nodes.iter().map(Node::subnet).collect();
        held.extend(self.flannel.iter().map(|f| f.subnet));
        let network = self
            .nodes
            .first()
            .map(|n| n.subnet_env().network)
            .unwrap_or_else(|| CLUSTER_NETWORK.parse().unwrap());
        let mut free: Vec<ipnet::Ipv4Net> = network
            .subnets(24)
            .expect("the cluster network is /24 or wider")
            .filter(|s| !held.contains(s))
            .collect();
        free.reverse();
        free
    }

    /// Waits until every node's BGP table holds every other node's subnet, and nothing else.
    pub fn wait_bgp_converged(&self, timeout: Duration) {
        let subnets: Vec<ipnet::Ipv4Net> = self.nodes.iter().map(Node::subnet).collect();
        for (i, node) in self.nodes.iter().enumerate() {
            let want: std::collections::BTreeSet<ipnet::Ipv4Net> = subnets
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, s)| *s)
                .collect();
            let deadline = std::time::Instant::now() + timeout;
            while node.bgp_learned() != want {
                if std::time::Instant::now() > deadline {
                    panic!(
                        "{}: BGP table {:?}, want {want:?}\n{}\n{}",
                        node.name,
                        node.bgp_learned(),
                        self.datapath_state(),
                        self.agent_logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Waits until every node has its subnet file and routes to exactly every other node.
    pub fn wait_all_converged(&self, timeout: Duration) {
        let others = self.nodes.len().saturating_sub(1);
        for node in &self.nodes {
            wait_until_else(
                &format!("{} to route to {others} peers", node.name),
                timeout,
                || node.subnet_file().exists() && node.route_count() == others,
                || format!("{}\n{}", self.datapath_state(), self.agent_logs()),
            );
        }
    }

    /// Runs `f` on a thread inside the underlay namespace (where etcd is reachable).
    pub fn in_underlay<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.underlay.run(f)
    }

    /// Waits until node `index` has written its subnet file and routes to every other node.
    pub fn wait_converged(&self, index: usize) {
        let node = &self.nodes[index];
        let others = self.nodes.len() - 1;
        node.wait_agent(
            &format!("{} to converge", node.name),
            || {
                node.subnet_file().exists()
                    && Maps::open_pinned(&node.pins.path)
                        .and_then(|m| m.routes())
                        .map(|r| r.len() >= others)
                        .unwrap_or(false)
            },
            || {
                format!(
                    "subnet file: {}\n{}\n{}",
                    node.subnet_file().exists(),
                    self.datapath_state(),
                    self.agent_logs()
                )
            },
        );
    }

    /// Creates a pod on node `index`: a new network namespace, the CNI ADD that `add` runs
    /// (given the node, the container id and the namespace's path; it returns the result), the
    /// pod recorded on the node. Returns its index in the node's pods and its address.
    fn add_pod_with(
        &mut self,
        index: usize,
        add: impl FnOnce(&Node, &str, &str) -> serde_json::Value,
    ) -> (usize, Ipv4Addr) {
        let ns = Netns::new("wp");
        let container_id = unique_name("ctr");
        let result = add(&self.nodes[index], &container_id, &ns.path());
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in the ADD result: {result}"));
        let pods = &mut self.nodes[index].pods;
        pods.push(Pod {
            ns,
            container_id,
            ip,
        });
        (pods.len() - 1, ip)
    }

    /// Creates pod `namespace/name` on node `index` through the CNI plugin (ADD) as a runtime
    /// does for Kubernetes (`K8S_POD_NAMESPACE`, `K8S_POD_NAME` in `CNI_ARGS`), asking for
    /// address `ip` when given. Returns its index in the node's pods and its address.
    pub fn add_named_pod(
        &mut self,
        index: usize,
        namespace: &str,
        name: &str,
        ip: Option<Ipv4Addr>,
    ) -> (usize, Ipv4Addr) {
        let mut args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}");
        if let Some(ip) = ip {
            args += &format!(";IP={ip}");
        }
        self.add_pod_with(index, |node, container_id, netns| {
            cni_with_args(node, "ADD", container_id, netns, &node.cni_conf(), &args)
        })
    }

    /// Creates a pod on node `index` through the CNI plugin (ADD), like a runtime.
    pub fn add_pod(&mut self, index: usize) -> Ipv4Addr {
        self.add_pod_with(index, |node, container_id, netns| {
            cni(node, "ADD", container_id, netns, &node.cni_conf())
        })
        .1
    }

    /// Creates a pod on node `index` through a conflist, as a runtime runs one: weft (its
    /// config extended by `weft_extra`, e.g. capabilities and `runtimeConfig`) then `chained`
    /// plugins (Debian's reference plugins), each given the previous result.
    pub fn add_pod_chained(
        &mut self,
        index: usize,
        weft_extra: serde_json::Value,
        chained: Vec<serde_json::Value>,
    ) -> Ipv4Addr {
        self.add_pod_with(index, |node, container_id, netns| {
            let mut weft = node.cni_conf();
            weft.as_object_mut().unwrap().remove("cniVersion");
            weft.as_object_mut().unwrap().remove("name");
            if let serde_json::Value::Object(extra) = weft_extra {
                weft.as_object_mut().unwrap().extend(extra);
            }
            let mut plugins = vec![weft];
            plugins.extend(chained);
            // Debian's reference plugins speak up to 1.0.0.
            let list =
                serde_json::json!({"cniVersion": "1.0.0", "name": "weft", "plugins": plugins});
            crate::cni::run_conflist(&node.ns, "ADD", &list, container_id, netns, None)
                .unwrap_or_else(|out| panic!("conflist ADD on {} failed: {out:?}", node.name))
        })
        .1
    }

    /// Deletes pod `pod` of node `index` through the CNI plugin (DEL).
    pub fn delete_pod(&mut self, index: usize, pod: usize) {
        let p = self.nodes[index].pods.remove(pod);
        let node = &self.nodes[index];
        cni(node, "DEL", &p.container_id, &p.ns.path(), &node.cni_conf());
    }

    pub fn all_pods(&self) -> Vec<(usize, &Pod)> {
        self.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.pods.iter().map(move |p| (i, p)))
            .collect()
    }
}

/// A host on the underlay that is not a node (a client outside the cluster, or an attacker on
/// the same L2 segment).
pub struct OutsideHost {
    pub ns: Netns,
    pub ip: Ipv4Addr,
}

impl Cluster {
    /// Adds a host on the first underlay subnet (bridge `br0`), default route through the
    /// underlay router.
    pub fn add_outside_host(&self) -> OutsideHost {
        let ns = Netns::new("wo");
        let ip = Ipv4Addr::new(192, 168, 100, 250);
        let port = unique_name("o");
        self.underlay.ip(&format!(
            "link add {port} type veth peer name eth0 netns {}",
            ns.name
        ));
        self.underlay.ip(&format!("link set {port} master br0 up"));
        ns.ip("link set eth0 up");
        ns.ip(&format!("addr add {ip}/24 dev eth0"));
        ns.ip("route add default via 192.168.100.1");
        OutsideHost { ns, ip }
    }

    /// How kube-proxy on node `index` sees its node (for `kube_proxy::install`).
    pub fn proxy_node(&self, index: usize) -> crate::kube_proxy::ProxyNode {
        crate::kube_proxy::ProxyNode {
            name: self.nodes[index].name.clone(),
            ip: self.nodes[index].ip,
            cluster_cidr: CLUSTER_NETWORK.into(),
            service_cidr: SERVICE_NETWORK.into(),
        }
    }

    /// Installs `services` on every node as kube-proxy in `mode` would.
    pub fn install_services(
        &self,
        mode: crate::kube_proxy::Mode,
        services: &[crate::kube_proxy::Service],
    ) {
        for i in 0..self.nodes.len() {
            crate::kube_proxy::install(&self.nodes[i].ns, mode, services, &self.proxy_node(i));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nodes first (their Drop kills agents and removes pods and files), then the underlay.
        self.nodes.clear();
        let _ = std::fs::remove_file(&self.net_conf);
    }
}

/// A node dropped on its own (removed from a cluster): agent killed, pods and files gone.
impl Drop for Node {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.as_mut() {
            agent.kill();
        }
        self.pods.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Executes the CNI plugin in the node's namespace with the CNI environment and `conf` on
/// stdin; returns the parsed result, panicking with the plugin's error output on failure.
pub fn cni(
    node: &Node,
    command: &str,
    container_id: &str,
    netns: &str,
    conf: &serde_json::Value,
) -> serde_json::Value {
    cni_with_args(node, command, container_id, netns, conf, "")
}

/// [`cni`] with `CNI_ARGS` (e.g. `K8S_POD_NAMESPACE=x;K8S_POD_NAME=a;IP=10.244.1.2`).
pub fn cni_with_args(
    node: &Node,
    command: &str,
    container_id: &str,
    netns: &str,
    conf: &serde_json::Value,
    args: &str,
) -> serde_json::Value {
    let plugin = node.bin_dir.join("weft-cni");
    assert!(plugin.exists(), "{} is missing", plugin.display());
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", node.ns.path()))
        .arg(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", &node.bin_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting weft-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("waiting for weft-cni");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        panic!(
            "weft-cni {command} on {} failed ({}): {stdout} {}",
            node.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if stdout.trim().is_empty() {
        return serde_json::Value::Null;
    }
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("weft-cni {command} printed non-JSON ({e}): {stdout}"))
}

/// One probe of the connectivity matrix.
pub struct Probe {
    pub from: String,
    pub to: String,
    pub ok: bool,
    pub rtt_ms: Option<f64>,
}

/// Pings `to` from the namespace `ns_name` (three echoes, 0.1 s apart) and returns the average RTT when all came
/// back.
pub fn ping_rtt_in(ns_name: &str, to: Ipv4Addr) -> Option<f64> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns_name,
            "ping",
            "-c",
            "3",
            "-i",
            "0.1",
            "-W",
            "1",
            "-q",
            &to.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    // "rtt min/avg/max/mdev = 0.041/0.055/0.070/0.012 ms"
    let text = String::from_utf8_lossy(&out.stdout);
    let stats = text.split(" = ").nth(1)?;
    stats.split('/').nth(1)?.parse().ok()
}

impl Cluster {
    /// Every pod to every pod, every node to every pod, every pod to every node.
    pub fn connectivity_matrix(&self) -> Vec<Probe> {
        // (from label, from namespace name, to label, to address)
        let mut plan: Vec<(String, String, String, Ipv4Addr)> = Vec::new();
        let pods = self.all_pods();
        let pod_name = |node: usize, ip: Ipv4Addr| format!("{}/{}", self.nodes[node].name, ip);
        for (fi, from) in &pods {
            for (ti, to) in &pods {
                if from.ip != to.ip {
                    plan.push((
                        pod_name(*fi, from.ip),
                        from.ns.name.clone(),
                        pod_name(*ti, to.ip),
                        to.ip,
                    ));
                }
            }
            for node in &self.nodes {
                plan.push((
                    pod_name(*fi, from.ip),
                    from.ns.name.clone(),
                    node.name.clone(),
                    node.ip,
                ));
            }
        }
        for node in &self.nodes {
            for (ti, to) in &pods {
                plan.push((
                    node.name.clone(),
                    node.ns.name.clone(),
                    pod_name(*ti, to.ip),
                    to.ip,
                ));
            }
        }
        // Probes run 8 at a time: each is a few pings, mostly waiting.
        let mut probes = Vec::with_capacity(plan.len());
        for chunk in plan.chunks(8) {
            let results: Vec<Option<f64>> = std::thread::scope(|scope| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|(_, ns, _, to)| scope.spawn(move || ping_rtt_in(ns, *to)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for ((from, _, to, _), rtt) in chunk.iter().zip(results) {
                probes.push(Probe {
                    from: from.clone(),
                    to: to.clone(),
                    ok: rtt.is_some(),
                    rtt_ms: rtt,
                });
            }
        }
        probes
    }

    /// TCP (a 256 KB transfer, content checked) and UDP (datagrams of 1421, 1422 and 1423
    /// bytes: the largest unfragmented one and the first that fragments) from every pod to every other pod and from every node to every
    /// pod. Panics with context on the first failure; returns how many pairs were checked.
    pub fn assert_tcp_udp_matrix(&self) -> usize {
        let pods = self.all_pods();
        let mut pairs: Vec<(&Netns, &Pod)> = Vec::new();
        for (_, from) in &pods {
            for (_, to) in &pods {
                if from.ip != to.ip {
                    pairs.push((&from.ns, to));
                }
            }
        }
        for node in &self.nodes {
            for (_, to) in &pods {
                pairs.push((&node.ns, to));
            }
        }
        // Eight pairs at a time, each on its own ports.
        let indexed: Vec<(usize, &(&Netns, &Pod))> = pairs.iter().enumerate().collect();
        for chunk in indexed.chunks(8) {
            std::thread::scope(|scope| {
                for (i, (from, to)) in chunk {
                    let (from, to) = (*from, *to);
                    let port = 20000 + 2 * *i as u16;
                    scope.spawn(move || {
                        crate::flow::tcp_transfer(
                            &to.ns,
                            to.ip,
                            port,
                            from,
                            256 << 10,
                            Duration::from_secs(10),
                        );
                        let retries =
                            crate::flow::udp_echo_sizes(from, &to.ns, to.ip, port + 1, 1421..=1423);
                        assert!(retries <= 1, "UDP to {} needed {retries} retries", to.ip);
                    });
                }
            });
        }
        pairs.len()
    }

    /// Runs the connectivity matrix and panics, with the datapath state and agent logs, when
    /// any probe failed. Returns the number of probes.
    pub fn assert_full_matrix(&self) -> usize {
        let probes = self.connectivity_matrix();
        let failed: Vec<String> = probes
            .iter()
            .filter(|p| !p.ok)
            .map(|p| format!("{} -> {}", p.from, p.to))
            .collect();
        assert!(
            failed.is_empty(),
            "unreachable: {failed:?}\n{}\n{}",
            self.datapath_state(),
            self.agent_logs()
        );
        probes.len()
    }

    /// Every node's routes, peers and non-zero drop counters, for failure messages.
    pub fn datapath_state(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let maps = node.maps();
            out += &format!("--- {} ({}) ---\n", node.name, node.ip);
            for (net, r) in maps.routes().unwrap_or_default() {
                out += &format!(
                    "  route {net} -> {} mode {}\n",
                    Ipv4Addr::from(r.node_ip),
                    r.mode
                );
            }
            for (ip, _) in maps.nodes().unwrap_or_default() {
                out += &format!("  peer {ip}\n");
            }
            for (reason, n) in maps.drops().unwrap_or_default() {
                if n > 0 {
                    out += &format!("  drop {} {n}\n", reason.name());
                }
            }
            // Without the bgp backend the table does not exist (`ip` fails): a failure message
            // must not turn into another panic.
            let table = weft_common::BGP_TABLE_DEFAULT.to_string();
            let bgp_table = Command::new("ip")
                .args(["-n", &node.ns.name, "route", "show", "table", &table])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for line in bgp_table.lines() {
                out += &format!("  bgp table: {line}\n");
            }
        }
        out
    }

    /// The agents' logs, for failure messages.
    pub fn agent_logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} agent log ---\n{}", n.name, n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A plain HTTP/1.0 GET from inside `ns`; returns (status, body).
pub fn http_get(ns: &Netns, addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let ns_path = ns.path();
    std::thread::spawn(move || {
        crate::netns::enter(&ns_path);
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        s.write_all(request.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    })
    .join()
    .ok()
    .flatten()
}

impl Cluster {
    /// Waits until node `index`'s agent answers 200 on /readyz.
    pub fn wait_ready(&self, index: usize) {
        let node = &self.nodes[index];
        node.wait_agent(
            &format!("{} agent /readyz", node.name),
            || matches!(node.http_get("/readyz"), Some((200, _))),
            || node.log(),
        );
    }
}

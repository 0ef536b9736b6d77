//! BIRD 2's configuration, rendered from a plain description of the cluster ([`ClusterState`]).
//!
//! What BIRD is told to do:
//! - export this node's pod subnets (a static blackhole route in BIRD's own table, never in the
//!   kernel) to every session, and nothing else;
//! - import, per session, only routes that cannot hijack (the import filters are rendered from
//!   the node list): from a mesh peer, exactly that node's pod subnets; from a router (a
//!   configured peer), exactly the pod subnets of known nodes, never this node's own, and only
//!   when the path shows the owner originated it (a route reflector's ORIGINATOR_ID, an eBGP
//!   path that started in the nodes' AS, no other node as next hop); never a router's own
//!   announcement of a pod subnet. Anything else (a more specific prefix inside a node's subnet, a subnet no
//!   node owns, a default route) is refused and kept visible as filtered;
//! - write what it learned, and nothing else, into weft's own kernel table (the datapath looks
//!   `bgp` routes up there); never write to the main table;
//! - resolve next hops recursively against the node's own routes (the main table, learned
//!   read-only, and the underlay's connected subnet), so a route reflector's route whose next
//!   hop is a node on another subnet goes via the node's gateway;
//! - graceful restart on every session and on the kernel table: a restarting speaker (agent or
//!   BIRD restart) keeps the kernel routes, and its peers keep forwarding along its routes for
//!   the restart time.
//!
//! The same input always renders the same text (nodes and peers sorted), so an unchanged cluster
//! never causes a reload, and a change reloads only what it touches.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use super::config::BgpConfig;

/// This node, as BGP needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNode {
    pub name: String,
    /// Underlay address: router id, session source, the next hop peers learn.
    pub ip: Ipv4Addr,
    /// The underlay interface's subnet (on-link next hops).
    pub underlay_subnet: Ipv4Net,
    pub underlay_iface: String,
    /// This node's pod subnets (one in practice).
    pub subnets: Vec<Ipv4Net>,
    /// Matched by `Peers[].NodeSelector`.
    pub labels: BTreeMap<String, String>,
}

/// Another node of the cluster: a mesh peer, and the owner of its pod subnets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerNode {
    pub ip: Ipv4Addr,
    pub subnets: Vec<Ipv4Net>,
}

/// Everything the rendered configuration depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterState {
    pub local: LocalNode,
    /// The cluster's pod network: its routes are never taken from the main table.
    pub network: Ipv4Net,
    /// The other nodes.
    pub nodes: Vec<PeerNode>,
    pub config: BgpConfig,
}

/// Where BIRD keeps its files (the caller's per-node directory).
#[derive(Clone, Debug)]
pub struct Files {
    pub dir: std::path::PathBuf,
}

impl Files {
    pub fn config(&self) -> std::path::PathBuf {
        self.dir.join("bird.conf")
    }
    pub fn socket(&self) -> std::path::PathBuf {
        self.dir.join("bird.ctl")
    }
    pub fn pid(&self) -> std::path::PathBuf {
        self.dir.join("bird.pid")
    }
}

/// Protocol name prefixes: sessions to other nodes (mesh) and to configured peers (routers).
pub const MESH_PREFIX: &str = "mesh_";
pub const PEER_PREFIX: &str = "peer_";

/// A BIRD symbol for an address: `192.168.1.7` -> `<prefix>192_168_1_7`.
pub fn session_name(prefix: &str, ip: Ipv4Addr) -> String {
    format!("{prefix}{}", ip.to_string().replace('.', "_"))
}

/// The address a session name was made from.
pub fn session_peer(name: &str) -> Option<Ipv4Addr> {
    let rest = name
        .strip_prefix(MESH_PREFIX)
        .or_else(|| name.strip_prefix(PEER_PREFIX))?;
    rest.replace('_', ".").parse().ok()
}

/// A BIRD prefix set: `[ 10.244.1.0/24, 10.244.2.0/24 ]`.
fn prefix_set<'a>(nets: impl IntoIterator<Item = &'a Ipv4Net>) -> String {
    let items: Vec<String> = nets.into_iter().map(|n| n.to_string()).collect();
    format!("[ {} ]", items.join(", "))
}

/// One BGP session to render.
struct Session {
    name: String,
    address: Ipv4Addr,
    asn: u32,
    port: u16,
    /// `None`: a router (the shared router filter); `Some`: a mesh peer's own subnets.
    mesh_subnets: Option<Vec<Ipv4Net>>,
}

/// The sessions this node opens: the configured peers that apply to it, then (with `Mesh`) every
/// other node not already a configured peer. Never itself, never one address twice.
fn sessions(state: &ClusterState) -> Vec<Session> {
    let local = &state.local;
    let mut seen = BTreeSet::from([local.ip]);
    let mut out = Vec::new();
    for p in &state.config.peers {
        if p.applies_to(&local.labels, local.ip) && seen.insert(p.address) {
            out.push(Session {
                name: session_name(PEER_PREFIX, p.address),
                address: p.address,
                asn: p.asn,
                port: p.port,
                mesh_subnets: None,
            });
        }
    }
    if state.config.mesh {
        let mut nodes: Vec<&PeerNode> = state.nodes.iter().collect();
        nodes.sort_by_key(|n| n.ip);
        for n in nodes {
            if seen.insert(n.ip) {
                let mut subnets = n.subnets.clone();
                subnets.sort();
                subnets.dedup();
                subnets.retain(|s| !local.subnets.contains(s));
                out.push(Session {
                    name: session_name(MESH_PREFIX, n.ip),
                    address: n.ip,
                    asn: state.config.asn,
                    port: super::config::BGP_PORT,
                    mesh_subnets: Some(subnets),
                });
            }
        }
    }
    out
}

/// BIRD's configuration for `state`.
pub fn render(state: &ClusterState) -> String {
    let local = &state.local;
    let cfg = &state.config;
    let mut local_subnets = local.subnets.clone();
    local_subnets.sort();
    local_subnets.dedup();
    // Owners of every other pod subnet, sorted; a subnet claimed by this node is never another's.
    let mut owners: BTreeMap<Ipv4Net, Ipv4Addr> = BTreeMap::new();
    for n in &state.nodes {
        for s in &n.subnets {
            if !local_subnets.contains(s) && n.ip != local.ip {
                owners.entry(*s).or_insert(n.ip);
            }
        }
    }
    let mut node_ips: BTreeSet<Ipv4Addr> = state.nodes.iter().map(|n| n.ip).collect();
    node_ips.insert(local.ip);
    let keepalive = (cfg.hold_time / 3).max(1);

    let mut c = String::new();
    let w = &mut c;
    let _ = writeln!(
        w,
        "# Rendered by weft-agent for node {} ({}): do not edit, it is rewritten on every change.",
        local.name, local.ip
    );
    let _ = writeln!(
        w,
        "log stderr {{ info, remote, warning, error, auth, fatal, bug }};"
    );
    // Unix seconds: parsed by weft (birdc output), no spaces.
    let _ = writeln!(w, "timeformat protocol \"%s\";\ntimeformat route \"%s\";");
    let _ = writeln!(w, "router id {};", local.ip);
    // After a restart (`bird -R`), the kernel table is synchronised once every peer sent its
    // routes, or after this long if one never comes back.
    let _ = writeln!(w, "graceful restart wait {};", cfg.restart_time);
    let _ = writeln!(w, "ipv4 table igp4;\n");
    let _ = writeln!(
        w,
        "define WEFT_NODE_IPS = [ {} ];\n",
        node_ips
            .iter()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(w, "protocol device {{ scan time 10; }}\n");
    // Next hops resolve against the underlay's connected subnet and the node's main table
    // (read-only: `export none`), never against cluster-network routes (weft_host, pods).
    let _ = writeln!(
        w,
        "protocol direct weft_underlay {{\n  ipv4 {{ table igp4; }};\n  interface \"{}\";\n}}\n",
        local.underlay_iface
    );
    let _ = writeln!(
        w,
        "protocol kernel weft_main {{\n  kernel table 254;\n  learn;\n  scan time 10;\n  ipv4 {{ table igp4; import where net !~ [ {}+ ]; export none; }};\n}}\n",
        state.network
    );
    let _ = writeln!(
        w,
        "protocol kernel weft_table {{\n  kernel table {};\n  merge paths on;\n  graceful restart on;\n  ipv4 {{ table master4; import none; export where source = RTS_BGP; }};\n}}\n",
        cfg.table
    );
    let _ = writeln!(
        w,
        "protocol static weft_pods {{\n  ipv4 {{ table master4; }};"
    );
    for s in &local_subnets {
        let _ = writeln!(w, "  route {s} blackhole;");
    }
    let _ = writeln!(w, "}}\n");
    // Who originated a route a router sent: a route reflector names the originating node
    // (ORIGINATOR_ID, RFC 4456); an eBGP router prepends its AS to the path, which must have
    // started in the nodes' AS; a route neither reflected nor from another AS was originated by
    // the router itself, and must then be the owner's own announcement. A next hop that is a
    // node must be the owner too.
    let _ = writeln!(
        w,
        "function weft_from_owner(ip owner) {{\n  \
           if bgp_next_hop ~ WEFT_NODE_IPS && bgp_next_hop != owner then return false;\n  \
           if defined(bgp_originator_id) then return bgp_originator_id = owner;\n  \
           if bgp_path.len = 0 then return bgp_next_hop = owner;\n  \
           return bgp_path.last = {};\n}}\n",
        cfg.asn
    );
    let _ = writeln!(w, "filter weft_from_router {{");
    if !local_subnets.is_empty() {
        let _ = writeln!(w, "  if net ~ {} then reject;", prefix_set(&local_subnets));
    }
    for (subnet, owner) in &owners {
        let _ = writeln!(
            w,
            "  if net ~ [ {subnet} ] then {{ if weft_from_owner({owner}) then accept; reject; }}"
        );
    }
    let _ = writeln!(w, "  reject;\n}}\n");
    let _ = writeln!(
        w,
        "template bgp weft_session {{\n  \
           local {ip} as {asn};\n  \
           strict bind on;\n  \
           graceful restart on;\n  \
           graceful restart time {restart};\n  \
           hold time {hold};\n  \
           keepalive time {keepalive};\n  \
           connect delay time 1;\n  \
           connect retry time 5;\n  \
           error wait time 1, 30;\n  \
           ipv4 {{\n    \
             table master4;\n    \
             igp table igp4;\n    \
             gateway recursive;\n    \
             import keep filtered on;\n    \
             add paths rx;\n    \
             export where proto = \"weft_pods\";\n  \
           }};\n}}\n",
        ip = local.ip,
        asn = cfg.asn,
        restart = cfg.restart_time,
        hold = cfg.hold_time,
    );
    for s in sessions(state) {
        let _ = writeln!(w, "protocol bgp {} from weft_session {{", s.name);
        let _ = writeln!(w, "  neighbor {} port {} as {};", s.address, s.port, s.asn);
        if s.asn != cfg.asn && !local.underlay_subnet.contains(&s.address) {
            // eBGP to a router that is not on-link.
            let _ = writeln!(w, "  multihop;");
        }
        match &s.mesh_subnets {
            Some(subnets) if subnets.is_empty() => {
                let _ = writeln!(w, "  ipv4 {{ import none; }};");
            }
            Some(subnets) => {
                let _ = writeln!(
                    w,
                    "  ipv4 {{ import where net ~ {}; }};",
                    prefix_set(subnets)
                );
            }
            None => {
                let _ = writeln!(w, "  ipv4 {{ import filter weft_from_router; }};");
            }
        }
        let _ = writeln!(w, "}}\n");
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::config::Peer;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn state(mesh: bool, peers: Vec<Peer>) -> ClusterState {
        ClusterState {
            local: LocalNode {
                name: "node-0".into(),
                ip: "192.168.100.10".parse().unwrap(),
                underlay_subnet: net("192.168.100.0/24"),
                underlay_iface: "eth0".into(),
                subnets: vec![net("10.244.1.0/24")],
                labels: BTreeMap::from([("rack".to_string(), "r1".to_string())]),
            },
            network: net("10.244.0.0/16"),
            nodes: vec![
                PeerNode {
                    ip: "192.168.101.12".parse().unwrap(),
                    subnets: vec![net("10.244.3.0/24")],
                },
                PeerNode {
                    ip: "192.168.100.11".parse().unwrap(),
                    subnets: vec![net("10.244.2.0/24")],
                },
            ],
            config: BgpConfig {
                mesh,
                peers,
                ..BgpConfig::default()
            },
        }
    }

    fn peer(addr: &str, asn: u32) -> Peer {
        Peer {
            address: addr.parse().unwrap(),
            asn,
            port: 179,
            node_selector: BTreeMap::new(),
            node_subnet: None,
        }
    }

    #[test]
    fn mesh_sessions_import_only_the_peers_own_subnets() {
        let text = render(&state(true, vec![]));
        assert!(text.contains("router id 192.168.100.10;"));
        assert!(text.contains("route 10.244.1.0/24 blackhole;"));
        assert!(text.contains("kernel table 2500;"));
        // Sorted by address, whatever the node order.
        let a = text.find("protocol bgp mesh_192_168_100_11").unwrap();
        let b = text.find("protocol bgp mesh_192_168_101_12").unwrap();
        assert!(a < b);
        assert!(text.contains(
            "protocol bgp mesh_192_168_100_11 from weft_session {\n  neighbor 192.168.100.11 port 179 as 64512;\n  ipv4 { import where net ~ [ 10.244.2.0/24 ]; };"
        ));
        assert!(!text.contains("peer_"));
        assert!(text.contains("export where proto = \"weft_pods\";"));
        assert!(text.contains("export where source = RTS_BGP;"));
        assert!(
            text.contains("export none;"),
            "the main table is never written"
        );
    }

    #[test]
    fn router_filter_is_rendered_from_the_node_list() {
        let mut rr = peer("192.168.100.1", 64512);
        rr.node_subnet = Some(net("192.168.100.0/24"));
        let mut other_rack = peer("192.168.101.1", 64512);
        other_rack.node_subnet = Some(net("192.168.101.0/24"));
        let mut by_label = peer("10.9.9.9", 65001);
        by_label.node_selector = BTreeMap::from([("rack".to_string(), "r1".to_string())]);
        let mut other_label = peer("10.9.9.8", 65001);
        other_label.node_selector = BTreeMap::from([("rack".to_string(), "r2".to_string())]);
        let text = render(&state(false, vec![rr, other_rack, by_label, other_label]));
        assert!(text.contains("protocol bgp peer_192_168_100_1 from weft_session"));
        assert!(
            !text.contains("peer_192_168_101_1"),
            "another subnet's router"
        );
        assert!(text.contains("protocol bgp peer_10_9_9_9 from weft_session {\n  neighbor 10.9.9.9 port 179 as 65001;\n  multihop;"));
        assert!(!text.contains("peer_10_9_9_8"), "another rack's router");
        assert!(!text.contains("mesh_"));
        assert!(text.contains("if net ~ [ 10.244.1.0/24 ] then reject;"));
        assert!(text.contains(
            "if net ~ [ 10.244.2.0/24 ] then { if weft_from_owner(192.168.100.11) then accept; reject; }"
        ));
        assert!(text.contains(
            "if net ~ [ 10.244.3.0/24 ] then { if weft_from_owner(192.168.101.12) then accept; reject; }"
        ));
        assert!(text.contains(
            "define WEFT_NODE_IPS = [ 192.168.100.10, 192.168.100.11, 192.168.101.12 ];"
        ));
    }

    #[test]
    fn a_configured_peer_that_is_a_node_is_not_meshed_twice_and_never_itself() {
        let text = render(&state(
            true,
            vec![peer("192.168.100.11", 64512), peer("192.168.100.10", 64512)],
        ));
        assert!(text.contains("protocol bgp peer_192_168_100_11"));
        assert!(!text.contains("mesh_192_168_100_11"));
        assert!(!text.contains("_192_168_100_10 "), "no session to itself");
        assert!(text.contains("protocol bgp mesh_192_168_101_12"));
    }

    #[test]
    fn rendering_is_deterministic() {
        let a = state(true, vec![]);
        let mut b = a.clone();
        b.nodes.reverse();
        assert_eq!(render(&a), render(&b));
        let mut c = a.clone();
        c.nodes.push(PeerNode {
            ip: "192.168.100.13".parse().unwrap(),
            subnets: vec![net("10.244.4.0/24")],
        });
        assert_ne!(render(&a), render(&c));
    }

    #[test]
    fn session_names_round_trip() {
        let ip: Ipv4Addr = "10.1.2.3".parse().unwrap();
        assert_eq!(session_peer(&session_name(MESH_PREFIX, ip)), Some(ip));
        assert_eq!(session_peer(&session_name(PEER_PREFIX, ip)), Some(ip));
        assert_eq!(session_peer("device1"), None);
    }

    /// BIRD itself accepts what is rendered (`bird -p` parses a configuration and exits).
    #[test]
    fn bird_parses_the_rendered_configuration() {
        let mut rr = peer("192.168.100.1", 64512);
        rr.node_subnet = Some(net("192.168.100.0/24"));
        let dir = std::env::temp_dir().join(format!("weft-bird-parse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in [
            state(true, vec![]),
            state(false, vec![rr, peer("10.9.9.9", 65001)]),
            state(true, vec![peer("192.168.100.11", 64512)]),
        ]
        .iter()
        .enumerate()
        {
            let path = dir.join(format!("bird-{i}.conf"));
            std::fs::write(&path, render(s)).unwrap();
            let out = std::process::Command::new("bird")
                .arg("-p")
                .arg("-c")
                .arg(&path)
                .output()
                .expect("running bird -p (bird2 is installed by `cargo xtask bootstrap`)");
            assert!(
                out.status.success(),
                "bird -p refused configuration {i}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                render(s)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

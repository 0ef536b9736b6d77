//! The `bgp` backend, as Calico runs it: BIRD 2 distributes pod routes, and pod traffic leaves
//! unencapsulated along them, across L3 boundaries too.
//!
//! - [`config`]: the backend's keys in net-conf.json (`AS`, `Mesh`, `Peers`, `Encapsulation`,
//!   ...), validated with errors naming the key.
//! - [`render`]: BIRD's configuration from a plain [`render::ClusterState`] (this node, its pod
//!   subnets, the other nodes and theirs, the configured peers), with import filters rendered
//!   from the node list so that no peer can hijack a pod subnet.
//! - [`speaker`]: BIRD as a supervised child process of the agent (reloaded in place, restarted
//!   with graceful restart when it dies, never outliving the agent).
//! - [`birdc`]: `birdc` and the parsing of its output (sessions, routes), for metrics and
//!   `weft status`.
//! - [`table`]: weft's own kernel routing table, which BIRD fills and the datapath reads
//!   (`bpf_fib_lookup` with `BPF_FIB_LOOKUP_TBID`).
//! - [`Controller`]: what the agent's control loop drives through [`BgpControl`]: the backend
//!   config and the cluster in, BIRD started, reconfigured or retired, the learned routes and
//!   the status out.
//!
//! Why a child process rather than a second container in the DaemonSet: the agent renders the
//! configuration, so it also decides when BIRD may start (only once the complete node list is
//! known: a BIRD recovering from a restart with an incomplete list would flush good routes),
//! restarts it at once with the right recovery flag when it dies (a crashing container waits
//! for the kubelet's back-off), and the same supervision works outside Kubernetes (etcd, static
//! file, the tests). The cost, BIRD restarting with the agent, is what graceful restart is for:
//! peers keep forwarding and the kernel keeps the routes (measured: zero loss across a SIGKILL
//! of the agent and of BIRD).
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use weft_common::RouteMode;

pub mod birdc;
pub mod config;
pub mod render;
pub mod speaker;
pub mod table;

pub use config::BgpConfig;
pub use render::{ClusterState, Files, LocalNode, PeerNode};
use speaker::Speaker;

/// After the backend switched away from bgp, BIRD keeps running this long before its clean
/// shutdown (which withdraws this node's routes from its peers): nodes pick up a changed
/// net-conf.json within a second or two of each other, and a peer still in bgp mode keeps its
/// route to this node until it switched too.
pub const RETIRE_AFTER: Duration = Duration::from_secs(10);

/// The route mode a peer's subnet gets. `wanted` comes from the configuration; but a route still
/// programmed in another mode keeps that mode until BIRD has installed a route for the subnet,
/// so a live switch into bgp never sends a packet toward a route that does not exist yet. (A
/// subnet first seen in bgp mode gets `Bgp` at once: until BIRD learns it, its packets are
/// counted drops, `no_bgp_route`.)
pub fn effective_mode(
    wanted: RouteMode,
    subnet: Ipv4Net,
    learned: &BTreeSet<Ipv4Net>,
    programmed: Option<u8>,
) -> RouteMode {
    if wanted != RouteMode::Bgp || learned.contains(&subnet) {
        return wanted;
    }
    match programmed.and_then(RouteMode::from_u8) {
        Some(previous) if previous != RouteMode::Bgp => previous,
        _ => wanted,
    }
}

/// What the reconciler needs to decide bgp peers' modes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteModes {
    pub config: BgpConfig,
    /// Prefixes with a route in weft's kernel table.
    pub learned: Arc<BTreeSet<Ipv4Net>>,
}

/// What changed in weft's table since the last poll.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableChange {
    /// Any route changed (next hops cached by the datapath may be stale).
    pub routes: bool,
    /// The set of learned prefixes changed (route modes may change).
    pub learned: bool,
}

/// The BGP side of a node, for metrics and logs.
#[derive(Clone, Debug, Default)]
pub struct BgpStatus {
    pub running: bool,
    pub sessions: Vec<birdc::Session>,
    pub learned_routes: usize,
    pub refused_routes: usize,
    pub starts: u64,
    pub crashes: u64,
    pub reloads: u64,
    pub reload_errors: u64,
}

/// The BGP side as the control loop drives it (`crate::control_loop`): [`Controller`] runs BIRD;
/// unit tests of the loop use a fake. The loop hands it the backend's bgp settings and the
/// complete node list, polls it every turn for changes in weft's table, and publishes its
/// status.
pub trait BgpControl: Send {
    /// The backend's bgp settings (`None`: the backend is not bgp).
    fn set_config(&mut self, config: Option<&BgpConfig>);
    /// This node's pod subnets and the other nodes (the complete list).
    fn set_cluster(&mut self, local_subnets: Vec<Ipv4Net>, nodes: Vec<PeerNode>);
    /// What changed in weft's table since the last poll.
    fn poll(&mut self) -> TableChange;
    /// Prefixes with a route in weft's table (as of the last poll).
    fn learned(&self) -> Arc<BTreeSet<Ipv4Net>>;
    /// For metrics: `None` while no BIRD is run.
    fn status(&self) -> Option<BgpStatus>;
}

/// The other nodes as BGP sees them: each address with the pod subnets it owns.
pub fn peer_nodes<'a>(
    leases: impl Iterator<Item = &'a crate::datastore::NodeLease>,
) -> Vec<PeerNode> {
    leases
        .fold(
            BTreeMap::<std::net::Ipv4Addr, Vec<Ipv4Net>>::new(),
            |mut m, l| {
                m.entry(l.public_ip).or_default().push(l.subnet);
                m
            },
        )
        .into_iter()
        .map(|(ip, mut subnets)| {
            subnets.sort();
            PeerNode { ip, subnets }
        })
        .collect()
}

/// Drives BIRD for the agent: configuration and cluster in; BIRD started, reconfigured or
/// retired; the learned routes and the status out. Holds no agent internals.
pub struct Controller {
    files: Files,
    local: LocalNode,
    network: Ipv4Net,
    config: Option<BgpConfig>,
    /// `None` until a complete node list was given.
    nodes: Option<Vec<PeerNode>>,
    speaker: Option<Speaker>,
    /// A BIRD from before a switch away from bgp, and when it stops.
    retiring: Option<(Speaker, Instant)>,
    learned: Arc<BTreeSet<Ipv4Net>>,
    table_seen: BTreeMap<Ipv4Net, String>,
    rendered: Option<String>,
}

impl Controller {
    pub fn new(files: Files, local: LocalNode, network: Ipv4Net) -> Self {
        Self {
            files,
            local,
            network,
            config: None,
            nodes: None,
            speaker: None,
            retiring: None,
            learned: Arc::default(),
            table_seen: BTreeMap::new(),
            rendered: None,
        }
    }

    fn state(&self) -> Option<ClusterState> {
        Some(ClusterState {
            local: self.local.clone(),
            network: self.network,
            nodes: self.nodes.clone()?,
            config: self.config.clone()?,
        })
    }

    /// Starts BIRD (once the node list is complete) or hands it the new configuration.
    fn sync(&mut self) {
        let Some(state) = self.state() else {
            return;
        };
        let text = render::render(&state);
        if self.rendered.as_ref() == Some(&text) {
            return;
        }
        match &self.speaker {
            Some(speaker) => speaker.configure(text.clone(), state.config.table),
            None => {
                if let Some((old, _)) = self.retiring.take() {
                    // Switched back before the old one stopped: keep that one.
                    old.configure(text.clone(), state.config.table);
                    self.speaker = Some(old);
                } else {
                    match Speaker::start(self.files.clone(), state.config.table, text.clone()) {
                        Ok(s) => self.speaker = Some(s),
                        Err(e) => {
                            tracing::error!("starting the BGP speaker: {e:#}");
                            return;
                        }
                    }
                }
            }
        }
        self.rendered = Some(text);
    }
}

impl BgpControl for Controller {
    fn set_config(&mut self, config: Option<&BgpConfig>) {
        if self.config.as_ref() == config {
            return;
        }
        self.config = config.cloned();
        if self.config.is_none()
            && let Some(speaker) = self.speaker.take()
        {
            tracing::info!(
                "backend is no longer bgp: BIRD stops in {}s",
                RETIRE_AFTER.as_secs()
            );
            self.retiring = Some((speaker, Instant::now() + RETIRE_AFTER));
            self.rendered = None;
        }
        self.sync();
    }

    fn set_cluster(&mut self, local_subnets: Vec<Ipv4Net>, nodes: Vec<PeerNode>) {
        self.local.subnets = local_subnets;
        self.nodes = Some(nodes);
        self.sync();
    }

    /// Retires a BIRD whose time has come and reports changes in weft's table.
    fn poll(&mut self) -> TableChange {
        if let Some((_, at)) = &self.retiring
            && Instant::now() >= *at
        {
            let (old, _) = self.retiring.take().expect("checked");
            // A clean shutdown takes milliseconds, but never holds up the control loop.
            std::thread::spawn(move || old.stop());
        }
        let table = match &self.speaker {
            Some(s) => s.status().table,
            None => BTreeMap::new(),
        };
        if table == self.table_seen {
            return TableChange::default();
        }
        let learned: BTreeSet<Ipv4Net> = table.keys().copied().collect();
        let change = TableChange {
            routes: true,
            learned: learned != *self.learned,
        };
        self.table_seen = table;
        if change.learned {
            self.learned = Arc::new(learned);
        }
        change
    }

    fn learned(&self) -> Arc<BTreeSet<Ipv4Net>> {
        self.learned.clone()
    }

    fn status(&self) -> Option<BgpStatus> {
        let speaker = self.speaker.as_ref()?;
        let s = speaker.status();
        Some(BgpStatus {
            running: s.running,
            learned_routes: s.table.len(),
            refused_routes: s.refused.len(),
            sessions: s.sessions,
            starts: s.starts,
            crashes: s.crashes,
            reloads: s.reloads,
            reload_errors: s.reload_errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_switch_keeps_the_old_mode_until_bird_has_the_route() {
        let subnet: Ipv4Net = "10.244.2.0/24".parse().unwrap();
        let none = BTreeSet::new();
        let learned = BTreeSet::from([subnet]);
        let vxlan = Some(RouteMode::Vxlan as u8);
        let bgp = Some(RouteMode::Bgp as u8);
        assert_eq!(
            effective_mode(RouteMode::Bgp, subnet, &none, vxlan),
            RouteMode::Vxlan
        );
        assert_eq!(
            effective_mode(RouteMode::Bgp, subnet, &learned, vxlan),
            RouteMode::Bgp
        );
        // A new subnet, or one already in bgp: bgp (a missing route is a counted drop).
        assert_eq!(
            effective_mode(RouteMode::Bgp, subnet, &none, None),
            RouteMode::Bgp
        );
        assert_eq!(
            effective_mode(RouteMode::Bgp, subnet, &none, bgp),
            RouteMode::Bgp
        );
        // Switching away from bgp is immediate.
        assert_eq!(
            effective_mode(RouteMode::Ipip, subnet, &none, bgp),
            RouteMode::Ipip
        );
    }

    #[test]
    fn metrics_count_established_sessions_and_routes() {
        let text = "\
peer_192_168_100_1 BGP        ---        up     1764150924  Established
mesh_192_168_100_11 BGP        ---        start  1764150925  Active        Socket: Connection refused
";
        let status = BgpStatus {
            running: true,
            sessions: birdc::parse_protocols(text),
            learned_routes: 3,
            refused_routes: 1,
            ..Default::default()
        };
        let metrics = crate::metrics::Metrics::new(None);
        assert!(
            !metrics.render().contains("weft_bgp_"),
            "no BGP metrics without bgp"
        );
        metrics.set_bgp(Some(status));
        let out = metrics.render();
        for line in [
            "weft_bgp_speaker_up 1",
            "weft_bgp_sessions_established 1",
            "weft_bgp_sessions_configured 2",
            "weft_bgp_learned_routes 3",
            "weft_bgp_refused_routes 1",
            "weft_bgp_session_established{peer=\"192.168.100.1\",kind=\"peer\"} 1",
            "weft_bgp_session_established{peer=\"192.168.100.11\",kind=\"mesh\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }
}

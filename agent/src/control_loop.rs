//! The agent's control loop: datastore events and net-conf changes in, peer map writes out.
//!
//! [`ControlLoop::turn`] is one turn without waiting (take the queued events, notice a changed
//! net-conf, drive BGP, apply, schedule a retry with backoff on failure, a full resync when
//! due); [`ControlLoop::run`] waits for events and turns forever. Everything outside the maps
//! goes through [`PeerMaps`], [`BgpControl`] and plain callbacks, so the loop runs in unit tests
//! with [`crate::reconcile::MemoryMaps`], a fake BGP side and a fake clock.
//!
//! The bgp backend: the loop gives the BGP side ([`crate::bgp::Controller`], which runs BIRD)
//! the backend's settings (at start and on every net-conf change) and the complete node list
//! (once the datastore listed it, and on every change); every turn it asks what changed in
//! weft's routing table: changed routes flush the datapath's cached next hops, a changed set of
//! learned prefixes re-decides the route modes (a route switching into bgp keeps its old mode
//! until BIRD installed its route).
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Result, bail};
use ipnet::Ipv4Net;
use weft_common::{BGP_TABLE_DEFAULT, CONFIG_F_READY, CONFIG_F_VXLAN_DEV, NodeConfig};

use crate::{
    bgp::{BgpControl, RouteModes},
    config::FlannelNetConf,
    datastore::{Backoff, Event},
    metrics::Metrics,
    node_net::{Underlay, vtep_mac_for},
    reconcile::{ModePolicy, PeerMaps, Reconciler},
};

/// The node config the datapath runs with under `conf`.
pub fn node_config(conf: &FlannelNetConf, underlay: &Underlay) -> NodeConfig {
    NodeConfig {
        node_ip: underlay.node_ip.octets(),
        underlay_ifindex: underlay.ifindex,
        vni: conf.backend.vni,
        vxlan_port: conf.backend.port,
        flags: CONFIG_F_READY,
        vtep_mac: vtep_mac_for(underlay.node_ip),
        _pad: [0; 2],
        // The table bgp routes are looked up in.
        bgp_table: conf
            .backend
            .bgp
            .as_ref()
            .map_or(BGP_TABLE_DEFAULT, |b| b.table),
    }
}

/// How this node reaches peers under `conf`; for the bgp backend, with the prefixes BIRD has
/// installed in weft's table (`learned`).
pub fn mode_policy(
    conf: &FlannelNetConf,
    underlay: &Underlay,
    learned: Arc<BTreeSet<Ipv4Net>>,
) -> ModePolicy {
    ModePolicy {
        backend: conf.backend.kind,
        direct_routing: conf.backend.direct_routing,
        underlay_subnet: underlay.subnet,
        bgp: conf
            .backend
            .bgp
            .clone()
            .map(|config| RouteModes { config, learned }),
    }
}

/// Watches `--net-conf` for changes a node can apply live: the backend (type, DirectRouting,
/// VNI, port). Pods are not rebuilt: the loop changes their default route's MTU
/// ([`PathMtuControl`]), unless `Backend.MTU` fixed their MTU, and then a backend whose
/// packets would not fit is refused.
pub struct NetConfWatch {
    path: Option<PathBuf>,
    mtime: Option<SystemTime>,
    /// The pods' MTU and the underlay's, when known.
    mtus: Option<(u32, u32)>,
}

impl NetConfWatch {
    pub fn new(path: Option<PathBuf>) -> Self {
        let mtime = path.as_deref().and_then(Self::mtime);
        Self {
            path,
            mtime,
            mtus: None,
        }
    }

    /// Refuses backends that add more than `underlay_mtu - pod_mtu` bytes.
    pub fn with_mtus(mut self, pod_mtu: u32, underlay_mtu: u32) -> Self {
        self.mtus = Some((pod_mtu, underlay_mtu));
        self
    }

    fn mtime(path: &Path) -> Option<SystemTime> {
        std::fs::metadata(path).and_then(|m| m.modified()).ok()
    }

    /// The new config when the file changed to a valid one with another backend.
    pub fn poll(&mut self, current: &FlannelNetConf) -> Option<FlannelNetConf> {
        let path = self.path.as_ref()?;
        let mtime = Self::mtime(path);
        if mtime == self.mtime {
            return None;
        }
        self.mtime = mtime;
        let new = match std::fs::read_to_string(path)
            .map_err(anyhow::Error::from)
            .and_then(|t| FlannelNetConf::parse(&t))
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
        let new = FlannelNetConf {
            backend: new.backend,
            ..current.clone()
        };
        let overhead = new.encap_overhead();
        if let Some((pod_mtu, underlay_mtu)) = self.mtus
            && pod_mtu + overhead > underlay_mtu
        {
            tracing::warn!(
                "ignoring the changed {}: backend {} adds {} bytes, and pods with MTU {pod_mtu} \
                 (Backend.MTU) on an underlay of MTU {underlay_mtu} leave room for {}: lower \
                 Backend.MTU (pods get it when recreated) before switching",
                path.display(),
                new.backend.kind.name(),
                overhead,
                underlay_mtu.saturating_sub(pod_mtu)
            );
            return None;
        }
        Some(new)
    }
}

/// What one turn did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Map entries written or removed.
    pub writes: usize,
    /// Whether an apply failed (retried at `retry_at`).
    pub failed: bool,
    /// Whether the backend changed.
    pub backend_switched: bool,
    /// Whether the set of prefixes in weft's BGP table changed (route modes re-decided).
    pub bgp_learned_changed: bool,
}

/// `weft_vxlan`, kept by the loop while the tc hook decapsulates: VXLAN goes through it (the
/// kernel's vxlan socket, for GRO) only while it is up on the configured port with
/// `from_vxlan` attached, and the loop checks that every second (someone may delete it; a
/// node migrated from flannel frees the port once `flannel.1` is deleted).
pub trait VxlanDeviceControl: Send {
    /// Makes the device fit for `port` (creating or re-creating it); whether VXLAN can go
    /// through it now.
    fn ensure(&mut self, port: u16) -> bool;
}

/// The path MTU of this node's pods (`FlannelNetConf::path_mtu`), kept by the loop: it goes
/// into the subnet file (new pods' default route), the node's host link and the default route
/// of every running pod. A live switch that adds overhead lowers it before the datapath
/// encapsulates more; one that removes overhead raises it once the routes are in their new
/// mode (before, larger packets would still be encapsulated, and the pods would learn the old
/// path MTU back from the datapath's fragmentation-needed). Every resync sets it again,
/// catching a pod whose ADD read the subnet file before a switch.
pub trait PathMtuControl: Send {
    /// Makes everything say `path_mtu`. What fails for one pod is logged and never stops the
    /// others.
    fn apply(&mut self, path_mtu: u32) -> Result<()>;
}

/// How often the loop checks `weft_vxlan`.
const VXLAN_DEVICE_CHECK: Duration = Duration::from_secs(1);

pub struct ControlLoop<M: PeerMaps> {
    pub maps: M,
    pub rec: Reconciler,
    pub conf: FlannelNetConf,
    underlay: Underlay,
    watch: NetConfWatch,
    metrics: Arc<Metrics>,
    /// Called when this node's subnet changed (the subnet file is rewritten).
    on_local_subnet: Box<dyn FnMut(ipnet::Ipv4Net) -> Result<()> + Send>,
    /// Called when this node lost its subnet to another node and holds none.
    on_subnet_lost: Box<dyn FnMut(ipnet::Ipv4Net) -> Result<()> + Send>,
    resync_every: Duration,
    next_resync: Instant,
    pub retry_at: Option<Instant>,
    dirty: bool,
    backoff: Backoff,
    /// `CONFIG_F_*` flags set in every node config written besides `CONFIG_F_READY`.
    config_flags: u16,
    /// The BGP side (BIRD), driven for the bgp backend; idle otherwise.
    bgp: Option<Box<dyn BgpControl>>,
    /// `weft_vxlan` (tc hook only), whether VXLAN goes through it now, and when to check next.
    vxlan_device: Option<(Box<dyn VxlanDeviceControl>, bool, Instant)>,
    /// The pods' path MTU, kept when given.
    path_mtu: Option<Box<dyn PathMtuControl>>,
    /// A switch raised the path MTU: applied once the routes are written in their new mode.
    raise_path_mtu: bool,
}

impl<M: PeerMaps> ControlLoop<M> {
    pub fn new(
        maps: M,
        mut rec: Reconciler,
        conf: FlannelNetConf,
        underlay: Underlay,
        metrics: Arc<Metrics>,
        resync_every: Duration,
        now: Instant,
    ) -> Self {
        // Records are checked against the cluster's network (`crate::admission`).
        rec.set_network(conf.network, conf.subnet_len);
        Self {
            maps,
            rec,
            conf,
            underlay,
            watch: NetConfWatch::new(None),
            metrics,
            on_local_subnet: Box::new(|_| Ok(())),
            on_subnet_lost: Box::new(|_| Ok(())),
            resync_every: resync_every.max(Duration::from_secs(1)),
            // The first apply is a resync: it adopts what the maps hold.
            next_resync: now,
            retry_at: None,
            dirty: false,
            backoff: Backoff::new(Duration::from_secs(10)),
            config_flags: 0,
            bgp: None,
            vxlan_device: None,
            path_mtu: None,
            raise_path_mtu: false,
        }
    }

    /// Keeps the pods' path MTU with `control` (the node's MTU for its pods is already set
    /// when the loop starts).
    pub fn path_mtu(mut self, control: Box<dyn PathMtuControl>) -> Self {
        self.path_mtu = Some(control);
        self
    }

    /// Sets the pods' path MTU; a failure is logged (the next resync tries again).
    fn apply_path_mtu(&mut self, mtu: u32) {
        if let Some(control) = self.path_mtu.as_mut()
            && let Err(e) = control.apply(mtu)
        {
            tracing::warn!("setting the pods' path MTU {mtu}: {e:#}");
        }
    }

    /// Keeps `device` (`weft_vxlan`) for the tc hook; `up`: VXLAN goes through it now (the
    /// node config the agent wrote says so).
    pub fn vxlan_device(mut self, device: Box<dyn VxlanDeviceControl>, up: bool) -> Self {
        self.vxlan_device = Some((device, up, Instant::now() + VXLAN_DEVICE_CHECK));
        self
    }

    /// The node config under `conf`, with the agent's flags and the VXLAN device's.
    fn config(&self, conf: &FlannelNetConf) -> NodeConfig {
        let mut config = node_config(conf, &self.underlay);
        config.flags |= self.config_flags;
        if self.vxlan_device.as_ref().is_some_and(|(_, up, _)| *up) {
            config.flags |= CONFIG_F_VXLAN_DEV;
        }
        config
    }

    /// Checks `weft_vxlan` when due; a change of whether VXLAN can go through it is written
    /// to the node config at once.
    fn keep_vxlan_device(&mut self, now: Instant) -> Result<()> {
        let port = self.conf.backend.port;
        let Some((device, up, next)) = self.vxlan_device.as_mut() else {
            return Ok(());
        };
        if now < *next {
            return Ok(());
        }
        *next = now + VXLAN_DEVICE_CHECK;
        let ok = device.ensure(port);
        if ok == *up {
            return Ok(());
        }
        *up = ok;
        if ok {
            tracing::info!(
                "VXLAN goes through {} again (UDP-tunnel GRO)",
                weft_common::VXLAN_DEV
            );
        } else {
            tracing::warn!(
                "{} is unusable: VXLAN is decapsulated in tc on the underlay (no GRO)",
                weft_common::VXLAN_DEV
            );
        }
        let config = self.config(&self.conf);
        self.maps.set_config(&config)
    }

    /// Drives `bgp` (BIRD) for the bgp backend: it gets the backend's settings now and on every
    /// change, and the node list once it is complete.
    pub fn bgp(mut self, mut bgp: Box<dyn BgpControl>) -> Self {
        bgp.set_config(self.conf.backend.bgp.as_ref());
        self.bgp = Some(bgp);
        self.rec.set_policy(self.policy(&self.conf));
        self
    }

    /// The mode policy under `conf` with what BGP learned so far.
    fn policy(&self, conf: &FlannelNetConf) -> ModePolicy {
        let learned = self.bgp.as_ref().map(|b| b.learned()).unwrap_or_default();
        mode_policy(conf, &self.underlay, learned)
    }

    /// The BGP side's turn: the node list when it changed, then what changed in weft's table.
    fn drive_bgp(&mut self, turn: &mut Turn) {
        let Some(bgp) = self.bgp.as_mut() else {
            return;
        };
        if self.dirty && self.rec.synced {
            let nodes = crate::bgp::peer_nodes(self.rec.remote_leases());
            // A node that lost its subnet to another node announces nothing.
            bgp.set_cluster(self.rec.held_subnet().into_iter().collect(), nodes);
        }
        let change = bgp.poll();
        self.metrics.set_bgp(bgp.status());
        if change.routes
            && let Err(e) = self.maps.flush_next_hops()
        {
            // Cached next hops expire within a second anyway.
            tracing::warn!("flushing next hops after a BGP table change: {e:#}");
        }
        if change.learned {
            self.rec.set_policy(self.policy(&self.conf));
            self.dirty = true;
            turn.bgp_learned_changed = true;
        }
    }

    /// Keeps `flags` (`CONFIG_F_*`, from the agent's flags) in the node config it writes.
    pub fn config_flags(mut self, flags: u16) -> Self {
        self.config_flags = flags;
        self
    }

    /// Applies changes of the net-conf file `path` (its backend) live. With `fixed_mtu` (the
    /// operator's `Backend.MTU`, the pods' interfaces and routes) only those whose overhead fits
    /// it on the underlay's MTU; without, every one (the path MTU follows the backend).
    pub fn watch_net_conf(mut self, path: Option<PathBuf>, fixed_mtu: Option<u32>) -> Self {
        let mut watch = NetConfWatch::new(path);
        if let Some(mtu) = fixed_mtu {
            watch = watch.with_mtus(mtu, self.underlay.mtu);
        }
        self.watch = watch;
        self
    }

    pub fn on_local_subnet(
        mut self,
        f: impl FnMut(ipnet::Ipv4Net) -> Result<()> + Send + 'static,
    ) -> Self {
        self.on_local_subnet = Box::new(f);
        self
    }

    pub fn on_subnet_lost(
        mut self,
        f: impl FnMut(ipnet::Ipv4Net) -> Result<()> + Send + 'static,
    ) -> Self {
        self.on_subnet_lost = Box::new(f);
        self
    }

    /// When the loop must turn next even without events (a retry, a resync; at least every
    /// second, to notice net-conf changes).
    pub fn next_wake(&self, now: Instant) -> Instant {
        let wake = self
            .retry_at
            .map_or(self.next_resync, |r| r.min(self.next_resync));
        wake.min(now + Duration::from_secs(1))
    }

    /// One turn at `now` with the events that arrived since the last one.
    pub fn turn(&mut self, events: Vec<Event>, now: Instant) -> Result<Turn> {
        let mut turn = Turn::default();
        for ev in events {
            match &ev {
                Event::Connected(c) => {
                    self.metrics.datastore_connected.set(i64::from(*c));
                }
                Event::LocalSubnet(s) => {
                    tracing::warn!(subnet = %s, "this node's subnet changed");
                    (self.on_local_subnet)(*s)?;
                }
                Event::SubnetLost(s) => {
                    tracing::warn!(subnet = %s, "this node's subnet is another node's now");
                    (self.on_subnet_lost)(*s)?;
                }
                _ => {}
            }
            self.dirty |= self.rec.handle(ev);
        }
        if let Some(new) = self.watch.poll(&self.conf) {
            tracing::info!(
                backend = new.backend.kind.name(),
                direct_routing = new.backend.direct_routing,
                vni = new.backend.vni,
                port = new.backend.port,
                "backend changed: re-programming every peer"
            );
            self.switch_backend(new)?;
            turn.backend_switched = true;
        }
        self.keep_vxlan_device(now)?;
        self.drive_bgp(&mut turn);
        self.metrics.beat();
        // Refused records change no map: counted whatever the turn does next.
        self.metrics
            .set_rejected_records(&self.rec.records().refused_by_reason());
        let resync = now >= self.next_resync;
        let retry = self.retry_at.is_some_and(|r| now >= r);
        // A failed apply waits for its retry, whatever arrives meanwhile (it is taken along).
        let backing_off = self.retry_at.is_some_and(|r| now < r);
        if !(self.dirty || resync || retry) || backing_off || !self.rec.synced {
            return Ok(turn);
        }
        let result = if resync {
            self.next_resync = now + self.resync_every;
            self.rec.resync(&mut self.maps)
        } else {
            self.rec.apply(&mut self.maps)
        };
        self.metrics.peers.set(self.rec.peer_count() as i64);
        self.metrics
            .offlink_peers
            .set(self.rec.offlink_count() as i64);
        match result {
            Ok(report) => {
                self.metrics.set_full_maps(&report.full_maps);
                self.metrics
                    .record_reconcile(report.duration, report.writes, !report.failed());
                turn.writes = report.writes;
                if report.failed() {
                    // The rest was applied; what failed is retried with backoff.
                    let delay = self.backoff.next_delay();
                    tracing::warn!(
                        "{} map writes failed, {} applied (retrying in {delay:?}): {}",
                        report.failures.len(),
                        report.writes,
                        report.failures.join("; ")
                    );
                    self.retry_at = Some(now + delay);
                    turn.failed = true;
                    return Ok(turn);
                }
                if report.writes > 0 {
                    tracing::info!(writes = report.writes, peers = self.rec.peer_count(), took = ?report.duration, "reconciled");
                }
                self.dirty = false;
                self.retry_at = None;
                self.backoff.reset();
                // Every route is in the configured mode now.
                if resync || self.raise_path_mtu {
                    self.raise_path_mtu = false;
                    self.apply_path_mtu(self.conf.path_mtu(self.underlay.mtu));
                }
                if self.metrics.ready.set(1) == 0 {
                    tracing::info!("ready");
                }
            }
            Err(e) => {
                self.metrics.record_reconcile(Duration::ZERO, 0, false);
                let delay = self.backoff.next_delay();
                tracing::warn!("reconcile failed (retrying in {delay:?}): {e:#}");
                self.retry_at = Some(now + delay);
                turn.failed = true;
            }
        }
        Ok(turn)
    }

    /// A live backend switch: the node config, then every route in its new mode (at the next
    /// turn). Pods' path MTU goes down now, before the datapath adds more overhead, and up once
    /// the routes are written: no pod sends a packet the encapsulation of the moment cannot
    /// carry.
    pub fn switch_backend(&mut self, new: FlannelNetConf) -> Result<()> {
        let underlay_mtu = self.underlay.mtu;
        let (old_mtu, new_mtu) = (self.conf.path_mtu(underlay_mtu), new.path_mtu(underlay_mtu));
        if new_mtu < old_mtu {
            self.apply_path_mtu(new_mtu);
        }
        // A raise pending from an earlier switch is replaced by this one's.
        self.raise_path_mtu = new_mtu > old_mtu;
        let port_changed = new.backend.port != self.conf.backend.port;
        if port_changed && let Some((_, up, _)) = self.vxlan_device.as_mut() {
            // The device listens on the old port: tc decapsulates VXLAN on the new one until
            // the device moved there.
            *up = false;
            let config = self.config(&new);
            self.maps.set_config(&config)?;
            if let Some((device, up, _)) = self.vxlan_device.as_mut() {
                *up = device.ensure(new.backend.port);
            }
        }
        let config = self.config(&new);
        self.maps.set_config(&config)?;
        // Starts, reconfigures or retires BIRD.
        if let Some(bgp) = self.bgp.as_mut() {
            bgp.set_config(new.backend.bgp.as_ref());
        }
        self.rec.set_policy(self.policy(&new));
        self.conf = new;
        self.dirty = true;
        Ok(())
    }

    /// Waits for events and turns, forever (until the datastore's sender goes away).
    pub fn run(mut self, rx: mpsc::Receiver<Event>) -> Result<()> {
        loop {
            let now = Instant::now();
            let timeout = self.next_wake(now).saturating_duration_since(now);
            let mut events = match rx.recv_timeout(timeout) {
                Ok(ev) => vec![ev],
                Err(mpsc::RecvTimeoutError::Timeout) => Vec::new(),
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the datastore stopped"),
            };
            // Take everything queued at once: a relist and a burst of events is one apply.
            events.extend(rx.try_iter());
            self.turn(events, Instant::now())?;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use weft_common::RouteMode;

    use super::*;
    use crate::{
        config::BackendType,
        datastore::NodeLease,
        reconcile::{MapWrite, MemoryMaps},
    };

    fn conf(backend: &str, direct: bool) -> FlannelNetConf {
        FlannelNetConf::parse(&format!(
            r#"{{"Network": "10.244.0.0/16", "Backend": {{"Type": "{backend}", "DirectRouting": {direct}}}}}"#
        ))
        .unwrap()
    }

    fn underlay() -> Underlay {
        Underlay {
            name: "eth0".into(),
            ifindex: 2,
            mtu: 1500,
            node_ip: Ipv4Addr::new(192, 168, 1, 1),
            subnet: "192.168.1.0/24".parse().unwrap(),
        }
    }

    fn lease(subnet: &str, ip: [u8; 4]) -> NodeLease {
        let subnet: ipnet::Ipv4Net = subnet.parse().unwrap();
        NodeLease {
            subnet,
            public_ip: Ipv4Addr::from(ip),
            backend: Some(BackendType::Vxlan),
            vtep_mac: None,
            name: crate::datastore::subnet_key(subnet),
            node_name: None,
            seniority: 0,
            unknown_backend: None,
        }
    }

    fn control_loop(
        maps: MemoryMaps,
        conf: FlannelNetConf,
        now: Instant,
    ) -> ControlLoop<MemoryMaps> {
        let u = underlay();
        let rec = Reconciler::new(
            mode_policy(&conf, &u, Arc::default()),
            "10.244.1.0/24".parse().unwrap(),
            u.node_ip,
        );
        ControlLoop::new(
            maps,
            rec,
            conf,
            u,
            Arc::new(Metrics::new(None)),
            Duration::from_secs(30),
            now,
        )
    }

    fn position(writes: &[MapWrite], w: &MapWrite) -> usize {
        writes
            .iter()
            .position(|x| x == w)
            .unwrap_or_else(|| panic!("{w:?} not written: {writes:?}"))
    }

    /// A fake `weft_vxlan`: usable while `works` says so, on the port last asked for; each
    /// call recorded with whether the config said VXLAN went through it at that moment.
    #[derive(Clone, Default)]
    struct FakeDevice {
        works: Arc<std::sync::Mutex<bool>>,
        calls: Arc<std::sync::Mutex<Vec<u16>>>,
    }

    impl VxlanDeviceControl for FakeDevice {
        fn ensure(&mut self, port: u16) -> bool {
            self.calls.lock().unwrap().push(port);
            *self.works.lock().unwrap()
        }
    }

    fn vxlan_dev_flag(l: &ControlLoop<MemoryMaps>) -> bool {
        l.maps.config.unwrap().flags & CONFIG_F_VXLAN_DEV != 0
    }

    /// The loop checks `weft_vxlan` every second and writes whether VXLAN goes through it; a
    /// new VXLAN port moves the device, with tc decapsulating the new port meanwhile.
    #[test]
    fn vxlan_device_is_kept_and_follows_the_port() {
        let t0 = Instant::now();
        let dev = FakeDevice::default();
        *dev.works.lock().unwrap() = true;
        let mut l = control_loop(MemoryMaps::default(), conf("vxlan", false), t0)
            .vxlan_device(Box::new(dev.clone()), true);
        l.turn(vec![Event::Snapshot(vec![])], t0).unwrap();
        assert!(
            dev.calls.lock().unwrap().is_empty(),
            "checked a second later"
        );
        // The device breaks (deleted, its port taken): the next check clears the flag.
        *dev.works.lock().unwrap() = false;
        l.turn(vec![], t0 + Duration::from_millis(1100)).unwrap();
        assert_eq!(*dev.calls.lock().unwrap(), vec![8472]);
        assert!(!vxlan_dev_flag(&l));
        // Back: the flag again, and the config keeps the agent's other flags.
        *dev.works.lock().unwrap() = true;
        l.turn(vec![], t0 + Duration::from_millis(1500)).unwrap();
        assert_eq!(dev.calls.lock().unwrap().len(), 1, "not before a second");
        l.turn(vec![], t0 + Duration::from_millis(2200)).unwrap();
        assert!(vxlan_dev_flag(&l));
        assert_ne!(l.maps.config.unwrap().flags & CONFIG_F_READY, 0);
        // A new port: the flag off while the device moves, on once it is there.
        let writes = l.maps.writes.len();
        let mut new = conf("vxlan", false);
        new.backend.port = 4789;
        l.switch_backend(new).unwrap();
        assert_eq!(*dev.calls.lock().unwrap(), vec![8472, 8472, 4789]);
        let configs = l.maps.writes[writes..]
            .iter()
            .filter(|w| **w == MapWrite::Config)
            .count();
        assert_eq!(configs, 2, "without the flag, then with it");
        assert!(vxlan_dev_flag(&l));
        assert_eq!(l.maps.config.unwrap().vxlan_port, 4789);
        // Another backend on the same port leaves the device alone.
        let mut host_gw = conf("host-gw", false);
        host_gw.backend.port = 4789;
        l.switch_backend(host_gw).unwrap();
        assert_eq!(dev.calls.lock().unwrap().len(), 3);
        assert!(vxlan_dev_flag(&l));
    }

    #[test]
    fn peers_before_routes_and_removals_before_additions() {
        let t0 = Instant::now();
        let mut l = control_loop(MemoryMaps::default(), conf("vxlan", false), t0);
        l.turn(
            vec![Event::Snapshot(vec![
                lease("10.244.2.0/24", [192, 168, 1, 2]),
                lease("10.244.3.0/24", [192, 168, 1, 3]),
            ])],
            t0,
        )
        .unwrap();
        let w = &l.maps.writes;
        for (net, ip) in [
            ("10.244.2.0/24", [192, 168, 1, 2]),
            ("10.244.3.0/24", [192, 168, 1, 3]),
        ] {
            assert!(
                position(w, &MapWrite::UpsertNode(Ipv4Addr::from(ip)))
                    < position(w, &MapWrite::UpsertRoute(net.parse().unwrap())),
                "the peer before its route: {w:?}"
            );
        }
        assert!(l.metrics.is_ready());
        // Node 3 moves to a new address, node 2 leaves, node 4 joins: one apply.
        l.maps.writes.clear();
        l.turn(
            vec![
                Event::Upsert(lease("10.244.3.0/24", [192, 168, 1, 33])),
                Event::Remove("10.244.2.0-24".into()),
                Event::Upsert(lease("10.244.4.0/24", [192, 168, 1, 4])),
            ],
            t0 + Duration::from_millis(10),
        )
        .unwrap();
        let w = l.maps.writes.clone();
        let last_removal = w
            .iter()
            .rposition(|x| matches!(x, MapWrite::RemoveRoute(_) | MapWrite::RemoveNode(_)))
            .unwrap();
        let first_addition = w
            .iter()
            .position(|x| matches!(x, MapWrite::UpsertRoute(_) | MapWrite::UpsertNode(_)))
            .unwrap();
        assert!(last_removal < first_addition, "removals first: {w:?}");
        assert!(
            position(&w, &MapWrite::RemoveRoute("10.244.2.0/24".parse().unwrap()))
                < position(&w, &MapWrite::RemoveNode(Ipv4Addr::new(192, 168, 1, 2))),
            "a route goes before the node it points to: {w:?}"
        );
        assert!(
            position(&w, &MapWrite::UpsertNode(Ipv4Addr::new(192, 168, 1, 33)))
                < position(&w, &MapWrite::UpsertRoute("10.244.3.0/24".parse().unwrap())),
            "{w:?}"
        );
        assert!(w.contains(&MapWrite::FlushNextHops), "a peer moved: {w:?}");
        assert_eq!(l.maps.routes.len(), 2);
        assert_eq!(
            l.maps.nodes.keys().copied().collect::<Vec<_>>(),
            vec![
                Ipv4Addr::new(192, 168, 1, 4),
                Ipv4Addr::new(192, 168, 1, 33)
            ]
        );
    }

    #[test]
    fn failed_applies_are_retried_with_backoff() {
        let t0 = Instant::now();
        let maps = MemoryMaps {
            fail_writes: 3,
            ..Default::default()
        };
        let mut l = control_loop(maps, conf("vxlan", false), t0);
        let snapshot = Event::Snapshot(vec![lease("10.244.2.0/24", [192, 168, 1, 2])]);
        let turn = l.turn(vec![snapshot], t0).unwrap();
        assert!(turn.failed);
        assert!(!l.metrics.is_ready(), "not ready before a successful apply");
        // 100 ms, then 200 ms, then 400 ms: doubling delays.
        let mut now = t0;
        for delay_ms in [100, 200] {
            assert_eq!(l.retry_at, Some(now + Duration::from_millis(delay_ms)));
            assert_eq!(l.next_wake(now), now + Duration::from_millis(delay_ms));
            // Nothing happens before the retry is due.
            assert_eq!(
                l.turn(vec![], now + Duration::from_millis(delay_ms - 1))
                    .unwrap(),
                Turn::default()
            );
            now += Duration::from_millis(delay_ms);
            assert!(l.turn(vec![], now).unwrap().failed);
        }
        assert_eq!(l.retry_at, Some(now + Duration::from_millis(400)));
        now += Duration::from_millis(400);
        let turn = l.turn(vec![], now).unwrap();
        assert!(!turn.failed);
        assert_eq!(turn.writes, 2, "the route and its node");
        assert_eq!(l.retry_at, None);
        assert!(l.metrics.is_ready());
        assert_eq!(l.metrics.reconcile_errors.get(), 3);
        // Success reset the backoff: the next failure waits 100 ms again.
        l.maps.fail_writes = 1;
        now += Duration::from_millis(10);
        assert!(
            l.turn(
                vec![Event::Upsert(lease("10.244.5.0/24", [192, 168, 1, 5]))],
                now
            )
            .unwrap()
            .failed
        );
        assert_eq!(l.retry_at, Some(now + Duration::from_millis(100)));
    }

    fn named(name: &str, subnet: &str, ip: [u8; 4], seniority: i64) -> NodeLease {
        NodeLease {
            name: name.into(),
            seniority,
            ..lease(subnet, ip)
        }
    }

    fn rejected(l: &ControlLoop<MemoryMaps>, reason: &str) -> i64 {
        l.metrics
            .rejected_records
            .get_or_create(&vec![("reason", weft_reason(reason))])
            .get()
    }

    /// The `'static` spelling of a reason (the metric's labels are static strings).
    fn weft_reason(reason: &str) -> &'static str {
        crate::admission::REASONS
            .iter()
            .find(|r| **r == reason)
            .unwrap_or_else(|| panic!("no reason {reason}"))
    }

    #[test]
    fn bad_records_are_refused_and_the_rest_converges() {
        let t0 = Instant::now();
        let mut l = control_loop(MemoryMaps::default(), conf("vxlan", false), t0);
        l.turn(
            vec![Event::Snapshot(vec![
                named("good-2", "10.244.2.0/24", [192, 168, 1, 2], 10),
                named("everything", "0.0.0.0/0", [192, 168, 1, 20], 1),
                named("services", "10.96.0.0/12", [192, 168, 1, 21], 1),
                named("metadata", "169.254.169.254/32", [192, 168, 1, 22], 1),
                // Younger than good-2 and claiming its subnet.
                named("rival", "10.244.2.0/24", [192, 168, 1, 23], 20),
                named("thief", "10.244.1.0/24", [192, 168, 1, 24], 1),
                named("pod-address", "10.244.4.0/24", [10, 244, 9, 9], 1),
                named("good-3", "10.244.3.0/24", [192, 168, 1, 3], 30),
            ])],
            t0,
        )
        .unwrap();
        let routes: Vec<String> = l.maps.routes.keys().map(|n| n.to_string()).collect();
        assert_eq!(routes, vec!["10.244.2.0/24", "10.244.3.0/24"]);
        assert_eq!(
            l.maps.routes[&"10.244.2.0/24".parse().unwrap()].node_ip,
            [192, 168, 1, 2],
            "the older record holds the subnet"
        );
        assert_eq!(l.maps.nodes.len(), 2, "refused records are no tunnel peers");
        assert!(l.metrics.is_ready());
        for (reason, n) in [
            ("outside_network", 3),
            ("overlaps_node", 1),
            ("overlaps_local_subnet", 1),
            ("public_ip_in_pod_network", 1),
            ("wrong_prefix_length", 0),
        ] {
            assert_eq!(rejected(&l, reason), n, "{reason}");
        }
        // The records are fixed or their rival goes: they are routed at once.
        l.turn(
            vec![
                Event::Upsert(named("services", "10.244.96.0/24", [192, 168, 1, 21], 1)),
                Event::Remove("good-2".into()),
            ],
            t0 + Duration::from_millis(5),
        )
        .unwrap();
        assert_eq!(
            l.maps.routes[&"10.244.2.0/24".parse().unwrap()].node_ip,
            [192, 168, 1, 23],
            "the rival took over"
        );
        assert!(
            l.maps
                .routes
                .contains_key(&"10.244.96.0/24".parse().unwrap())
        );
        assert!(!l.maps.nodes.contains_key(&Ipv4Addr::new(192, 168, 1, 2)));
        assert_eq!(rejected(&l, "outside_network"), 2);
        assert_eq!(rejected(&l, "overlaps_node"), 0);
    }

    #[test]
    fn a_full_map_stops_nothing_else_and_names_itself() {
        let t0 = Instant::now();
        let maps = MemoryMaps {
            routes_max: Some(2),
            ..Default::default()
        };
        let mut l = control_loop(maps, conf("vxlan", false), t0);
        let turn = l
            .turn(
                vec![Event::Snapshot(vec![
                    lease("10.244.2.0/24", [192, 168, 1, 2]),
                    lease("10.244.3.0/24", [192, 168, 1, 3]),
                    lease("10.244.4.0/24", [192, 168, 1, 4]),
                ])],
                t0,
            )
            .unwrap();
        assert!(turn.failed);
        assert_eq!(turn.writes, 5, "three node entries and two routes");
        assert_eq!(l.maps.routes.len(), 2);
        // The third peer's node entry went in (the node map has room), not its route.
        assert_eq!(l.maps.nodes.len(), 3);
        let why = l.metrics.not_ready().expect("not ready");
        assert!(
            why.contains("WEFT_ROUTES") && why.contains("full") && why.contains("--routes-max"),
            "{why}"
        );
        assert_eq!(
            l.metrics
                .map_full
                .get_or_create(&vec![("map", "routes")])
                .get(),
            1
        );
        assert_eq!(
            l.metrics
                .map_full
                .get_or_create(&vec![("map", "nodes")])
                .get(),
            0
        );
        // A peer leaves: its route goes first, which makes room for the one that did not fit.
        let retry_at = l.retry_at.unwrap();
        let turn = l
            .turn(vec![Event::Remove("10.244.2.0-24".into())], retry_at)
            .unwrap();
        assert!(!turn.failed, "{turn:?}");
        let routes: Vec<String> = l.maps.routes.keys().map(|n| n.to_string()).collect();
        assert_eq!(routes, vec!["10.244.3.0/24", "10.244.4.0/24"]);
        assert_eq!(l.metrics.not_ready(), None);
        assert_eq!(
            l.metrics
                .map_full
                .get_or_create(&vec![("map", "routes")])
                .get(),
            0
        );
        // At capacity, a replacement in one turn fits: removals are applied before additions.
        l.maps.writes.clear();
        let turn = l
            .turn(
                vec![
                    Event::Remove("10.244.3.0-24".into()),
                    Event::Upsert(lease("10.244.5.0/24", [192, 168, 1, 5])),
                ],
                retry_at + Duration::from_millis(1),
            )
            .unwrap();
        assert!(!turn.failed, "{:?}", l.maps.writes);
        assert!(
            position(
                &l.maps.writes,
                &MapWrite::RemoveRoute("10.244.3.0/24".parse().unwrap())
            ) < position(
                &l.maps.writes,
                &MapWrite::UpsertRoute("10.244.5.0/24".parse().unwrap())
            )
        );
        // A full node map: no route toward the peer whose node entry is missing.
        l.maps.nodes_max = Some(l.maps.nodes.len());
        l.maps.routes_max = None;
        let turn = l
            .turn(
                vec![Event::Upsert(lease("10.244.6.0/24", [192, 168, 1, 6]))],
                retry_at + Duration::from_millis(2),
            )
            .unwrap();
        assert!(turn.failed);
        assert!(
            !l.maps
                .routes
                .contains_key(&"10.244.6.0/24".parse().unwrap())
        );
        assert!(l.metrics.not_ready().unwrap().contains("WEFT_NODES"));
    }

    #[test]
    fn backend_switch_reprograms_every_peer_and_the_config() {
        let t0 = Instant::now();
        let mut l = control_loop(MemoryMaps::default(), conf("vxlan", false), t0);
        l.turn(
            vec![Event::Snapshot(vec![
                lease("10.244.2.0/24", [192, 168, 1, 2]),
                lease("10.244.3.0/24", [192, 168, 2, 3]),
            ])],
            t0,
        )
        .unwrap();
        assert!(
            l.maps
                .routes
                .values()
                .all(|r| r.mode == RouteMode::Vxlan as u8)
        );
        // (config, mode of the peer on this subnet, of the one across, entries that change)
        for (c, near, far, changed) in [
            (conf("ipip", false), RouteMode::Ipip, RouteMode::Ipip, 4),
            (conf("vxlan", true), RouteMode::Direct, RouteMode::Vxlan, 4),
            (
                conf("host-gw", false),
                RouteMode::Direct,
                RouteMode::Direct,
                2,
            ),
        ] {
            l.maps.writes.clear();
            l.switch_backend(c).unwrap();
            let turn = l.turn(vec![], t0 + Duration::from_millis(1)).unwrap();
            assert_eq!(turn.writes, changed, "{:?}", l.maps.writes);
            assert_eq!(l.maps.writes[0], MapWrite::Config, "config first");
            let mode = |net: &str| l.maps.routes[&net.parse().unwrap()].mode;
            assert_eq!(mode("10.244.2.0/24"), near as u8);
            assert_eq!(mode("10.244.3.0/24"), far as u8);
            assert_eq!(l.maps.nodes[&Ipv4Addr::new(192, 168, 2, 3)].mode, far as u8);
        }
        assert_eq!(
            l.metrics.offlink_peers.get(),
            1,
            "host-gw cannot reach 192.168.2.3"
        );
        let vni = l.maps.config.unwrap().vni;
        assert_eq!(vni, 1);
    }

    #[test]
    fn net_conf_file_changes_switch_the_backend() {
        let dir = std::env::temp_dir().join(format!("weft-netconf-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("net-conf.json");
        std::fs::write(&path, r#"{"Network": "10.244.0.0/16"}"#).unwrap();
        let current = FlannelNetConf::parse(r#"{"Network": "10.244.0.0/16"}"#).unwrap();
        let mut w = NetConfWatch::new(Some(path.clone()));
        assert_eq!(w.poll(&current), None, "unchanged");
        // A changed but invalid file is ignored; a valid one with a new backend is taken.
        w.mtime = None;
        std::fs::write(
            &path,
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}"#,
        )
        .unwrap();
        assert_eq!(w.poll(&current), None);
        w.mtime = None;
        std::fs::write(
            &path,
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "ipip"}}"#,
        )
        .unwrap();
        let new = w.poll(&current).expect("the new backend");
        assert_eq!(new.backend.kind, BackendType::Ipip);
        // Pods at the underlay's full MTU (host-gw with Backend.MTU): a tunnel would not fit,
        // so the switch is refused; without Backend.MTU (no fixed MTU) anything is taken, the
        // pods' path MTU follows.
        let mut full = NetConfWatch::new(Some(path.clone())).with_mtus(1500, 1500);
        full.mtime = None;
        assert_eq!(
            full.poll(&current),
            None,
            "ipip does not fit 1500-byte pods"
        );
        let mut fits = NetConfWatch::new(Some(path.clone())).with_mtus(1480, 1500);
        fits.mtime = None;
        assert!(fits.poll(&current).is_some(), "ipip fits 1480-byte pods");
        std::fs::write(
            &path,
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        let host_gw = FlannelNetConf::parse(
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#,
        )
        .unwrap();
        let mut default = NetConfWatch::new(Some(path.clone()));
        default.mtime = None;
        assert!(default.poll(&host_gw).is_some(), "vxlan under default pods");
        fits.mtime = None;
        assert_eq!(
            fits.poll(&host_gw),
            None,
            "vxlan does not fit 1480-byte pods"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The path MTUs the loop set, in order.
    #[derive(Clone, Default)]
    struct FakePathMtu(Arc<std::sync::Mutex<Vec<u32>>>);

    impl PathMtuControl for FakePathMtu {
        fn apply(&mut self, path_mtu: u32) -> Result<()> {
            self.0.lock().unwrap().push(path_mtu);
            Ok(())
        }
    }

    #[test]
    fn the_pods_path_mtu_follows_the_backend_and_every_resync() {
        let t0 = Instant::now();
        let calls = FakePathMtu::default();
        let mut l = control_loop(MemoryMaps::default(), conf("host-gw", false), t0)
            .path_mtu(Box::new(calls.clone()));
        l.turn(vec![Event::Snapshot(vec![])], t0).unwrap();
        assert_eq!(*calls.0.lock().unwrap(), [1500], "the first resync");
        // Lowered at the switch, before any route is in its new mode; raised once the routes
        // are written (the next turn); unchanged: not applied.
        for (backend, direct, at_switch, after_turn) in [
            ("vxlan", false, vec![1450], vec![1450]),
            ("vxlan", true, vec![], vec![]),
            ("ipip", false, vec![], vec![1480]),
            ("host-gw", false, vec![], vec![1500]),
            ("ipip", false, vec![1480], vec![1480]),
        ] {
            calls.0.lock().unwrap().clear();
            l.switch_backend(conf(backend, direct)).unwrap();
            assert_eq!(
                *calls.0.lock().unwrap(),
                at_switch,
                "{backend} at the switch"
            );
            l.turn(vec![], t0 + Duration::from_millis(1)).unwrap();
            assert_eq!(
                *calls.0.lock().unwrap(),
                after_turn,
                "{backend} after a turn"
            );
        }
        calls.0.lock().unwrap().clear();
        l.turn(vec![], t0 + Duration::from_secs(31)).unwrap();
        assert_eq!(*calls.0.lock().unwrap(), [1480], "the next resync");
        // Backend.MTU fixes the path MTU whatever the backend.
        let fixed = |backend: &str| {
            FlannelNetConf::parse(&format!(
                r#"{{"Network": "10.244.0.0/16", "Backend": {{"Type": "{backend}", "MTU": 1400}}}}"#
            ))
            .unwrap()
        };
        calls.0.lock().unwrap().clear();
        l.switch_backend(fixed("vxlan")).unwrap();
        l.switch_backend(fixed("host-gw")).unwrap();
        l.turn(vec![], t0 + Duration::from_secs(32)).unwrap();
        assert_eq!(*calls.0.lock().unwrap(), [1400], "lowered once, then fixed");
    }

    /// What the fake BGP side was told, and what its table holds (shared with the test).
    #[derive(Default)]
    struct FakeBgpState {
        configs: Vec<Option<crate::bgp::BgpConfig>>,
        clusters: Vec<(Vec<Ipv4Net>, Vec<crate::bgp::PeerNode>)>,
        /// Prefixes in weft's table, as BIRD would install them.
        table: BTreeSet<Ipv4Net>,
        /// What the last poll reported.
        seen: Arc<BTreeSet<Ipv4Net>>,
    }

    #[derive(Clone, Default)]
    struct FakeBgp(Arc<std::sync::Mutex<FakeBgpState>>);

    impl BgpControl for FakeBgp {
        fn set_config(&mut self, config: Option<&crate::bgp::BgpConfig>) {
            self.0.lock().unwrap().configs.push(config.cloned());
        }
        fn set_cluster(&mut self, local: Vec<Ipv4Net>, nodes: Vec<crate::bgp::PeerNode>) {
            self.0.lock().unwrap().clusters.push((local, nodes));
        }
        fn poll(&mut self) -> crate::bgp::TableChange {
            let mut s = self.0.lock().unwrap();
            if *s.seen == s.table {
                return Default::default();
            }
            s.seen = Arc::new(s.table.clone());
            crate::bgp::TableChange {
                routes: true,
                learned: true,
            }
        }
        fn learned(&self) -> Arc<BTreeSet<Ipv4Net>> {
            self.0.lock().unwrap().seen.clone()
        }
        fn status(&self) -> Option<crate::bgp::BgpStatus> {
            let s = self.0.lock().unwrap();
            s.configs
                .last()
                .cloned()
                .flatten()
                .map(|_| crate::bgp::BgpStatus {
                    running: true,
                    learned_routes: s.seen.len(),
                    ..Default::default()
                })
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn bgp_conf(backend: &str) -> FlannelNetConf {
        FlannelNetConf::parse(&format!(
            r#"{{"Network": "10.244.0.0/16", "Backend": {backend}}}"#
        ))
        .unwrap()
    }

    fn modes(l: &ControlLoop<MemoryMaps>) -> Vec<(Ipv4Net, u8)> {
        l.maps.routes.iter().map(|(k, r)| (*k, r.mode)).collect()
    }

    #[test]
    fn bgp_gets_its_config_and_the_complete_node_list() {
        let t0 = Instant::now();
        let fake = FakeBgp::default();
        let conf =
            bgp_conf(r#"{"Type": "bgp", "RouteTable": 100, "Encapsulation": "CrossSubnet"}"#);
        let mut l = control_loop(MemoryMaps::default(), conf, t0).bgp(Box::new(fake.clone()));
        {
            let s = fake.0.lock().unwrap();
            assert_eq!(s.configs.len(), 1);
            assert_eq!(s.configs[0].as_ref().unwrap().table, 100);
            assert!(
                s.clusters.is_empty(),
                "no node list before the datastore listed"
            );
        }
        // Nothing listed yet: BIRD must not start on an incomplete list.
        l.turn(vec![Event::Connected(true)], t0).unwrap();
        assert!(fake.0.lock().unwrap().clusters.is_empty());
        l.turn(
            vec![Event::Snapshot(vec![
                lease("10.244.1.0/24", [192, 168, 1, 1]),
                lease("10.244.2.0/24", [192, 168, 1, 2]),
                lease("10.244.3.0/24", [192, 168, 2, 3]),
                lease("10.244.4.0/24", [192, 168, 2, 3]),
            ])],
            t0,
        )
        .unwrap();
        {
            let s = fake.0.lock().unwrap();
            let (local, nodes) = s.clusters.last().unwrap();
            assert_eq!(local, &vec![net("10.244.1.0/24")]);
            assert_eq!(
                nodes,
                &vec![
                    crate::bgp::PeerNode {
                        ip: Ipv4Addr::new(192, 168, 1, 2),
                        subnets: vec![net("10.244.2.0/24")],
                    },
                    crate::bgp::PeerNode {
                        ip: Ipv4Addr::new(192, 168, 2, 3),
                        subnets: vec![net("10.244.3.0/24"), net("10.244.4.0/24")],
                    },
                ],
                "this node's own record is no peer; one peer per address"
            );
        }
        assert_eq!(node_config(&l.conf, &underlay()).bgp_table, 100);
        // CrossSubnet: native along BGP on this subnet, the tunnel (ipip) across.
        assert_eq!(
            modes(&l),
            vec![
                (net("10.244.2.0/24"), RouteMode::Bgp as u8),
                (net("10.244.3.0/24"), RouteMode::Ipip as u8),
                (net("10.244.4.0/24"), RouteMode::Ipip as u8),
            ]
        );
        // A node leaving: BGP gets the new list; an idle turn gives it nothing new.
        let before = fake.0.lock().unwrap().clusters.len();
        l.turn(
            vec![Event::Remove("10.244.2.0-24".into())],
            t0 + Duration::from_millis(5),
        )
        .unwrap();
        l.turn(vec![], t0 + Duration::from_millis(6)).unwrap();
        let s = fake.0.lock().unwrap();
        assert_eq!(s.clusters.len(), before + 1);
        assert_eq!(s.clusters.last().unwrap().1.len(), 1);
        assert!(l.metrics.render().contains("weft_bgp_speaker_up 1"));
    }

    #[test]
    fn bgp_announces_no_subnet_while_the_node_holds_none() {
        let t0 = Instant::now();
        let fake = FakeBgp::default();
        let conf = bgp_conf(r#"{"Type": "bgp"}"#);
        let mut l = control_loop(MemoryMaps::default(), conf, t0).bgp(Box::new(fake.clone()));
        let announced = |fake: &FakeBgp| fake.0.lock().unwrap().clusters.last().unwrap().0.clone();
        l.turn(
            vec![Event::Snapshot(vec![lease(
                "10.244.2.0/24",
                [192, 168, 1, 2],
            )])],
            t0,
        )
        .unwrap();
        assert_eq!(announced(&fake), vec![net("10.244.1.0/24")]);
        // Another node holds this node's subnet now: announcing it would hijack its traffic.
        l.turn(
            vec![Event::SubnetLost(net("10.244.1.0/24"))],
            t0 + Duration::from_millis(5),
        )
        .unwrap();
        assert_eq!(announced(&fake), vec![]);
        // A new subnet: announced.
        l.turn(
            vec![Event::LocalSubnet(net("10.244.7.0/24"))],
            t0 + Duration::from_millis(10),
        )
        .unwrap();
        assert_eq!(announced(&fake), vec![net("10.244.7.0/24")]);
    }

    #[test]
    fn a_live_switch_into_bgp_waits_for_birds_routes() {
        let t0 = Instant::now();
        let fake = FakeBgp::default();
        let mut l = control_loop(MemoryMaps::default(), conf("vxlan", false), t0)
            .bgp(Box::new(fake.clone()));
        assert_eq!(fake.0.lock().unwrap().configs, vec![None]);
        l.turn(
            vec![Event::Snapshot(vec![
                lease("10.244.2.0/24", [192, 168, 1, 2]),
                lease("10.244.3.0/24", [192, 168, 2, 3]),
            ])],
            t0,
        )
        .unwrap();
        let vxlan = RouteMode::Vxlan as u8;
        let bgp = RouteMode::Bgp as u8;
        assert!(modes(&l).iter().all(|(_, m)| *m == vxlan));
        assert!(l.metrics.render().find("weft_bgp_").is_none());

        // Into bgp: BIRD is configured, but no route changes mode before BIRD installed it.
        l.maps.writes.clear();
        l.switch_backend(bgp_conf(r#"{"Type": "bgp"}"#)).unwrap();
        l.turn(vec![], t0 + Duration::from_millis(1)).unwrap();
        assert!(fake.0.lock().unwrap().configs.last().unwrap().is_some());
        assert!(
            modes(&l).iter().all(|(_, m)| *m == vxlan),
            "{:?}",
            modes(&l)
        );
        assert_eq!(l.maps.nodes[&Ipv4Addr::new(192, 168, 2, 3)].mode, vxlan);

        // BIRD installs one route: that subnet (and its node) goes to bgp, the next hops cached
        // from the old table are flushed; the other stays vxlan.
        fake.0.lock().unwrap().table.insert(net("10.244.2.0/24"));
        l.maps.writes.clear();
        let turn = l.turn(vec![], t0 + Duration::from_millis(2)).unwrap();
        assert!(turn.bgp_learned_changed);
        assert!(l.maps.writes.contains(&MapWrite::FlushNextHops));
        assert_eq!(
            modes(&l),
            vec![(net("10.244.2.0/24"), bgp), (net("10.244.3.0/24"), vxlan)]
        );
        assert_eq!(l.maps.nodes[&Ipv4Addr::new(192, 168, 1, 2)].mode, bgp);
        fake.0.lock().unwrap().table.insert(net("10.244.3.0/24"));
        l.turn(vec![], t0 + Duration::from_millis(3)).unwrap();
        assert!(modes(&l).iter().all(|(_, m)| *m == bgp));
        // Withdrawn later: the route keeps bgp (its packets are counted drops, no_bgp_route,
        // rather than a tunnel the peer may no longer expect).
        fake.0.lock().unwrap().table.remove(&net("10.244.3.0/24"));
        l.turn(vec![], t0 + Duration::from_millis(4)).unwrap();
        assert!(modes(&l).iter().all(|(_, m)| *m == bgp));

        // Back to vxlan: immediate, and BIRD is told the backend is no longer bgp.
        l.switch_backend(conf("vxlan", false)).unwrap();
        l.turn(vec![], t0 + Duration::from_millis(5)).unwrap();
        assert!(modes(&l).iter().all(|(_, m)| *m == vxlan));
        assert_eq!(fake.0.lock().unwrap().configs.last(), Some(&None));
        assert!(l.maps.config.unwrap().bgp_table == BGP_TABLE_DEFAULT);
    }
}

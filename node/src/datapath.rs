//! The eBPF datapath as userspace sees it: the embedded object, loading with or without pins,
//! typed access to every map, and attaching the programs to interfaces.
//!
//! Pins live under `<root>/v<SCHEMA_VERSION>/` (`maps/`, `links/`), so an agent, the CNI plugin
//! and the CLI of one node share maps, several simulated nodes never do, and a new map layout
//! never reuses an old map.
use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU8, Ordering},
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, LinkError, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle, qdisc_add_clsact},
        xdp::{XdpLink, XdpMode},
    },
    sys::SyscallError,
};
use ipnet::Ipv4Net;
use weft_common::{
    DecapHook, DropReason, ENDPOINTS_MAX, EndpointInfo, FlowSlot, Ipv4Key, NODES_MAX, NextHop,
    NodeConfig, NodeInfo, NodeName, PathMtu, ROUTES_MAX, RouteInfo, SCHEMA_VERSION, Stat,
    conntrack::{CT_MAX_DEFAULT, CtEntry, CtKey},
    flow_slot, map_names,
    monitor::{MONITOR_SLOTS, MonitorConfig, MonitorRate},
    prog_names,
};

/// The compiled `node-ebpf` object (BTF included).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft"));

/// The schema-versioned pin directory under a pin root (e.g. `/sys/fs/bpf/weft/v1`).
pub fn pin_dir(root: &Path) -> PathBuf {
    root.join(format!("v{SCHEMA_VERSION}"))
}

/// `BPF_FS_MAGIC` from the kernel's `magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Makes sure a bpffs is mounted at `/sys/fs/bpf` (a fresh host may not have one), as Cilium's
/// agent does: pins live there and must survive agent restarts.
pub fn ensure_bpffs() -> Result<()> {
    let mount_point = Path::new("/sys/fs/bpf");
    if let Ok(st) = nix::sys::statfs::statfs(mount_point)
        && st.filesystem_type().0 == BPF_FS_MAGIC
    {
        return Ok(());
    }
    std::fs::create_dir_all(mount_point).context("creating /sys/fs/bpf")?;
    nix::mount::mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs at /sys/fs/bpf")
}

#[path = "datapath_policy.rs"]
pub mod policy_write;
pub use policy_write::{PolicyCapacities, PolicySnapshot};

/// Sizes chosen at load time. A map already pinned keeps the size it was created with (a map
/// cannot be resized): see [`Datapath::capacity`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Capacity of the conntrack map (`WEFT_CT`).
    pub conntrack_max: u32,
    /// Capacities of the NetworkPolicy maps (pinned maps keep theirs).
    pub policy: PolicyCapacities,
    /// Capacity of the route map (`WEFT_ROUTES`): other nodes' subnets.
    pub routes_max: u32,
    /// Capacity of the node map (`WEFT_NODES`): other nodes' addresses.
    pub nodes_max: u32,
    /// Capacity of the endpoint map (`WEFT_ENDPOINTS`): this node's pods.
    pub endpoints_max: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_max: CT_MAX_DEFAULT,
            policy: PolicyCapacities::default(),
            routes_max: ROUTES_MAX,
            nodes_max: NODES_MAX,
            endpoints_max: ENDPOINTS_MAX,
        }
    }
}

impl LoadOptions {
    /// (map, requested capacity) of every map whose size is chosen at load time.
    pub fn sizes(&self) -> [(&'static str, u32); 4] {
        [
            (map_names::CONNTRACK, self.conntrack_max),
            (map_names::ROUTES, self.routes_max),
            (map_names::NODES, self.nodes_max),
            (map_names::ENDPOINTS, self.endpoints_max),
        ]
    }

    fn apply(&self, loader: &mut EbpfLoader<'_>) {
        for (name, size) in self.sizes() {
            loader.map_max_entries(name, size);
        }
        // As many names as peers (a hash map's buckets are a power of two: one more entry for
        // this node's own name would double them; at full capacity one name is missing and
        // that node shows by its address).
        loader.map_max_entries(map_names::NODE_NAMES, self.nodes_max);
        self.policy.size(loader);
    }
}

/// A write refused because the map has no room left (the kernel's E2BIG for a hash map, ENOSPC
/// for an LPM trie).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("map {map} is full ({capacity} entries)")]
pub struct MapFull {
    pub map: &'static str,
    pub capacity: u32,
}

/// Whether `e` is the kernel saying a map has no room.
fn is_full(e: &aya::maps::MapError) -> bool {
    matches!(
        e,
        aya::maps::MapError::SyscallError(SyscallError { io_error, .. })
            if matches!(io_error.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOSPC))
    )
}

pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
    /// Schema-versioned pin directory, when pinned.
    pin_dir: Option<PathBuf>,
}

impl Datapath {
    /// Loads the object with private, unpinned maps (packet-injection tests, benchmarks).
    pub fn load_unpinned() -> Result<Self> {
        Self::load_unpinned_with(&LoadOptions::default())
    }

    /// `load_unpinned` with explicit sizes.
    pub fn load_unpinned_with(options: &LoadOptions) -> Result<Self> {
        Self::load_unpinned_object(EBPF_OBJECT, options)
    }

    /// `load_unpinned_with` for another build of the object (benchmarks comparing builds).
    pub fn load_unpinned_object(object: &[u8], options: &LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        options.apply(&mut loader);
        let mut ebpf = loader.load(object).context("loading the eBPF object")?;
        load_programs(&mut ebpf)?;
        let maps = if object.as_ptr() == EBPF_OBJECT.as_ptr() {
            Maps::take_from(&mut ebpf)?
        } else {
            // Another build may lack maps this one has.
            Maps::take_present(&mut ebpf)
        };
        Ok(Self {
            ebpf,
            maps,
            pin_dir: None,
        })
    }

    /// Loads the object reusing the maps pinned under `pin_root` (creating and pinning them on
    /// first use): what the agent and the CNI plugin do.
    pub fn load_pinned(pin_root: &Path) -> Result<Self> {
        Self::load_pinned_with(pin_root, &LoadOptions::default())
    }

    /// `load_pinned` with explicit sizes for maps created now (pinned maps keep theirs).
    pub fn load_pinned_with(pin_root: &Path, options: &LoadOptions) -> Result<Self> {
        if pin_root.starts_with("/sys/fs/bpf") {
            ensure_bpffs()?;
        }
        let dir = pin_dir(pin_root);
        let maps_dir = dir.join("maps");
        std::fs::create_dir_all(&maps_dir)
            .with_context(|| format!("creating the pin directory {}", maps_dir.display()))?;
        std::fs::create_dir_all(dir.join("links"))?;
        remove_retired_pins(&maps_dir);
        let mut loader = EbpfLoader::new();
        options.apply(&mut loader);
        for name in map_names::ALL {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        let mut ebpf = loader.load(EBPF_OBJECT).with_context(|| {
            format!(
                "loading the eBPF object with maps pinned in {}",
                maps_dir.display()
            )
        })?;
        load_programs(&mut ebpf)?;
        let maps = Maps::take_from(&mut ebpf)?;
        Ok(Self {
            ebpf,
            maps,
            pin_dir: Some(dir),
        })
    }

    /// A second instance of the programs for `weft trace`: the maps the programs only read
    /// (`map_names::SHARED_WITH_TRACE`: config, routes, endpoints, nodes, the NetworkPolicy
    /// maps) are the live ones pinned under `pin_root`; every other map (counters, policy
    /// denial counters, conntrack, caches, the monitor's)
    /// is private to this instance, so running it changes nothing on the node.
    /// The caller copies into the private maps whatever live state a decision depends on (the
    /// flow's conntrack entry, learned path MTUs).
    pub fn load_for_trace(pin_root: &Path) -> Result<Self> {
        let maps_dir = pin_dir(pin_root).join("maps");
        let mut loader = EbpfLoader::new();
        // Small private maps: a trace tracks one flow.
        loader.map_max_entries(map_names::CONNTRACK, 1024);
        loader.map_max_entries(map_names::NEXT_HOPS, 1024);
        loader.map_max_entries(map_names::PATH_MTU, 1024);
        loader.map_max_entries(map_names::POLICY_DROPS, 1024);
        // No monitor listens to the trace instance (its slots' flags stay zero): one page per
        // ring (a ring buffer's size is a multiple of the page size) instead of 512 KiB each.
        // SAFETY: sysconf reads a constant of the system.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(page) = u32::try_from(page)
            && page.is_power_of_two()
        {
            for ring in map_names::EVENTS {
                loader.map_max_entries(ring, page);
            }
        }
        for name in map_names::SHARED_WITH_TRACE {
            let pin = maps_dir.join(name);
            if !pin.exists() {
                return Err(anyhow!(
                    "{} is missing (is the agent running with pins under {}?)",
                    pin.display(),
                    pin_root.display()
                ));
            }
            loader.map_pin_path(name, pin);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the trace instance of the eBPF object")?;
        load_programs(&mut ebpf)?;
        let maps = Maps::take_from(&mut ebpf)?;
        Ok(Self {
            ebpf,
            maps,
            pin_dir: None,
        })
    }

    /// The conntrack map's capacity as loaded (see [`Datapath::capacity`]).
    pub fn conntrack_capacity(&self) -> Result<u32> {
        self.capacity(map_names::CONNTRACK)
    }

    /// A map's capacity as loaded: the requested size for a new map, the old size for a map
    /// adopted from its pin (a map cannot be resized; a new size takes effect once the pin is
    /// removed, e.g. at the next boot).
    pub fn capacity(&self, name: &str) -> Result<u32> {
        self.maps.capacity(name)
    }

    pub fn tc_program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
        prog.try_into()
            .with_context(|| format!("{name} is not a tc program"))
    }

    /// Supplies the tunnel key `from_vxlan` takes for packets without the kernel's tunnel
    /// metadata (`map_names::TRACE_TUNNEL`): for test and trace instances, whose
    /// BPF_PROG_TEST_RUN cannot attach metadata to a packet. `None` clears it. The map is never
    /// pinned: this writes only this instance's.
    pub fn set_trace_tunnel(&mut self, key: Option<weft_common::TunnelKey>) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(map_names::TRACE_TUNNEL)
            .ok_or_else(|| anyhow!("map {} missing", map_names::TRACE_TUNNEL))?;
        let mut map: Array<&mut MapData, weft_common::TunnelKey> = map.try_into()?;
        let key = key.unwrap_or(weft_common::TunnelKey {
            peer: [0; 4],
            vni: 0,
            valid: 0,
        });
        map.set(0, key, 0).context("writing the trace tunnel key")
    }

    pub fn xdp_program(&mut self) -> Result<&mut Xdp> {
        let prog = self
            .ebpf
            .program_mut(prog_names::XDP_UNDERLAY)
            .ok_or_else(|| anyhow!("program xdp_underlay missing from the object"))?;
        prog.try_into()
            .context("xdp_underlay is not an XDP program")
    }

    // --- attaching ------------------------------------------------------------------------
    //
    // Attachments are bpf_links. When the datapath is pinned, links are pinned too: they outlive
    // the process (the CNI plugin exits after ADD; the agent may be killed), and a restarted
    // agent atomically swaps its freshly loaded program into the existing link, so no packet
    // ever meets an interface without a program.

    fn link_pin(&self, prog: &str, ifname: &str) -> Option<PathBuf> {
        self.pin_dir
            .as_ref()
            .map(|d| d.join("links").join(format!("{prog}@{ifname}")))
    }

    /// Attaches `from_pod` (tc ingress) and `to_pod` (tc egress) to a pod's host-side veth (in
    /// the current netns), through `hook`; attachments already there switch to this object's
    /// programs in place.
    pub fn attach_pod(&mut self, ifname: &str, hook: PodHook) -> Result<()> {
        for (name, direction) in POD_PROGRAMS {
            let pin = self.link_pin(name, ifname);
            let prog = self.tc_program(name)?;
            attach_pod_program(prog, name, ifname, direction, hook, pin.as_deref())?;
        }
        Ok(())
    }

    /// Attaches the underlay programs to the node's NIC (in the current netns): tc ingress
    /// (delivery; decapsulation of whatever XDP did not decapsulate) and, where `xdp` says so,
    /// XDP (decapsulation before GRO). Returns where decapsulation happens and why.
    ///
    /// `auto` uses XDP only where the driver runs it natively on its own buffers: not on a veth
    /// (XDP there copies every frame into page-pool memory and turns TSO off on the peer, up to
    /// 9x less TCP throughput measured), not in generic mode (after the skb is built: a copy).
    /// tc is attached first and decapsulates everything XDP leaves, so switching the hook
    /// either way (an upgrade, a changed `--xdp`) loses no packet.
    pub fn attach_underlay(&mut self, ifname: &str, xdp: XdpSetting) -> Result<DecapHook> {
        self.attach_tc(prog_names::FROM_UNDERLAY, ifname, TcAttachType::Ingress)?;
        let link = || -> Result<crate::netlink::LinkInfo> {
            let nl = crate::netlink::BlockingNetlink::open()?;
            nl.block_on(nl.link(ifname))?
                .ok_or_else(|| anyhow!("no interface {ifname}"))
        };
        let native =
            |mode: Option<crate::netlink::XdpMode>| mode == Some(crate::netlink::XdpMode::Driver);
        let hook = match xdp {
            XdpSetting::Off => DecapHook::TcOff,
            XdpSetting::Auto if link()?.kind.as_deref() == Some("veth") => DecapHook::TcVeth,
            XdpSetting::Auto => match self.attach_xdp(ifname, XdpMode::Driver) {
                // A pinned link is switched in place, whatever its mode: keep it if native.
                Ok(()) if native(link()?.xdp) => DecapHook::XdpNative,
                _ => DecapHook::TcNoNativeXdp,
            },
            XdpSetting::On => match self.attach_xdp(ifname, XdpMode::Driver) {
                Ok(()) if native(link()?.xdp) => DecapHook::XdpForced,
                Ok(()) => DecapHook::XdpGeneric,
                Err(_) => {
                    self.attach_xdp(ifname, XdpMode::Skb)?;
                    DecapHook::XdpGeneric
                }
            },
        };
        if hook.hook() == "tc" {
            self.detach_xdp(ifname)?;
        }
        Ok(hook)
    }

    /// Removes `xdp_underlay` from `ifname` (its pinned link), if attached.
    fn detach_xdp(&mut self, ifname: &str) -> Result<()> {
        if let Some(pin) = self.link_pin(prog_names::XDP_UNDERLAY, ifname) {
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", pin.display())),
            }
        }
        Ok(())
    }

    /// Switches every pod's programs to this object's (an agent upgrade or restart): atomic
    /// per attachment, no packet meets a veth without a program. Pods attached through TCX
    /// are found by their link pins (pins whose veth is gone are removed; a pod attached by an
    /// older plugin without `to_pod` gets it now); pods attached through clsact by the endpoint
    /// map (their host-side veth), whose filters are replaced in place. Returns how many pods
    /// were switched.
    pub fn reattach_pods(&mut self) -> Result<usize> {
        let Some(dir) = self.pin_dir.clone() else {
            return Ok(0);
        };
        let prefix = format!("{}@", prog_names::FROM_POD);
        let mut switched = 0;
        let mut tcx_pods = Vec::new();
        for entry in std::fs::read_dir(dir.join("links"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(ifname) = name.strip_prefix(&prefix) else {
                continue;
            };
            if nix::net::if_::if_nametoindex(ifname).is_err() {
                // The pod is gone (DEL never ran): drop the stale links.
                let _ = std::fs::remove_file(entry.path());
                let _ = std::fs::remove_file(
                    dir.join("links")
                        .join(format!("{}@{ifname}", prog_names::TO_POD)),
                );
                continue;
            }
            self.attach_pod(ifname, PodHook::Tcx)?;
            tcx_pods.push(ifname.to_string());
            switched += 1;
        }
        for (_, ep) in self.maps.endpoints()? {
            let Ok(ifname) = nix::net::if_::if_indextoname(ep.host_ifindex) else {
                continue;
            };
            let ifname = ifname.to_string_lossy().into_owned();
            if tcx_pods.contains(&ifname) {
                continue;
            }
            // A device clsact cannot go on (another ingress qdisc: a shaped pod whose link pins
            // are gone) gets TCX links instead.
            if self.attach_pod(&ifname, PodHook::Clsact).is_err() {
                self.attach_pod(&ifname, PodHook::Tcx)?;
            }
            switched += 1;
        }
        Ok(switched)
    }

    /// Attaches `from_host` to the ingress of `weft_net` (the peer of `weft_host`).
    pub fn attach_from_host(&mut self, ifname: &str) -> Result<()> {
        self.attach_tc(prog_names::FROM_HOST, ifname, TcAttachType::Ingress)
    }

    fn attach_tc(&mut self, prog_name: &str, ifname: &str, direction: TcAttachType) -> Result<()> {
        let pin = self.link_pin(prog_name, ifname);
        let prog = self.tc_program(prog_name)?;
        attach_tc_link(prog, prog_name, ifname, direction, pin.as_deref())
    }

    /// Pins the loaded programs under `<pin dir>/progs/` so the CNI plugin attaches them
    /// without loading (and verifying) the object on every ADD. Replaces older pins atomically
    /// (pin under a temporary name, then rename).
    pub fn pin_programs(&mut self) -> Result<()> {
        let Some(dir) = self.pin_dir.clone() else {
            return Err(anyhow!("the datapath is not pinned"));
        };
        let progs = dir.join("progs");
        std::fs::create_dir_all(&progs)?;
        for name in prog_names::TC.into_iter().chain([prog_names::XDP_UNDERLAY]) {
            // bpffs refuses names containing dots.
            let tmp = progs.join(format!("tmp_{name}_{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            let prog = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
            prog.pin(&tmp).with_context(|| format!("pinning {name}"))?;
            std::fs::rename(&tmp, progs.join(name))
                .with_context(|| format!("renaming the pin of {name}"))?;
        }
        Ok(())
    }

    fn attach_xdp(&mut self, ifname: &str, mode: XdpMode) -> Result<()> {
        let pin = self.link_pin(prog_names::XDP_UNDERLAY, ifname);
        let prog = self.xdp_program()?;
        if let Some(old) = open_pinned_link(pin.as_deref())? {
            let link = XdpLink::try_from(old).context("pinned link is not an XDP link")?;
            let id = prog
                .attach_to_link(link)
                .with_context(|| format!("replacing xdp_underlay on {ifname}"))?;
            // The pin keeps the link; our handle may go.
            std::mem::drop(FdLink::try_from(prog.take_link(id)?)?);
            return Ok(());
        }
        let id = prog
            .attach(ifname, mode)
            .with_context(|| format!("attaching xdp_underlay to {ifname}"))?;
        if let Some(pin) = pin {
            let link = prog.take_link(id)?;
            FdLink::try_from(link)?
                .pin(&pin)
                .with_context(|| format!("pinning the link at {}", pin.display()))?;
        }
        Ok(())
    }
}

/// `--xdp`: whether tunnel packets from the underlay are decapsulated in XDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpSetting {
    /// XDP where the driver runs it natively (not on a veth), tc elsewhere.
    #[default]
    Auto,
    /// XDP always: natively if the driver can, else in generic mode.
    On,
    /// tc only.
    Off,
}

impl std::str::FromStr for XdpSetting {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(format!("{other:?} is not one of auto, on, off")),
        }
    }
}

/// `WEFT_MONITOR_FLAGS` mapped into this process (the map is `BPF_F_MMAPABLE`): its value,
/// one byte per monitor slot, at the start of the mapping.
struct MappedFlags {
    ptr: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

impl MappedFlags {
    fn new(map: &MapData) -> Result<Self> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        // SAFETY: sysconf reads a constant of the system.
        let len = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .context("the page size")?;
        // SAFETY: a shared mapping of the map's first page (its one value), owned by `Self`
        // and unmapped on drop; the map fd stays open for the call.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error())
                .context("mapping the monitor flags (WEFT_MONITOR_FLAGS)");
        }
        let ptr = std::ptr::NonNull::new(ptr).context("mmap returned null")?;
        Ok(Self { ptr, len })
    }

    fn slot(&self, slot: usize) -> &AtomicU8 {
        assert!(slot < MONITOR_SLOTS as usize, "monitor slot {slot}");
        // SAFETY: the mapping holds at least the value's MONITOR_SLOTS bytes for as long as
        // `self` lives; the programs access them concurrently, hence the atomic.
        unsafe { AtomicU8::from_ptr(self.ptr.as_ptr().cast::<u8>().add(slot)) }
    }
}

impl Drop for MappedFlags {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used past this point.
        unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
    }
}

/// Removes the pins of maps an earlier datapath declared and this one does not
/// (`map_names::RETIRED`): nothing reads them any more, and programs still using them keep
/// their own references until they are replaced.
fn remove_retired_pins(maps_dir: &Path) {
    for name in map_names::RETIRED {
        // Absent on a node that never ran the older datapath; a pin that cannot be removed
        // costs only its memory.
        let _ = std::fs::remove_file(maps_dir.join(name));
    }
}

/// Typed access to every map of the datapath, either taken from a loaded object or opened from
/// the pins of a running node (the CNI plugin and the CLI open pins: no program load, no
/// verifier run).
pub struct Maps {
    maps: std::collections::HashMap<&'static str, Map>,
}

impl Maps {
    fn take_from(ebpf: &mut Ebpf) -> Result<Self> {
        let mut maps = std::collections::HashMap::new();
        for name in map_names::ALL {
            let map = ebpf
                .take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
            maps.insert(name, map);
        }
        Ok(Self { maps })
    }

    /// The maps of `map_names::ALL` the object has.
    fn take_present(ebpf: &mut Ebpf) -> Self {
        let maps = map_names::ALL
            .iter()
            .filter_map(|name| Some((*name, ebpf.take_map(name)?)))
            .collect();
        Self { maps }
    }

    /// Opens the maps pinned under `pin_root` by a node's agent.
    pub fn open_pinned(pin_root: &Path) -> Result<Self> {
        let dir = pin_dir(pin_root).join("maps");
        let mut maps = std::collections::HashMap::new();
        for name in map_names::ALL {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).with_context(|| {
                format!(
                    "opening pinned map {} (is the agent running?)",
                    path.display()
                )
            })?;
            maps.insert(name, Map::from_map_data(data)?);
        }
        Ok(Self { maps })
    }

    /// Takes a map out of the set, for users that need it owned (the monitor's ring buffer).
    pub fn take(&mut self, name: &str) -> Result<Map> {
        self.maps
            .remove(name)
            .ok_or_else(|| anyhow!("map {name} missing"))
    }

    /// Which events each slot's monitor asked for (`MONITOR_F_*` bits, by slot; all zero:
    /// nobody listens).
    pub fn monitor_flags(&self) -> Result<[u8; MONITOR_SLOTS as usize]> {
        let map = MappedFlags::new(self.map_data(map_names::MONITOR_FLAGS)?)?;
        Ok(std::array::from_fn(|slot| {
            map.slot(slot).load(Ordering::SeqCst)
        }))
    }

    /// Sets the flags of `slot` alone: a byte store into the mapped map, so monitors changing
    /// their own slots at once never overwrite each other's (an element update would write the
    /// whole word).
    pub fn set_monitor_flags(&self, slot: u32, flags: u32) -> Result<()> {
        let map = MappedFlags::new(self.map_data(map_names::MONITOR_FLAGS)?)?;
        let byte = u8::try_from(flags).context("monitor flags fit a byte")?;
        map.slot(slot as usize).store(byte, Ordering::SeqCst);
        Ok(())
    }

    /// Budget, sampling and owner of the monitor of `slot`.
    pub fn monitor_config(&self, slot: u32) -> Result<MonitorConfig> {
        let map: Array<&MapData, MonitorConfig> = self.map(map_names::MONITORS)?.try_into()?;
        map.get(&slot, 0)
            .with_context(|| format!("reading the config of monitor slot {slot}"))
    }

    /// Every slot's config, by slot.
    pub fn monitor_configs(&self) -> Result<Vec<MonitorConfig>> {
        (0..MONITOR_SLOTS)
            .map(|slot| self.monitor_config(slot))
            .collect()
    }

    pub fn set_monitor_config(&mut self, slot: u32, cfg: &MonitorConfig) -> Result<()> {
        let mut map: Array<&mut MapData, MonitorConfig> =
            self.map_mut(map_names::MONITORS)?.try_into()?;
        map.set(slot, cfg, 0)
            .with_context(|| format!("writing the config of monitor slot {slot}"))
    }

    /// Puts `socket` in the first free monitor slot of the sockmap (`BPF_NOEXIST`: a slot
    /// another monitor holds is never taken over) and returns the slot; `Ok(None)` when every
    /// slot is taken. The kernel empties the slot when the socket is closed.
    pub fn claim_monitor_slot(
        &mut self,
        socket: &impl std::os::fd::AsRawFd,
    ) -> Result<Option<u32>> {
        let mut map: aya::maps::SockMap<&mut MapData> =
            self.map_mut(map_names::MONITOR_SOCKS)?.try_into()?;
        // BPF_NOEXIST from the kernel's bpf.h.
        const BPF_NOEXIST: u64 = 1;
        for slot in 0..MONITOR_SLOTS {
            match map.set(slot, socket, BPF_NOEXIST) {
                Ok(()) => return Ok(Some(slot)),
                Err(aya::maps::MapError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(e).context("claiming a monitor slot (WEFT_MONITOR_SOCKS)");
                }
            }
        }
        Ok(None)
    }

    /// The token buckets and loss counters of `slot`, one per CPU.
    pub fn monitor_rates(&self, slot: u32) -> Result<Vec<MonitorRate>> {
        let map: PerCpuArray<&MapData, MonitorRate> =
            self.map(map_names::MONITOR_RATES)?.try_into()?;
        Ok(map
            .get(&slot, 0)
            .with_context(|| format!("reading the counters of monitor slot {slot}"))?
            .iter()
            .copied()
            .collect())
    }

    /// Records a node's name (`WEFT_NODE_NAMES`).
    pub fn upsert_node_name(&mut self, addr: Ipv4Addr, name: &str) -> Result<()> {
        self.hash_upsert(map_names::NODE_NAMES, addr, &NodeName::new(name))
            .with_context(|| format!("recording the name of node {addr}"))
    }

    pub fn remove_node_name(&mut self, addr: Ipv4Addr) -> Result<()> {
        self.hash_remove::<NodeName>(map_names::NODE_NAMES, addr)
            .with_context(|| format!("removing the name of node {addr}"))
    }

    /// Node names by address (this node's and its peers', as the agent's datastore names
    /// them; nodes whose record carries no name are absent).
    pub fn node_names(&self) -> Result<Vec<(Ipv4Addr, String)>> {
        Ok(self
            .hash_entries::<NodeName>(map_names::NODE_NAMES)
            .context("iterating node names")?
            .into_iter()
            .map(|(ip, n)| (ip, n.as_str().to_string()))
            .filter(|(_, n)| !n.is_empty())
            .collect())
    }

    fn map(&self, name: &str) -> Result<&Map> {
        self.maps
            .get(name)
            .ok_or_else(|| anyhow!("map {name} missing"))
    }

    fn map_data(&self, name: &str) -> Result<&MapData> {
        match self.map(name)? {
            Map::Array(d) => Ok(d),
            _ => Err(anyhow!("{name}: unexpected map type")),
        }
    }

    /// The capacity (`max_entries`) of the map `name`.
    pub fn capacity(&self, name: &str) -> Result<u32> {
        let data = match self.map(name)? {
            Map::HashMap(d) | Map::LruHashMap(d) | Map::LpmTrie(d) | Map::Array(d) => d,
            Map::PerCpuArray(d) | Map::PerCpuHashMap(d) | Map::PerCpuLruHashMap(d) => d,
            _ => return Err(anyhow!("{name}: unexpected map type")),
        };
        Ok(data.info()?.max_entries())
    }

    /// The error for a write to `name` the kernel refused: [`MapFull`] when the map has no
    /// room, the kernel's error otherwise.
    fn write_error(&self, name: &'static str, e: aya::maps::MapError) -> anyhow::Error {
        if is_full(&e) {
            return MapFull {
                map: name,
                capacity: self.capacity(name).unwrap_or(0),
            }
            .into();
        }
        e.into()
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.maps
            .get_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing"))
    }

    pub fn set_config(&mut self, cfg: &NodeConfig) -> Result<()> {
        let mut map: Array<&mut MapData, NodeConfig> =
            self.map_mut(map_names::CONFIG)?.try_into()?;
        map.set(0, cfg, 0).context("writing the node config")
    }

    pub fn config(&self) -> Result<NodeConfig> {
        let map: Array<&MapData, NodeConfig> = self.map(map_names::CONFIG)?.try_into()?;
        map.get(&0, 0).context("reading the node config")
    }

    pub fn upsert_route(&mut self, cidr: Ipv4Net, info: &RouteInfo) -> Result<()> {
        let mut map: LpmTrie<&mut MapData, [u8; 4], RouteInfo> =
            self.map_mut(map_names::ROUTES)?.try_into()?;
        let key = Key::new(cidr.prefix_len() as u32, cidr.network().octets());
        let result = map.insert(&key, info, 0);
        result
            .map_err(|e| self.write_error(map_names::ROUTES, e))
            .with_context(|| format!("inserting route {cidr}"))
    }

    pub fn remove_route(&mut self, cidr: Ipv4Net) -> Result<()> {
        let mut map: LpmTrie<&mut MapData, [u8; 4], RouteInfo> =
            self.map_mut(map_names::ROUTES)?.try_into()?;
        let key = Key::new(cidr.prefix_len() as u32, cidr.network().octets());
        map.remove(&key)
            .with_context(|| format!("removing route {cidr}"))
    }

    pub fn routes(&self) -> Result<Vec<(Ipv4Net, RouteInfo)>> {
        let map: LpmTrie<&MapData, [u8; 4], RouteInfo> = self.map(map_names::ROUTES)?.try_into()?;
        let mut out = Vec::new();
        for entry in map.iter() {
            let (key, info) = entry.context("iterating routes")?;
            let net = Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)
                .context("route key with an invalid prefix length")?;
            out.push((net, info));
        }
        out.sort_by_key(|(net, _)| *net);
        Ok(out)
    }

    /// Inserts or replaces `value` under the IPv4 key `addr` in the hash map `name`.
    fn hash_upsert<V: aya::Pod>(
        &mut self,
        name: &'static str,
        addr: Ipv4Addr,
        value: &V,
    ) -> Result<()> {
        let mut map: HashMap<&mut MapData, Ipv4Key, V> = self.map_mut(name)?.try_into()?;
        let result = map.insert(
            Ipv4Key {
                addr: addr.octets(),
            },
            value,
            0,
        );
        result.map_err(|e| self.write_error(name, e))
    }

    fn hash_remove<V: aya::Pod>(&mut self, name: &str, addr: Ipv4Addr) -> Result<()> {
        let mut map: HashMap<&mut MapData, Ipv4Key, V> = self.map_mut(name)?.try_into()?;
        map.remove(&Ipv4Key {
            addr: addr.octets(),
        })?;
        Ok(())
    }

    /// Every entry of an IPv4-keyed hash map, sorted by address.
    fn hash_entries<V: aya::Pod>(&self, name: &str) -> Result<Vec<(Ipv4Addr, V)>> {
        let map: HashMap<&MapData, Ipv4Key, V> = self.map(name)?.try_into()?;
        let mut out = Vec::new();
        for entry in map.iter() {
            let (key, value) = entry?;
            out.push((Ipv4Addr::from(key.addr), value));
        }
        out.sort_by_key(|(a, _)| *a);
        Ok(out)
    }

    pub fn upsert_endpoint(&mut self, addr: Ipv4Addr, info: &EndpointInfo) -> Result<()> {
        self.hash_upsert(map_names::ENDPOINTS, addr, info)
            .with_context(|| format!("inserting endpoint {addr}"))
    }

    /// Removes an endpoint, and its flow counters (a later pod with the same address starts
    /// from zero).
    pub fn remove_endpoint(&mut self, addr: Ipv4Addr) -> Result<()> {
        self.hash_remove::<EndpointInfo>(map_names::ENDPOINTS, addr)
            .with_context(|| format!("removing endpoint {addr}"))?;
        self.remove_flows(addr)
    }

    /// Packets and bytes of each local pod, summed over CPUs (`WEFT_FLOWS`).
    pub fn flows(&self) -> Result<Vec<(Ipv4Addr, FlowSlot)>> {
        let map: PerCpuArray<&MapData, FlowSlot> = self.map(map_names::FLOWS)?.try_into()?;
        let mut out = Vec::new();
        for (ip, _) in self.endpoints()? {
            let addr = ip.octets();
            let per_cpu = map
                .get(&flow_slot(addr), 0)
                .with_context(|| format!("reading the flow counters of {ip}"))?;
            let mut sum = FlowSlot {
                addr,
                ..FlowSlot::ZERO
            };
            // Only the CPUs' values that belong to this pod (a slot taken over elsewhere is
            // another address's).
            for f in per_cpu.iter().filter(|f| f.addr == addr) {
                sum.packets_out += f.packets_out;
                sum.bytes_out += f.bytes_out;
                sum.packets_in += f.packets_in;
                sum.bytes_in += f.bytes_in;
            }
            out.push((ip, sum));
        }
        Ok(out)
    }

    /// Forgets the flow counters of an address (a later pod with it starts from zero).
    pub fn remove_flows(&mut self, addr: Ipv4Addr) -> Result<()> {
        let mut map: PerCpuArray<&mut MapData, FlowSlot> =
            self.map_mut(map_names::FLOWS)?.try_into()?;
        let index = flow_slot(addr.octets());
        let values = map.get(&index, 0)?;
        let changed = values.iter().any(|v| v.addr == addr.octets());
        let zeroed: Vec<FlowSlot> = values
            .iter()
            .map(|v| {
                if v.addr == addr.octets() {
                    FlowSlot::ZERO
                } else {
                    *v
                }
            })
            .collect();
        if changed {
            map.set(index, aya::maps::PerCpuValues::try_from(zeroed)?, 0)
                .with_context(|| format!("clearing the flow counters of {addr}"))?;
        }
        Ok(())
    }

    pub fn endpoints(&self) -> Result<Vec<(Ipv4Addr, EndpointInfo)>> {
        self.hash_entries(map_names::ENDPOINTS)
            .context("iterating endpoints")
    }

    pub fn upsert_node(&mut self, addr: Ipv4Addr, info: &NodeInfo) -> Result<()> {
        self.hash_upsert(map_names::NODES, addr, info)
            .with_context(|| format!("inserting node {addr}"))
    }

    pub fn remove_node(&mut self, addr: Ipv4Addr) -> Result<()> {
        self.hash_remove::<NodeInfo>(map_names::NODES, addr)
            .with_context(|| format!("removing node {addr}"))
    }

    pub fn nodes(&self) -> Result<Vec<(Ipv4Addr, NodeInfo)>> {
        self.hash_entries(map_names::NODES)
            .context("iterating nodes")
    }

    /// Cached underlay next hops (what the datapath resolved through the kernel's FIB).
    pub fn next_hops(&self) -> Result<Vec<(Ipv4Addr, NextHop)>> {
        self.hash_entries(map_names::NEXT_HOPS)
            .context("iterating next hops")
    }

    /// Forgets every cached next hop, so the next packet to each node asks the FIB again (the
    /// agent calls this when the underlay's routes or neighbours change).
    pub fn flush_next_hops(&mut self) -> Result<()> {
        let mut map: HashMap<&mut MapData, Ipv4Key, NextHop> =
            self.map_mut(map_names::NEXT_HOPS)?.try_into()?;
        let keys: Vec<Ipv4Key> = map.keys().filter_map(|k| k.ok()).collect();
        for key in keys {
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// Every conntrack entry (dead ones included until the GC removes them).
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        let map: HashMap<&MapData, CtKey, CtEntry> = self.map(map_names::CONNTRACK)?.try_into()?;
        // An entry evicted between the key walk and its lookup is simply gone.
        let mut out: Vec<(CtKey, CtEntry)> = map.iter().flatten().collect();
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    /// The conntrack map's descriptor, for the GC's cursor walk (`crate::conntrack`).
    pub fn conntrack_fd(&self) -> Result<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd as _;
        match self.map(map_names::CONNTRACK)? {
            Map::LruHashMap(data) | Map::HashMap(data) => Ok(data.fd().as_fd()),
            _ => Err(anyhow!("{} is not a hash map", map_names::CONNTRACK)),
        }
    }

    /// One conntrack entry (`None`: absent or evicted).
    pub fn conntrack_entry(&self, key: &CtKey) -> Result<Option<CtEntry>> {
        let map: HashMap<&MapData, CtKey, CtEntry> = self.map(map_names::CONNTRACK)?.try_into()?;
        match map.get(key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading a conntrack entry"),
        }
    }

    /// Writes a conntrack entry (tests and tools; the datapath writes its own).
    pub fn upsert_conntrack(&mut self, key: &CtKey, entry: &CtEntry) -> Result<()> {
        let mut map: HashMap<&mut MapData, CtKey, CtEntry> =
            self.map_mut(map_names::CONNTRACK)?.try_into()?;
        map.insert(key, entry, 0)
            .context("writing a conntrack entry")
    }

    /// Removes a conntrack entry (a missing one is fine: evicted meanwhile).
    pub fn remove_conntrack(&mut self, key: &CtKey) -> Result<()> {
        let mut map: HashMap<&mut MapData, CtKey, CtEntry> =
            self.map_mut(map_names::CONNTRACK)?.try_into()?;
        match map.remove(key) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes a learned path MTU (`weft trace` copies the live ones into its instance).
    pub fn upsert_path_mtu(&mut self, peer: Ipv4Addr, value: &PathMtu) -> Result<()> {
        self.hash_upsert(map_names::PATH_MTU, peer, value)
            .with_context(|| format!("writing the path MTU toward {peer}"))
    }

    /// Path MTUs learned from ICMP fragmentation-needed, by peer.
    pub fn path_mtus(&self) -> Result<Vec<(Ipv4Addr, PathMtu)>> {
        self.hash_entries(map_names::PATH_MTU)
            .context("iterating path MTUs")
    }

    fn per_cpu_sum(&self, name: &str, index: u32) -> Result<u64> {
        let map: PerCpuArray<&MapData, u64> = self.map(name)?.try_into()?;
        let values = map
            .get(&index, 0)
            .with_context(|| format!("reading {name}[{index}]"))?;
        Ok(values.iter().sum())
    }

    /// Drop counters summed over CPUs.
    pub fn drops(&self) -> Result<Vec<(DropReason, u64)>> {
        DropReason::ALL
            .iter()
            .map(|r| Ok((*r, self.per_cpu_sum(map_names::DROPS, *r as u32)?)))
            .collect()
    }

    pub fn drop_count(&self, reason: DropReason) -> Result<u64> {
        self.per_cpu_sum(map_names::DROPS, reason as u32)
    }

    /// Path counters summed over CPUs.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>> {
        Stat::ALL
            .iter()
            .map(|s| Ok((*s, self.per_cpu_sum(map_names::STATS, *s as u32)?)))
            .collect()
    }

    pub fn stat_count(&self, stat: Stat) -> Result<u64> {
        self.per_cpu_sum(map_names::STATS, stat as u32)
    }
}

/// The link pinned at `pin`, if there is one (a previous agent's attachment to adopt).
fn open_pinned_link(pin: Option<&Path>) -> Result<Option<FdLink>> {
    let Some(pin) = pin else {
        return Ok(None);
    };
    match PinnedLink::from_pin(pin) {
        Ok(old) => Ok(Some(FdLink::from(old))),
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(e).context(format!("opening {}", pin.display())),
    }
}

/// Attaches `prog` to the tc ingress or egress of `ifname` (current netns) as a TCX link. With
/// a pin path, the link is pinned there; an existing pinned link is atomically switched to
/// `prog`.
fn attach_tc_link(
    prog: &mut SchedClassifier,
    prog_name: &str,
    ifname: &str,
    direction: TcAttachType,
    pin: Option<&Path>,
) -> Result<()> {
    if let Some(old) = open_pinned_link(pin)? {
        let link = SchedClassifierLink::try_from(old).context("pinned link is not a tc link")?;
        let id = prog
            .attach_to_link(link)
            .with_context(|| format!("replacing {prog_name} on {ifname}"))?;
        // The pin keeps the link; our handle may go.
        std::mem::drop(FdLink::try_from(prog.take_link(id)?)?);
        return Ok(());
    }
    let id = prog
        .attach_with_options(
            ifname,
            direction,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching {prog_name} to {ifname}"))?;
    if let Some(pin) = pin {
        let link = prog.take_link(id)?;
        FdLink::try_from(link)?
            .pin(pin)
            .with_context(|| format!("pinning the link at {}", pin.display()))?;
    }
    Ok(())
}

/// Path of the pinned link of `prog_name` on `ifname` for the node pinned under `pin_root`.
pub fn link_pin_path(pin_root: &Path, prog_name: &str, ifname: &str) -> PathBuf {
    pin_dir(pin_root)
        .join("links")
        .join(format!("{prog_name}@{ifname}"))
}

/// The programs on a pod's host-side veth and the direction each is attached in.
pub const POD_PROGRAMS: [(&str, TcAttachType); 2] = [
    (prog_names::FROM_POD, TcAttachType::Ingress),
    (prog_names::TO_POD, TcAttachType::Egress),
];

/// How `from_pod` and `to_pod` hook into a pod's host-side veth.
///
/// Measured on this project's machines (2 vCPUs, kernel 6.18): attaching both programs
/// through TCX takes 26 ms (each TCX attach waits for a normal RCU grace period,
/// `tcx_entry_sync()`, holding rtnl, and deleting the device waits again in
/// `tcx_uninstall()`); a clsact qdisc with two cls_bpf filters takes 0.2 ms (the filter swap
/// waits only when a grace period is still due, and then for an expedited one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodHook {
    /// A clsact qdisc with both programs as direct-action cls_bpf filters (priority
    /// [`POD_FILTER_PRIORITY`], handle [`POD_FILTER_HANDLE`]: first in line). The filters
    /// belong to the device (no pin); an upgrade replaces them in place, atomically. The
    /// default.
    Clsact,
    /// Pinned TCX links. For pods the runtime asks to shape: the `bandwidth` plugin chained
    /// after weft adds an `ingress` qdisc, which cannot coexist with clsact.
    Tcx,
}

/// tc priority of weft's cls_bpf filters on pod veths.
pub const POD_FILTER_PRIORITY: u16 = 1;
/// tc handle (minor) of weft's cls_bpf filters on pod veths.
pub const POD_FILTER_HANDLE: u16 = 1;

/// Attaches `prog` (named `prog_name`) in `direction` of the pod veth `ifname` through
/// `hook`, switching an existing attachment to it in place.
fn attach_pod_program(
    prog: &mut SchedClassifier,
    prog_name: &str,
    ifname: &str,
    direction: TcAttachType,
    hook: PodHook,
    pin: Option<&Path>,
) -> Result<()> {
    match hook {
        PodHook::Tcx => attach_tc_link(prog, prog_name, ifname, direction, pin),
        PodHook::Clsact => attach_tc_filter(prog, prog_name, ifname, direction),
    }
}

/// Attaches `prog` as weft's direct-action cls_bpf filter in `direction` of `ifname` (adding
/// the clsact qdisc if missing); an existing filter of weft's is switched to `prog` in place
/// (cls_bpf replaces the program under RCU: no packet meets the device without one).
fn attach_tc_filter(
    prog: &mut SchedClassifier,
    prog_name: &str,
    ifname: &str,
    direction: TcAttachType,
) -> Result<()> {
    // Already there (the other direction's attach, a retried ADD, a restart): fine. Anything
    // else (another ingress qdisc in the way) shows in the filter's attach error below.
    let _ = qdisc_add_clsact(ifname);
    let handle = TcHandle::new(0, POD_FILTER_HANDLE);
    let options = NlOptions {
        priority: POD_FILTER_PRIORITY,
        handle,
        ..Default::default()
    };
    let id = match prog.attach_with_options(ifname, direction, TcAttachOptions::Netlink(options)) {
        Ok(id) => id,
        Err(create) => {
            let existing =
                SchedClassifierLink::attached(ifname, direction, POD_FILTER_PRIORITY, handle, None)
                    .with_context(|| format!("{ifname}: no such interface"))?;
            prog.attach_to_link(existing).map_err(|replace| {
                anyhow!(
                    "attaching {prog_name} to {ifname} as a cls_bpf filter: {create} \
                     (replacing: {replace})"
                )
            })?
        }
    };
    // The filter belongs to the device from now on; dropping aya's handle would delete it.
    std::mem::forget(prog.take_link(id)?);
    Ok(())
}

/// Attaches the node's pinned `from_pod` and `to_pod` programs (pinned by the agent) to a pod's
/// host-side veth in the current netns through `hook` (TCX links are pinned): what the CNI
/// plugin does on ADD. No object load, no verifier run.
pub fn attach_pinned_pod(pin_root: &Path, ifname: &str, hook: PodHook) -> Result<()> {
    for (name, direction) in POD_PROGRAMS {
        let mut prog = open_pinned_tc(pin_root, name)?;
        let pin = link_pin_path(pin_root, name, ifname);
        attach_pod_program(&mut prog, name, ifname, direction, hook, Some(&pin))?;
    }
    Ok(())
}

/// Attaches the node's pinned `from_vxlan` (pinned by the agent) to the ingress of the VXLAN
/// device `ifname` (current netns) as a pinned TCX link: an attachment already there switches
/// to the pinned program atomically. A link pin whose attachment is gone (the device was
/// deleted and made again: the old link is defunct, and switching its program would attach
/// nothing) is replaced by a new attachment.
pub fn attach_pinned_vxlan(pin_root: &Path, ifname: &str) -> Result<()> {
    let name = prog_names::FROM_VXLAN;
    let pin = link_pin_path(pin_root, name, ifname);
    if !vxlan_program_attached(ifname) {
        match std::fs::remove_file(&pin) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", pin.display())),
        }
    }
    let mut prog = open_pinned_tc(pin_root, name)?;
    attach_tc_link(&mut prog, name, ifname, TcAttachType::Ingress, Some(&pin))
}

/// Whether `from_vxlan` is attached to the ingress of `ifname` (current netns).
pub fn vxlan_program_attached(ifname: &str) -> bool {
    SchedClassifier::query_tcx(ifname, TcAttachType::Ingress).is_ok_and(|(_, progs)| {
        progs
            .iter()
            .any(|p| p.name_as_str() == Some(prog_names::FROM_VXLAN))
    })
}

/// Opens the tc program `name` the agent pinned under `pin_root`.
fn open_pinned_tc(pin_root: &Path, name: &str) -> Result<SchedClassifier> {
    let prog_path = pin_dir(pin_root).join("progs").join(name);
    SchedClassifier::from_pin(&prog_path).with_context(|| {
        format!(
            "opening the pinned program {} (is the agent running?)",
            prog_path.display()
        )
    })
}

/// Removes the pinned link of `from_vxlan` on `ifname` (the device is going away).
pub fn detach_pinned_vxlan(pin_root: &Path, ifname: &str) -> Result<()> {
    let pin = link_pin_path(pin_root, prog_names::FROM_VXLAN, ifname);
    match std::fs::remove_file(&pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", pin.display())),
    }
}

/// Detaches TCX-attached `from_pod` and `to_pod` from a pod's veth by removing their pinned
/// links (idempotent; clsact filters go with their device).
pub fn detach_pinned_pod(pin_root: &Path, ifname: &str) -> Result<()> {
    for (name, _) in POD_PROGRAMS {
        let pin = link_pin_path(pin_root, name, ifname);
        match std::fs::remove_file(&pin) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", pin.display())),
        }
    }
    Ok(())
}

fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    for name in prog_names::TC {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading (verifying) {name}"))?;
    }
    let xdp: &mut Xdp = ebpf
        .program_mut(prog_names::XDP_UNDERLAY)
        .ok_or_else(|| anyhow!("program xdp_underlay missing from the object"))?
        .try_into()?;
    xdp.load().context("loading (verifying) xdp_underlay")?;
    Ok(())
}

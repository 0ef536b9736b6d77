//! Types shared by the kernel-side programs (`node-ebpf`) and userspace (`weft-agent`, tests).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding so that both sides agree on the
//! layout byte for byte and the kernel never sees uninitialised padding. Addresses are big-endian
//! byte arrays (network order, as on the wire); plain integers are host order.
#![no_std]

pub mod conntrack;
pub mod monitor;
pub mod policy;

/// Version of the map layout. It is part of the pin path, so a new layout never reuses maps
/// pinned by an older agent (aya reuses a pinned map without checking its shape).
pub const SCHEMA_VERSION: u32 = 3;
/// Default routing table (kernel table id) that BIRD fills with the pod routes it learns and
/// `bgp` routes are looked up in. A table of weft's own: the main table keeps the node's
/// routing, and weft's table holds nothing but routes to other nodes' pod subnets.
pub const BGP_TABLE_DEFAULT: u32 = 2500;
/// Default root of the pins; the schema directory `v{SCHEMA_VERSION}` lives under it.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/weft";

/// Map names, as declared in `node-ebpf` and as pinned.
pub mod map_names {
    pub const CONFIG: &str = "WEFT_CONFIG";
    pub const ROUTES: &str = "WEFT_ROUTES";
    pub const ENDPOINTS: &str = "WEFT_ENDPOINTS";
    pub const NODES: &str = "WEFT_NODES";
    pub const DROPS: &str = "WEFT_DROPS";
    pub const STATS: &str = "WEFT_STATS";
    pub const NEXT_HOPS: &str = "WEFT_NEXT_HOPS";
    pub const CONNTRACK: &str = "WEFT_CT";
    pub const PATH_MTU: &str = "WEFT_PATH_MTU";
    pub const POLICY_ENDPOINTS: &str = "WEFT_POLICY_ENDPOINTS";
    pub const POLICY_ADDRS: &str = "WEFT_POLICY_ADDRS";
    pub const POLICY_CIDRS: &str = "WEFT_POLICY_CIDRS";
    pub const POLICY_RULES: &str = "WEFT_POLICY_RULES";
    pub const POLICY_PORT_BLOCKS: &str = "WEFT_POLICY_PORT_BLOCKS";
    pub const POLICY_NS_DEFAULTS: &str = "WEFT_POLICY_NS_DEFAULTS";
    pub const POLICY_CONFIG: &str = "WEFT_POLICY_CONFIG";
    pub const POLICY_PODS: &str = "WEFT_POLICY_PODS";
    pub const POLICY_DROPS: &str = "WEFT_POLICY_DROPS";
    /// The policy maps (`crate::policy`).
    pub const POLICY: [&str; 9] = [
        POLICY_ENDPOINTS,
        POLICY_ADDRS,
        POLICY_CIDRS,
        POLICY_RULES,
        POLICY_PORT_BLOCKS,
        POLICY_NS_DEFAULTS,
        POLICY_CONFIG,
        POLICY_PODS,
        POLICY_DROPS,
    ];
    /// Per-endpoint packets and bytes, in and out.
    pub const FLOWS: &str = "WEFT_FLOWS";
    /// `weft monitor`: which events each listener slot asked for, one word (`crate::monitor`).
    pub const MONITOR_FLAGS: &str = "WEFT_MONITOR_FLAGS";
    /// `weft monitor`: per listener slot, its budget, sampling and owner.
    pub const MONITORS: &str = "WEFT_MONITORS";
    /// `weft monitor`: per slot, a socket of its monitor (the kernel empties a slot when its
    /// monitor dies).
    pub const MONITOR_SOCKS: &str = "WEFT_MONITOR_SOCKS";
    /// `weft monitor`: per slot, per-CPU token buckets and loss counters.
    pub const MONITOR_RATES: &str = "WEFT_MONITOR_RATES";
    /// `weft monitor`: the event ring buffer of each slot.
    pub const EVENTS: [&str; crate::monitor::MONITOR_SLOTS as usize] = [
        "WEFT_EVENTS_0",
        "WEFT_EVENTS_1",
        "WEFT_EVENTS_2",
        "WEFT_EVENTS_3",
    ];
    /// Node address -> node name (`crate::NodeName`), written by the agent from its datastore,
    /// read by `weft monitor` and `weft nodes`. No program reads it.
    pub const NODE_NAMES: &str = "WEFT_NODE_NAMES";
    /// The tunnel key `from_vxlan` takes when the packet carries none: written only by test
    /// and trace instances (BPF_PROG_TEST_RUN cannot attach tunnel metadata to a packet).
    /// Never pinned, so never shared: the live instance's stays empty, and there a packet
    /// without the kernel's metadata is dropped.
    pub const TRACE_TUNNEL: &str = "WEFT_TRACE_TUNNEL";
    /// Every map the datapath declares.
    pub const ALL: [&str; 28] = [
        CONFIG,
        ROUTES,
        ENDPOINTS,
        NODES,
        DROPS,
        STATS,
        NEXT_HOPS,
        CONNTRACK,
        PATH_MTU,
        MONITOR_FLAGS,
        MONITORS,
        MONITOR_SOCKS,
        MONITOR_RATES,
        EVENTS[0],
        EVENTS[1],
        EVENTS[2],
        EVENTS[3],
        NODE_NAMES,
        FLOWS,
        POLICY_ENDPOINTS,
        POLICY_ADDRS,
        POLICY_CIDRS,
        POLICY_RULES,
        POLICY_PORT_BLOCKS,
        POLICY_NS_DEFAULTS,
        POLICY_CONFIG,
        POLICY_PODS,
        POLICY_DROPS,
    ];
    /// Maps earlier versions of the datapath pinned under the same schema directory and this
    /// one no longer declares (their shape changed, so they were renamed): the agent removes
    /// their pins at start. `weft monitor` served one monitor through these.
    pub const RETIRED: [&str; 4] = [
        "WEFT_MONITOR",
        "WEFT_MONITOR_SOCK",
        "WEFT_MONITOR_RATE",
        "WEFT_EVENTS",
    ];
    /// The maps the programs only read (userspace writes them): `weft trace` shares these with
    /// the live datapath and gives its instance private copies of every other map (counters,
    /// conntrack, caches, the monitor's), so a trace changes no state. A new map is private to
    /// the trace unless listed here: a read-only map left out shows as a wrong trace, never as
    /// a trace that writes to the node.
    /// The policy maps are shared (the trace judges against the live policy) except
    /// `POLICY_DROPS`, the per-endpoint denial counters the programs write.
    pub const SHARED_WITH_TRACE: [&str; 12] = [
        CONFIG,
        ROUTES,
        ENDPOINTS,
        NODES,
        POLICY_ENDPOINTS,
        POLICY_ADDRS,
        POLICY_CIDRS,
        POLICY_RULES,
        POLICY_PORT_BLOCKS,
        POLICY_NS_DEFAULTS,
        POLICY_CONFIG,
        POLICY_PODS,
    ];
}

/// Program names (the Rust function names in `node-ebpf`).
pub mod prog_names {
    /// tc ingress on the host side of a pod's veth: traffic leaving a pod.
    pub const FROM_POD: &str = "from_pod";
    /// XDP on the underlay NIC: tunnel decapsulation before GRO.
    pub const XDP_UNDERLAY: &str = "xdp_underlay";
    /// tc ingress on the underlay NIC: delivery to pods, tc decapsulation fallback.
    pub const FROM_UNDERLAY: &str = "from_underlay";
    /// tc ingress on `weft_net`, peer of `weft_host`: the node's own traffic to remote pods.
    pub const FROM_HOST: &str = "from_host";
    /// tc egress on the host side of a pod's veth: what the host stack delivers into a pod.
    pub const TO_POD: &str = "to_pod";
    /// tc ingress on `weft_vxlan` (`VXLAN_DEV`): VXLAN the kernel's vxlan socket aggregated
    /// (GRO) and decapsulated, delivered to pods.
    pub const FROM_VXLAN: &str = "from_vxlan";
    /// Every tc program, in the order the agent loads them.
    pub const TC: [&str; 5] = [FROM_POD, FROM_UNDERLAY, FROM_HOST, TO_POD, FROM_VXLAN];
}

/// The veth pair through which the node's own traffic to pods on other nodes enters the
/// datapath (the agent routes the cluster network via `HOST_DEV`; `from_host` runs on the
/// ingress of `HOST_PEER_DEV`).
pub const HOST_DEV: &str = "weft_host";
pub const HOST_PEER_DEV: &str = "weft_net";

/// The node's metadata-mode (`external`, collect_md) VXLAN device, as Cilium's `cilium_vxlan`:
/// with the tc hook its UDP socket gives VXLAN the underlay's GRO (the kernel aggregates
/// tunnel packets of one flow before decapsulating them), and `from_vxlan` on its ingress
/// delivers the inner packets. Nothing is ever routed through it.
pub const VXLAN_DEV: &str = "weft_vxlan";

/// Every pod's gateway (Calico's link-local address): a permanent neighbour entry in the pod maps
/// it to the host side of the pod's veth; the datapath answers ARP for it.
pub const POD_GATEWAY: [u8; 4] = [169, 254, 1, 1];

pub const ROUTES_MAX: u32 = 65_536;
pub const ENDPOINTS_MAX: u32 = 16_384;
pub const NODES_MAX: u32 = 65_536;
pub const NEXT_HOPS_MAX: u32 = 65_536;
/// Learned path MTUs (one per peer, like the next hops).
pub const PATH_MTU_MAX: u32 = 65_536;
/// How long a path MTU learned from an ICMP fragmentation-needed holds (the kernel's
/// `net.ipv4.route.mtu_expires`, 10 minutes).
pub const PATH_MTU_TTL_NS: u64 = 600_000_000_000;
/// Smallest path MTU accepted from an ICMP fragmentation-needed (the kernel's
/// `net.ipv4.route.min_pmtu`): a forged ICMP cannot shrink packets below it.
pub const PATH_MTU_MIN: u32 = 552;
/// How long a next hop resolved by the kernel's FIB is reused before it is looked up again.
/// Short enough that underlay route or neighbour changes take effect within a second; long
/// enough that the ~90 ns lookup is paid once per peer per second instead of per packet.
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;

pub const VXLAN_PORT_DEFAULT: u16 = 8472;
pub const VXLAN_VNI_DEFAULT: u32 = 1;
/// Outer Ethernet + IPv4 + UDP + VXLAN + inner Ethernet header.
pub const VXLAN_OVERHEAD: u32 = 50;
/// Outer IPv4 header only.
pub const IPIP_OVERHEAD: u32 = 20;

/// The largest pod MTU an underlay MTU allows: minus the largest overhead of any backend
/// (VXLAN's), so that a pod's packet fits every backend a cluster can switch to live.
pub const fn max_pod_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
}

/// How packets reach the node owning a route.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteMode {
    /// VXLAN encapsulation (flannel-compatible: VNI and port from the config).
    Vxlan = 1,
    /// IPv4-in-IPv4 encapsulation (Calico-compatible).
    Ipip = 2,
    /// No encapsulation: routed to the owning node on the shared L2 segment (host-gw).
    Direct = 3,
    /// No encapsulation, next hop from the kernel's FIB in weft's BGP table (filled by BIRD):
    /// the owning node itself or a router on the way to it.
    Bgp = 4,
}

impl RouteMode {
    /// Bytes this mode adds to a packet.
    #[inline(always)]
    pub const fn overhead(self) -> u32 {
        match self {
            Self::Vxlan => VXLAN_OVERHEAD,
            Self::Ipip => IPIP_OVERHEAD,
            Self::Direct | Self::Bgp => 0,
        }
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Vxlan),
            2 => Some(Self::Ipip),
            3 => Some(Self::Direct),
            4 => Some(Self::Bgp),
            _ => None,
        }
    }
}

/// Where a pod CIDR lives: the owning node's underlay address and how to reach it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RouteInfo {
    /// Owning node's underlay IPv4 address (network order).
    pub node_ip: [u8; 4],
    /// The owning node's VTEP MAC (inner destination MAC for VXLAN).
    pub vtep_mac: [u8; 6],
    /// A [`RouteMode`] as u8.
    pub mode: u8,
    pub _pad: u8,
}

/// Key of the endpoint map and the node map: an IPv4 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Ipv4Key {
    pub addr: [u8; 4],
}

/// Traffic to and from the pod takes the host stack, never the fast path: its qdiscs (the
/// `bandwidth` plugin's shaping) see every packet. Set by the CNI plugin when the runtime asks
/// for bandwidth limits (`runtimeConfig.bandwidth`).
pub const EP_F_STACK_ONLY: u32 = 1 << 0;

/// A pod attached to this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct EndpointInfo {
    /// ifindex of the host side of the pod's veth (in the node's namespace).
    pub host_ifindex: u32,
    /// MAC of the pod's interface (the peer of the host-side veth).
    pub pod_mac: [u8; 6],
    /// MAC of the host side of the veth: the pod's gateway MAC.
    pub host_mac: [u8; 6],
    /// `EP_F_*` bits.
    pub flags: u32,
}

/// Slots of the per-endpoint flow counters (`WEFT_FLOWS`): pods' addresses are distinct in
/// their low 12 bits within any pod subnet of up to 4096 addresses (flannel's default is 256).
pub const FLOW_SLOTS: u32 = 4096;

/// The `WEFT_FLOWS` slot of a pod address.
#[inline(always)]
pub fn flow_slot(addr: [u8; 4]) -> u32 {
    u32::from_be_bytes(addr) & (FLOW_SLOTS - 1)
}

/// Traffic of one local pod (a `WEFT_FLOWS` slot, per CPU). Bytes are IPv4 lengths (headers
/// included, no Ethernet header).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowSlot {
    /// The pod the counters belong to (network order); all zero: unused.
    pub addr: [u8; 4],
    pub _pad: u32,
    /// Sent by the pod (past its source checks).
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Delivered into the pod.
    pub packets_in: u64,
    pub bytes_in: u64,
}

impl FlowSlot {
    pub const ZERO: Self = Self {
        addr: [0; 4],
        _pad: 0,
        packets_out: 0,
        bytes_out: 0,
        packets_in: 0,
        bytes_in: 0,
    };
}

/// A known tunnel peer: the only outer sources the decapsulation accepts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NodeInfo {
    pub vtep_mac: [u8; 6],
    /// A [`RouteMode`] as u8 (the peer's default mode).
    pub mode: u8,
    pub _pad: u8,
}

/// Longest node name kept (bytes): a Kubernetes node name is a DNS subdomain, at most 253.
pub const NODE_NAME_LEN: usize = 256;

/// A node's name (value of `WEFT_NODE_NAMES`, keyed by the node's [`Ipv4Key`]), NUL-padded:
/// the Kubernetes Node's name, the static file entry's `name`, or the `NodeName` a weft node
/// puts in its etcd lease. For userspace only (`weft monitor`, `weft nodes`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NodeName {
    pub name: [u8; NODE_NAME_LEN],
}

impl NodeName {
    /// The entry for `name`, cut to at most `NODE_NAME_LEN - 1` bytes at a character
    /// boundary (so the text stays valid UTF-8 and NUL-terminated).
    pub fn new(name: &str) -> Self {
        let mut end = name.len().min(NODE_NAME_LEN - 1);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut out = [0u8; NODE_NAME_LEN];
        out[..end].copy_from_slice(&name.as_bytes()[..end]);
        Self { name: out }
    }

    /// The name as text (up to the first NUL; empty if not UTF-8).
    pub fn as_str(&self) -> &str {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.name.len());
        core::str::from_utf8(&self.name[..end]).unwrap_or("")
    }
}

/// The node is on-link: the FIB's next hop toward it is the node itself, no router.
pub const NEXT_HOP_F_ONLINK: u32 = 1 << 0;

/// An underlay next hop toward a node, as the kernel's FIB resolved it (cache entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NextHop {
    /// Egress interface.
    pub ifindex: u32,
    /// MTU of the route toward the node as the FIB reports it (a route's `mtu` or the
    /// device's).
    pub mtu: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// `NEXT_HOP_F_*` bits.
    pub flags: u32,
    /// `bpf_ktime_get_coarse_ns` time after which the entry is stale.
    pub expires_ns: u64,
}

/// A path MTU toward a peer learned from an ICMP fragmentation-needed about one of this
/// node's tunnel packets (the kernel learns none for them: no socket sent them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PathMtu {
    pub mtu: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` time after which the value no longer applies.
    pub expires_ns: u64,
}

/// Metadata `xdp_underlay` leaves in front of a packet it decapsulated, for `from_underlay`:
/// the packet came out of a tunnel from `peer` (whose inner source was checked). Metadata is
/// not part of the packet, so nothing on the wire can forge it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct DecapMeta {
    /// [`DECAP_META_MAGIC`].
    pub magic: u32,
    /// Outer source: the node the packet came from.
    pub peer: [u8; 4],
}

/// The tunnel key `from_vxlan` works with: the node a packet came from (the outer source) and
/// its VNI, from the kernel's tunnel metadata. Also the value of `WEFT_TRACE_TUNNEL`, the key
/// a test or trace instance supplies instead (`valid` != 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TunnelKey {
    /// Outer source address (network order).
    pub peer: [u8; 4],
    /// VNI (host order).
    pub vni: u32,
    /// Non-zero: set.
    pub valid: u32,
}

/// `DecapMeta::magic`: decapsulated from `peer`; the inner source may be the peer itself.
pub const DECAP_META_MAGIC: u32 = 0x5746_4443;
/// `DecapMeta::magic`: decapsulated from `peer`, and the inner source is one of its pods (its
/// route was checked): `from_underlay` need not look it up again. (A separate value, so a
/// packet an older `xdp_underlay` marked is never taken for one whose source was classified.)
pub const DECAP_META_MAGIC_POD: u32 = 0x5746_4450;

/// Flow hash of a packet's addresses, protocol and ports (zero for non-first fragments and
/// protocols without ports). Deterministic, so userspace and tests compute the same value;
/// mixing as in MurmurHash3's finalizer.
#[inline(always)]
pub fn flow_hash(saddr: [u8; 4], daddr: [u8; 4], protocol: u8, ports: [u8; 4]) -> u32 {
    let mut h = u32::from_be_bytes(saddr).wrapping_mul(0x9e37_79b1);
    h ^= u32::from_be_bytes(daddr);
    h = h.rotate_left(13).wrapping_mul(0x85eb_ca6b);
    h ^= u32::from_be_bytes(ports);
    h = h.rotate_left(11).wrapping_mul(0xc2b2_ae35);
    h ^= protocol as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

/// VXLAN UDP source port for a flow hash: spread over the dynamic range 49152-65535
/// (RFC 7348 §5) so underlay ECMP and receivers' RSS keep one flow on one path.
#[inline(always)]
pub fn vxlan_source_port(hash: u32) -> u16 {
    const MIN: u64 = 49152;
    const RANGE: u64 = 65536 - MIN;
    (((hash as u64 * RANGE) >> 32) + MIN) as u16
}

/// Node-wide configuration, one entry in an array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NodeConfig {
    /// This node's underlay IPv4 address (network order); tunnels are addressed to it.
    pub node_ip: [u8; 4],
    /// ifindex of the underlay NIC; encapsulated packets leave through it.
    pub underlay_ifindex: u32,
    /// VXLAN network identifier (host order, 24 bits used).
    pub vni: u32,
    /// VXLAN UDP destination port (host order).
    pub vxlan_port: u16,
    /// `CONFIG_F_*` bits.
    pub flags: u16,
    /// This node's VTEP MAC: inner source MAC of the VXLAN frames it sends.
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Kernel routing table `bgp` routes are looked up in (`BPF_FIB_LOOKUP_TBID`).
    pub bgp_table: u32,
}

/// The config entry is valid (userspace wrote it). Programs pass everything untouched before.
pub const CONFIG_F_READY: u16 = 1 << 0;
/// Plain (unencapsulated) traffic from hosts that are not peers may reach this node's pods
/// through the host stack (routed access from outside the cluster, as BGP setups want).
/// Off by default: only peers on the underlay may send plain frames to pods.
pub const CONFIG_F_ACCEPT_ROUTED: u16 = 1 << 1;
/// VXLAN addressed to this node carrying TCP (or arriving GSO) goes to the kernel's vxlan
/// socket (`VXLAN_DEV`, which decapsulates it after GRO, and `from_vxlan` delivers):
/// `from_underlay` checks it and passes it on instead of decapsulating it itself. Set by the
/// agent only while the device is up on the configured port with `from_vxlan` attached.
pub const CONFIG_F_VXLAN_DEV: u16 = 1 << 2;

/// Bits of `NodeConfig::flags` holding the [`DecapHook`] the agent chose (the datapath ignores
/// them; `weft status` shows them).
pub const CONFIG_DECAP_HOOK_SHIFT: u16 = 8;
pub const CONFIG_DECAP_HOOK_MASK: u16 = 0x0f << CONFIG_DECAP_HOOK_SHIFT;

/// Where tunnel packets from the underlay are decapsulated, and why (`--xdp`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapHook {
    /// Not recorded (an older agent).
    Unknown = 0,
    /// XDP in the driver (`--xdp=auto`: the driver runs XDP natively).
    XdpNative = 1,
    /// XDP in the driver, as `--xdp=on` asks.
    XdpForced = 2,
    /// XDP in generic (skb) mode: `--xdp=on` on a driver without native XDP.
    XdpGeneric = 3,
    /// tc: `--xdp=off`.
    TcOff = 4,
    /// tc: `--xdp=auto` on a veth, where XDP copies every frame and turns TSO off on the peer.
    TcVeth = 5,
    /// tc: `--xdp=auto` on a driver without native XDP (generic mode would copy).
    TcNoNativeXdp = 6,
}

impl DecapHook {
    pub const ALL: [DecapHook; 7] = [
        Self::Unknown,
        Self::XdpNative,
        Self::XdpForced,
        Self::XdpGeneric,
        Self::TcOff,
        Self::TcVeth,
        Self::TcNoNativeXdp,
    ];

    pub fn from_u8(v: u8) -> Self {
        Self::ALL.get(v as usize).copied().unwrap_or(Self::Unknown)
    }

    /// The hook recorded in a config's flags.
    pub fn of_flags(flags: u16) -> Self {
        Self::from_u8(((flags & CONFIG_DECAP_HOOK_MASK) >> CONFIG_DECAP_HOOK_SHIFT) as u8)
    }

    /// The flag bits recording this hook.
    pub fn flags(self) -> u16 {
        (self as u16) << CONFIG_DECAP_HOOK_SHIFT
    }

    /// `xdp` or `tc` (`unknown` when not recorded).
    pub fn hook(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::XdpNative | Self::XdpForced | Self::XdpGeneric => "xdp",
            Self::TcOff | Self::TcVeth | Self::TcNoNativeXdp => "tc",
        }
    }

    /// Why, in a few words (stable: a metric label).
    pub fn reason(self) -> &'static str {
        match self {
            Self::Unknown => "not recorded",
            Self::XdpNative => "native XDP in the driver",
            Self::XdpForced => "--xdp=on, native XDP in the driver",
            Self::XdpGeneric => "--xdp=on, generic mode (the driver has no native XDP)",
            Self::TcOff => "--xdp=off",
            Self::TcVeth => "veth: XDP would copy every frame and turn off TSO on the peer",
            Self::TcNoNativeXdp => "the driver has no native XDP (generic mode would copy)",
        }
    }
}

/// Where VXLAN from other nodes is decapsulated, from a config's flags (`weft status`, the
/// `vxlan` label of `weft_decap_hook`): `xdp` (the XDP hook), `weft_vxlan` (the tc hook, TCP
/// through the kernel's vxlan socket on `VXLAN_DEV`: GRO before decapsulation; other protocols
/// decapsulated by `from_underlay`, cheaper per packet), `tc` (the tc hook
/// decapsulating on the underlay: the device could not be set up), `unknown` (not recorded).
pub fn vxlan_decap(flags: u16) -> &'static str {
    match DecapHook::of_flags(flags).hook() {
        "xdp" => "xdp",
        "tc" if flags & CONFIG_F_VXLAN_DEV != 0 => VXLAN_DEV,
        "tc" => "tc",
        _ => "unknown",
    }
}

/// Declares a counter enum once: its values (the index into a per-CPU array), the count, the
/// list in index order and the stable snake_case names used by the CLI and metrics all come from
/// the one list given to the macro. Values are assigned in order from 0, so the list cannot have
/// gaps or duplicates.
macro_rules! counter_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident, count $count:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        pub const $count: u32 = [$($name::$variant),+].len() as u32;

        impl $name {
            /// Every value, in index order.
            pub const ALL: [$name; $count as usize] = [$($name::$variant),+];

            /// Stable snake_case name, used by the CLI and metrics.
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }
    };
}

counter_enum! {
    /// Why a packet was dropped. Index into the per-CPU drop counter array.
    pub enum DropReason, count DROP_REASON_COUNT {
        /// Source IPv4 address of a pod packet is not the endpoint's.
        SpoofedIp => "spoofed_ip",
        /// Source MAC of a pod packet is not the endpoint's.
        SpoofedMac => "spoofed_mac",
        /// IPv4 header truncated or invalid (IHL < 5, version != 4, total length beyond the
        /// frame).
        MalformedIpv4 => "malformed_ipv4",
        /// A tunnel packet addressed to this node comes from an address that is not a known node.
        UnknownTunnelSource => "unknown_tunnel_source",
        /// A tunnel packet addressed to this node is truncated or its VXLAN header is invalid.
        MalformedTunnel => "malformed_tunnel",
        /// The decapsulated inner frame is not IPv4.
        InnerNotIpv4 => "inner_not_ipv4",
        /// `bpf_skb_adjust_room` / `bpf_xdp_adjust_head` failed.
        AdjustRoomFailed => "adjust_room_failed",
        /// Writing a header into the packet failed.
        StoreFailed => "store_failed",
        /// The route's mode is unknown (map corrupted or newer agent).
        BadRouteMode => "bad_route_mode",
        /// The kernel's FIB has no usable route to the remote node's underlay address.
        NoUnderlayRoute => "no_underlay_route",
        /// IPv4 forwarding is disabled on the underlay NIC (`net.ipv4.conf.<nic>.forwarding`):
        /// the kernel's FIB refuses to route for it. The agent enables it; this says someone
        /// undid it.
        ForwardingDisabled => "forwarding_disabled",
        /// A decapsulated packet's inner source is neither in the pod CIDR of the node that
        /// sent it (the outer source) nor that node's own address.
        TunnelInnerSourceSpoofed => "tunnel_inner_source_spoofed",
        /// A plain (unencapsulated) frame to a local pod from a source that is neither a pod of
        /// an on-link peer (or of a `bgp` peer) nor such a peer itself.
        PlainFromNonPeer => "plain_from_non_peer",
        /// A plain frame to a local pod claims a peer's (or its pods') source but does not come
        /// from that peer's MAC address.
        PlainPeerMacMismatch => "plain_peer_mac_mismatch",
        /// A pod sent a tunnel packet (UDP to the VXLAN port, or IP protocol 4) to a node's
        /// address.
        TunnelFromPod => "tunnel_from_pod",
        /// A pod sent IPv6 (the cluster network is IPv4 only).
        Ipv6FromPod => "ipv6_from_pod",
        /// A pod sent a VLAN-tagged frame.
        VlanFromPod => "vlan_from_pod",
        /// A pod sent a frame that is neither IPv4 nor ARP (nor IPv6 or VLAN, counted above).
        NonIpFromPod => "non_ip_from_pod",
        /// A pod's ARP packet carries a sender address or MAC that is not the pod's.
        ArpSpoofed => "arp_spoofed",
        /// A pod's ARP packet is neither a request for its gateway (169.254.1.1) nor a reply
        /// about itself.
        ArpNotGateway => "arp_not_gateway",
        /// A pod's ARP packet is truncated or not Ethernet/IPv4 ARP.
        MalformedArp => "malformed_arp",
        /// `from_host` got a packet whose source is neither the node's address nor a local
        /// pod: something from outside relayed toward the overlay without masquerade.
        HostForeignSource => "host_foreign_source",
        /// A `bgp` route's destination has no usable route in weft's BGP table (BIRD has not
        /// learned it, or withdrew it). Dropped, not passed to the stack: the stack routes the
        /// cluster network back into weft (`weft_host`), so passing would loop.
        NoBgpRoute => "no_bgp_route",
        /// Forwarding would loop: weft's BGP table routes the destination back to this node's
        /// own address, or a router sent this node, unencapsulated, traffic for another node's
        /// pods routed by BGP (nodes never transit; the only way on is back out to the router).
        RouteLoop => "route_loop",
        /// A plain frame to a local pod from a `bgp` peer's pod (or the peer itself) that fails
        /// the reverse-path check: weft's BGP table (the main table for a node's own address)
        /// has no route toward its source out of the underlay, or the frame does not come from
        /// that route's next hop (the router's or the peer's MAC).
        BgpReversePath => "bgp_reverse_path",
        /// `from_host` got a packet from the node or one of its pods to an address of the
        /// cluster network that nobody holds (no node's subnet covers it, or no pod of this
        /// node has it): answered with ICMP host unreachable, as the stack would route it
        /// into `weft_host` again until its TTL ran out.
        NoPodRoute => "no_pod_route",
        /// NetworkPolicy: a new flow into a pod that its ingress policies do not allow (also a
        /// flow that a policy change denied, at its next packet; see `WEFT_POLICY_DROPS` for
        /// the pod).
        PolicyDeniedIngress => "policy_denied_ingress",
        /// NetworkPolicy: a new flow out of a pod that its egress policies do not allow (also a
        /// flow that a policy change denied, at its next packet).
        PolicyDeniedEgress => "policy_denied_egress",
        /// A VXLAN packet decapsulated by the kernel's vxlan socket (`weft_vxlan`) carries
        /// another VNI than the configured one.
        VxlanVniMismatch => "vxlan_vni_mismatch",
        /// A packet on `weft_vxlan`'s ingress without the tunnel metadata the kernel's vxlan
        /// socket attaches (it did not come from the socket).
        TunnelMetadataMissing => "tunnel_metadata_missing",
    }
}

counter_enum! {
    /// What happened to packets that were not dropped. Index into the per-CPU stats array.
    pub enum Stat, count STAT_COUNT {
        /// Delivered from a pod to a pod on this node.
        LocalDelivered => "local_delivered",
        /// Encapsulated in VXLAN and sent to a remote node.
        VxlanEncap => "vxlan_encap",
        /// Encapsulated in IPIP and sent to a remote node.
        IpipEncap => "ipip_encap",
        /// Routed without encapsulation to a remote node.
        DirectForward => "direct_forward",
        /// Routed without encapsulation along the BGP table's next hop.
        BgpForward => "bgp_forward",
        /// VXLAN decapsulated by XDP.
        XdpVxlanDecap => "xdp_vxlan_decap",
        /// IPIP decapsulated by XDP.
        XdpIpipDecap => "xdp_ipip_decap",
        /// VXLAN or IPIP decapsulated by tc (XDP absent).
        TcDecap => "tc_decap",
        /// Delivered from the underlay to a local pod with `bpf_redirect_peer`.
        UnderlayDelivered => "underlay_delivered",
        /// Handed to the host stack (not weft's, or no route).
        PassedToStack => "passed_to_stack",
        /// Next hop not resolved by the FIB; handed to `bpf_redirect_neigh`.
        NeighResolve => "neigh_resolve",
        /// A flow's first packet took the fast path (pod to pod, no translation): a fast
        /// conntrack entry was created.
        ConntrackFastNew => "conntrack_fast_new",
        /// The host stack carried a flow into a pod or toward the overlay, or a pod started one
        /// toward something that is not a pod (the node, outside): a stack conntrack entry was
        /// created (its packets keep going through the stack).
        ConntrackStackNew => "conntrack_stack_new",
        /// A packet between pods handed to the host stack because its flow is the stack's
        /// (translated, or not known from its start).
        StackFlowToStack => "stack_flow_to_stack",
        /// Delivered into a pod by the host stack (seen by `to_pod`).
        StackToPod => "stack_to_pod",
        /// A pod's ARP request for its gateway answered by the datapath.
        ArpReplied => "arp_replied",
        /// A packet too big for the path toward its destination answered with ICMP
        /// fragmentation-needed (path MTU discovery).
        FragNeededSent => "frag_needed_sent",
        /// An ICMP fragmentation-needed about one of this node's tunnel packets lowered the path
        /// MTU toward a peer.
        PathMtuLearned => "path_mtu_learned",
        /// VXLAN aggregated (GRO) and decapsulated by the kernel's vxlan socket, taken by
        /// `from_vxlan` on `weft_vxlan` (one count per aggregated packet).
        VxlanDeviceDecap => "vxlan_device_decap",
    }
}

// Layout checks: no hidden padding anywhere (the kernel compares keys bytewise).
const _: () = {
    assert!(core::mem::size_of::<RouteInfo>() == 12);
    assert!(core::mem::size_of::<Ipv4Key>() == 4);
    assert!(core::mem::size_of::<EndpointInfo>() == 20);
    assert!(core::mem::size_of::<NodeInfo>() == 8);
    assert!(core::mem::size_of::<NodeName>() == NODE_NAME_LEN);
    assert!(core::mem::size_of::<NodeConfig>() == 28);
    assert!(core::mem::size_of::<NextHop>() == 32);
    assert!(core::mem::size_of::<PathMtu>() == 16);
    assert!(core::mem::size_of::<DecapMeta>() == 8);
    assert!(core::mem::size_of::<TunnelKey>() == 12);
    assert!(core::mem::size_of::<FlowSlot>() == 40);
    assert!(core::mem::size_of::<conntrack::CtKey>() == 16);
    assert!(core::mem::size_of::<conntrack::CtEntry>() == 16);
};

/// aya reads and writes map keys and values as plain bytes (`aya::Pod`). The bound below makes
/// that sound: each type must also be `bytemuck::Pod`, whose derive refuses any type with
/// padding or invalid bit patterns, so the compiler proves what the unsafe impl promises.
#[cfg(feature = "user")]
macro_rules! aya_pod {
    ($($t:ty),+ $(,)?) => {
        $(
            const _: () = {
                const fn proven_pod<T: bytemuck::Pod>() {}
                proven_pod::<$t>()
            };
            // SAFETY: `$t` is `bytemuck::Pod` (checked just above).
            unsafe impl aya::Pod for $t {}
        )+
    };
}

#[cfg(feature = "user")]
aya_pod!(
    RouteInfo,
    Ipv4Key,
    EndpointInfo,
    NodeInfo,
    NodeName,
    NodeConfig,
    NextHop,
    PathMtu,
    DecapMeta,
    TunnelKey,
    FlowSlot,
    conntrack::CtKey,
    conntrack::CtEntry,
    monitor::MonitorConfig,
    monitor::MonitorFlags,
    monitor::MonitorRate,
    monitor::MonitorEvent,
    policy::PolicyEndpoint,
    policy::PolicyClass,
    policy::PolicyRuleKey,
    policy::PortRange,
    policy::PolicyPorts,
    policy::PolicyPortBlockKey,
    policy::PolicyPortBlock,
    policy::PolicyNamespaceKey,
    policy::PolicyNamespaceDefault,
    policy::PolicyConfig,
    policy::PolicyPodName,
    policy::PolicyDrops,
);

#[cfg(test)]
mod decap_hook_tests {
    use super::*;

    #[test]
    fn every_hook_round_trips_through_the_config_flags_and_keeps_the_others() {
        for hook in DecapHook::ALL {
            let flags = CONFIG_F_READY | CONFIG_F_ACCEPT_ROUTED | hook.flags();
            assert_eq!(DecapHook::of_flags(flags), hook);
            assert_eq!(
                flags & !CONFIG_DECAP_HOOK_MASK,
                CONFIG_F_READY | CONFIG_F_ACCEPT_ROUTED
            );
            assert_eq!(DecapHook::from_u8(hook as u8), hook);
        }
        assert_eq!(DecapHook::of_flags(CONFIG_F_READY), DecapHook::Unknown);
        assert_eq!(DecapHook::from_u8(0x0f), DecapHook::Unknown);
    }

    #[test]
    fn vxlan_decap_names_where_vxlan_goes() {
        let tc = DecapHook::TcVeth.flags();
        assert_eq!(vxlan_decap(tc | CONFIG_F_VXLAN_DEV), VXLAN_DEV);
        assert_eq!(vxlan_decap(tc), "tc");
        // XDP decapsulates before the socket could, whatever the flag says.
        assert_eq!(vxlan_decap(DecapHook::XdpNative.flags()), "xdp");
        assert_eq!(
            vxlan_decap(DecapHook::XdpGeneric.flags() | CONFIG_F_VXLAN_DEV),
            "xdp"
        );
        assert_eq!(vxlan_decap(CONFIG_F_VXLAN_DEV), "unknown");
    }
}

#[cfg(test)]
mod node_name_tests {
    use super::*;

    #[test]
    fn names_round_trip_and_long_ones_are_cut_at_a_character() {
        assert_eq!(NodeName::new("node-1").as_str(), "node-1");
        assert_eq!(NodeName::new("").as_str(), "");
        // 253 bytes (Kubernetes' longest) fit whole.
        let longest = "a".repeat(253);
        assert_eq!(NodeName::new(&longest).as_str(), longest);
        // Longer: cut to 255 bytes, never inside a character, NUL-terminated.
        let long = "é".repeat(200);
        let cut = NodeName::new(&long);
        assert_eq!(cut.as_str(), "é".repeat(127));
        assert_eq!(cut.name[NODE_NAME_LEN - 1], 0);
    }
}

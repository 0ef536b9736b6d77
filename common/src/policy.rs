//! NetworkPolicy map keys and values (networking.k8s.io/v1), shared by the datapath and the
//! agent's policy compiler (`weft_agent::policy`), which explains the design in full.
//!
//! Per new flow a direction costs at most: one endpoint lookup, one address lookup (hash, then
//! the LPM trie only on a miss), four rule probes and, only for port sets too fragmented for the
//! inline ranges, one bitmap lookup per probe that hit. Every lookup is a hash or a
//! fixed-depth LPM lookup, so the cost does not grow with the number of rules.
//!
//! Maps (names in [`crate::map_names`]):
//! - `WEFT_POLICY_ENDPOINTS` hash [`crate::Ipv4Key`] (local pod address) → [`PolicyEndpoint`]
//! - `WEFT_POLICY_ADDRS` hash [`crate::Ipv4Key`] (every known pod address, this node's own
//!   addresses) → [`PolicyClass`]
//! - `WEFT_POLICY_CIDRS` LPM trie of [`crate::Ipv4Key`] (ipBlock `cidr`/`except` boundaries) →
//!   [`PolicyClass`]; consulted only when `WEFT_POLICY_ADDRS` has no entry
//! - `WEFT_POLICY_RULES` hash [`PolicyRuleKey`] → [`PolicyPorts`]
//! - `WEFT_POLICY_PORT_BLOCKS` hash [`PolicyPortBlockKey`] → [`PolicyPortBlock`]
//! - `WEFT_POLICY_NS_DEFAULTS` hash [`PolicyNamespaceKey`] → [`PolicyNamespaceDefault`]
//! - `WEFT_POLICY_CONFIG` array of one [`PolicyConfig`]: the revision of the maps' contents
//!   (established flows are checked again once after it changes), the Service network
//! - `WEFT_POLICY_PODS` hash [`crate::Ipv4Key`] (local pod address) → [`PolicyPodName`]: the
//!   namespace and name the CNI plugin got from the runtime (`K8S_POD_NAMESPACE`,
//!   `K8S_POD_NAME`)
//! - `WEFT_POLICY_DROPS` LRU per-CPU hash [`crate::Ipv4Key`] (local pod address) →
//!   [`PolicyDrops`]: policy denials per endpoint
//!
//! # Connection tracking
//!
//! A flow is judged when it starts on a node (its first packet there, or the first packet
//! without a live `WEFT_CT` entry): egress at its source if the source is a local pod, ingress
//! at its destination if the destination is a local pod. The entry created for an allowed flow
//! records the policy revision it was judged at (`CtEntry::policy_rev`) and [`POLICY_CT_ALLOWED`]
//! in `CtEntry::policy`; every later packet of the flow, both ways (replies included), passes on
//! that entry while the revision is current. After a policy change (a new revision) the flow's
//! next packet judges its original direction again, once: a flow the change denies is cut
//! ([`POLICY_CT_DENIED`], both ways), as Cilium does.

/// Class of addresses that match no policy peer: an address absent from both address maps
/// (outside every ipBlock, and not a known pod) has this class.
pub const POLICY_CLASS_NONE: u32 = 0;
/// This node's own addresses: traffic between a pod and its own node is always allowed
/// (kubelet probes), in both directions.
pub const POLICY_CLASS_HOST: u32 = 1;
/// First class number the compiler hands out.
pub const POLICY_CLASS_FIRST_DYNAMIC: u32 = 2;
/// Wildcard class in a rule key: the rule allows every source (ingress) or destination
/// (egress), known or not (`from`/`to` empty).
pub const POLICY_CLASS_ANY: u32 = u32::MAX;
/// Wildcard protocol in a rule key: a rule without `ports` allows every protocol (also ICMP).
/// 255 is IANA-reserved, never carried by a packet.
pub const POLICY_PROTO_ANY: u8 = 255;
/// The rule set with no entries: an isolated direction pointing at it denies everything. New
/// endpoints (CNI ADD) and endpoints whose rules did not fit start there.
pub const POLICY_RULESET_DENY: u32 = 0;

pub const POLICY_DIR_INGRESS: u8 = 1;
pub const POLICY_DIR_EGRESS: u8 = 2;

/// [`PolicyEndpoint::flags`]: a policy of type Ingress selects the endpoint.
pub const POLICY_F_INGRESS_ISOLATED: u32 = 1 << 0;
/// [`PolicyEndpoint::flags`]: a policy of type Egress selects the endpoint.
pub const POLICY_F_EGRESS_ISOLATED: u32 = 1 << 1;
/// [`PolicyEndpoint::flags`]: written by the CNI plugin from the namespace default; the agent
/// has not compiled this endpoint yet (its directions deny while isolated).
pub const POLICY_F_PENDING: u32 = 1 << 2;
/// [`PolicyEndpoint::flags`]: the ingress rules did not fit in the maps; ingress denies all.
pub const POLICY_F_INGRESS_FAILED: u32 = 1 << 3;
/// [`PolicyEndpoint::flags`]: the egress rules did not fit in the maps; egress denies all.
pub const POLICY_F_EGRESS_FAILED: u32 = 1 << 4;

/// [`PolicyNamespaceDefault::flags`] of the key whose name is all zeros: the agent has written
/// the namespace defaults at least once. Before that, a new endpoint is isolated both ways.
pub const POLICY_NS_F_SYNCED: u32 = 1 << 31;

/// Inline port ranges in a [`PolicyPorts`]; more go to the bitmap blocks.
pub const POLICY_INLINE_RANGES: usize = 6;
/// Longest namespace name (a DNS-1123 label) plus room.
pub const POLICY_NS_NAME_LEN: usize = 64;

pub const POLICY_ENDPOINTS_MAX: u32 = 16_384;
pub const POLICY_ADDRS_MAX: u32 = 65_536;
pub const POLICY_CIDRS_MAX: u32 = 16_384;
pub const POLICY_RULES_MAX: u32 = 262_144;
pub const POLICY_PORT_BLOCKS_MAX: u32 = 65_536;
pub const POLICY_NS_DEFAULTS_MAX: u32 = 16_384;
/// Local pods with a name (`WEFT_POLICY_PODS`) and with drop counters (`WEFT_POLICY_DROPS`).
pub const POLICY_PODS_MAX: u32 = 16_384;

/// `CtEntry::policy`: the flow was allowed at `CtEntry::policy_rev`.
pub const POLICY_CT_ALLOWED: u8 = 1;
/// `CtEntry::policy`: a pod's flow to a Service address: its egress is judged where the host
/// stack delivers it after translating the address (`to_pod`, `from_host`), by its backend.
pub const POLICY_CT_DEFERRED: u8 = 2;
/// `CtEntry::policy`: denied at `CtEntry::policy_rev` (a policy change cut the flow).
pub const POLICY_CT_DENIED: u8 = 3;

/// [`PolicyConfig::flags`]: the agent wrote the config (`revision` is meaningful).
pub const POLICY_CFG_F_READY: u32 = 1 << 0;
/// [`PolicyConfig::flags`]: `service_net`/`service_mask` hold the Service network.
pub const POLICY_CFG_F_SERVICE_NET: u32 = 1 << 1;

/// Longest pod name (a DNS-1123 subdomain) plus room.
pub const POLICY_POD_NAME_LEN: usize = 256;

/// The policy state of a local endpoint (pod), keyed by its address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyEndpoint {
    /// Rule set deciding traffic into the pod when ingress-isolated.
    pub ingress_ruleset: u32,
    /// Rule set deciding traffic out of the pod when egress-isolated.
    pub egress_ruleset: u32,
    /// `POLICY_F_*`.
    pub flags: u32,
}

impl PolicyEndpoint {
    /// Not isolated either way (no policy selects the pod).
    pub const OPEN: Self = Self {
        ingress_ruleset: POLICY_RULESET_DENY,
        egress_ruleset: POLICY_RULESET_DENY,
        flags: 0,
    };
}

/// An address's peer class: which policy peers it matches (and, for egress named ports, which
/// numbers it gives the names), as numbered by the compiler on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyClass {
    pub class: u32,
}

/// Key of the rule map: what a rule set allows for one peer class and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyRuleKey {
    pub ruleset: u32,
    /// A peer class, or [`POLICY_CLASS_ANY`].
    pub class: u32,
    /// IP protocol (6, 17, 132) or [`POLICY_PROTO_ANY`].
    pub protocol: u8,
    /// `POLICY_DIR_*` (rule sets are per direction; kept for readable dumps).
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// An inclusive destination port range (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// The allowed destination ports of one rule key: `count` inline ranges, plus the bitmap
/// blocks of set `overflow` when non-zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyPorts {
    pub ranges: [PortRange; POLICY_INLINE_RANGES],
    /// Port set whose [`PolicyPortBlock`]s hold the ranges that did not fit inline; 0: none.
    pub overflow: u32,
    /// Valid entries in `ranges`.
    pub count: u8,
    pub _pad: [u8; 3],
}

/// Key of a 256-port bitmap block of an overflow port set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyPortBlockKey {
    pub set: u32,
    /// `port >> 8`.
    pub block: u16,
    pub _pad: u16,
}

/// Ports `block * 256 + i` for each bit `i` set (bit `i % 64` of word `i / 64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyPortBlock {
    pub bits: [u64; 4],
}

/// A namespace name, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyNamespaceKey {
    pub name: [u8; POLICY_NS_NAME_LEN],
}

/// Isolation a new pod of the namespace gets at CNI ADD, before the agent compiled it:
/// isolated in a direction if any policy of that type exists in the namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyNamespaceDefault {
    /// `POLICY_F_INGRESS_ISOLATED` / `POLICY_F_EGRESS_ISOLATED`, or [`POLICY_NS_F_SYNCED`] on
    /// the all-zero key.
    pub flags: u32,
}

/// The policy state of the node as a whole (index 0 of `WEFT_POLICY_CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyConfig {
    /// Bumped by the agent after every change of the policy maps: a conntrack entry judged at
    /// an older revision is judged again at its flow's next packet.
    pub revision: u32,
    /// `POLICY_CFG_F_*`.
    pub flags: u32,
    /// The Service network (`--service-cluster-ip-range`): a pod's flow to it is judged after
    /// the host stack translated it (by its backend), not at `from_pod`.
    pub service_net: [u8; 4],
    pub service_mask: [u8; 4],
    /// The datastore revision (etcd) whose state the maps hold: how a caller knows that a
    /// policy it wrote is enforced on this node.
    pub datastore_revision: u64,
}

/// A local pod's namespace and name, NUL-padded, as the runtime gave them to the CNI plugin.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyPodName {
    pub namespace: [u8; POLICY_NS_NAME_LEN],
    pub name: [u8; POLICY_POD_NAME_LEN],
}

/// Packets a policy denied, per local endpoint (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyDrops {
    /// Into the endpoint (its ingress policies).
    pub ingress: u64,
    /// Out of the endpoint (its egress policies).
    pub egress: u64,
}

impl PolicyPorts {
    pub const EMPTY: Self = Self {
        ranges: [PortRange { first: 0, last: 0 }; POLICY_INLINE_RANGES],
        overflow: 0,
        count: 0,
        _pad: [0; 3],
    };
    pub const ALL: Self = {
        let mut v = Self::EMPTY;
        v.ranges[0] = PortRange {
            first: 0,
            last: u16::MAX,
        };
        v.count = 1;
        v
    };

    /// Whether `port` is in an inline range (the datapath then checks the overflow blocks).
    #[inline(always)]
    pub fn inline_contains(&self, port: u16) -> bool {
        let mut i = 0;
        while i < POLICY_INLINE_RANGES {
            if (i as u8) < self.count && self.ranges[i].first <= port && port <= self.ranges[i].last
            {
                return true;
            }
            i += 1;
        }
        false
    }
}

impl PolicyPortBlock {
    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        let bit = (port & 0xff) as usize;
        self.bits[bit / 64] & (1u64 << (bit % 64)) != 0
    }
}

impl PolicyNamespaceKey {
    /// The key of a namespace name (longer names are cut; they are invalid anyway).
    pub fn new(name: &str) -> Self {
        let mut key = Self {
            name: [0; POLICY_NS_NAME_LEN],
        };
        let bytes = name.as_bytes();
        let n = if bytes.len() < POLICY_NS_NAME_LEN {
            bytes.len()
        } else {
            POLICY_NS_NAME_LEN
        };
        let mut i = 0;
        while i < n {
            key.name[i] = bytes[i];
            i += 1;
        }
        key
    }
}

/// Copies `text` into a NUL-padded array (longer text is cut: such names are invalid anyway).
fn fill<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let bytes = text.as_bytes();
    let n = if bytes.len() < N { bytes.len() } else { N };
    let mut i = 0;
    while i < n {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

/// The text of a NUL-padded array.
fn text(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..end]).unwrap_or("")
}

impl PolicyPodName {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: fill(namespace),
            name: fill(name),
        }
    }

    pub fn namespace(&self) -> &str {
        text(&self.namespace)
    }

    pub fn name(&self) -> &str {
        text(&self.name)
    }
}

/// The policy state the CNI plugin writes for a new endpoint, before it has a route: isolated
/// in the directions that policies of its namespace isolate (`ns_flags`, from
/// `WEFT_POLICY_NS_DEFAULTS[namespace]`), both ways while the agent has never synced (no
/// [`POLICY_NS_F_SYNCED`] in `marker_flags`, the entry of the empty name), allowing nothing
/// until the agent compiles the pod.
pub fn new_endpoint_state(marker_flags: Option<u32>, ns_flags: Option<u32>) -> PolicyEndpoint {
    let synced = marker_flags.is_some_and(|f| f & POLICY_NS_F_SYNCED != 0);
    let isolation = if synced {
        ns_flags.unwrap_or_default() & (POLICY_F_INGRESS_ISOLATED | POLICY_F_EGRESS_ISOLATED)
    } else {
        POLICY_F_INGRESS_ISOLATED | POLICY_F_EGRESS_ISOLATED
    };
    PolicyEndpoint {
        ingress_ruleset: POLICY_RULESET_DENY,
        egress_ruleset: POLICY_RULESET_DENY,
        flags: isolation | POLICY_F_PENDING,
    }
}

impl PolicyNamespaceKey {
    pub fn name(&self) -> &str {
        text(&self.name)
    }
}

impl PolicyConfig {
    /// Whether `addr` is in the Service network.
    #[inline(always)]
    pub fn is_service(&self, addr: [u8; 4]) -> bool {
        self.flags & POLICY_CFG_F_SERVICE_NET != 0
            && u32::from_ne_bytes(addr) & u32::from_ne_bytes(self.service_mask)
                == u32::from_ne_bytes(self.service_net)
    }
}

const _: () = {
    assert!(core::mem::size_of::<PolicyConfig>() == 24);
    assert!(core::mem::size_of::<PolicyPodName>() == 320);
    assert!(core::mem::size_of::<PolicyDrops>() == 16);
    assert!(core::mem::size_of::<PolicyEndpoint>() == 12);
    assert!(core::mem::size_of::<PolicyClass>() == 4);
    assert!(core::mem::size_of::<PolicyRuleKey>() == 12);
    assert!(core::mem::size_of::<PortRange>() == 4);
    assert!(core::mem::size_of::<PolicyPorts>() == 32);
    assert!(core::mem::size_of::<PolicyPortBlockKey>() == 8);
    assert!(core::mem::size_of::<PolicyPortBlock>() == 32);
    assert!(core::mem::size_of::<PolicyNamespaceKey>() == 64);
    assert!(core::mem::size_of::<PolicyNamespaceDefault>() == 4);
};

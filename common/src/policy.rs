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

const _: () = {
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

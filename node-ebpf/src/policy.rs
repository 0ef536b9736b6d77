//! NetworkPolicy verdicts (maps and design: `weft_common::policy`; compiled by the agent's
//! `policy::compile`).
//!
//! A flow is judged once per node, when it starts there: egress at its source if the source
//! is a local pod, ingress at its destination if the destination is a local pod. Conntrack
//! (`crate::conntrack`) calls [`admit`] for a flow without a live entry and stamps the entry
//! it creates with the current revision ([`stamp`]); later packets, replies included, pass on
//! the entry ([`established`]) until the agent bumps the revision, after which the flow's
//! original direction is judged again once: a flow the new policies deny is cut.
//!
//! Always allowed: a pod to itself, a pod and this node's own addresses both ways (the host
//! class), and every direction that no policy isolates. A local pod without a policy state is
//! denied both ways (the CNI plugin writes one before the pod has a route); an address without
//! a class matches no selector (fail closed).
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruPerCpuHashMap, lpm_trie::Key},
    macros::btf_map,
};
use weft_common::conntrack::{CT_F_INIT_HI, CtEntry, CtKey};
use weft_common::{
    DropReason, Ipv4Key,
    policy::{
        POLICY_ADDRS_MAX, POLICY_CIDRS_MAX, POLICY_CLASS_ANY, POLICY_CLASS_HOST, POLICY_CLASS_NONE,
        POLICY_CT_ALLOWED, POLICY_CT_DEFERRED, POLICY_CT_DENIED, POLICY_DIR_EGRESS,
        POLICY_DIR_INGRESS, POLICY_ENDPOINTS_MAX, POLICY_F_EGRESS_ISOLATED,
        POLICY_F_INGRESS_ISOLATED, POLICY_NS_DEFAULTS_MAX, POLICY_PODS_MAX, POLICY_PORT_BLOCKS_MAX,
        POLICY_PROTO_ANY, POLICY_RULES_MAX, POLICY_RULESET_DENY, PolicyClass, PolicyConfig,
        PolicyDrops, PolicyEndpoint, PolicyNamespaceDefault, PolicyNamespaceKey, PolicyPodName,
        PolicyPortBlock, PolicyPortBlockKey, PolicyPorts, PolicyRuleKey,
    },
};

use crate::{
    parse::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr},
    route,
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

/// Local pods: isolation and rule sets per direction.
#[btf_map]
pub static WEFT_POLICY_ENDPOINTS: HashMap<
    Ipv4Key,
    PolicyEndpoint,
    { POLICY_ENDPOINTS_MAX as usize },
    NO_PREALLOC,
> = HashMap::new();

/// Every pod address of the cluster and this node's addresses → class.
#[btf_map]
pub static WEFT_POLICY_ADDRS: HashMap<
    Ipv4Key,
    PolicyClass,
    { POLICY_ADDRS_MAX as usize },
    NO_PREALLOC,
> = HashMap::new();

/// ipBlock boundaries → class of the region they start (addresses without an entry above).
#[btf_map]
pub static WEFT_POLICY_CIDRS: LpmTrie<[u8; 4], PolicyClass, { POLICY_CIDRS_MAX as usize }> =
    LpmTrie::new();

/// {rule set, class or ANY, protocol or ANY, direction} → allowed destination ports.
#[btf_map]
pub static WEFT_POLICY_RULES: HashMap<
    PolicyRuleKey,
    PolicyPorts,
    { POLICY_RULES_MAX as usize },
    NO_PREALLOC,
> = HashMap::new();

/// 256-port bitmaps of port sets too fragmented for the inline ranges.
#[btf_map]
pub static WEFT_POLICY_PORT_BLOCKS: HashMap<
    PolicyPortBlockKey,
    PolicyPortBlock,
    { POLICY_PORT_BLOCKS_MAX as usize },
    NO_PREALLOC,
> = HashMap::new();

/// Namespace → isolation of a new pod (read by the CNI plugin, not by the programs).
#[btf_map]
pub static WEFT_POLICY_NS_DEFAULTS: HashMap<
    PolicyNamespaceKey,
    PolicyNamespaceDefault,
    { POLICY_NS_DEFAULTS_MAX as usize },
    NO_PREALLOC,
> = HashMap::new();

/// The revision of the maps' contents and the Service network (index 0).
#[btf_map]
pub static WEFT_POLICY_CONFIG: Array<PolicyConfig, 1> = Array::new();

/// Local pod address → namespace and name (written by the CNI plugin, read by the agent and
/// the CLI).
#[btf_map]
pub static WEFT_POLICY_PODS: HashMap<
    Ipv4Key,
    PolicyPodName,
    { POLICY_PODS_MAX as usize },
    NO_PREALLOC,
> = HashMap::new();

/// Policy denials per local endpoint, per CPU.
#[btf_map]
pub static WEFT_POLICY_DROPS: LruPerCpuHashMap<Ipv4Key, PolicyDrops, { POLICY_PODS_MAX as usize }> =
    LruPerCpuHashMap::new();

/// What a hook asks of a packet's flow, and the packet's addresses.
#[derive(Clone, Copy)]
pub struct Check {
    /// Judge the source's egress (when it is a local pod). `false` at `from_pod` for a Service
    /// address: its egress is judged after the stack translated it.
    pub egress: bool,
    saddr: [u8; 4],
    daddr: [u8; 4],
    protocol: u8,
    /// A fragment after the first: no ports to judge.
    later_fragment: bool,
}

impl Check {
    /// Ingress and egress of the packet `ip`, whichever ends are local.
    #[inline(always)]
    pub fn of(ip: &Ipv4Hdr) -> Check {
        Check {
            egress: true,
            saddr: ip.saddr,
            daddr: ip.daddr,
            protocol: ip.protocol,
            later_fragment: u16::from_be_bytes(ip.frag_off) & 0x1fff != 0,
        }
    }

    /// At `from_pod`, toward a destination that is not a pod: a Service address is judged by
    /// its backend, after the host stack's translation.
    #[inline(always)]
    pub fn to_stack(ip: &Ipv4Hdr) -> Check {
        let mut c = Self::of(ip);
        c.egress = !config().is_some_and(|cfg| cfg.is_service(ip.daddr));
        c
    }
}

/// A packet conntrack cannot follow (no ports: a fragment after the first, a truncated L4
/// header, an ICMP type without flow): judged as a new flow without ports. A later fragment
/// passes: without its first fragment, which was judged with its ports, the receiver never
/// reassembles it into anything a socket sees (and Linux discards overlapping fragments).
#[inline(always)]
pub fn untracked(check: &Check) -> Result<(), Denied> {
    if check.later_fragment {
        return Ok(());
    }
    admit(check.saddr, check.daddr, check.protocol, 0, *check)
}

/// An ICMP error about a flow without a live entry allowing it: judged as a new ICMP flow.
#[inline(always)]
pub fn unrelated(check: &Check) -> Result<(), Denied> {
    admit(check.saddr, check.daddr, check.protocol, 0, *check)
}

/// A denial: the direction and the local endpoint whose policy denied.
#[derive(Clone, Copy)]
pub struct Denied {
    pub ingress: bool,
    pub endpoint: [u8; 4],
}

impl Denied {
    /// Counts the denial on the endpoint's counter and returns its reason (which the entry
    /// program counts node-wide, as every drop).
    #[inline(always)]
    pub fn count(self) -> DropReason {
        let reason = if self.ingress {
            DropReason::PolicyDeniedIngress
        } else {
            DropReason::PolicyDeniedEgress
        };
        let key = Ipv4Key {
            addr: self.endpoint,
        };
        if WEFT_POLICY_DROPS.get_ptr_mut(key).is_none() {
            let _ = WEFT_POLICY_DROPS.insert(key, PolicyDrops::default(), 0);
        }
        if let Some(d) = WEFT_POLICY_DROPS.get_ptr_mut(key) {
            // Per-CPU slot: no other writer.
            unsafe {
                if self.ingress {
                    (*d).ingress += 1;
                } else {
                    (*d).egress += 1;
                }
            }
        }
        reason
    }
}

#[inline(always)]
fn config() -> Option<&'static PolicyConfig> {
    WEFT_POLICY_CONFIG.get(0)
}

/// The current revision of the policy maps.
#[inline(always)]
pub fn revision() -> u32 {
    config().map_or(0, |c| c.revision)
}

/// The port a policy matches: the destination port of TCP, UDP and SCTP, 0 for protocols
/// without ports (only rules without `ports` allow them).
#[inline(always)]
pub fn policy_port(protocol: u8, port: [u8; 2]) -> u16 {
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => u16::from_be_bytes(port),
        _ => 0,
    }
}

/// The policy state of `addr` if it is a local pod: its own, or deny-all for a local pod
/// without one.
#[inline(always)]
fn local_state(addr: [u8; 4]) -> Option<PolicyEndpoint> {
    if let Some(st) = unsafe { WEFT_POLICY_ENDPOINTS.get(Ipv4Key { addr }) } {
        return Some(*st);
    }
    route::endpoint(addr)?;
    Some(PolicyEndpoint {
        ingress_ruleset: POLICY_RULESET_DENY,
        egress_ruleset: POLICY_RULESET_DENY,
        flags: POLICY_F_INGRESS_ISOLATED | POLICY_F_EGRESS_ISOLATED,
    })
}

/// The class of an address: the address map, else the LPM trie of ipBlock regions, else none.
#[inline(always)]
fn class_of(addr: [u8; 4]) -> u32 {
    if let Some(c) = unsafe { WEFT_POLICY_ADDRS.get(Ipv4Key { addr }) } {
        return c.class;
    }
    match WEFT_POLICY_CIDRS.get(&Key::new(32, addr)) {
        Some(c) => c.class,
        None => POLICY_CLASS_NONE,
    }
}

/// Whether rule entry {ruleset, class, protocol} allows `port`.
#[inline(always)]
fn probe(ruleset: u32, direction: u8, class: u32, protocol: u8, port: u16) -> bool {
    let key = PolicyRuleKey {
        ruleset,
        class,
        protocol,
        direction,
        _pad: [0; 2],
    };
    let Some(ports) = (unsafe { WEFT_POLICY_RULES.get(key) }) else {
        return false;
    };
    if ports.inline_contains(port) {
        return true;
    }
    if ports.overflow == 0 {
        return false;
    }
    let block = PolicyPortBlockKey {
        set: ports.overflow,
        block: port >> 8,
        _pad: 0,
    };
    unsafe { WEFT_POLICY_PORT_BLOCKS.get(block) }.is_some_and(|b| b.contains(port))
}

/// The verdict of one direction of local endpoint `state` toward `remote`.
#[inline(always)]
fn allows(state: &PolicyEndpoint, direction: u8, remote: [u8; 4], protocol: u8, port: u16) -> bool {
    let (flag, ruleset) = if direction == POLICY_DIR_INGRESS {
        (POLICY_F_INGRESS_ISOLATED, state.ingress_ruleset)
    } else {
        (POLICY_F_EGRESS_ISOLATED, state.egress_ruleset)
    };
    if state.flags & flag == 0 {
        return true;
    }
    let class = class_of(remote);
    if class == POLICY_CLASS_HOST {
        return true;
    }
    probe(ruleset, direction, class, protocol, port)
        || probe(ruleset, direction, POLICY_CLASS_ANY, protocol, port)
        || probe(ruleset, direction, class, POLICY_PROTO_ANY, port)
        || probe(ruleset, direction, POLICY_CLASS_ANY, POLICY_PROTO_ANY, port)
}

/// Whether a new flow `src → dst` (`protocol`, destination `port` as [`policy_port`]) may start
/// on this node.
#[inline(always)]
pub fn admit(
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    port: u16,
    check: Check,
) -> Result<(), Denied> {
    if u32::from_ne_bytes(src) == u32::from_ne_bytes(dst) {
        return Ok(());
    }
    if check.egress
        && let Some(st) = local_state(src)
        && !allows(&st, POLICY_DIR_EGRESS, dst, protocol, port)
    {
        return Err(Denied {
            ingress: false,
            endpoint: src,
        });
    }
    if let Some(st) = local_state(dst)
        && !allows(&st, POLICY_DIR_INGRESS, src, protocol, port)
    {
        return Err(Denied {
            ingress: true,
            endpoint: dst,
        });
    }
    Ok(())
}

/// The verdict bits of a new entry for a flow [`admit`] allowed under `check`.
#[inline(always)]
pub fn stamp(entry: &mut CtEntry, check: Check) {
    entry.policy_rev = revision();
    entry.policy = if check.egress {
        POLICY_CT_ALLOWED
    } else {
        POLICY_CT_DEFERRED
    };
}

/// A packet of a flow with the live entry `entry`: passes while the entry's revision is
/// current; after a policy change, the flow's original direction is judged again (once).
#[inline(always)]
pub fn established(entry: *mut CtEntry, key: &CtKey) -> Result<(), Denied> {
    let rev = revision();
    let e = unsafe { &mut *entry };
    if e.policy_rev == rev {
        if e.policy != POLICY_CT_DENIED {
            return Ok(());
        }
        // Denied at this revision: judged again (for the direction to count; maps written
        // within a revision only ever add new endpoints' states).
        let verdict = judge_original(e, key);
        if verdict.is_ok() {
            e.policy = POLICY_CT_ALLOWED;
        }
        return verdict;
    }
    if e.policy == POLICY_CT_DEFERRED {
        // Judged where the stack delivers it, by its backend.
        e.policy_rev = rev;
        return Ok(());
    }
    let verdict = judge_original(e, key);
    e.policy_rev = rev;
    e.policy = if verdict.is_ok() {
        POLICY_CT_ALLOWED
    } else {
        POLICY_CT_DENIED
    };
    verdict
}

/// The flow's original direction (initiator to responder), judged now.
#[inline(always)]
fn judge_original(e: &CtEntry, key: &CtKey) -> Result<(), Denied> {
    let (from, to, port) = if e.flags & CT_F_INIT_HI != 0 {
        (key.addr_hi, key.addr_lo, key.port_lo)
    } else {
        (key.addr_lo, key.addr_hi, key.port_hi)
    };
    let check = Check {
        egress: true,
        saddr: from,
        daddr: to,
        protocol: key.protocol,
        later_fragment: false,
    };
    admit(
        from,
        to,
        key.protocol,
        policy_port(key.protocol, port),
        check,
    )
}

/// Whether an entry allows packets related to its flow (ICMP errors about it).
#[inline(always)]
pub fn allows_related(entry: *const CtEntry) -> bool {
    let p = unsafe { (*entry).policy };
    p == POLICY_CT_ALLOWED || p == POLICY_CT_DEFERRED
}

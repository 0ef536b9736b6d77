//! The NetworkPolicy maps as userspace sees them (`weft_common::policy`): their capacities,
//! typed writes that tell a full map apart from other failures (the agent's compiler closes
//! what a full map leaves incomplete), and a snapshot of their contents (a restarting agent
//! adopts what its predecessor left pinned; the CLI prints it).
use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    net::Ipv4Addr,
};

use anyhow::{Context as _, Result};
use aya::{
    EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapError, PerCpuHashMap, PerCpuValues, lpm_trie::Key,
    },
};
use ipnet::Ipv4Net;
use weft_common::{
    Ipv4Key, map_names,
    policy::{
        POLICY_ADDRS_MAX, POLICY_CIDRS_MAX, POLICY_ENDPOINTS_MAX, POLICY_NS_DEFAULTS_MAX,
        POLICY_PODS_MAX, POLICY_PORT_BLOCKS_MAX, POLICY_RULES_MAX, PolicyClass, PolicyConfig,
        PolicyDrops, PolicyEndpoint, PolicyNamespaceDefault, PolicyNamespaceKey, PolicyPodName,
        PolicyPortBlock, PolicyPortBlockKey, PolicyPorts, PolicyRuleKey,
    },
};

use super::Maps;

/// Capacities of the policy maps (`max_entries`), chosen when the maps are created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyCapacities {
    pub endpoints: u32,
    pub addrs: u32,
    pub cidrs: u32,
    pub rules: u32,
    pub port_blocks: u32,
    pub ns_defaults: u32,
}

impl Default for PolicyCapacities {
    fn default() -> Self {
        Self {
            endpoints: POLICY_ENDPOINTS_MAX,
            addrs: POLICY_ADDRS_MAX,
            cidrs: POLICY_CIDRS_MAX,
            rules: POLICY_RULES_MAX,
            port_blocks: POLICY_PORT_BLOCKS_MAX,
            ns_defaults: POLICY_NS_DEFAULTS_MAX,
        }
    }
}

impl PolicyCapacities {
    pub(super) fn size(&self, loader: &mut EbpfLoader) {
        loader
            .map_max_entries(map_names::POLICY_ENDPOINTS, self.endpoints)
            .map_max_entries(map_names::POLICY_ADDRS, self.addrs)
            .map_max_entries(map_names::POLICY_CIDRS, self.cidrs)
            .map_max_entries(map_names::POLICY_RULES, self.rules)
            .map_max_entries(map_names::POLICY_PORT_BLOCKS, self.port_blocks)
            .map_max_entries(map_names::POLICY_NS_DEFAULTS, self.ns_defaults)
            // Names and counters exist per local pod.
            .map_max_entries(map_names::POLICY_PODS, self.endpoints.max(POLICY_PODS_MAX))
            .map_max_entries(map_names::POLICY_DROPS, self.endpoints.max(POLICY_PODS_MAX));
    }
}

/// Why a policy map write failed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyWriteError {
    /// The map is full (the kernel's E2BIG for hash maps, ENOSPC for LPM tries).
    #[error("{0} is full")]
    Full(&'static str),
    #[error("writing {map}: {source}")]
    Other {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

fn classify(map: &'static str, e: MapError) -> PolicyWriteError {
    if let MapError::SyscallError(s) = &e
        && matches!(
            s.io_error.raw_os_error(),
            Some(libc::E2BIG) | Some(libc::ENOSPC)
        )
    {
        return PolicyWriteError::Full(map);
    }
    PolicyWriteError::Other { map, source: e }
}

/// Deleting a key that is not there is a success.
fn removed(map: &'static str, r: Result<(), MapError>) -> Result<(), PolicyWriteError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(classify(map, e)),
    }
}

/// Everything the policy maps hold (what the compiler wrote, read back).
#[derive(Clone, Debug, Default)]
pub struct PolicySnapshot {
    pub endpoints: StdHashMap<Ipv4Addr, PolicyEndpoint>,
    pub addrs: StdHashMap<Ipv4Addr, u32>,
    pub cidrs: BTreeMap<Ipv4Net, u32>,
    pub rules: StdHashMap<PolicyRuleKey, PolicyPorts>,
    pub blocks: StdHashMap<PolicyPortBlockKey, PolicyPortBlock>,
    pub ns_defaults: StdHashMap<String, u32>,
}

impl Maps {
    fn policy_hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        key: &K,
        value: Option<&V>,
    ) -> Result<(), PolicyWriteError> {
        let map = self.map_mut(name).map_err(|_| PolicyWriteError::Other {
            map: name,
            source: MapError::InvalidName { name: name.into() },
        })?;
        let mut map: HashMap<&mut MapData, K, V> = map.try_into().map_err(|e| classify(name, e))?;
        match value {
            Some(v) => map.insert(key, v, 0).map_err(|e| classify(name, e)),
            None => removed(name, map.remove(key)),
        }
    }

    pub fn put_policy_endpoint(
        &mut self,
        ip: Ipv4Addr,
        state: Option<&PolicyEndpoint>,
    ) -> Result<(), PolicyWriteError> {
        let key = Ipv4Key { addr: ip.octets() };
        self.policy_hash(map_names::POLICY_ENDPOINTS, &key, state)
    }

    pub fn put_policy_addr(
        &mut self,
        ip: Ipv4Addr,
        class: Option<u32>,
    ) -> Result<(), PolicyWriteError> {
        let key = Ipv4Key { addr: ip.octets() };
        let v = class.map(|class| PolicyClass { class });
        self.policy_hash(map_names::POLICY_ADDRS, &key, v.as_ref())
    }

    pub fn put_policy_rule(
        &mut self,
        key: &PolicyRuleKey,
        ports: Option<&PolicyPorts>,
    ) -> Result<(), PolicyWriteError> {
        self.policy_hash(map_names::POLICY_RULES, key, ports)
    }

    pub fn put_policy_port_block(
        &mut self,
        key: &PolicyPortBlockKey,
        block: Option<&PolicyPortBlock>,
    ) -> Result<(), PolicyWriteError> {
        self.policy_hash(map_names::POLICY_PORT_BLOCKS, key, block)
    }

    pub fn put_policy_ns_default(
        &mut self,
        namespace: &str,
        flags: Option<u32>,
    ) -> Result<(), PolicyWriteError> {
        let key = PolicyNamespaceKey::new(namespace);
        let v = flags.map(|flags| PolicyNamespaceDefault { flags });
        self.policy_hash(map_names::POLICY_NS_DEFAULTS, &key, v.as_ref())
    }

    pub fn put_policy_pod_name(
        &mut self,
        ip: Ipv4Addr,
        name: Option<&PolicyPodName>,
    ) -> Result<(), PolicyWriteError> {
        let key = Ipv4Key { addr: ip.octets() };
        self.policy_hash(map_names::POLICY_PODS, &key, name)
    }

    pub fn put_policy_cidr(
        &mut self,
        net: Ipv4Net,
        class: Option<u32>,
    ) -> Result<(), PolicyWriteError> {
        let name = map_names::POLICY_CIDRS;
        let map = self.map_mut(name).map_err(|_| PolicyWriteError::Other {
            map: name,
            source: MapError::InvalidName { name: name.into() },
        })?;
        let mut map: LpmTrie<&mut MapData, [u8; 4], PolicyClass> =
            map.try_into().map_err(|e| classify(name, e))?;
        let key = Key::new(net.prefix_len() as u32, net.network().octets());
        match class {
            Some(class) => map
                .insert(&key, PolicyClass { class }, 0)
                .map_err(|e| classify(name, e)),
            None => removed(name, map.remove(&key)),
        }
    }

    /// The policy state of a local endpoint, if it has one.
    pub fn policy_endpoint(&self, ip: Ipv4Addr) -> Result<Option<PolicyEndpoint>> {
        let map: HashMap<&MapData, Ipv4Key, PolicyEndpoint> =
            self.map(map_names::POLICY_ENDPOINTS)?.try_into()?;
        match map.get(&Ipv4Key { addr: ip.octets() }, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading a policy endpoint"),
        }
    }

    /// A namespace's default isolation (`""`: the agent's synced marker).
    pub fn policy_ns_default(&self, namespace: &str) -> Result<Option<u32>> {
        let map: HashMap<&MapData, PolicyNamespaceKey, PolicyNamespaceDefault> =
            self.map(map_names::POLICY_NS_DEFAULTS)?.try_into()?;
        match map.get(&PolicyNamespaceKey::new(namespace), 0) {
            Ok(v) => Ok(Some(v.flags)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading a namespace default"),
        }
    }

    /// The namespace and name of a local pod, as the CNI plugin recorded them.
    pub fn policy_pod_name(&self, ip: Ipv4Addr) -> Result<Option<PolicyPodName>> {
        let map: HashMap<&MapData, Ipv4Key, PolicyPodName> =
            self.map(map_names::POLICY_PODS)?.try_into()?;
        match map.get(&Ipv4Key { addr: ip.octets() }, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading a pod name"),
        }
    }

    /// Every local pod's namespace and name.
    pub fn policy_pod_names(&self) -> Result<Vec<(Ipv4Addr, PolicyPodName)>> {
        self.hash_entries(map_names::POLICY_PODS)
            .context("iterating pod names")
    }

    pub fn policy_config(&self) -> Result<PolicyConfig> {
        let map: Array<&MapData, PolicyConfig> = self.map(map_names::POLICY_CONFIG)?.try_into()?;
        map.get(&0, 0).context("reading the policy config")
    }

    pub fn set_policy_config(&mut self, cfg: &PolicyConfig) -> Result<()> {
        let mut map: Array<&mut MapData, PolicyConfig> =
            self.map_mut(map_names::POLICY_CONFIG)?.try_into()?;
        map.set(0, cfg, 0).context("writing the policy config")
    }

    /// Policy denials per local endpoint, summed over CPUs.
    pub fn policy_drops(&self) -> Result<Vec<(Ipv4Addr, PolicyDrops)>> {
        let map: PerCpuHashMap<&MapData, Ipv4Key, PolicyDrops> =
            self.map(map_names::POLICY_DROPS)?.try_into()?;
        let mut out = Vec::new();
        for entry in map.iter() {
            let (key, values): (Ipv4Key, PerCpuValues<PolicyDrops>) = entry?;
            let mut sum = PolicyDrops::default();
            for v in values.iter() {
                sum.ingress += v.ingress;
                sum.egress += v.egress;
            }
            out.push((Ipv4Addr::from(key.addr), sum));
        }
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }

    /// Forgets an endpoint's denial counters (the pod is gone).
    pub fn remove_policy_drops(&mut self, ip: Ipv4Addr) -> Result<()> {
        let mut map: PerCpuHashMap<&mut MapData, Ipv4Key, PolicyDrops> =
            self.map_mut(map_names::POLICY_DROPS)?.try_into()?;
        removed(
            map_names::POLICY_DROPS,
            map.remove(&Ipv4Key { addr: ip.octets() }),
        )
        .map_err(anyhow::Error::from)
    }

    /// Everything the compiled policy maps hold.
    pub fn policy_snapshot(&self) -> Result<PolicySnapshot> {
        let mut snap = PolicySnapshot::default();
        let eps: HashMap<&MapData, Ipv4Key, PolicyEndpoint> =
            self.map(map_names::POLICY_ENDPOINTS)?.try_into()?;
        for e in eps.iter() {
            let (k, v) = e?;
            snap.endpoints.insert(Ipv4Addr::from(k.addr), v);
        }
        let addrs: HashMap<&MapData, Ipv4Key, PolicyClass> =
            self.map(map_names::POLICY_ADDRS)?.try_into()?;
        for e in addrs.iter() {
            let (k, v) = e?;
            snap.addrs.insert(Ipv4Addr::from(k.addr), v.class);
        }
        let cidrs: LpmTrie<&MapData, [u8; 4], PolicyClass> =
            self.map(map_names::POLICY_CIDRS)?.try_into()?;
        for e in cidrs.iter() {
            let (k, v) = e?;
            let net = Ipv4Net::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8)
                .context("policy CIDR key with an invalid prefix length")?;
            snap.cidrs.insert(net, v.class);
        }
        let rules: HashMap<&MapData, PolicyRuleKey, PolicyPorts> =
            self.map(map_names::POLICY_RULES)?.try_into()?;
        for e in rules.iter() {
            let (k, v) = e?;
            snap.rules.insert(k, v);
        }
        let blocks: HashMap<&MapData, PolicyPortBlockKey, PolicyPortBlock> =
            self.map(map_names::POLICY_PORT_BLOCKS)?.try_into()?;
        for e in blocks.iter() {
            let (k, v) = e?;
            snap.blocks.insert(k, v);
        }
        let ns: HashMap<&MapData, PolicyNamespaceKey, PolicyNamespaceDefault> =
            self.map(map_names::POLICY_NS_DEFAULTS)?.try_into()?;
        for e in ns.iter() {
            let (k, v) = e?;
            snap.ns_defaults.insert(k.name().to_string(), v.flags);
        }
        Ok(snap)
    }
}

//! Cluster state is checked before it reaches the maps: every node record from a datastore is
//! admitted or refused here, and only admitted records become routes and tunnel peers.
//!
//! A record is refused, with a warning naming it and a count by reason
//! (`weft_rejected_node_records{reason}`), when its subnet is not a subnet this cluster can
//! hand out (host bits set, outside `Network`, a prefix other than `SubnetLen`), when it claims
//! this node's subnet or this node's address, when its address cannot be a node's (unspecified,
//! loopback, multicast, reserved, or a pod address inside `Network`), or when it announces a
//! backend this node cannot talk to. Records that pass those checks all have the same prefix
//! length and are aligned, so two of them overlap only when they name the same subnet: then the
//! older record wins (etcd: the lower create revision; Kubernetes: the earlier creationTimestamp;
//! static file: the earlier entry; ties by name), which every node decides the same way
//! whatever order the records arrived in. The others are refused until the winner leaves.
//!
//! Admission is incremental: a change re-decides only the subnets it touches, and a refused
//! record is re-checked whenever it or its rival changes, so a record that becomes valid (or
//! whose rival leaves) is admitted at that moment. One bad record never stops the others.
use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use crate::datastore::NodeLease;

/// Why a node record was refused. The reason names are the `reason` label of
/// `weft_rejected_node_records` (a fixed, small set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The subnet has host bits set (`10.244.1.5/24`).
    UnalignedSubnet,
    /// The subnet is not inside `Network` (`0.0.0.0/0`, the Service network, `169.254.169.254/32`).
    OutsideNetwork { network: Ipv4Net },
    /// The subnet's prefix is not `SubnetLen`.
    WrongPrefixLength { subnet_len: u8 },
    /// Another node claims this node's own subnet.
    OverlapsLocalSubnet,
    /// An older record holds the same subnet.
    OverlapsNode { holder: String },
    /// The address is unspecified, loopback, multicast or reserved.
    InvalidPublicIp,
    /// The address is a pod address (inside `Network`).
    PublicIpInPodNetwork { network: Ipv4Net },
    /// The record carries this node's address with another subnet.
    PublicIpIsLocal,
    /// The record announces a backend this node cannot talk to.
    UnknownBackend { backend: String },
    /// The record could not be read at all (not JSON, a field of the wrong type, an address
    /// that is not one).
    Unreadable { error: String },
}

/// Every refusal reason, in the order the metric lists them.
pub const REASONS: [&str; 10] = [
    "unaligned_subnet",
    "outside_network",
    "wrong_prefix_length",
    "overlaps_local_subnet",
    "overlaps_node",
    "invalid_public_ip",
    "public_ip_in_pod_network",
    "public_ip_is_local",
    "unknown_backend",
    "unreadable",
];

impl Refusal {
    /// The `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnalignedSubnet => REASONS[0],
            Self::OutsideNetwork { .. } => REASONS[1],
            Self::WrongPrefixLength { .. } => REASONS[2],
            Self::OverlapsLocalSubnet => REASONS[3],
            Self::OverlapsNode { .. } => REASONS[4],
            Self::InvalidPublicIp => REASONS[5],
            Self::PublicIpInPodNetwork { .. } => REASONS[6],
            Self::PublicIpIsLocal => REASONS[7],
            Self::UnknownBackend { .. } => REASONS[8],
            Self::Unreadable { .. } => REASONS[9],
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnalignedSubnet => write!(f, "the subnet has host bits set"),
            Self::OutsideNetwork { network } => {
                write!(f, "the subnet is outside Network {network}")
            }
            Self::WrongPrefixLength { subnet_len } => {
                write!(f, "the subnet's prefix is not SubnetLen /{subnet_len}")
            }
            Self::OverlapsLocalSubnet => write!(f, "the subnet is this node's own"),
            Self::OverlapsNode { holder } => {
                write!(f, "the subnet is held by the older record {holder}")
            }
            Self::InvalidPublicIp => write!(
                f,
                "the public address is unspecified, loopback, multicast or reserved"
            ),
            Self::PublicIpInPodNetwork { network } => {
                write!(
                    f,
                    "the public address is a pod address (inside Network {network})"
                )
            }
            Self::PublicIpIsLocal => write!(f, "the public address is this node's own"),
            Self::UnknownBackend { backend } => {
                write!(f, "backend type {backend:?} is not one this node speaks")
            }
            Self::Unreadable { error } => write!(f, "the record cannot be read: {error}"),
        }
    }
}

/// What a record is checked against: the cluster's network and this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// `Network` and `SubnetLen` (None: not known, those checks are skipped).
    pub network: Option<(Ipv4Net, u8)>,
    /// This node's subnet (None: it lost it and holds none).
    pub local_subnet: Option<Ipv4Net>,
    pub local_ip: Ipv4Addr,
}

impl Rules {
    /// Whether `lease` is this node's own record.
    pub fn is_local(&self, lease: &NodeLease) -> bool {
        Some(lease.subnet) == self.local_subnet && lease.public_ip == self.local_ip
    }

    /// The checks of one record on its own (everything but the contest for a subnet).
    pub fn check(&self, lease: &NodeLease) -> Result<(), Refusal> {
        if self.is_local(lease) {
            return Ok(());
        }
        let subnet = lease.subnet;
        if subnet.addr() != subnet.network() {
            return Err(Refusal::UnalignedSubnet);
        }
        if let Some((network, subnet_len)) = self.network {
            if !network.contains(&subnet) {
                return Err(Refusal::OutsideNetwork { network });
            }
            if subnet.prefix_len() != subnet_len {
                return Err(Refusal::WrongPrefixLength { subnet_len });
            }
        }
        if let Some(local) = self.local_subnet
            && (subnet.contains(&local) || local.contains(&subnet))
        {
            return Err(Refusal::OverlapsLocalSubnet);
        }
        let ip = lease.public_ip;
        let first = ip.octets()[0];
        if first == 0 || ip.is_loopback() || ip.is_multicast() || first >= 240 {
            return Err(Refusal::InvalidPublicIp);
        }
        if let Some((network, _)) = self.network
            && network.contains(&ip)
        {
            return Err(Refusal::PublicIpInPodNetwork { network });
        }
        if ip == self.local_ip {
            return Err(Refusal::PublicIpIsLocal);
        }
        if let Some(backend) = &lease.unknown_backend {
            return Err(Refusal::UnknownBackend {
                backend: backend.clone(),
            });
        }
        Ok(())
    }
}

/// Which of two records claiming one subnet is older (and wins): seniority, then name.
pub fn seniority(a: &NodeLease, b: &NodeLease) -> Ordering {
    (a.seniority, &a.name).cmp(&(b.seniority, &b.name))
}

/// Every record a datastore holds, by name, and which of them are admitted.
#[derive(Debug)]
pub struct Records {
    rules: Rules,
    all: HashMap<String, NodeLease>,
    /// Names of the records claiming each subnet (admitted or not).
    by_subnet: HashMap<Ipv4Net, BTreeSet<String>>,
    /// The admitted record of each subnet.
    admitted: HashMap<Ipv4Net, String>,
    refused: BTreeMap<String, Refusal>,
}

impl Records {
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            all: HashMap::new(),
            by_subnet: HashMap::new(),
            admitted: HashMap::new(),
            refused: BTreeMap::new(),
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The admitted record of `subnet`.
    pub fn admitted(&self, subnet: &Ipv4Net) -> Option<&NodeLease> {
        self.all.get(self.admitted.get(subnet)?)
    }

    /// Every admitted record.
    pub fn admitted_all(&self) -> impl Iterator<Item = &NodeLease> {
        self.admitted.values().filter_map(|n| self.all.get(n))
    }

    /// The refused records with why, by name.
    pub fn refused(&self) -> &BTreeMap<String, Refusal> {
        &self.refused
    }

    /// How many records are refused, for every reason (zeros included).
    pub fn refused_by_reason(&self) -> Vec<(&'static str, usize)> {
        REASONS
            .iter()
            .map(|r| {
                (
                    *r,
                    self.refused.values().filter(|f| f.reason() == *r).count(),
                )
            })
            .collect()
    }

    /// Replaces every record (a relist). Returns the subnets whose admitted record changed.
    pub fn replace_all(&mut self, leases: Vec<NodeLease>) -> BTreeSet<Ipv4Net> {
        // Every subnet, before and after, counts as changed: any holder's data may differ.
        let mut touched: BTreeSet<Ipv4Net> = self.by_subnet.keys().copied().collect();
        self.all.clear();
        self.by_subnet.clear();
        for lease in leases {
            // Two records of one name in a list: the later one counts (as an update would).
            if let Some(old) = self.all.insert(lease.name.clone(), lease.clone())
                && let Some(names) = self.by_subnet.get_mut(&old.subnet)
            {
                names.remove(&old.name);
            }
            self.by_subnet
                .entry(lease.subnet)
                .or_default()
                .insert(lease.name.clone());
            touched.insert(lease.subnet);
        }
        self.refused.retain(|name, _| self.all.contains_key(name));
        touched.extend(self.admitted.keys().copied());
        self.decide(touched.clone());
        touched
    }

    /// A record created or changed. Returns the subnets whose admitted record changed.
    pub fn upsert(&mut self, lease: NodeLease) -> BTreeSet<Ipv4Net> {
        let mut touched = BTreeSet::from([lease.subnet]);
        let mut held = None;
        if let Some(old) = self.all.get(&lease.name) {
            if *old == lease {
                return BTreeSet::new();
            }
            touched.insert(old.subnet);
            if self.admitted.get(&old.subnet) == Some(&lease.name) {
                held = Some(old.subnet);
            }
            self.unindex(&old.name.clone(), old.subnet);
        }
        self.by_subnet
            .entry(lease.subnet)
            .or_default()
            .insert(lease.name.clone());
        let (name, subnet) = (lease.name.clone(), lease.subnet);
        self.all.insert(name.clone(), lease);
        let mut changed = self.decide(touched);
        // The holder's own data changed (its address moved): its subnet's route changes too.
        changed.extend(held);
        if self.admitted.get(&subnet) == Some(&name) {
            changed.insert(subnet);
        }
        changed
    }

    /// The record `name` can no longer be read: whatever it said before counts no more (an
    /// unreadable record is no route), and it is refused until it is readable or gone. Returns
    /// the subnets whose admitted record changed.
    pub fn unreadable(&mut self, name: &str, error: String) -> BTreeSet<Ipv4Net> {
        let changed = self.remove(name);
        let refusal = Refusal::Unreadable { error };
        if self.refused.get(name) != Some(&refusal) {
            tracing::warn!(
                record = name,
                reason = refusal.reason(),
                "refused node record {name}: {refusal}"
            );
            self.refused.insert(name.to_string(), refusal);
        }
        changed
    }

    /// The record `name` is gone. Returns the subnets whose admitted record changed.
    pub fn remove(&mut self, name: &str) -> BTreeSet<Ipv4Net> {
        let Some(old) = self.all.remove(name) else {
            if self.refused.remove(name).is_some() {
                tracing::info!(record = name, "refused node record gone");
            }
            return BTreeSet::new();
        };
        self.unindex(name, old.subnet);
        if self.refused.remove(name).is_some() {
            tracing::info!(record = name, "refused node record gone");
        }
        self.decide(BTreeSet::from([old.subnet]))
    }

    /// New rules (this node's subnet changed, or the network): every record is decided again.
    pub fn set_rules(&mut self, rules: Rules) -> BTreeSet<Ipv4Net> {
        if rules == self.rules {
            return BTreeSet::new();
        }
        self.rules = rules;
        let touched = self
            .by_subnet
            .keys()
            .chain(self.admitted.keys())
            .copied()
            .collect();
        self.decide(touched)
    }

    fn unindex(&mut self, name: &str, subnet: Ipv4Net) {
        if let Some(names) = self.by_subnet.get_mut(&subnet) {
            names.remove(name);
            if names.is_empty() {
                self.by_subnet.remove(&subnet);
            }
        }
    }

    /// Decides who holds each subnet in `touched`; returns those whose holder changed.
    fn decide(&mut self, touched: BTreeSet<Ipv4Net>) -> BTreeSet<Ipv4Net> {
        let mut changed = BTreeSet::new();
        for subnet in touched {
            let names: Vec<String> = self
                .by_subnet
                .get(&subnet)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            let mut valid: Vec<&NodeLease> = Vec::new();
            let mut verdicts: Vec<(String, Option<Refusal>)> = Vec::new();
            for name in &names {
                let lease = &self.all[name];
                match self.rules.check(lease) {
                    Ok(()) => valid.push(lease),
                    Err(r) => verdicts.push((name.clone(), Some(r))),
                }
            }
            valid.sort_by(|a, b| seniority(a, b));
            let winner = valid.first().map(|l| l.name.clone());
            for lease in &valid {
                let verdict = match &winner {
                    Some(w) if *w != lease.name => {
                        Some(Refusal::OverlapsNode { holder: w.clone() })
                    }
                    _ => None,
                };
                verdicts.push((lease.name.clone(), verdict));
            }
            for (name, verdict) in verdicts {
                self.record_verdict(&name, verdict);
            }
            let before = self.admitted.get(&subnet).cloned();
            match &winner {
                Some(w) => {
                    self.admitted.insert(subnet, w.clone());
                }
                None => {
                    self.admitted.remove(&subnet);
                }
            }
            if before != winner {
                changed.insert(subnet);
            }
        }
        changed
    }

    fn record_verdict(&mut self, name: &str, verdict: Option<Refusal>) {
        let lease = &self.all[name];
        match verdict {
            Some(refusal) => {
                if self.refused.get(name) != Some(&refusal) {
                    tracing::warn!(
                        record = name,
                        subnet = %lease.subnet,
                        public_ip = %lease.public_ip,
                        reason = refusal.reason(),
                        "refused node record {name} ({} at {}): {refusal}",
                        lease.subnet,
                        lease.public_ip,
                    );
                    self.refused.insert(name.to_string(), refusal);
                }
            }
            None => {
                if self.refused.remove(name).is_some() {
                    tracing::info!(
                        record = name,
                        subnet = %lease.subnet,
                        "node record {name} accepted now"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendType;

    fn rules() -> Rules {
        Rules {
            network: Some(("10.244.0.0/16".parse().unwrap(), 24)),
            local_subnet: Some("10.244.1.0/24".parse().unwrap()),
            local_ip: Ipv4Addr::new(192, 168, 1, 1),
        }
    }

    fn rec(name: &str, subnet: &str, ip: [u8; 4], seniority: i64) -> NodeLease {
        NodeLease {
            subnet: subnet.parse().unwrap(),
            public_ip: Ipv4Addr::from(ip),
            backend: Some(BackendType::Vxlan),
            vtep_mac: None,
            name: name.into(),
            node_name: None,
            seniority,
            unknown_backend: None,
        }
    }

    fn reason(r: &Rules, lease: &NodeLease) -> Option<&'static str> {
        r.check(lease).err().map(|e| e.reason())
    }

    #[test]
    fn each_rule_refuses_with_its_reason() {
        let r = rules();
        let ok = [192, 168, 1, 2];
        for (subnet, ip, want) in [
            ("10.244.2.0/24", ok, None),
            ("0.0.0.0/0", ok, Some("outside_network")),
            // The Service network, and the cloud metadata address.
            ("10.96.0.0/12", ok, Some("outside_network")),
            ("169.254.169.254/32", ok, Some("outside_network")),
            ("10.244.0.0/16", ok, Some("wrong_prefix_length")),
            ("10.244.2.0/25", ok, Some("wrong_prefix_length")),
            ("10.244.2.0/23", ok, Some("wrong_prefix_length")),
            ("10.244.2.5/24", ok, Some("unaligned_subnet")),
            ("10.244.1.0/24", ok, Some("overlaps_local_subnet")),
            (
                "10.244.2.0/24",
                [10, 244, 9, 9],
                Some("public_ip_in_pod_network"),
            ),
            ("10.244.2.0/24", [0, 0, 0, 0], Some("invalid_public_ip")),
            ("10.244.2.0/24", [127, 0, 0, 1], Some("invalid_public_ip")),
            ("10.244.2.0/24", [224, 0, 0, 5], Some("invalid_public_ip")),
            (
                "10.244.2.0/24",
                [255, 255, 255, 255],
                Some("invalid_public_ip"),
            ),
            (
                "10.244.2.0/24",
                [192, 168, 1, 1],
                Some("public_ip_is_local"),
            ),
        ] {
            assert_eq!(
                reason(&r, &rec("x", subnet, ip, 0)),
                want,
                "{subnet} at {ip:?}"
            );
        }
        // This node's own record passes (it just never becomes a route).
        assert_eq!(
            reason(&r, &rec("me", "10.244.1.0/24", [192, 168, 1, 1], 0)),
            None
        );
        let mut wg = rec("x", "10.244.2.0/24", ok, 0);
        wg.unknown_backend = Some("wireguard".into());
        assert_eq!(reason(&r, &wg), Some("unknown_backend"));
        // Without the network (not known yet) only the network checks are skipped.
        let loose = Rules {
            network: None,
            ..rules()
        };
        assert_eq!(reason(&loose, &rec("x", "10.96.0.0/12", ok, 0)), None);
        assert_eq!(
            reason(&loose, &rec("x", "0.0.0.0/0", ok, 0)),
            Some("overlaps_local_subnet")
        );
        for reason in REASONS {
            assert!(!reason.is_empty());
        }
    }

    #[test]
    fn the_older_record_wins_on_every_node_whatever_the_order() {
        let a = rec("node-a", "10.244.5.0/24", [192, 168, 1, 5], 100);
        let b = rec("node-b", "10.244.5.0/24", [192, 168, 1, 6], 200);
        let c = rec("node-c", "10.244.6.0/24", [192, 168, 1, 7], 300);
        for order in [
            vec![a.clone(), b.clone(), c.clone()],
            vec![b.clone(), c.clone(), a.clone()],
            vec![c.clone(), b.clone(), a.clone()],
        ] {
            // As a relist, and one event at a time.
            let mut list = Records::new(rules());
            list.replace_all(order.clone());
            let mut events = Records::new(rules());
            for l in order {
                events.upsert(l);
            }
            for r in [&list, &events] {
                let s: Ipv4Net = "10.244.5.0/24".parse().unwrap();
                assert_eq!(r.admitted(&s).unwrap().name, "node-a");
                assert_eq!(
                    r.refused().get("node-b"),
                    Some(&Refusal::OverlapsNode {
                        holder: "node-a".into()
                    })
                );
                assert_eq!(r.admitted_all().count(), 2, "node-c is unaffected");
            }
        }
        // Equal seniority: the name decides.
        let mut r = Records::new(rules());
        r.upsert(rec("z", "10.244.5.0/24", [192, 168, 1, 5], 1));
        r.upsert(rec("y", "10.244.5.0/24", [192, 168, 1, 6], 1));
        assert_eq!(
            r.admitted(&"10.244.5.0/24".parse().unwrap()).unwrap().name,
            "y"
        );
    }

    #[test]
    fn refused_records_are_admitted_once_valid_or_unrivalled() {
        let mut r = Records::new(rules());
        let good = rec("good", "10.244.2.0/24", [192, 168, 1, 2], 1);
        let bad = rec("bad", "0.0.0.0/0", [192, 168, 1, 3], 2);
        let changed = r.replace_all(vec![good.clone(), bad.clone()]);
        assert!(changed.contains(&"10.244.2.0/24".parse().unwrap()));
        assert_eq!(r.admitted_all().count(), 1);
        assert_eq!(r.refused().len(), 1);
        let counts: BTreeMap<_, _> = r.refused_by_reason().into_iter().collect();
        assert_eq!(counts["outside_network"], 1);
        assert_eq!(counts.len(), REASONS.len());
        // The bad record is fixed: admitted.
        let fixed = rec("bad", "10.244.3.0/24", [192, 168, 1, 3], 2);
        assert_eq!(
            r.upsert(fixed),
            BTreeSet::from(["10.244.3.0/24".parse().unwrap()])
        );
        assert!(r.refused().is_empty());
        // A younger rival is refused while the holder lives, admitted once it leaves.
        let rival = rec("rival", "10.244.2.0/24", [192, 168, 1, 4], 9);
        assert!(r.upsert(rival).is_empty(), "the holder did not change");
        assert_eq!(r.refused().keys().collect::<Vec<_>>(), vec!["rival"]);
        assert_eq!(
            r.remove("good"),
            BTreeSet::from(["10.244.2.0/24".parse().unwrap()])
        );
        assert_eq!(
            r.admitted(&"10.244.2.0/24".parse().unwrap()).unwrap().name,
            "rival"
        );
        assert!(r.refused().is_empty());
        // A holder that moves to another address changes its subnet's route.
        let moved = rec("rival", "10.244.2.0/24", [192, 168, 1, 44], 9);
        assert_eq!(r.upsert(moved.clone()).len(), 1);
        assert!(r.upsert(moved).is_empty(), "no change, nothing to do");
        // A record that goes bad loses its subnet.
        let worse = rec("rival", "10.244.2.0/24", [10, 244, 2, 1], 9);
        assert_eq!(r.upsert(worse).len(), 1);
        assert!(r.admitted(&"10.244.2.0/24".parse().unwrap()).is_none());
        // New rules (this node's subnet moved onto 10.244.3.0/24): its holder is refused.
        let changed = r.set_rules(Rules {
            local_subnet: Some("10.244.3.0/24".parse().unwrap()),
            ..rules()
        });
        assert!(changed.contains(&"10.244.3.0/24".parse().unwrap()));
        assert_eq!(r.refused().get("bad"), Some(&Refusal::OverlapsLocalSubnet));
        // This node lost its subnet and holds none: the subnet's new holder is admitted.
        let changed = r.set_rules(Rules {
            local_subnet: None,
            ..rules()
        });
        assert!(changed.contains(&"10.244.3.0/24".parse().unwrap()));
        assert!(!r.refused().contains_key("bad"));
        assert_eq!(
            r.admitted(&"10.244.3.0/24".parse().unwrap()).unwrap().name,
            "bad"
        );
    }

    #[test]
    fn an_unreadable_record_is_no_route_and_counted_until_readable_or_gone() {
        let count = |r: &Records| -> usize {
            r.refused_by_reason()
                .into_iter()
                .find(|(reason, _)| *reason == "unreadable")
                .unwrap()
                .1
        };
        let mut r = Records::new(rules());
        let held = "10.244.2.0/24".parse().unwrap();
        r.replace_all(vec![rec("n2", "10.244.2.0/24", [192, 168, 1, 2], 1)]);
        // A record that was routed turns unreadable: its route goes, it is counted.
        assert_eq!(
            r.unreadable("n2", "expected value at line 1".into()),
            BTreeSet::from([held])
        );
        assert!(r.admitted(&held).is_none());
        assert_eq!(count(&r), 1);
        assert!(
            r.refused()["n2"].to_string().contains("line 1"),
            "the error is kept"
        );
        // Another one, never readable: counted, changes no route.
        assert!(r.unreadable("n9", "not JSON".into()).is_empty());
        assert_eq!(count(&r), 2);
        // Readable again: admitted, no longer counted.
        r.upsert(rec("n2", "10.244.2.0/24", [192, 168, 1, 2], 1));
        assert_eq!(r.admitted(&held).unwrap().name, "n2");
        assert_eq!(count(&r), 1);
        // Gone: not counted.
        assert!(r.remove("n9").is_empty());
        assert_eq!(count(&r), 0);
        assert!(r.refused().is_empty());
    }
}

//! Truth-table case files (`tests/netpol/*.json`) and the report of a run, as the
//! `cargo xtask netpol` runner reads and writes them; plus the cluster layout they assume and
//! the two kernel-free deciders (reference evaluator, emulated datapath) a case can be run
//! against.
//!
//! A case file is a JSON list of cases:
//! `{"name", "description"?, "tags"?, "notes"?, "policies": [NetworkPolicy...],
//!   "probes": [{"from": "x/a", "to": "y/b", "port": 80, "proto": "TCP", "allowed": true}],
//!   "expect_api_rejection"?: bool, "assumes_pod_ips"?: bool | {"x/a": "10.244.1.2", ...},
//!   "pod_ports"?: {"x/b": [{"name": "serve-80-tcp", "port": 81, "protocol": "TCP"}]}}`
//!
//! `pod_ports` is weft's extension for per-pod named-port cases: it replaces the named container
//! ports of the pods it lists (the pods still serve TCP and UDP on 80 and 81, so the runner only
//! has to declare different names on them).
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::{Deserialize, Serialize};

use super::{
    compile::Capacities,
    emulate::EmulatedCluster,
    evaluate,
    model::{NamedPort, PodRecord, Policy, Protocol, World},
};

#[derive(Clone, Debug, Deserialize)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub proto: String,
    pub allowed: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PortDecl {
    pub name: String,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".into()
}

#[derive(Clone, Debug, Deserialize)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub notes: Option<serde_json::Value>,
    #[serde(default)]
    pub policies: Vec<NetworkPolicy>,
    pub probes: Vec<Probe>,
    #[serde(default)]
    pub expect_api_rejection: bool,
    #[serde(default)]
    pub assumes_pod_ips: Option<serde_json::Value>,
    #[serde(default)]
    pub pod_ports: BTreeMap<String, Vec<PortDecl>>,
}

/// Reads one case file.
pub fn load_file(path: &Path) -> Result<Vec<Case>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cases: Vec<Case> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for c in &cases {
        c.check()
            .with_context(|| format!("{}: case {:?}", path.display(), c.name))?;
    }
    Ok(cases)
}

/// The `*.json` files of a directory, sorted.
pub fn case_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    v.sort();
    Ok(v)
}

/// The runner's cluster: namespaces x, y, z; pods a, b, c in each; three nodes.
pub struct Layout {
    /// "ns/pod" → address.
    pub pods: BTreeMap<String, Ipv4Addr>,
    /// Node name → its addresses.
    pub nodes: BTreeMap<String, Vec<Ipv4Addr>>,
}

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// The named container ports every pod declares (name, port, protocol).
pub const SERVED: [(&str, u16, Protocol); 4] = [
    ("serve-80-tcp", 80, Protocol::Tcp),
    ("serve-81-tcp", 81, Protocol::Tcp),
    ("serve-80-udp", 80, Protocol::Udp),
    ("serve-81-udp", 81, Protocol::Udp),
];

impl Layout {
    /// The addresses issue 12 fixes; node N (`node-N`, subnet 10.244.N.0/24) has the given
    /// addresses.
    pub fn standard(node_addrs: BTreeMap<String, Vec<Ipv4Addr>>) -> Self {
        let pods = [
            ("x/a", "10.244.1.2"),
            ("x/b", "10.244.1.3"),
            ("x/c", "10.244.2.2"),
            ("y/a", "10.244.2.3"),
            ("y/b", "10.244.3.2"),
            ("y/c", "10.244.3.3"),
            ("z/a", "10.244.1.4"),
            ("z/b", "10.244.2.4"),
            ("z/c", "10.244.3.4"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.parse().expect("address")))
        .collect();
        Self {
            pods,
            nodes: node_addrs,
        }
    }

    /// The node owning a pod address (10.244.N.x is on node-N).
    pub fn node_of(ip: Ipv4Addr) -> String {
        format!("node-{}", ip.octets()[2])
    }

    /// The world of a case: the layout with the case's `pod_ports` overrides.
    pub fn world(&self, case: &Case) -> Result<World> {
        let mut w = World::default();
        for ns in NAMESPACES {
            w.namespaces.insert(
                ns.into(),
                [
                    ("ns".to_string(), ns.to_string()),
                    (
                        super::model::NAMESPACE_NAME_LABEL.to_string(),
                        ns.to_string(),
                    ),
                ]
                .into(),
            );
        }
        w.nodes = self.nodes.clone();
        for (key, ip) in &self.pods {
            let (ns, name) = key.split_once('/').expect("ns/pod");
            let ports = match case.pod_ports.get(key) {
                None => SERVED
                    .iter()
                    .map(|(n, port, protocol)| NamedPort {
                        name: n.to_string(),
                        port: *port,
                        protocol: *protocol,
                    })
                    .collect(),
                Some(decls) => decls
                    .iter()
                    .map(|d| {
                        Ok(NamedPort {
                            name: d.name.clone(),
                            port: d.port,
                            protocol: Protocol::parse(&d.protocol).with_context(|| {
                                format!("pod_ports {key}: protocol {:?}", d.protocol)
                            })?,
                        })
                    })
                    .collect::<Result<_>>()?,
            };
            w.upsert_pod(PodRecord {
                namespace: ns.into(),
                name: name.into(),
                labels: [("pod".to_string(), name.to_string())].into(),
                ip: Some(*ip),
                node: Self::node_of(*ip),
                host_network: false,
                ports,
            });
        }
        Ok(w)
    }

    fn addr(&self, pod: &str) -> Result<Ipv4Addr> {
        self.pods
            .get(pod)
            .copied()
            .with_context(|| format!("unknown pod {pod:?} (expected ns/pod)"))
    }
}

impl Case {
    /// Structural checks: probe protocols, `pod_ports` keys, `assumes_pod_ips` agreeing with the
    /// layout.
    pub fn check(&self) -> Result<()> {
        let layout = Layout::standard(BTreeMap::new());
        for p in &self.probes {
            layout.addr(&p.from)?;
            layout.addr(&p.to)?;
            if Protocol::parse(&p.proto).is_none() {
                bail!("probe protocol {:?} (TCP, UDP or SCTP)", p.proto);
            }
        }
        for k in self.pod_ports.keys() {
            layout.addr(k)?;
        }
        if let Some(serde_json::Value::Object(m)) = &self.assumes_pod_ips {
            for (k, v) in m {
                let want: Ipv4Addr = v
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .context("assumes_pod_ips value")?;
                if layout.addr(k)? != want {
                    bail!(
                        "assumes_pod_ips {k} = {want}, the layout gives {}",
                        layout.addr(k)?
                    );
                }
            }
        }
        Ok(())
    }

    /// The policies that apply: all of them, validated as the API server would; none when any is
    /// refused. `Err` carries the validation errors.
    pub fn admitted_policies(&self) -> Result<Vec<Policy>, String> {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for np in &self.policies {
            match Policy::from_api(np, "default") {
                Ok(p) => out.push(p),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors.join("; "))
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct WrongProbe {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub proto: String,
    pub expected: bool,
    pub observed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub name: String,
    pub probes: usize,
    pub wrong: Vec<WrongProbe>,
    /// Admission went the other way than the case expects (not a probe, but a failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct Report {
    pub cases: Vec<CaseResult>,
    pub total_probes: usize,
    pub wrong_probes: usize,
}

impl Report {
    pub fn push(&mut self, r: CaseResult) {
        self.total_probes += r.probes;
        self.wrong_probes += r.wrong.len();
        self.cases.push(r);
    }

    pub fn failed(&self) -> bool {
        self.wrong_probes > 0 || self.cases.iter().any(|c| c.error.is_some())
    }
}

impl CaseResult {
    /// One line per case, as the runner prints it.
    pub fn line(&self) -> String {
        let status = if self.wrong.is_empty() && self.error.is_none() {
            "ok"
        } else {
            "FAILED"
        };
        let mut s = format!(
            "{status:6} {} ({} probes, {} wrong)",
            self.name,
            self.probes,
            self.wrong.len()
        );
        if let Some(e) = &self.error {
            s += &format!(": {e}");
        }
        for w in &self.wrong {
            s += &format!(
                "\n         {} -> {} {}/{}: expected {}, observed {}",
                w.from,
                w.to,
                w.port,
                w.proto,
                if w.expected { "allowed" } else { "denied" },
                if w.observed { "allowed" } else { "denied" }
            );
        }
        s
    }
}

/// Decides a probe: `(world, policies, source, destination, IP protocol, port) -> allowed`.
pub type Decider<'a> = dyn FnMut(&World, &[Policy], Ipv4Addr, Ipv4Addr, u8, u16) -> bool + 'a;

/// Runs a case against a decider (`decide(world, policies, src, dst, proto, port)`): admission,
/// then every probe.
pub fn run_case(layout: &Layout, case: &Case, decide: &mut Decider) -> Result<CaseResult> {
    let world = layout.world(case)?;
    let (policies, error) = match (case.admitted_policies(), case.expect_api_rejection) {
        (Ok(p), false) => (p, None),
        (Err(_), true) => (Vec::new(), None),
        (Ok(_), true) => (
            Vec::new(),
            Some("expected the API to reject the policies; all were accepted".to_string()),
        ),
        (Err(e), false) => (Vec::new(), Some(format!("policies rejected: {e}"))),
    };
    let mut wrong = Vec::new();
    for p in &case.probes {
        let proto = Protocol::parse(&p.proto)
            .context("probe protocol")?
            .number();
        let observed = decide(
            &world,
            &policies,
            layout.addr(&p.from)?,
            layout.addr(&p.to)?,
            proto,
            p.port,
        );
        if observed != p.allowed {
            wrong.push(WrongProbe {
                from: p.from.clone(),
                to: p.to.clone(),
                port: p.port,
                proto: p.proto.clone(),
                expected: p.allowed,
                observed,
            });
        }
    }
    Ok(CaseResult {
        name: case.name.clone(),
        probes: case.probes.len(),
        wrong,
        error,
    })
}

/// The reference evaluator as a decider.
pub fn reference(
    w: &World,
    p: &[Policy],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    port: u16,
) -> bool {
    evaluate::allowed(w, p, src, dst, proto, port)
}

/// The compiled datapath form, emulated, as a decider (compiles the case once per world and
/// policy set, then answers probes from the emulated maps).
pub fn emulated() -> impl FnMut(&World, &[Policy], Ipv4Addr, Ipv4Addr, u8, u16) -> bool {
    let mut cache: Option<(String, EmulatedCluster)> = None;
    move |w, p, src, dst, proto, port| {
        let key = format!("{w:?}{p:?}");
        if cache.as_ref().is_none_or(|(k, _)| *k != key) {
            let (cluster, reports) = EmulatedCluster::build(w, p, Capacities::default());
            assert!(reports.is_empty(), "{reports:?}");
            cache = Some((key, cluster));
        }
        cache
            .as_ref()
            .expect("built")
            .1
            .allowed(src, dst, proto, port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_format() {
        let mut r = Report::default();
        r.push(CaseResult {
            name: "deny".into(),
            probes: 2,
            wrong: vec![WrongProbe {
                from: "x/a".into(),
                to: "y/b".into(),
                port: 80,
                proto: "TCP".into(),
                expected: false,
                observed: true,
            }],
            error: None,
        });
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"cases": [{"name": "deny", "probes": 2, "wrong": [
                {"from": "x/a", "to": "y/b", "port": 80, "proto": "TCP", "expected": false, "observed": true}]}],
                "total_probes": 2, "wrong_probes": 1})
        );
        assert!(r.failed());
    }

    #[test]
    fn bad_case_files_are_refused_with_the_field() {
        let case: Case = serde_json::from_value(serde_json::json!({"name": "n", "probes": [
            {"from": "x/a", "to": "q/b", "port": 80, "proto": "TCP", "allowed": true}]}))
        .unwrap();
        assert!(case.check().unwrap_err().to_string().contains("q/b"));
        let case: Case = serde_json::from_value(
            serde_json::json!({"name": "n", "assumes_pod_ips": {"x/a": "10.244.9.9"},
            "probes": []}),
        )
        .unwrap();
        assert!(
            case.check()
                .unwrap_err()
                .to_string()
                .contains("assumes_pod_ips")
        );
    }

    #[test]
    fn admission_mismatch_is_a_failure() {
        let layout = Layout::standard(BTreeMap::new());
        let case: Case = serde_json::from_value(serde_json::json!({"name": "n", "expect_api_rejection": true,
            "policies": [{"metadata": {"name": "ok", "namespace": "x"}, "spec": {"podSelector": {}}}],
            "probes": [{"from": "x/a", "to": "x/b", "port": 80, "proto": "TCP", "allowed": true}]}))
        .unwrap();
        let r = run_case(&layout, &case, &mut reference).unwrap();
        assert!(r.error.is_some());
    }
}

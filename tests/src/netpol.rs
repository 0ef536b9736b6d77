//! The NetworkPolicy truth-table runner (`cargo xtask netpol FILE...`, and the test that runs
//! the repository's case files): a 3-node weft cluster in network namespaces with the etcd
//! datastore, node N owning 10.244.N.0/24, namespaces x, y, z (`ns=<name>` and
//! `kubernetes.io/metadata.name=<name>`), pods a, b, c in each (`pod=<name>`) at the addresses
//! of `policy::cases::Layout::standard`, created by the CNI plugin as a runtime does
//! (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, and the address asked for with `IP=`), each serving
//! TCP and UDP on 80 and 81 (container ports `serve-80-tcp`, `serve-81-tcp`, `serve-80-udp`,
//! `serve-81-udp`; a case's `pod_ports` renames them on its pods).
//!
//! Per case: the policies are applied as `weft policy apply` applies them (validated with the
//! API server's messages, written to etcd in one transaction); **convergence** is when every
//! node's agent reports, in its pinned `WEFT_POLICY_CONFIG`, that its maps hold the etcd
//! revision of that write; then every probe runs at once (a real TCP connect or UDP
//! request/reply from the source pod's namespace to the destination pod's address, 1 s timeout,
//! one retry, as upstream's e2e does; the answer must name the intended pod), the results are
//! compared with the case, and the policies are removed (and convergence awaited again).
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use weft_agent::{
    datastore::etcd::EtcdClient,
    netpol::store,
    policy::cases::{self, Case, CaseResult, Layout, NAMESPACES, PODS, SERVED, WrongProbe},
};

use crate::{
    cluster::{Cluster, ClusterOptions, FLANNEL_PREFIX},
    netns::Netns,
};

/// The ports every pod serves (TCP and UDP each).
pub const SERVED_PORTS: [u16; 2] = [80, 81];
/// Probe timeout and attempts (upstream: 1 s, one retry).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
pub const PROBE_ATTEMPTS: usize = 2;

/// A pod of the layout.
pub struct RunnerPod {
    pub key: String,
    pub ip: Ipv4Addr,
    pub node: usize,
    /// Path of its network namespace.
    pub ns_path: String,
}

pub struct NetpolCluster {
    pub cluster: Cluster,
    pub pods: BTreeMap<String, RunnerPod>,
    pub layout: Layout,
}

/// The Pod object of `ns/name` with the given container ports (name, port, protocol).
pub fn pod_object(ns: &str, name: &str, ports: &[(String, u16, String)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "containerPort": p, "protocol": proto}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
        "spec": {"containers": [{"name": "serve", "image": "agnhost", "ports": ports}]}})
}

fn default_ports() -> Vec<(String, u16, String)> {
    SERVED
        .iter()
        .map(|(n, p, proto)| (n.to_string(), *p, proto.name().to_string()))
        .collect()
}

/// Serves TCP and UDP on 80 and 81 inside `ns`, answering every connection and datagram with
/// the pod's key (`x/a`), so a probe knows who answered.
fn serve(ns: &Netns, key: &str) {
    for port in SERVED_PORTS {
        let k = key.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        ns.spawn(move || {
            let l = TcpListener::bind(("0.0.0.0", port)).expect("binding a TCP port");
            tx.send(()).unwrap();
            for s in l.incoming().flatten() {
                let k = k.clone();
                std::thread::spawn(move || {
                    let mut s = s;
                    let _ = s.write_all(k.as_bytes());
                });
            }
        });
        rx.recv().unwrap();
        let k = key.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        ns.spawn(move || {
            let u = UdpSocket::bind(("0.0.0.0", port)).expect("binding a UDP port");
            tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(k.as_bytes(), from);
            }
        });
        rx.recv().unwrap();
    }
}

/// One probe attempt from the calling thread's namespace: who answered, if anyone.
fn attempt(to: Ipv4Addr, port: u16, proto: &str) -> Option<String> {
    let addr = SocketAddr::from((to, port));
    match proto {
        "TCP" => {
            let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).ok()?;
            s.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out)
        }
        "UDP" => {
            let u = UdpSocket::bind("0.0.0.0:0").ok()?;
            u.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
            u.send_to(b"probe", addr).ok()?;
            let mut buf = [0u8; 512];
            let deadline = Instant::now() + PROBE_TIMEOUT;
            while Instant::now() < deadline {
                let (n, from) = u.recv_from(&mut buf).ok()?;
                if from == addr {
                    return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            None
        }
        "SCTP" => sctp_attempt(addr),
        _ => None,
    }
}

/// SCTP: a connect (INIT, INIT-ACK, COOKIE) is the probe: the handshake only completes when
/// the packets pass both ways.
fn sctp_attempt(addr: SocketAddr) -> Option<String> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd < 0 {
        return None;
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: PROBE_TIMEOUT.as_secs() as i64,
        tv_usec: 0,
    };
    let SocketAddr::V4(a) = addr else { return None };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: valid option and address of the sizes passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        if libc::connect(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            return None;
        }
    }
    Some(String::new())
}

/// A probe from the namespace at `ns_path`: whether the intended pod (`want`) answered, within
/// the attempts.
pub fn probe(ns_path: &str, to: Ipv4Addr, port: u16, proto: &str, want: &str) -> bool {
    let (ns_path, proto, want) = (ns_path.to_string(), proto.to_string(), want.to_string());
    std::thread::spawn(move || {
        crate::netns::enter(&ns_path);
        (0..PROBE_ATTEMPTS).any(|_| match attempt(to, port, &proto) {
            // SCTP answers with the handshake only.
            Some(who) => proto == "SCTP" || who == want,
            None => false,
        })
    })
    .join()
    .unwrap_or(false)
}

impl NetpolCluster {
    /// Brings the cluster up: 3 nodes, 9 pods at their addresses, serving, known to every
    /// agent.
    pub fn new() -> Result<Self> {
        let cluster = Cluster::new(ClusterOptions {
            nodes: 3,
            numbered_subnets: true,
            ..Default::default()
        });
        let layout = Layout::standard(BTreeMap::new());
        // Namespaces and Pod objects first: the pods are compiled with their labels at once.
        let mut objects = Vec::new();
        for ns in NAMESPACES {
            objects.push(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"ns": ns}}}));
            for p in PODS {
                objects.push(pod_object(ns, p, &default_ports()));
            }
        }
        let mut nc = Self {
            cluster,
            pods: BTreeMap::new(),
            layout,
        };
        nc.apply_json(&objects)?;
        let want: Vec<(String, Ipv4Addr)> = nc
            .layout
            .pods
            .iter()
            .map(|(k, ip)| (k.clone(), *ip))
            .collect();
        for (key, ip) in want {
            let node = ip.octets()[2] as usize - 1;
            let (ns, name) = key.split_once('/').expect("ns/pod");
            let (i, got) = nc.cluster.add_named_pod(node, ns, name, Some(ip));
            if got != ip {
                bail!("{key}: asked for {ip}, the CNI plugin gave {got}");
            }
            let pod = &nc.cluster.nodes[node].pods[i];
            serve(&pod.ns, &key);
            nc.pods.insert(
                key.clone(),
                RunnerPod {
                    key: key.clone(),
                    ip,
                    node,
                    ns_path: pod.ns.path(),
                },
            );
        }
        // Every agent publishes its pods' addresses; wait until all 9 are in etcd, then until
        // every agent enforces that revision.
        let client = nc.etcd_client();
        let dir = store::k8s_prefix(FLANNEL_PREFIX);
        let rev = nc.cluster.in_underlay(move || -> Result<i64> {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let (rev, kvs) = client.range_prefix(&format!("{dir}podips/"))?;
                if kvs.len() >= 9 {
                    return Ok(rev);
                }
                if Instant::now() > deadline {
                    bail!("only {} pod addresses published in 30 s", kvs.len());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })?;
        nc.wait_enforced(rev)?;
        Ok(nc)
    }

    pub fn etcd_client(&self) -> EtcdClient {
        EtcdClient::new(&[self.cluster.etcd.endpoint()]).expect("etcd client")
    }

    /// `weft policy apply` of JSON objects: validated, written; returns the etcd revision.
    pub fn apply_json(&self, objects: &[Value]) -> Result<i64> {
        let text: String = objects.iter().map(|o| o.to_string() + "\n").collect();
        self.apply_text(&text)
    }

    pub fn apply_text(&self, text: &str) -> Result<i64> {
        let objects = store::parse_documents(text)?;
        let client = self.etcd_client();
        self.cluster
            .in_underlay(move || store::apply(&client, FLANNEL_PREFIX, &objects, "default"))
    }

    pub fn delete_keys(&self, keys: Vec<store::Key>) -> Result<i64> {
        let client = self.etcd_client();
        self.cluster
            .in_underlay(move || store::delete(&client, FLANNEL_PREFIX, &keys))
    }

    /// Waits until every node's maps hold etcd revision `rev` (the agents write it into their
    /// pinned `WEFT_POLICY_CONFIG` once applied).
    pub fn wait_enforced(&self, rev: i64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &self.cluster.nodes {
            loop {
                let got = node
                    .maps()
                    .policy_config()
                    .map(|c| c.datastore_revision)
                    .unwrap_or(0);
                if got >= rev as u64 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} enforces etcd revision {got}, not {rev}, after 30 s\n{}",
                        node.name,
                        node.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// Runs one case: apply, converge, probe (all at once), compare, remove.
    pub fn run_case(&self, case: &Case) -> Result<CaseResult> {
        let mut error = None;
        // Per-pod named ports.
        let mut renamed = Vec::new();
        for (key, decls) in &case.pod_ports {
            let (ns, name) = key.split_once('/').context("pod_ports key")?;
            let ports: Vec<(String, u16, String)> = decls
                .iter()
                .map(|d| (d.name.clone(), d.port, d.protocol.clone()))
                .collect();
            renamed.push(pod_object(ns, name, &ports));
        }
        if !renamed.is_empty() {
            let rev = self.apply_json(&renamed)?;
            self.wait_enforced(rev)?;
        }
        let policies: Vec<Value> = case
            .policies
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(p).expect("serializable");
                v["kind"] = json!("NetworkPolicy");
                v["apiVersion"] = json!("networking.k8s.io/v1");
                v
            })
            .collect();
        let mut applied_keys = Vec::new();
        if !policies.is_empty() {
            match self.apply_json(&policies) {
                Ok(rev) => {
                    if case.expect_api_rejection {
                        error = Some(
                            "expected the API to reject the policies; all were accepted".into(),
                        );
                    }
                    let objects = store::parse_documents(
                        &policies.iter().map(|p| p.to_string()).collect::<String>(),
                    )?;
                    applied_keys = store::validate(&objects, "default")?;
                    self.wait_enforced(rev)?;
                }
                Err(e) => {
                    if !case.expect_api_rejection {
                        error = Some(format!("policies rejected: {e:#}"));
                    }
                }
            }
        } else if case.expect_api_rejection {
            error = Some("expected the API to reject the policies; there are none".into());
        }
        let results: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = case
                .probes
                .iter()
                .map(|p| {
                    let from = &self.pods[&p.from];
                    let to = &self.pods[&p.to];
                    s.spawn(move || probe(&from.ns_path, to.ip, p.port, &p.proto, &to.key))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(false))
                .collect()
        });
        let wrong = case
            .probes
            .iter()
            .zip(results)
            .filter(|(p, observed)| p.allowed != *observed)
            .map(|(p, observed)| WrongProbe {
                from: p.from.clone(),
                to: p.to.clone(),
                port: p.port,
                proto: p.proto.clone(),
                expected: p.allowed,
                observed,
            })
            .collect();
        if !applied_keys.is_empty() {
            let rev = self.delete_keys(applied_keys)?;
            self.wait_enforced(rev)?;
        }
        if !case.pod_ports.is_empty() {
            let restore: Vec<Value> = case
                .pod_ports
                .keys()
                .map(|k| {
                    let (ns, name) = k.split_once('/').expect("checked");
                    pod_object(ns, name, &default_ports())
                })
                .collect();
            let rev = self.apply_json(&restore)?;
            self.wait_enforced(rev)?;
        }
        Ok(CaseResult {
            name: case.name.clone(),
            probes: case.probes.len(),
            wrong,
            error,
        })
    }
}

/// Runs the case files, printing a line per case; returns the report.
pub fn run_files(
    files: &[std::path::PathBuf],
    mut on_line: impl FnMut(&str),
) -> Result<cases::Report> {
    let mut all = Vec::new();
    for f in files {
        all.extend(cases::load_file(f)?);
    }
    let started = Instant::now();
    let nc = NetpolCluster::new()?;
    on_line(&format!(
        "cluster up in {:.1} s: 3 nodes, 9 pods",
        started.elapsed().as_secs_f64()
    ));
    let mut report = cases::Report::default();
    for case in &all {
        let t = Instant::now();
        let r = nc.run_case(case)?;
        on_line(&format!(
            "{} [{:.1} s]",
            r.line(),
            t.elapsed().as_secs_f64()
        ));
        report.push(r);
    }
    Ok(report)
}

//! NetworkPolicy end to end, on the truth-table runner's cluster (`weft_tests::netpol`: 3 nodes,
//! etcd datastore, pods x/a .. z/c at fixed addresses serving TCP and UDP 80 and 81):
//!
//! - every case file of the repository (`tests/netpol/*.json`) through the real datapath;
//! - beyond the matrix: a pod and a namespace relabelled; the node and kubelet-probe path; a
//!   hostNetwork client; a new pod isolated when CNI ADD returns; an established flow cut by a
//!   policy change; agents restarted with policies in place under a prober (no window of
//!   openness); 100 policy changes under flows (no allowed packet lost);
//!   `weft policy apply`, show (by name and address), an invalid file refused, delete;
//! - a real agent with a rule map too small for a pod's policy: closed, counted, logged.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weft_agent::{datastore::etcd::EtcdClient, netpol::store, policy::cases};
use weft_common::policy::{POLICY_F_INGRESS_FAILED, POLICY_F_INGRESS_ISOLATED, POLICY_F_PENDING};
use weft_tests::{
    cluster::{Cluster, ClusterOptions, FLANNEL_PREFIX, binary},
    netpol::{NetpolCluster, pod_object, probe},
};

#[test]
fn repository_case_files_hold_in_the_datapath() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("netpol");
    let files = cases::case_files(&dir).unwrap();
    let started = Instant::now();
    let report = weft_tests::netpol::run_files(&files, |l| println!("{l}")).unwrap();
    println!(
        "{} cases, {} probes, {} wrong, in {:.0} s",
        report.cases.len(),
        report.total_probes,
        report.wrong_probes,
        started.elapsed().as_secs_f64()
    );
    assert!(report.cases.len() >= 100);
    let failed: Vec<String> = report
        .cases
        .iter()
        .filter(|c| !c.wrong.is_empty() || c.error.is_some())
        .map(|c| c.line())
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

fn netpol(name: &str, ns: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

struct Env {
    nc: NetpolCluster,
}

impl Env {
    fn apply(&self, objects: &[Value]) {
        let rev = self.nc.apply_json(objects).unwrap();
        self.nc.wait_enforced(rev).unwrap();
    }

    fn delete_policy(&self, ns: &str, name: &str) {
        let rev = self
            .nc
            .delete_keys(vec![weft_agent::netpol::store::Key::NetworkPolicy {
                namespace: ns.into(),
                name: name.into(),
            }])
            .unwrap();
        self.nc.wait_enforced(rev).unwrap();
    }

    /// A TCP probe on port 80 from pod `from` (or a namespace path) to pod `to`.
    fn tcp(&self, from: &str, to: &str) -> bool {
        let ns = match self.nc.pods.get(from) {
            Some(p) => p.ns_path.clone(),
            None => from.to_string(),
        };
        let to = &self.nc.pods[to];
        probe(&ns, to.ip, 80, "TCP", &to.key)
    }

    /// The etcd store's current revision.
    fn etcd_revision(&self) -> i64 {
        let client = self.nc.etcd_client();
        self.nc
            .cluster
            .in_underlay(move || client.range_prefix("/").unwrap().0)
    }

    fn node_ns(&self, i: usize) -> String {
        self.nc.cluster.nodes[i].ns.path()
    }
}

/// Sends UDP requests from pod namespace `ns` to `to:80` (a new socket, so a new flow, each
/// time) until `stop`, counting answers and silences.
fn udp_prober(
    ns: String,
    to: Ipv4Addr,
    timeout: Duration,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, Arc<AtomicU64>, std::thread::JoinHandle<()>) {
    let (ok, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (o, l) = (ok.clone(), lost.clone());
    let h = std::thread::spawn(move || {
        weft_tests::netns::enter(&ns);
        let addr = SocketAddr::from((to, 80));
        while !stop.load(Ordering::Relaxed) {
            let u = UdpSocket::bind("0.0.0.0:0").unwrap();
            u.set_read_timeout(Some(timeout)).unwrap();
            let _ = u.send_to(b"probe", addr);
            let mut buf = [0u8; 64];
            match u.recv_from(&mut buf) {
                Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                Err(_) => l.fetch_add(1, Ordering::Relaxed),
            };
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    (ok, lost, h)
}

#[test]
fn beyond_the_matrix() {
    let mut env = Env {
        nc: NetpolCluster::new().unwrap(),
    };

    // --- A pod relabelled: x/a takes ingress from pod=b only; x/c becomes pod=b and back.
    env.apply(&[netpol(
        "from-b",
        "x",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    )]);
    assert!(env.tcp("x/b", "x/a"));
    assert!(!env.tcp("x/c", "x/a"));
    let mut relabelled = pod_object("x", "c", &[]);
    relabelled["metadata"]["labels"] = json!({"pod": "b"});
    env.apply(&[relabelled]);
    assert!(env.tcp("x/c", "x/a"), "x/c relabelled pod=b");
    env.apply(&[pod_object("x", "c", &[])]);
    assert!(!env.tcp("x/c", "x/a"), "x/c back to pod=c");
    env.delete_policy("x", "from-b");

    // --- A namespace relabelled: x/a takes ingress from namespaces team=blue.
    env.apply(&[netpol(
        "from-blue",
        "x",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]}),
    )]);
    assert!(!env.tcp("z/a", "x/a"));
    env.apply(&[json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "z", "labels": {"ns": "z", "team": "blue"}}})]);
    assert!(env.tcp("z/a", "x/a"), "z labelled team=blue");
    assert!(!env.tcp("y/a", "x/a"));
    env.apply(&[json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "z", "labels": {"ns": "z"}}})]);
    assert!(!env.tcp("z/a", "x/a"), "z unlabelled");
    env.delete_policy("x", "from-blue");

    // --- Default deny ingress in x: the pod's own node (kubelet probes) still gets in, another
    // node does not. A hostNetwork client is its node's address: a selector matching its
    // labels does not let it in, an ipBlock of its node's address does.
    env.apply(&[
        netpol("deny-all", "x", json!({"podSelector": {}})),
        netpol(
            "from-pod-a",
            "y",
            json!({"podSelector": {"matchLabels": {"pod": "b"}},
                   "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
        ),
        {
            let mut h = pod_object("x", "hostnet", &[]);
            h["metadata"]["labels"] = json!({"pod": "a"});
            h["spec"]["hostNetwork"] = json!(true);
            h["spec"]["nodeName"] = json!("node-2");
            h
        },
    ]);
    // x/a lives on node-1 (index 0); y/b on node-3 (index 2).
    assert!(env.tcp(&env.node_ns(0), "x/a"), "kubelet probe from node-1");
    assert!(!env.tcp(&env.node_ns(1), "x/a"), "node-2 into x/a");
    assert!(
        !env.tcp(&env.node_ns(1), "y/b"),
        "hostNetwork pod=a on node-2 into y/b"
    );
    assert!(env.tcp("x/a", "y/b"), "the pod x/a into y/b");
    assert!(env.tcp(&env.node_ns(2), "y/b"), "y/b's own node");
    let node2 = env.nc.cluster.nodes[1].ip;
    env.apply(&[netpol(
        "from-node-2",
        "y",
        json!({"podSelector": {"matchLabels": {"pod": "b"}},
               "ingress": [{"from": [{"ipBlock": {"cidr": format!("{node2}/32")}}]}]}),
    )]);
    assert!(
        env.tcp(&env.node_ns(1), "y/b"),
        "ipBlock of node-2's address"
    );

    // --- A new pod is isolated when CNI ADD returns (x has a default deny ingress): its
    // state is in the maps, written by the plugin, before the agent compiled it.
    let (_, ip) = env
        .nc
        .cluster
        .add_named_pod(0, "x", "new", Some(Ipv4Addr::new(10, 244, 1, 9)));
    let st = env.nc.cluster.nodes[0]
        .maps()
        .policy_endpoint(ip)
        .unwrap()
        .expect("a policy state when ADD returned");
    assert_ne!(st.flags & POLICY_F_INGRESS_ISOLATED, 0, "{st:?}");
    // Until the agent compiles it (it learns the pod from its own publisher through etcd), it
    // is pending; then it has its real state, still isolated by deny-all.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = env.nc.cluster.nodes[0]
            .maps()
            .policy_endpoint(ip)
            .unwrap()
            .unwrap();
        if st.flags & POLICY_F_PENDING == 0 {
            assert_ne!(st.flags & POLICY_F_INGRESS_ISOLATED, 0, "{st:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never compiled the new pod"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    for name in ["from-pod-a", "from-node-2"] {
        env.delete_policy("y", name);
    }
    env.delete_policy("x", "deny-all");

    // --- An established flow that a policy change denies is cut at its next packet.
    let yb = env.nc.pods["y/b"].ip;
    let ns_xa = env.nc.pods["x/a"].ns_path.clone();
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let flow = std::thread::spawn(move || {
        weft_tests::netns::enter(&ns_xa);
        let u = UdpSocket::bind("0.0.0.0:45678").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let addr = SocketAddr::from((yb, 80));
        let mut buf = [0u8; 64];
        for _ in 0..2 {
            let _ = go_rx.recv();
            let _ = u.send_to(b"x", addr);
            tx.send(u.recv_from(&mut buf).is_ok()).unwrap();
        }
    });
    go_tx.send(()).unwrap();
    assert!(rx.recv().unwrap(), "the flow works");
    env.apply(&[netpol("deny-y", "y", json!({"podSelector": {}}))]);
    go_tx.send(()).unwrap();
    assert!(
        !rx.recv().unwrap(),
        "the established flow was cut by the new policy"
    );
    flow.join().unwrap();
    env.delete_policy("y", "deny-y");

    // --- Agents restarted with policies in place, a prober running throughout: y/b takes
    // x/a only. Nothing x/c sends may get in at any time.
    env.apply(&[netpol(
        "only-xa",
        "y",
        json!({"podSelector": {"matchLabels": {"pod": "b"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}},
                                      "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
    )]);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok_a, lost_a, ha) = udp_prober(
        env.nc.pods["x/a"].ns_path.clone(),
        yb,
        Duration::from_millis(500),
        stop.clone(),
    );
    let (ok_c, lost_c, hc) = udp_prober(
        env.nc.pods["x/c"].ns_path.clone(),
        yb,
        Duration::from_millis(100),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..3 {
        env.nc.cluster.restart_agent(i);
        // The restarted agent reports the etcd revision it enforces once it adopted the maps.
        let deadline = Instant::now() + Duration::from_secs(30);
        while env.nc.cluster.nodes[i]
            .maps()
            .policy_config()
            .map(|c| c.datastore_revision)
            .unwrap_or(0)
            == 0
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    ha.join().unwrap();
    hc.join().unwrap();
    let (oa, la, oc, lc) = (
        ok_a.load(Ordering::Relaxed),
        lost_a.load(Ordering::Relaxed),
        ok_c.load(Ordering::Relaxed),
        lost_c.load(Ordering::Relaxed),
    );
    println!("agent restarts: allowed {oa} answered, {la} lost; denied {oc} answered, {lc} silent");
    assert_eq!(oc, 0, "a denied flow got through during the restarts");
    assert!(lc >= 10 && oa >= 10, "the prober ran ({oa}, {lc})");
    assert_eq!(la, 0, "allowed probes lost during the restarts");

    // --- 100 policy changes while flows run: x/a -> y/b is allowed by every version.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok_a, lost_a, ha) = udp_prober(
        env.nc.pods["x/a"].ns_path.clone(),
        yb,
        Duration::from_millis(500),
        stop.clone(),
    );
    for i in 0..100u16 {
        let spec = json!({"podSelector": {"matchLabels": {"pod": "b"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}},
                                   "podSelector": {"matchLabels": {"pod": "a"}}},
                                  {"podSelector": {"matchLabels": {"pod": format!("v{i}")}}}],
                         "ports": [{"protocol": "UDP", "port": 80}, {"port": 1000 + i}]}]});
        let mut objects = vec![netpol("churn", "y", spec)];
        if i % 2 == 0 {
            objects.push(netpol(
                &format!("other-{i}"),
                "z",
                json!({"podSelector": {"matchLabels": {"pod": "c"}}}),
            ));
        }
        env.nc.apply_json(&objects).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    ha.join().unwrap();
    let (oa, la) = (ok_a.load(Ordering::Relaxed), lost_a.load(Ordering::Relaxed));
    println!("policy churn: allowed {oa} answered, {la} lost");
    assert!(oa > 10, "the prober ran");
    assert_eq!(la, 0, "allowed packets lost under policy churn");

    // --- `weft policy` as an operator runs it: apply a YAML file to etcd, read x/c's effective
    // rules back from its node's maps (by name and by address), refuse an invalid file
    // (nothing written), delete by file.
    let dir = std::env::temp_dir().join(format!("weft-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("web.yaml");
    let yaml = [
        "# x/c takes TCP 80 from pod=a only",
        "apiVersion: networking.k8s.io/v1",
        "kind: NetworkPolicy",
        "metadata: {name: cli-web, namespace: x}",
        "spec:",
        "  podSelector: {matchLabels: {pod: c}}",
        "  ingress:",
        "  - from: [{podSelector: {matchLabels: {pod: a}}}]",
        "    ports: [{port: 80}]",
        "---",
        "# z/a may send anywhere (isolates nothing)",
        "apiVersion: networking.k8s.io/v1",
        "kind: NetworkPolicy",
        "metadata: {name: cli-out, namespace: z}",
        "spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{}]}",
    ];
    std::fs::write(&good, yaml.join("\n") + "\n").unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "cli-bad", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{"from": [
                {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}})
        .to_string(),
    )
    .unwrap();
    let etcd = env.nc.cluster.etcd.endpoint();
    let weft = |args: &[&str]| -> std::process::Output {
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if matches!(args.get(1), Some(&"apply") | Some(&"delete")) {
            a.extend([
                "--etcd-endpoints".into(),
                etcd.clone(),
                "--etcd-prefix".into(),
                FLANNEL_PREFIX.into(),
            ]);
        }
        env.nc.cluster.in_underlay(move || {
            std::process::Command::new(binary("weft"))
                .args(&a)
                .output()
                .unwrap()
        })
    };
    let revision_of = |out: &std::process::Output| -> i64 {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "weft failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("etcd revision "))
            .and_then(|r| r.trim().parse().ok())
            .unwrap_or_else(|| panic!("no revision in {stdout}"))
    };
    let out = weft(&["policy", "apply", "-f", good.to_str().unwrap()]);
    let rev = revision_of(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("networkpolicy x/cli-web configured")
            && stdout.contains("networkpolicy z/cli-out configured"),
        "{stdout}"
    );
    env.nc.wait_enforced(rev).unwrap();
    assert!(env.tcp("x/a", "x/c"), "x/a -> x/c allowed by cli-web");
    assert!(!env.tcp("x/b", "x/c"), "x/b -> x/c denied by cli-web");
    // x/c lives on node-2 (index 1).
    let pins = env.nc.cluster.nodes[1]
        .pins
        .path
        .to_str()
        .unwrap()
        .to_string();
    let (xa, xb, xc) = (
        env.nc.pods["x/a"].ip,
        env.nc.pods["x/b"].ip,
        env.nc.pods["x/c"].ip,
    );
    for who in ["x/c".to_string(), xc.to_string()] {
        let out = weft(&["--pin-root", &pins, "--json", "policy", &who]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ep = &v["endpoints"][0];
        assert_eq!(ep["pod"], "x/c", "{v}");
        assert_eq!(ep["ingress"]["isolated"], true, "{v}");
        assert_eq!(ep["egress"]["isolated"], false, "{v}");
        let allow = ep["ingress"]["allow"].as_array().unwrap();
        let peers = |a: &Value| -> Vec<String> {
            a["peers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string())
                .collect()
        };
        assert!(
            allow.iter().any(|a| peers(a).contains(&xa.to_string())
                && a["protocol"] == "TCP"
                && a["ports"] == json!(["80"])),
            "x/a on TCP 80 not among x/c's allowances: {v}"
        );
        assert!(
            !allow.iter().any(|a| peers(a).contains(&xb.to_string())),
            "x/b allowed into x/c: {v}"
        );
    }
    let table = weft(&["--pin-root", &pins, "policy", "x/c"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("ingress: isolated") && table.contains(&xa.to_string()),
        "{table}"
    );
    // Invalid: refused with the API server's message, nothing written.
    let before = env.etcd_revision();
    let out = weft(&["policy", "apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "spec.ingress[0].from[0]: Forbidden: may not specify both ipBlock and another peer"
        ),
        "{stderr}"
    );
    assert_eq!(env.etcd_revision(), before, "an invalid file wrote to etcd");
    let rev = revision_of(&weft(&["policy", "delete", "-f", good.to_str().unwrap()]));
    env.nc.wait_enforced(rev).unwrap();
    assert!(env.tcp("x/b", "x/c"), "x/b -> x/c after the delete");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A real agent whose rule map is too small for a pod's policy: the pod is closed in that
/// direction (never open), `weft_policy_failed_endpoints` counts it and the log names it.
#[test]
fn a_full_policy_map_closes_the_endpoint_with_a_metric_and_a_log_line() {
    let mut cluster = Cluster::new(ClusterOptions {
        nodes: 1,
        numbered_subnets: true,
        agent_args: vec!["--policy-rules-max".into(), "16".into()],
        ..Default::default()
    });
    cluster.wait_ready(0);
    let (_, ip) = cluster.add_named_pod(0, "x", "t", None);
    // 30 ipBlocks, each on its own port: 30 classes, 30 rule entries into a map of 16 (the
    // smallest the flag takes).
    let rules: Vec<Value> = (0..30)
        .map(|i| {
            json!({"from": [{"ipBlock": {"cidr": format!("10.{}.0.0/16", 100 + i)}}],
                        "ports": [{"port": 1000 + i}]})
        })
        .collect();
    let text: String = [
        pod_object("x", "t", &[]),
        netpol("many", "x", json!({"podSelector": {}, "ingress": rules})),
    ]
    .iter()
    .map(|o| o.to_string() + "\n")
    .collect();
    let objects = store::parse_documents(&text).unwrap();
    let client = EtcdClient::new(&[cluster.etcd.endpoint()]).unwrap();
    cluster
        .in_underlay(move || store::apply(&client, FLANNEL_PREFIX, &objects, "default").unwrap());
    let node = &cluster.nodes[0];
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.metric("weft_policy_failed_endpoints") != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "weft_policy_failed_endpoints never became 1\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = node
        .maps()
        .policy_endpoint(ip)
        .unwrap()
        .expect("a policy state");
    assert_ne!(st.flags & POLICY_F_INGRESS_FAILED, 0, "{st:?}");
    let log = node.log();
    assert!(
        log.lines().any(|l| l.contains("policy rules do not fit")
            && l.contains(&ip.to_string())
            && l.contains("WEFT_POLICY_RULES")),
        "no log line names {ip}:\n{log}"
    );
}

//! NetworkPolicy's Kubernetes source (kube-rs reflectors through the datastore's watch loop)
//! against recorded API server responses over HTTPS: the lists of Pods, Namespaces and
//! NetworkPolicies in the shapes the API server returns (a Pod with its status, named ports of
//! containers and a sidecar, a hostNetwork pod, a pod without an address), then watch events: a
//! pod relabelled, a namespace relabelled, a policy changed and deleted, a pod deleted. The
//! events the controller gets must say exactly that; `Synced` comes once every kind is listed.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, TcpListener},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use serde_json::{Value, json};
use weft_agent::{
    datastore::kube::KubeSource,
    netpol::{controller::PolicyEvent, kube_source},
    policy::model::{NamedPort, Protocol},
};
use weft_tests::{cni::TempDir, pki};

fn pod(ns: &str, name: &str, labels: Value, ip: Option<&str>, rv: &str) -> Value {
    let mut p = json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": rv, "labels": labels,
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2024-01-01T00:00:00Z"},
            "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
        "spec": {"nodeName": "node-1", "containers": [
            {"name": "web", "image": "nginx", "ports": [
                {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                {"containerPort": 9090},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}],
            "initContainers": [{"name": "sidecar", "image": "envoy", "restartPolicy": "Always",
                "ports": [{"name": "admin", "containerPort": 15000}]}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    });
    if let Some(ip) = ip {
        p["status"]["podIP"] = json!(ip);
        p["status"]["podIPs"] = json!([{"ip": ip}]);
    }
    p
}

fn namespace(name: &str, labels: Value, rv: &str) -> Value {
    json!({"kind": "Namespace", "apiVersion": "v1",
        "metadata": {"name": name, "resourceVersion": rv, "labels": labels},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

fn netpol(name: &str, port: u16, rv: &str) -> Value {
    json!({"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
        "metadata": {"name": name, "namespace": "x", "resourceVersion": rv},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}],
                         "ports": [{"port": port}]}]}})
}

fn list(kind: &str, api: &str, items: Vec<Value>) -> String {
    json!({"kind": kind, "apiVersion": api, "metadata": {"resourceVersion": "100"}, "items": items})
        .to_string()
}

fn watch_lines(events: &[(&str, Value)]) -> String {
    events
        .iter()
        .map(|(t, o)| format!("{}\n", json!({"type": t, "object": o})))
        .collect()
}

struct Served {
    path: &'static str,
    list: String,
    watch: String,
}

/// HTTPS on loopback: lists and one watch per path, then idle watches.
fn serve(ca: &pki::Ca, routes: Vec<Served>) -> (String, Arc<Mutex<Vec<String>>>) {
    let tls = pki::server_config(&ca.issue("kube-apiserver", &["127.0.0.1"], true, false));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let routes = Arc::new(Mutex::new(routes));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let reqs = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (routes, tls, reqs) = (routes.clone(), tls.clone(), reqs.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(tls).unwrap();
                let mut stream = rustls::StreamOwned::new(conn, stream);
                let mut reader = BufReader::new(&mut stream);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() || line.is_empty() {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                }
                drop(reader);
                let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
                reqs.lock().unwrap().push(target.clone());
                let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                let (body, hang) = {
                    let mut r = routes.lock().unwrap();
                    match r.iter_mut().find(|s| s.path == path) {
                        Some(s) if query.contains("watch=true") => {
                            let w = std::mem::take(&mut s.watch);
                            let hang = w.is_empty();
                            (w, hang)
                        }
                        Some(s) => (s.list.clone(), false),
                        None => (String::new(), false),
                    }
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{body}"
                );
                let _ = stream.flush();
                if hang {
                    std::thread::sleep(Duration::from_secs(20));
                }
                stream.conn.send_close_notify();
                let _ = stream.flush();
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink);
            });
        }
    });
    (url, requests)
}

#[test]
fn pods_namespaces_and_policies_from_recorded_api_responses() {
    let dir = TempDir::new("weft-kube-policy-");
    let ca = pki::Ca::new("kubernetes");
    let ca_path = dir.path.join("ca.crt");
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    let web = pod(
        "x",
        "web-1",
        json!({"app": "web"}),
        Some("10.244.1.5"),
        "10",
    );
    let routes = vec![
        Served {
            path: "/api/v1/pods",
            list: list(
                "PodList",
                "v1",
                vec![
                    web.clone(),
                    pod("x", "starting", json!({"app": "web"}), None, "11"),
                    {
                        let mut h = pod(
                            "kube-system",
                            "proxy",
                            json!({"app": "proxy"}),
                            Some("192.168.1.1"),
                            "12",
                        );
                        h["spec"]["hostNetwork"] = json!(true);
                        h
                    },
                ],
            ),
            watch: watch_lines(&[
                (
                    "MODIFIED",
                    pod(
                        "x",
                        "web-1",
                        json!({"app": "web", "tier": "fe"}),
                        Some("10.244.1.5"),
                        "110",
                    ),
                ),
                (
                    "DELETED",
                    pod("x", "starting", json!({"app": "web"}), None, "111"),
                ),
            ]),
        },
        Served {
            path: "/api/v1/namespaces",
            list: list(
                "NamespaceList",
                "v1",
                vec![namespace(
                    "x",
                    json!({"kubernetes.io/metadata.name": "x"}),
                    "5",
                )],
            ),
            watch: watch_lines(&[(
                "MODIFIED",
                namespace(
                    "x",
                    json!({"kubernetes.io/metadata.name": "x", "team": "blue"}),
                    "120",
                ),
            )]),
        },
        Served {
            path: "/apis/networking.k8s.io/v1/networkpolicies",
            list: list(
                "NetworkPolicyList",
                "networking.k8s.io/v1",
                vec![netpol("web", 80, "7"), {
                    // Invalid for weft (an empty peer): logged and skipped, the rest applies.
                    let mut bad = netpol("bad", 80, "8");
                    bad["spec"]["ingress"][0]["from"] = json!([{}]);
                    bad
                }],
            ),
            watch: watch_lines(&[
                ("MODIFIED", netpol("web", 8080, "130")),
                ("DELETED", netpol("web", 8080, "131")),
            ]),
        },
    ];
    let (url, requests) = serve(&ca, routes);
    let kubeconfig = dir.path.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {url}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: ctx\n  context: {{cluster: c, user: u}}\ncurrent-context: ctx\n",
            ca_path.display()
        ),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let source = KubeSource {
        api: None,
        kubeconfig: Some(kubeconfig),
    };
    let client = rt.block_on(source.client()).unwrap();
    let (tx, rx) = mpsc::channel();
    kube_source::spawn(rt.handle(), source, client, tx);
    let mut events = Vec::new();
    while let Ok(ev) = rx.recv_timeout(Duration::from_secs(5)) {
        events.push(ev);
        if events.len() >= 12 {
            break;
        }
    }
    let find = |pred: &dyn Fn(&PolicyEvent) -> bool| events.iter().position(pred);
    // The pod list: the running pod with its address, node and named ports (sidecar's too;
    // the unnamed port is not one), the pod without an address, the hostNetwork pod.
    let pods = events
        .iter()
        .find_map(|e| match e {
            PolicyEvent::Pods(p) => Some(p.clone()),
            _ => None,
        })
        .expect("a pod snapshot");
    let web_rec = pods.iter().find(|p| p.name == "web-1").expect("web-1");
    assert_eq!(web_rec.ip, Some(Ipv4Addr::new(10, 244, 1, 5)));
    assert_eq!(web_rec.node, "node-1");
    assert_eq!(web_rec.labels.get("app").map(String::as_str), Some("web"));
    let mut ports = web_rec.ports.clone();
    ports.sort();
    assert_eq!(
        ports,
        vec![
            NamedPort {
                name: "admin".into(),
                protocol: Protocol::Tcp,
                port: 15000
            },
            NamedPort {
                name: "dns".into(),
                protocol: Protocol::Udp,
                port: 53
            },
            NamedPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080
            },
        ]
    );
    assert_eq!(pods.iter().find(|p| p.name == "starting").unwrap().ip, None);
    assert!(
        pods.iter()
            .find(|p| p.name == "proxy")
            .unwrap()
            .host_network
    );
    // The policy list: the valid one only.
    let policies = events
        .iter()
        .find_map(|e| match e {
            PolicyEvent::Policies(p) => Some(p.clone()),
            _ => None,
        })
        .expect("a policy snapshot");
    assert_eq!(policies.len(), 1, "{policies:?}");
    assert_eq!(policies[0].name, "web");
    let synced = find(&|e| matches!(e, PolicyEvent::Synced)).expect("Synced");
    for (what, i) in [
        ("pods", find(&|e| matches!(e, PolicyEvent::Pods(_)))),
        (
            "namespaces",
            find(&|e| matches!(e, PolicyEvent::Namespaces(_))),
        ),
        ("policies", find(&|e| matches!(e, PolicyEvent::Policies(_)))),
    ] {
        assert!(
            i.unwrap() < synced,
            "Synced before the {what} list: {events:?}"
        );
    }
    // Watch events: relabels and changes as they happened.
    assert!(
        events.iter().any(|e| matches!(e, PolicyEvent::PodUpsert(p)
            if p.name == "web-1" && p.labels.get("tier").map(String::as_str) == Some("fe"))),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, PolicyEvent::PodRemove { name, .. } if name == "starting"))
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, PolicyEvent::NamespaceUpsert(n, l)
        if n == "x" && l.get("team").map(String::as_str) == Some("blue")))
    );
    let changed = find(&|e| matches!(e, PolicyEvent::PolicyUpsert(p) if p.name == "web"))
        .expect("policy change");
    let removed = find(&|e| matches!(e, PolicyEvent::PolicyRemove { name, .. } if name == "web"))
        .expect("policy delete");
    assert!(changed < removed);
    let reqs = requests.lock().unwrap().clone();
    for path in [
        "/api/v1/pods",
        "/api/v1/namespaces",
        "/apis/networking.k8s.io/v1/networkpolicies",
    ] {
        assert!(
            reqs.iter()
                .any(|r| r.starts_with(path) && r.contains("watch=true")),
            "{reqs:?}"
        );
    }
    rt.shutdown_background();
}

//! The Kubernetes datastore (kube-rs) against recorded API server responses, served over HTTPS
//! with a private CA by a scripted server on loopback: the node's own podCIDR and annotation
//! publishing, the initial list in two pages, watch events (add, update, delete, bookmark), a
//! watch re-opened from the last version, resource version expiry (410 Gone, as a watch event
//! and as an HTTP status) answered by a relist, a rotated service-account token re-read from
//! its file once the server refuses the old one, a server whose certificate is not signed by
//! the cluster's CA refused, and the node's own labels (the bgp backend's peer selection).
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use serde_json::{Value, json};
use weft_agent::{
    config::{BackendType, FlannelNetConf},
    datastore::{
        Datastore, Event, LocalNode, NodeLease,
        kube::{KubeDatastore, KubeSource},
    },
    node_net::vtep_mac_for,
};
use weft_tests::{
    cni::TempDir,
    pki::{self, Ca},
};

/// When node-a, node-b, ... were created: a day apart, in that order.
fn created(name: &str) -> String {
    let day = name.bytes().last().unwrap() - b'a' + 1;
    format!("2025-01-{day:02}T00:00:00Z")
}

fn node(name: &str, cidr: &str, ip: &str, annotations: Value, rv: &str) -> Value {
    json!({
        "kind": "Node", "apiVersion": "v1",
        "metadata": {"name": name, "resourceVersion": rv, "annotations": annotations,
            "creationTimestamp": created(name), "uid": format!("uid-{name}")},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}
    })
}

fn node_a() -> Value {
    let mut n = node("node-a", "10.244.1.0/24", "192.168.1.1", json!({}), "90");
    // Matched by the bgp backend's `Peers[].NodeSelector`.
    n["metadata"]["labels"] = json!({"rack": "r1", "kubernetes.io/hostname": "node-a"});
    n
}
fn node_b(ip_override: &str) -> Value {
    node(
        "node-b",
        "10.244.2.0/24",
        "192.168.1.2",
        json!({
            "flannel.alpha.coreos.com/backend-type": "vxlan",
            "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"aa:bb:cc:dd:ee:02\"}",
            "flannel.alpha.coreos.com/public-ip-overwrite": ip_override,
        }),
        "95",
    )
}
fn node_c(rv: &str) -> Value {
    node(
        "node-c",
        "10.244.3.0/24",
        "192.168.1.3",
        json!({"weft.io/backend-type": "ipip"}),
        rv,
    )
}
fn node_d() -> Value {
    node("node-d", "10.244.4.0/24", "192.168.1.4", json!({}), "180")
}

fn list(rv: &str, items: Vec<Value>) -> String {
    json!({"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items})
        .to_string()
}

/// A first page of a paginated list: the API server's `continue` token, no final version yet.
fn first_page(continue_token: &str, items: Vec<Value>) -> String {
    json!({"kind": "NodeList", "apiVersion": "v1",
        "metadata": {"resourceVersion": "100", "continue": continue_token, "remainingItemCount": 1},
        "items": items})
    .to_string()
}

fn status(code: u16, reason: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{reason}"), "reason": reason, "code": code})
    .to_string()
}

fn watch_lines(events: &[(&str, Value)]) -> String {
    events
        .iter()
        .map(|(t, o)| format!("{}\n", json!({"type": t, "object": o})))
        .collect()
}

fn next(rx: &mpsc::Receiver<Event>) -> Event {
    rx.recv_timeout(Duration::from_secs(10))
        .expect("an event from the kube datastore")
}

/// The record of node-a (10.244.1.0/24), node-b (10.244.2.0/24), ...
fn lease(cidr: &str, ip: [u8; 4], backend: Option<BackendType>, mac: Option<[u8; 6]>) -> NodeLease {
    let subnet: ipnet::Ipv4Net = cidr.parse().unwrap();
    let name = format!("node-{}", (b'a' + subnet.network().octets()[2] - 1) as char);
    let seniority = created(&name)
        .parse::<k8s_openapi::jiff::Timestamp>()
        .unwrap()
        .as_second();
    NodeLease {
        subnet,
        public_ip: Ipv4Addr::from(ip),
        backend,
        vtep_mac: mac,
        node_name: Some(name.clone()),
        name,
        seniority,
        unknown_backend: None,
    }
}

fn sorted(mut v: Vec<NodeLease>) -> Vec<NodeLease> {
    v.sort_by_key(|l| l.subnet);
    v
}

/// What the scripted server answers, in order, for each kind of request.
#[derive(Default)]
struct Script {
    /// List responses (the last one repeats).
    lists: Vec<String>,
    /// Watch responses (status, body); with none left a watch stays open until `release`.
    watches: Vec<(u16, String)>,
    requests: Vec<String>,
    patches: Vec<String>,
    auth: Vec<String>,
    /// The only bearer token accepted, when set.
    token: Option<String>,
}

/// The scripted API server: HTTPS on loopback with a certificate of `ca`.
struct ApiServer {
    script: Arc<Mutex<Script>>,
    /// Ends the open watches.
    release: Arc<AtomicBool>,
    url: String,
}

impl ApiServer {
    fn start(ca: &Ca, script: Script) -> Self {
        let tls = pki::server_config(&ca.issue("kube-apiserver", &["127.0.0.1"], true, false));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let script = Arc::new(Mutex::new(script));
        let release = Arc::new(AtomicBool::new(false));
        {
            let (script, release) = (script.clone(), release.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let (script, release, tls) = (script.clone(), release.clone(), tls.clone());
                    std::thread::spawn(move || {
                        let conn = rustls::ServerConnection::new(tls).unwrap();
                        let mut stream = rustls::StreamOwned::new(conn, stream);
                        handle(&mut stream, &script, &release);
                        // A close-delimited body ends with TLS close_notify, not just EOF.
                        stream.conn.send_close_notify();
                        let _ = stream.flush();
                    });
                }
            });
        }
        Self {
            script,
            release,
            url,
        }
    }
}

fn handle(stream: &mut (impl Read + Write), script: &Mutex<Script>, release: &AtomicBool) {
    let mut reader = BufReader::new(&mut *stream);
    let mut request_line = String::new();
    // A client that refused our certificate never sends a request.
    if reader.read_line(&mut request_line).is_err() || request_line.is_empty() {
        return;
    }
    let mut content_length = 0;
    let mut auth = String::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        if h.trim().is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap();
        }
        if lower.starts_with("authorization:") {
            auth = h["authorization:".len()..].trim().to_string();
        }
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body).unwrap();
    drop(reader);
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let (status_code, response, hang) = {
        let mut s = script.lock().unwrap();
        s.requests.push(format!("{method} {target}"));
        s.auth.push(auth.clone());
        if s.token
            .as_ref()
            .is_some_and(|t| auth != format!("Bearer {t}"))
        {
            (401, status(401, "Unauthorized"), false)
        } else if method == "PATCH" {
            s.patches.push(String::from_utf8_lossy(&body).into_owned());
            (200, node_a().to_string(), false)
        } else if path == "/api/v1/nodes/node-a" {
            (200, node_a().to_string(), false)
        } else if path == "/api/v1/nodes" && query.contains("watch=true") {
            if s.watches.is_empty() {
                (200, String::new(), true)
            } else {
                let (st, b) = s.watches.remove(0);
                (st, b, false)
            }
        } else if path == "/api/v1/nodes" {
            let l = if s.lists.len() > 1 {
                s.lists.remove(0)
            } else {
                s.lists[0].clone()
            };
            (200, l, false)
        } else {
            (404, status(404, "NotFound"), false)
        }
    };
    let reason = match status_code {
        200 => "OK",
        401 => "Unauthorized",
        410 => "Gone",
        _ => "Not Found",
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status_code} {reason}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{response}"
    );
    let _ = stream.flush();
    if hang {
        // An idle watch stays open (until released or 20 s, as a server's timeout would).
        for _ in 0..200 {
            if release.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A kubeconfig whose current context uses `server` with `ca` and the given user fields; a
/// decoy first context points elsewhere (only the current context counts).
fn kubeconfig(dir: &Path, server: &str, ca: &Path, user: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: decoy
  cluster:
    server: https://192.0.2.1:6443
- name: test
  cluster:
    server: {server}
    certificate-authority: {}
users:
- name: decoy
  user:
    token: wrong
- name: agent
  user:
{user}
contexts:
- name: decoy
  context: {{cluster: decoy, user: decoy}}
- name: weft
  context: {{cluster: test, user: agent}}
current-context: weft
",
            ca.display()
        ),
    )
    .unwrap();
    path
}

fn local_node() -> LocalNode {
    let ip = Ipv4Addr::new(192, 168, 1, 1);
    LocalNode {
        name: "node-a".into(),
        public_ip: ip,
        backend: BackendType::Vxlan,
        vtep_mac: vtep_mac_for(ip),
        previous_subnet: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn list_watch_events_and_relist_on_410() {
    let ca = Ca::new("cluster-ca");
    let server = ApiServer::start(
        &ca,
        Script {
            lists: vec![
                first_page("page-2", vec![node_a()]),
                list("100", vec![node_b("10.9.9.2")]),
                list("200", vec![node_a(), node_d()]),
                list("300", vec![node_a(), node_d()]),
            ],
            watches: vec![
                (
                    200,
                    watch_lines(&[
                        ("ADDED", node_c("101")),
                        ("MODIFIED", node_b("10.9.9.22")),
                        ("DELETED", node_c("103")),
                        (
                            "BOOKMARK",
                            json!({"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": "150"}}),
                        ),
                    ]),
                ),
                (
                    200,
                    watch_lines(&[(
                        "ERROR",
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": "too old resource version: 150 (180)", "reason": "Expired", "code": 410}),
                    )]),
                ),
                (410, status(410, "Expired")),
            ],
            ..Default::default()
        },
    );
    let dir = TempDir::new("weft-kube-");
    let ca_file = pki::write(&dir.path, "ca.crt", &ca.cert_pem());
    let kubeconfig = kubeconfig(&dir.path, &server.url, &ca_file, "    token: t0ken");
    let rt = runtime();
    let mut ds = KubeDatastore::new(
        KubeSource {
            api: None,
            kubeconfig: Some(kubeconfig),
        },
        rt.handle().clone(),
    )
    .unwrap();
    let conf = FlannelNetConf::parse(r#"{"Network": "10.244.0.0/16"}"#).unwrap();
    assert_eq!(
        ds.acquire(&local_node(), &conf).unwrap(),
        "10.244.1.0/24".parse().unwrap()
    );
    {
        let s = server.script.lock().unwrap();
        assert_eq!(s.patches.len(), 1);
        let patch: Value = serde_json::from_str(&s.patches[0]).unwrap();
        let ann = &patch["metadata"]["annotations"];
        for prefix in ["weft.io/", "flannel.alpha.coreos.com/"] {
            assert_eq!(ann[format!("{prefix}backend-type")], "vxlan");
            assert_eq!(ann[format!("{prefix}public-ip")], "192.168.1.1");
            let data: Value =
                serde_json::from_str(ann[format!("{prefix}backend-data")].as_str().unwrap())
                    .unwrap();
            assert_eq!(data, json!({"VNI": 1, "VtepMAC": "02:57:c0:a8:01:01"}));
        }
        assert!(s.auth.iter().all(|a| a == "Bearer t0ken"), "{:?}", s.auth);
    }

    let (tx, rx) = mpsc::channel();
    Box::new(ds).run(tx).unwrap();
    let flannel_mac = Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x02]);
    let a = lease("10.244.1.0/24", [192, 168, 1, 1], None, None);
    assert_eq!(next(&rx), Event::Connected(true));
    match next(&rx) {
        Event::Snapshot(l) => assert_eq!(
            sorted(l),
            vec![
                a.clone(),
                lease(
                    "10.244.2.0/24",
                    [10, 9, 9, 2],
                    Some(BackendType::Vxlan),
                    flannel_mac
                )
            ]
        ),
        e => panic!("expected the initial list, got {e:?}"),
    }
    assert_eq!(
        next(&rx),
        Event::Upsert(lease(
            "10.244.3.0/24",
            [192, 168, 1, 3],
            Some(BackendType::Ipip),
            None
        ))
    );
    assert_eq!(
        next(&rx),
        Event::Upsert(lease(
            "10.244.2.0/24",
            [10, 9, 9, 22],
            Some(BackendType::Vxlan),
            flannel_mac
        ))
    );
    assert_eq!(next(&rx), Event::Remove("node-c".into()));
    // The watch from the bookmark's version says 410: relist.
    assert_eq!(next(&rx), Event::Connected(true));
    let d = lease("10.244.4.0/24", [192, 168, 1, 4], None, None);
    assert_eq!(next(&rx), Event::Snapshot(vec![a.clone(), d.clone()]));
    // The next watch is refused with HTTP 410: relist again.
    assert_eq!(next(&rx), Event::Connected(true));
    assert_eq!(next(&rx), Event::Snapshot(vec![a, d]));
    // Then the watch from the newest list stays open and quiet.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());

    server.release.store(true, Ordering::Relaxed);
    let s = server.script.lock().unwrap();
    let watches: Vec<&String> = s
        .requests
        .iter()
        .filter(|r| r.contains("watch=true"))
        .collect();
    assert_eq!(watches.len(), 4, "{:?}", s.requests);
    for (w, rv) in watches.iter().zip(["100", "150", "200", "300"]) {
        assert!(
            w.contains(&format!("resourceVersion={rv}")),
            "{w} should resume from {rv}"
        );
        assert!(w.contains("allowWatchBookmarks=true"), "{w}");
    }
    let lists: Vec<&String> = s
        .requests
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/nodes?") && !r.contains("watch=true"))
        .collect();
    // Two pages, then two relists.
    assert_eq!(lists.len(), 4, "{:?}", s.requests);
    assert!(lists[1].contains("continue=page-2"), "{}", lists[1]);
    assert!(s.auth.iter().all(|a| a == "Bearer t0ken"));
}

#[test]
fn kube_source_refuses_what_it_cannot_speak() {
    let rt = runtime();
    for bad in ["ftp://10.0.0.1:6443", "not a url"] {
        let err = rt
            .block_on(
                KubeSource {
                    api: Some(bad.into()),
                    kubeconfig: None,
                }
                .client(),
            )
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("--kube-api"), "{err:#}");
    }
    let err = rt
        .block_on(
            KubeSource {
                api: None,
                kubeconfig: Some("/nonexistent/kubeconfig".into()),
            }
            .client(),
        )
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("--kubeconfig"), "{err:#}");
}

#[test]
fn rotated_token_file_is_reread_when_the_old_token_is_refused() {
    let ca = Ca::new("cluster-ca");
    let server = ApiServer::start(
        &ca,
        Script {
            lists: vec![
                list("100", vec![node_a()]),
                list("200", vec![node_a(), node_d()]),
            ],
            token: Some("old-token".into()),
            ..Default::default()
        },
    );
    let dir = TempDir::new("weft-kube-token-");
    let ca_file = pki::write(&dir.path, "ca.crt", &ca.cert_pem());
    let token_file = dir.path.join("token");
    std::fs::write(&token_file, "old-token").unwrap();
    let kubeconfig = kubeconfig(
        &dir.path,
        &server.url,
        &ca_file,
        &format!("    tokenFile: {}", token_file.display()),
    );
    let rt = runtime();
    let ds = KubeDatastore::new(
        KubeSource {
            api: None,
            kubeconfig: Some(kubeconfig),
        },
        rt.handle().clone(),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    Box::new(ds).run(tx).unwrap();
    let a = lease("10.244.1.0/24", [192, 168, 1, 1], None, None);
    let first = next(&rx);
    assert_eq!(
        first,
        Event::Connected(true),
        "{:?}",
        server.script.lock().unwrap().requests
    );
    assert_eq!(next(&rx), Event::Snapshot(vec![a.clone()]));
    // The token rotates (as the kubelet rotates projected tokens); the server refuses the old
    // one from now on and ends the open watch.
    std::fs::write(&token_file, "new-token").unwrap();
    server.script.lock().unwrap().token = Some("new-token".into());
    server.release.store(true, Ordering::Relaxed);
    let d = lease("10.244.4.0/24", [192, 168, 1, 4], None, None);
    // A refusal is a lost connection until the client has re-read the token and relisted.
    let mut refused = 0;
    loop {
        match rx
            .recv_timeout(Duration::from_secs(15))
            .expect("recovery after the rotation")
        {
            Event::Connected(false) => refused += 1,
            Event::Connected(true) => break,
            e => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(next(&rx), Event::Snapshot(vec![a, d]));
    let s = server.script.lock().unwrap();
    assert!(
        refused >= 1,
        "the old token was never refused: {:?}",
        s.auth
    );
    let last = s.auth.last().unwrap();
    assert_eq!(last, "Bearer new-token", "{:?}", s.auth);
}

#[test]
fn https_trusts_only_the_cluster_ca() {
    let ca = Ca::new("cluster-ca");
    let other = Ca::new("other-ca");
    let server = ApiServer::start(
        &ca,
        Script {
            lists: vec![list("1", vec![])],
            ..Default::default()
        },
    );
    let rt = runtime();
    let client_with = |ca: &Ca, name: &str| {
        let dir = TempDir::new(&format!("weft-kube-ca-{name}-"));
        let ca_file = pki::write(&dir.path, "ca.crt", &ca.cert_pem());
        let kubeconfig = kubeconfig(&dir.path, &server.url, &ca_file, "    token: t");
        let ds = KubeDatastore::new(
            KubeSource {
                api: None,
                kubeconfig: Some(kubeconfig),
            },
            rt.handle().clone(),
        )
        .unwrap();
        let client = ds.client().clone();
        rt.block_on(async move {
            kube::Api::<k8s_openapi::api::core::v1::Node>::all(client)
                .get("node-a")
                .await
        })
    };
    let node = client_with(&ca, "good").expect("HTTPS with the cluster CA");
    assert_eq!(node.metadata.name.as_deref(), Some("node-a"));
    let err = client_with(&other, "other").unwrap_err();
    assert!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "{err:?}"
    );
}

/// Node objects no node may route, as an API server returns them, through the datastore and
/// the control loop: refused with their reasons, the rest routed; a refused node whose rival
/// goes is routed then.
#[test]
fn bad_node_records_from_the_api_server_are_refused() {
    use std::{sync::Arc, time::Instant};

    use weft_agent::{
        control_loop::{ControlLoop, mode_policy},
        metrics::Metrics,
        node_net::Underlay,
        reconcile::{MemoryMaps, Reconciler},
    };
    let flannel = |ip: &str, backend: &str| json!({"flannel.alpha.coreos.com/public-ip": ip, "flannel.alpha.coreos.com/backend-type": backend});
    let bad_node = |name: &str, cidr: &str, ip: &str, ann: Value| node(name, cidr, ip, ann, "99");
    let ca = Ca::new("cluster-ca");
    let server = ApiServer::start(
        &ca,
        Script {
            lists: vec![list(
                "100",
                vec![
                    node_a(),
                    node_b("10.9.9.2"),
                    bad_node("node-e", "0.0.0.0/0", "192.168.1.50", json!({})),
                    bad_node("node-f", "10.96.0.0/12", "192.168.1.51", json!({})),
                    bad_node("node-g", "169.254.169.254/32", "192.168.1.52", json!({})),
                    // Created after node-b (its name sorts later), claiming node-b's /24.
                    bad_node("node-h", "10.244.2.0/24", "192.168.1.53", json!({})),
                    bad_node(
                        "node-i",
                        "10.244.9.0/24",
                        "192.168.1.54",
                        flannel("", "wireguard"),
                    ),
                    bad_node("node-j", "10.244.10.0/24", "10.244.77.1", json!({})),
                    // Records that cannot be made: an address annotation that is not one, and
                    // a node with a podCIDR but no address at all.
                    bad_node(
                        "node-k",
                        "10.244.11.0/24",
                        "192.168.1.55",
                        json!({"weft.io/public-ip": "192.168.1"}),
                    ),
                    json!({
                        "kind": "Node", "apiVersion": "v1",
                        "metadata": {"name": "node-l", "resourceVersion": "99",
                            "creationTimestamp": created("node-l"), "uid": "uid-node-l"},
                        "spec": {"podCIDR": "10.244.12.0/24", "podCIDRs": ["10.244.12.0/24"]},
                        "status": {"addresses": [{"type": "Hostname", "address": "node-l"}]}
                    }),
                    node_c("98"),
                ],
            )],
            ..Default::default()
        },
    );
    let dir = TempDir::new("weft-kube-bad-");
    let ca_file = pki::write(&dir.path, "ca.crt", &ca.cert_pem());
    let kubeconfig = kubeconfig(&dir.path, &server.url, &ca_file, "    token: t0ken");
    let rt = runtime();
    let ds = KubeDatastore::new(
        KubeSource {
            api: None,
            kubeconfig: Some(kubeconfig),
        },
        rt.handle().clone(),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    Box::new(ds).run(tx).unwrap();
    let conf = FlannelNetConf::parse(r#"{"Network": "10.244.0.0/16"}"#).unwrap();
    let underlay = Underlay {
        name: "eth0".into(),
        ifindex: 2,
        mtu: 1500,
        node_ip: Ipv4Addr::new(192, 168, 1, 1),
        subnet: "192.168.1.0/24".parse().unwrap(),
    };
    let metrics = Arc::new(Metrics::new(None));
    let rec = Reconciler::new(
        mode_policy(&conf, &underlay, Default::default()),
        "10.244.1.0/24".parse().unwrap(),
        underlay.node_ip,
    );
    let mut l = ControlLoop::new(
        MemoryMaps::default(),
        rec,
        conf,
        underlay,
        metrics.clone(),
        Duration::from_secs(30),
        Instant::now(),
    );
    let rejected = |reason: &'static str| {
        metrics
            .rejected_records
            .get_or_create(&vec![("reason", reason)])
            .get()
    };
    let routes = |l: &ControlLoop<MemoryMaps>| -> Vec<(String, Ipv4Addr)> {
        l.maps
            .routes
            .iter()
            .map(|(n, r)| (n.to_string(), Ipv4Addr::from(r.node_ip)))
            .collect()
    };
    // Turns the loop on the events as they come (the watch after the list stays open and quiet).
    let turn_until = |l: &mut ControlLoop<MemoryMaps>,
                      what: &str,
                      done: &dyn Fn(&ControlLoop<MemoryMaps>) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done(l) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            let events: Vec<Event> = rx
                .recv_timeout(Duration::from_millis(100))
                .into_iter()
                .collect();
            l.turn(events, Instant::now()).unwrap();
        }
    };
    // The list (the unreadable records follow its snapshot).
    turn_until(&mut l, "the list", &|l| {
        l.rec.synced && rejected("unreadable") == 2
    });
    // node-b holds its subnet; the others are refused, with their reasons.
    assert_eq!(
        routes(&l),
        vec![
            ("10.244.2.0/24".into(), Ipv4Addr::new(10, 9, 9, 2)),
            ("10.244.3.0/24".into(), Ipv4Addr::new(192, 168, 1, 3)),
        ]
    );
    assert_eq!(rejected("outside_network"), 3);
    assert_eq!(rejected("overlaps_node"), 1);
    assert_eq!(rejected("unknown_backend"), 1);
    assert_eq!(rejected("public_ip_in_pod_network"), 1);
    assert_eq!(rejected("unreadable"), 2);
    assert_eq!(l.maps.nodes.len(), 2);
    // The API server deletes node-b, fixes node-k's annotation and deletes node-l (the open
    // watch ends, the next one says so).
    let fixed_k = bad_node(
        "node-k",
        "10.244.11.0/24",
        "192.168.1.55",
        json!({"weft.io/public-ip": "192.168.1.56"}),
    );
    let node_l = json!({"kind": "Node", "apiVersion": "v1",
        "metadata": {"name": "node-l", "resourceVersion": "101"}});
    server.script.lock().unwrap().watches.push((
        200,
        watch_lines(&[
            ("DELETED", node_b("10.9.9.2")),
            ("MODIFIED", fixed_k),
            ("DELETED", node_l),
        ]),
    ));
    server.release.store(true, Ordering::Relaxed);
    turn_until(&mut l, "node-h and node-k routed, node-l gone", &|l| {
        routes(l).len() == 3
            && routes(l)
                .iter()
                .any(|(_, ip)| *ip == Ipv4Addr::new(192, 168, 1, 53))
            && rejected("unreadable") == 0
    });
    // node-b is gone: node-h, refused as the younger claim until now, holds the subnet;
    // node-k is readable now and routed; node-l is gone and no longer counted.
    assert_eq!(
        routes(&l),
        vec![
            ("10.244.2.0/24".into(), Ipv4Addr::new(192, 168, 1, 53)),
            ("10.244.3.0/24".into(), Ipv4Addr::new(192, 168, 1, 3)),
            ("10.244.11.0/24".into(), Ipv4Addr::new(192, 168, 1, 56)),
        ]
    );
    assert_eq!(rejected("overlaps_node"), 0);
    assert_eq!(rejected("outside_network"), 3);
    assert!(l.maps.nodes.keys().all(|ip| {
        [
            Ipv4Addr::new(192, 168, 1, 53),
            Ipv4Addr::new(192, 168, 1, 3),
            Ipv4Addr::new(192, 168, 1, 56),
        ]
        .contains(ip)
    }));
}

/// The bgp backend matches `Peers[].NodeSelector` against the node's labels, read from its
/// Node object when `--node-labels` is not given.
#[test]
fn node_labels_come_from_the_node_object() {
    let ca = Ca::new("cluster-ca");
    let server = ApiServer::start(
        &ca,
        Script {
            lists: vec![list("1", vec![])],
            ..Default::default()
        },
    );
    let dir = TempDir::new("weft-kube-labels-");
    let ca_file = pki::write(&dir.path, "ca.crt", &ca.cert_pem());
    let source = KubeSource {
        api: None,
        kubeconfig: Some(kubeconfig(&dir.path, &server.url, &ca_file, "    token: t")),
    };
    let rt = runtime();
    let labels = rt
        .block_on(async {
            let client = source.client().await?;
            weft_agent::datastore::kube::node_labels(&client, "node-a").await
        })
        .unwrap();
    assert_eq!(labels.get("rack").map(String::as_str), Some("r1"));
    assert_eq!(labels.len(), 2, "{labels:?}");
    let missing = rt.block_on(async {
        let client = source.client().await?;
        weft_agent::datastore::kube::node_labels(&client, "node-x").await
    });
    assert!(
        format!("{:#}", missing.unwrap_err()).contains("node-x"),
        "the error names the node"
    );
}

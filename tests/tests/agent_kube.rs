//! The Kubernetes datastore against recorded API server responses, served by a scripted HTTP
//! server on loopback: the node's own podCIDR and annotation publishing, the initial list,
//! watch events (add, update, delete, bookmark), a watch re-opened from the last version, and
//! resource version expiry (410 Gone, as a watch event and as an HTTP status) answered by a
//! relist.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use serde_json::{Value, json};
use weft_agent::{
    config::{BackendType, FlannelNetConf},
    datastore::{
        Datastore, Event, LocalNode, NodeLease,
        kube::{KubeClient, KubeDatastore},
    },
    node_net::vtep_mac_for,
};

fn node(name: &str, cidr: &str, ip: &str, annotations: Value, rv: &str) -> Value {
    json!({
        "kind": "Node", "apiVersion": "v1",
        "metadata": {"name": name, "resourceVersion": rv, "annotations": annotations},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}
    })
}

fn node_a() -> Value {
    node("node-a", "10.244.1.0/24", "192.168.1.1", json!({}), "90")
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

fn watch_lines(events: &[(&str, Value)]) -> String {
    events
        .iter()
        .map(|(t, o)| format!("{}\n", json!({"type": t, "object": o})))
        .collect()
}

/// What the scripted server answers, in order, for each kind of request.
struct Script {
    lists: Vec<String>,
    watches: Vec<(u16, String)>,
    requests: Vec<String>,
    patches: Vec<String>,
    auth: Vec<String>,
}

fn handle(mut stream: TcpStream, script: Arc<Mutex<Script>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
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
            auth = h.trim().to_string();
        }
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body).unwrap();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let (status, response, hang) = {
        let mut s = script.lock().unwrap();
        s.requests.push(format!("{method} {path}"));
        s.auth.push(auth);
        if method == "PATCH" {
            s.patches.push(String::from_utf8_lossy(&body).into_owned());
            (200, node_a().to_string(), false)
        } else if path == "/api/v1/nodes/node-a" {
            (200, node_a().to_string(), false)
        } else if path == "/api/v1/nodes" {
            let l = if s.lists.len() > 1 {
                s.lists.remove(0)
            } else {
                s.lists[0].clone()
            };
            (200, l, false)
        } else if path.starts_with("/api/v1/nodes?watch=true") {
            if s.watches.is_empty() {
                (200, String::new(), true)
            } else {
                let (st, b) = s.watches.remove(0);
                (st, b, false)
            }
        } else {
            (404, "{}".into(), false)
        }
    };
    let reason = if status == 200 { "OK" } else { "Gone" };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{response}"
    );
    let _ = stream.flush();
    if hang {
        // The last watch stays open, as an idle watch does.
        std::thread::sleep(Duration::from_secs(20));
    }
}

fn next(rx: &mpsc::Receiver<Event>) -> Event {
    rx.recv_timeout(Duration::from_secs(10))
        .expect("an event from the kube datastore")
}

fn lease(cidr: &str, ip: [u8; 4], backend: Option<BackendType>, mac: Option<[u8; 6]>) -> NodeLease {
    NodeLease {
        subnet: cidr.parse().unwrap(),
        public_ip: Ipv4Addr::from(ip),
        backend,
        vtep_mac: mac,
    }
}

fn sorted(mut v: Vec<NodeLease>) -> Vec<NodeLease> {
    v.sort_by_key(|l| l.subnet);
    v
}

#[test]
fn list_watch_events_and_relist_on_410() {
    let script = Arc::new(Mutex::new(Script {
        lists: vec![
            list("100", vec![node_a(), node_b("10.9.9.2")]),
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
                        json!({"kind": "Node", "metadata": {"resourceVersion": "150"}}),
                    ),
                ]),
            ),
            (
                200,
                watch_lines(&[(
                    "ERROR",
                    json!({"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410}),
                )]),
            ),
            (
                410,
                json!({"kind": "Status", "code": 410, "reason": "Expired"}).to_string(),
            ),
        ],
        requests: vec![],
        patches: vec![],
        auth: vec![],
    }));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    {
        let script = script.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let script = script.clone();
                std::thread::spawn(move || handle(stream, script));
            }
        });
    }
    let kubeconfig = std::env::temp_dir().join(format!("weft-kubeconfig-{}", std::process::id()));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nclusters:\n- cluster:\n    server: http://{addr}\n  name: test\nusers:\n- name: agent\n  user:\n    token: t0ken\n"
        ),
    )
    .unwrap();
    let client = KubeClient::new(None, Some(&kubeconfig)).unwrap();
    let _ = std::fs::remove_file(&kubeconfig);
    let mut ds = KubeDatastore::new(client);
    let conf = FlannelNetConf::parse(r#"{"Network": "10.244.0.0/16"}"#).unwrap();
    let ip = Ipv4Addr::new(192, 168, 1, 1);
    let local = LocalNode {
        name: "node-a".into(),
        public_ip: ip,
        backend: BackendType::Vxlan,
        vtep_mac: vtep_mac_for(ip),
        previous_subnet: None,
    };
    assert_eq!(
        ds.acquire(&local, &conf).unwrap(),
        "10.244.1.0/24".parse().unwrap()
    );
    {
        let s = script.lock().unwrap();
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
        assert!(
            s.auth.iter().all(|a| a == "Authorization: Bearer t0ken"),
            "{:?}",
            s.auth
        );
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
    assert_eq!(next(&rx), Event::Remove("10.244.3.0/24".parse().unwrap()));
    // The watch from the bookmark's version says 410: relist.
    assert_eq!(next(&rx), Event::Connected(true));
    let d = lease("10.244.4.0/24", [192, 168, 1, 4], None, None);
    assert_eq!(next(&rx), Event::Snapshot(vec![a.clone(), d.clone()]));
    // The next watch is refused with HTTP 410: relist again.
    assert_eq!(next(&rx), Event::Connected(true));
    assert_eq!(next(&rx), Event::Snapshot(vec![a, d]));
    // Then the watch from the newest list stays open and quiet.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());

    let s = script.lock().unwrap();
    let watches: Vec<&String> = s
        .requests
        .iter()
        .filter(|r| r.contains("watch=true"))
        .collect();
    assert_eq!(watches.len(), 4, "{:?}", s.requests);
    for (w, rv) in watches.iter().zip(["100", "150", "200", "300"]) {
        assert!(
            w.ends_with(&format!("resourceVersion={rv}")),
            "{w} should resume from {rv}"
        );
        assert!(w.contains("allowWatchBookmarks=true"), "{w}");
    }
    assert_eq!(
        s.requests
            .iter()
            .filter(|r| *r == "GET /api/v1/nodes")
            .count(),
        3
    );
}

#[test]
fn kube_client_refuses_what_it_cannot_speak() {
    let err = KubeClient::new(Some("https://10.0.0.1:6443"), None)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("--kube-api"), "{err:#}");
}

/// An `openssl s_server -HTTP` on loopback, killed by pid on drop.
struct TlsServer {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA named `name` (`name.crt`, `name.key`).
fn ca(dir: &std::path::Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

/// A server certificate for 127.0.0.1 signed by CA `ca` (`server.crt`, `server.key`).
fn server_cert(dir: &std::path::Path, ca: &str) {
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            "server.crt",
            "-extfile",
            "server.ext",
        ],
    );
}

#[test]
fn https_trusts_only_the_cluster_ca() {
    let dir = std::env::temp_dir().join(format!("weft-kube-tls-{}", std::process::id()));
    let www = dir.join("www");
    std::fs::create_dir_all(www.join("api/v1/nodes")).unwrap();
    // `s_server -HTTP` sends the file as the whole response.
    std::fs::write(
        www.join("api/v1/nodes/node-a"),
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{}",
            node_a()
        ),
    )
    .unwrap();
    ca(&dir, "cluster");
    ca(&dir, "other");
    server_cert(&dir, "cluster");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-HTTP",
            "-accept",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("-cert")
        .arg(dir.join("server.crt"))
        .arg("-key")
        .arg(dir.join("server.key"))
        .current_dir(&www)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let server = TlsServer {
        child,
        dir: dir.clone(),
    };
    weft_tests::process::wait_until("the TLS server", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let client_with = |ca: &str| {
        let kubeconfig = server.dir.join(format!("kubeconfig-{ca}"));
        std::fs::write(
            &kubeconfig,
            format!(
                "clusters:\n- cluster:\n    certificate-authority: {}\n    server: https://127.0.0.1:{port}\n",
                server.dir.join(format!("{ca}.crt")).display()
            ),
        )
        .unwrap();
        KubeClient::new(None, Some(&kubeconfig)).unwrap()
    };
    let node = client_with("cluster")
        .get_node("node-a")
        .expect("HTTPS with the cluster CA");
    assert_eq!(node["metadata"]["name"], "node-a");
    let err = client_with("other").get_node("node-a").unwrap_err();
    assert!(
        format!("{err:#}").to_lowercase().contains("certificate"),
        "{err:#}"
    );
}

//! The etcd datastore against an etcd that serves HTTPS with a private CA and requires client
//! certificates, then also etcd's own users: the client trusts only the CA it is given, shows
//! its certificate, authenticates with a username and password, and the agent does all of it
//! from flannel's flags.
use std::{net::Ipv4Addr, time::Duration};

use serde_json::json;
use weft_agent::{
    config::{BackendType, FlannelNetConf},
    datastore::{
        Datastore, LocalNode,
        etcd::{EtcdClient, EtcdDatastore, EtcdOptions},
    },
    node_net::vtep_mac_for,
};
use weft_tests::{
    cluster::binary,
    cni::TempDir,
    etcd::{Etcd, EtcdTls},
    netns::{Netns, veth_pair},
    pins::PinDir,
    pki::{self, Ca},
    process::{NsProcess, wait_until},
};

const PREFIX: &str = "/coreos.com/network";
const ETCD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 94, 1);

#[test]
fn tls_client_certificates_and_users() {
    let dir = TempDir::new("weft-etcd-tls-");
    let ca = Ca::new("etcd-ca");
    let other = Ca::new("other-ca");
    // etcd's JSON gateway dials etcd's gRPC side with the server's own certificate: with
    // client-certificate authentication on, that certificate must be a client's too, and
    // without a common name (etcd refuses gateway requests once users are on otherwise).
    let server = ca.issue("", &["192.168.94.1"], true, true);
    // No common name either: etcd's JSON gateway refuses certificates with one once users are
    // enabled (it cannot pass the name on as the user); see agent/README.md.
    let client = ca.issue("", &[], false, true);
    let stranger = other.issue("weft-agent", &[], false, true);
    let w = |name: &str, pem: &str| pki::write(&dir.path, name, pem);
    let ca_file = w("ca.crt", &ca.cert_pem());
    let other_ca_file = w("other.crt", &other.cert_pem());
    let tls = EtcdTls {
        cert: w("server.crt", &server.cert_pem),
        key: w("server.key", &server.key_pem),
        client_ca: ca_file.clone(),
    };
    let (cert, key) = (
        w("client.crt", &client.cert_pem),
        w("client.key", &client.key_pem),
    );
    let (stranger_cert, stranger_key) = (
        w("stranger.crt", &stranger.cert_pem),
        w("stranger.key", &stranger.key_pem),
    );

    let ns = Netns::new("wet");
    let peer = Netns::new("wep");
    veth_pair(&ns, "eth0", &peer, "eth0");
    ns.ip(&format!("addr add {ETCD_IP}/24 dev eth0"));
    let etcd = Etcd::start_with(&ns, ETCD_IP, 2379, Some(tls));
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let opts = |ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path| EtcdOptions {
        ca_file: Some(ca.to_path_buf()),
        cert_file: Some(cert.to_path_buf()),
        key_file: Some(key.to_path_buf()),
        ..Default::default()
    };
    let good = opts(&ca_file, &cert, &key);
    let wrong_ca = opts(&other_ca_file, &cert, &key);
    let wrong_client = opts(&ca_file, &stranger_cert, &stranger_key);
    let no_client = EtcdOptions {
        ca_file: Some(ca_file.clone()),
        ..Default::default()
    };
    let (ep, g) = (endpoint.clone(), good.clone());
    let refusals = ns.run(move || {
        let c = EtcdClient::with_options(std::slice::from_ref(&ep), &g).unwrap();
        c.put("/weft-test/k", b"v", 0)
            .expect("put over TLS with a client certificate");
        assert_eq!(c.get("/weft-test/k").unwrap().unwrap().value, b"v");
        let refused = |o: &EtcdOptions| {
            let c = EtcdClient::with_options(std::slice::from_ref(&ep), o).unwrap();
            format!("{:#}", c.get("/weft-test/k").expect_err("refused"))
        };
        (
            refused(&wrong_ca),
            refused(&wrong_client),
            refused(&no_client),
        )
    });
    let (wrong_ca_err, wrong_client_err, no_client_err) = refusals;
    assert!(
        wrong_ca_err.to_lowercase().contains("certificate")
            || wrong_ca_err.to_lowercase().contains("issuer"),
        "a server of another CA must be refused: {wrong_ca_err}"
    );
    assert!(!wrong_client_err.is_empty() && !no_client_err.is_empty());

    // etcd's own users on top: root with a password, then authentication on.
    let (ep, g) = (endpoint.clone(), good.clone());
    ns.run(move || {
        let c = EtcdClient::with_options(std::slice::from_ref(&ep), &g).unwrap();
        c.call::<serde_json::Value>(
            "/v3/auth/user/add",
            json!({"name": "root", "password": "s3cret"}),
        )
        .unwrap();
        c.call::<serde_json::Value>(
            "/v3/auth/user/grant",
            json!({"user": "root", "role": "root"}),
        )
        .unwrap();
        c.call::<serde_json::Value>("/v3/auth/enable", json!({}))
            .unwrap();
    });
    let with_user = EtcdOptions {
        username: Some("root".into()),
        password: Some("s3cret".into()),
        ..good.clone()
    };
    let wrong_password = EtcdOptions {
        password: Some("guess".into()),
        ..with_user.clone()
    };
    let (ep, u, wp) = (endpoint.clone(), with_user.clone(), wrong_password.clone());
    let (subnet, wrong_password_err) = ns.run(move || {
        let conf = FlannelNetConf::parse(r#"{"Network": "10.80.0.0/16"}"#).unwrap();
        let mut ds =
            EtcdDatastore::with_options(std::slice::from_ref(&ep), &u, PREFIX, 30).unwrap();
        let ip = Ipv4Addr::new(192, 168, 94, 7);
        let subnet = ds
            .acquire(
                &LocalNode {
                    name: "n".into(),
                    public_ip: ip,
                    backend: BackendType::Vxlan,
                    vtep_mac: vtep_mac_for(ip),
                    previous_subnet: None,
                },
                &conf,
            )
            .expect("a lease as user root");
        let c = EtcdClient::with_options(std::slice::from_ref(&ep), &wp).unwrap();
        (
            subnet,
            format!("{:#}", c.get("/weft-test/k").expect_err("wrong password")),
        )
    });
    assert!(
        FlannelNetConf::parse(r#"{"Network": "10.80.0.0/16"}"#)
            .unwrap()
            .is_leasable(subnet)
    );
    assert!(
        wrong_password_err.contains("authentication failed")
            || wrong_password_err.contains("invalid"),
        "{wrong_password_err}"
    );

    // The agent, from flannel's flags alone.
    let node = peer;
    node.ip("addr add 192.168.94.10/24 dev eth0");
    let conf = dir.path.join("net-conf.json");
    std::fs::write(&conf, r#"{"Network": "10.81.0.0/16"}"#).unwrap();
    let pins = PinDir::new("etcdtls");
    let subnet_file = dir.path.join("subnet.env");
    let s = |p: &std::path::Path| p.display().to_string();
    let args: Vec<String> = vec![
        "--etcd-endpoints".into(),
        endpoint.clone(),
        "--etcd-cafile".into(),
        s(&ca_file),
        "--etcd-certfile".into(),
        s(&cert),
        "--etcd-keyfile".into(),
        s(&key),
        "--etcd-username".into(),
        "root".into(),
        "--net-conf".into(),
        s(&conf),
        "--iface".into(),
        "eth0".into(),
        "--node-name".into(),
        "tls-node".into(),
        "--pin-root".into(),
        s(&pins.path),
        "--subnet-file".into(),
        s(&subnet_file),
        "--no-ip-masq".into(),
    ];
    let agent = NsProcess::spawn(
        &node,
        &binary("weft-agent"),
        &args,
        &[("WEFT_ETCD_PASSWORD", "s3cret".into())],
        &dir.path.join("agent.log"),
    );
    wait_until(
        &format!("the agent's lease over TLS\n{}", agent.log()),
        Duration::from_secs(30),
        || subnet_file.exists(),
    );
    let env = weft_agent::subnet_env::SubnetEnv::read(&subnet_file).unwrap();
    let ep = endpoint.clone();
    let lease = ns.run(move || {
        let c = EtcdClient::with_options(std::slice::from_ref(&ep), &with_user).unwrap();
        c.get(&weft_agent::datastore::etcd::lease_key(PREFIX, env.subnet))
            .unwrap()
    });
    let lease = lease.expect("the agent's lease in flannel's layout");
    assert_ne!(lease.lease, 0, "attached to an etcd lease");
    drop(agent);
    drop(etcd);
}

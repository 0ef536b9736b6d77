//! `weft-agent --datastore static`: a fixed topology from a file, two nodes, no etcd.
use std::{net::Ipv4Addr, time::Duration};

use serde_json::json;
use weft_common::RouteMode;
use weft_tests::{
    cluster::{METRICS_PORT, binary},
    netns::{Netns, unique_name, veth_pair},
    pins::PinDir,
    process::{NsProcess, output_within, wait_until},
};

/// How long an agent refusing its configuration may take to exit.
const REFUSAL_WITHIN: Duration = Duration::from_secs(30);

#[test]
fn static_topology_programs_routes() {
    let a = Netns::new("sta");
    let b = Netns::new("stb");
    veth_pair(&a, "eth0", &b, "eth0");
    a.ip("addr add 192.168.90.1/24 dev eth0");
    b.ip("addr add 192.168.90.2/24 dev eth0");
    // The default route names the underlay (no --iface).
    a.ip("route add default via 192.168.90.2");
    b.ip("route add default via 192.168.90.1");
    let dir = std::env::temp_dir().join(unique_name("weft-static-"));
    std::fs::create_dir_all(&dir).unwrap();
    let topology = dir.join("nodes.json");
    std::fs::write(
        &topology,
        json!({"nodes": [
            {"name": "a", "publicIP": "192.168.90.1", "subnet": "10.70.1.0/24"},
            {"name": "b", "publicIP": "192.168.90.2", "subnet": "10.70.2.0/24", "vtepMAC": "02:00:00:00:00:bb"},
            // Entries no node may route: refused, the rest of the file still applies.
            {"name": "everything", "publicIP": "192.168.90.50", "subnet": "0.0.0.0/0"},
            {"name": "services", "publicIP": "192.168.90.51", "subnet": "10.96.0.0/12"},
            {"name": "metadata", "publicIP": "192.168.90.52", "subnet": "169.254.169.254/32"},
            // Later in the file than b, so younger: b keeps the subnet.
            {"name": "copy-of-b", "publicIP": "192.168.90.53", "subnet": "10.70.2.0/24"},
            {"name": "tunnel", "publicIP": "192.168.90.54", "subnet": "10.70.9.0/24", "backendType": "udp"},
        ]})
        .to_string(),
    )
    .unwrap();
    let conf = dir.join("net-conf.json");
    std::fs::write(
        &conf,
        r#"{"Network": "10.70.0.0/16", "Backend": {"Type": "vxlan"}}"#,
    )
    .unwrap();
    let pins = [PinDir::new("sta"), PinDir::new("stb")];
    let mut agents = Vec::new();
    for (i, (ns, name)) in [(&a, "a"), (&b, "b")].into_iter().enumerate() {
        let args: Vec<String> = [
            "--datastore",
            "static",
            "--static-file",
            topology.to_str().unwrap(),
            "--net-conf",
            conf.to_str().unwrap(),
            "--node-name",
            name,
            "--pin-root",
            pins[i].path.to_str().unwrap(),
            "--subnet-file",
            dir.join(format!("{name}.env")).to_str().unwrap(),
            "--metrics-addr",
            &format!("127.0.0.1:{METRICS_PORT}"),
            "--no-ip-masq",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        agents.push(NsProcess::spawn(
            ns,
            &binary("weft-agent"),
            &args,
            &[],
            &dir.join(format!("{name}.log")),
        ));
    }
    for (i, pin) in pins.iter().enumerate() {
        wait_until(
            &format!("agent {i} to program its peer\n{}", agents[i].log()),
            Duration::from_secs(30),
            || {
                weft_agent::datapath::Maps::open_pinned(&pin.path)
                    .and_then(|m| m.routes())
                    .is_ok_and(|r| r.len() == 1)
            },
        );
    }
    let ra = weft_agent::datapath::Maps::open_pinned(&pins[0].path)
        .unwrap()
        .routes()
        .unwrap();
    assert_eq!(ra[0].0, "10.70.2.0/24".parse().unwrap());
    assert_eq!(
        Ipv4Addr::from(ra[0].1.node_ip),
        Ipv4Addr::new(192, 168, 90, 2)
    );
    assert_eq!(ra[0].1.vtep_mac, [2, 0, 0, 0, 0, 0xbb]);
    assert_eq!(ra[0].1.mode, RouteMode::Vxlan as u8);
    let rb = weft_agent::datapath::Maps::open_pinned(&pins[1].path)
        .unwrap()
        .routes()
        .unwrap();
    assert_eq!(rb[0].0, "10.70.1.0/24".parse().unwrap());
    assert_eq!(rb[0].1.vtep_mac, [2, 0x57, 192, 168, 90, 1]);
    // Node names from the file, for `weft monitor` and `weft nodes`: the peer and the node
    // itself; refused entries name nothing.
    wait_until(
        "a to record the node names",
        Duration::from_secs(10),
        || {
            weft_agent::datapath::Maps::open_pinned(&pins[0].path)
                .and_then(|m| m.node_names())
                .is_ok_and(|n| {
                    n == vec![
                        (Ipv4Addr::new(192, 168, 90, 1), "a".to_string()),
                        (Ipv4Addr::new(192, 168, 90, 2), "b".to_string()),
                    ]
                })
        },
    );
    let weft = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(binary("weft"))
            .arg("--pin-root")
            .arg(&pins[0].path)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let nodes = weft(&["nodes"]);
    assert_eq!(nodes[0]["ip"], "192.168.90.2");
    assert_eq!(nodes[0]["name"], "b", "{nodes}");
    assert_eq!(weft(&["status"])["node_name"], "a");
    // On b the copy claims b's own subnet; on a it is the younger of two claims.
    for (ns, rival) in [(&a, "overlaps_node"), (&b, "overlaps_local_subnet")] {
        let metric = |name: &str| {
            let (_, body) = weft_tests::cluster::http_get(
                ns,
                ([127, 0, 0, 1], METRICS_PORT).into(),
                "/metrics",
            )
            .expect("metrics");
            body.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        wait_until(
            "the refused entries counted",
            Duration::from_secs(10),
            || metric("weft_rejected_node_records{reason=\"outside_network\"}") == Some(3.0),
        );
        assert_eq!(
            metric(&format!("weft_rejected_node_records{{reason=\"{rival}\"}}")),
            Some(1.0)
        );
        assert_eq!(
            metric("weft_rejected_node_records{reason=\"unknown_backend\"}"),
            Some(1.0)
        );
    }
    assert_eq!(
        weft_agent::datapath::Maps::open_pinned(&pins[0].path)
            .unwrap()
            .nodes()
            .unwrap()
            .len(),
        1
    );
    let env = weft_agent::subnet_env::SubnetEnv::read(&dir.join("a.env")).unwrap();
    assert_eq!(env.subnet, "10.70.1.0/24".parse().unwrap());
    assert!(!env.ipmasq);
    // A Backend.MTU above the underlay's (1500) minus the configured backend's overhead is
    // refused, naming it: vxlan adds 50, host-gw nothing.
    let big_mtu = dir.join("big-mtu.json");
    for (backend, mtu, max) in [("vxlan", 1451, 1450), ("host-gw", 1501, 1500)] {
        std::fs::write(
            &big_mtu,
            format!(
                r#"{{"Network": "10.70.0.0/16", "Backend": {{"Type": "{backend}", "MTU": {mtu}}}}}"#
            ),
        )
        .unwrap();
        let (refused, stderr) = refusal(&a, &topology, &big_mtu, &dir.join("big-mtu.env"));
        assert!(refused, "{backend} {mtu}");
        assert!(
            stderr.contains("Backend.MTU") && stderr.contains(&format!("at most {max}")),
            "{backend} {mtu}: {stderr}"
        );
    }
    // A bad topology is refused naming the field.
    std::fs::write(
        &topology,
        r#"{"nodes": [{"name": "a", "publicIP": "x", "subnet": "10.70.1.0/24"}]}"#,
    )
    .unwrap();
    let (refused, stderr) = refusal(&a, &topology, &conf, &dir.join("bad-topology.env"));
    assert!(refused);
    assert!(stderr.contains("nodes[0].publicIP"), "{stderr}");
    drop(agents);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs node `a`'s static agent in `ns` on `topology` and `net_conf` (its own pin root and
/// subnet file), expecting it to refuse its configuration: whether it exited with failure, and
/// its stderr (`output_within` fails the test if it still runs after `REFUSAL_WITHIN`).
fn refusal(
    ns: &Netns,
    topology: &std::path::Path,
    net_conf: &std::path::Path,
    subnet_file: &std::path::Path,
) -> (bool, String) {
    let scratch = PinDir::new("str");
    let out = output_within(
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg(binary("weft-agent"))
            .args(["--datastore", "static", "--node-name", "a", "--static-file"])
            .arg(topology)
            .arg("--net-conf")
            .arg(net_conf)
            .arg("--pin-root")
            .arg(&scratch.path)
            .arg("--subnet-file")
            .arg(subnet_file)
            .args(["--metrics-addr", "127.0.0.1:0"]),
        REFUSAL_WITHIN,
    );
    (
        !out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn install_cni_copies_the_plugin_and_writes_the_conflist() {
    let dir = std::env::temp_dir().join(unique_name("weft-install-cni-"));
    let plugin = dir.join("fake-weft-cni");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&plugin, b"#!/bin/sh\n").unwrap();
    let out = std::process::Command::new(binary("weft-agent"))
        .args([
            "--install-cni",
            "--install-cni-only",
            "--pin-root",
            "/sys/fs/bpf/weft-x",
        ])
        .arg("--cni-binary")
        .arg(&plugin)
        .arg("--cni-bin-dir")
        .arg(dir.join("bin"))
        .arg("--cni-conf-dir")
        .arg(dir.join("net.d"))
        .arg("--cni-data-dir")
        .arg(dir.join("ipam"))
        .arg("--subnet-file")
        .arg(dir.join("subnet.env"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dir.join("bin/weft-cni")).unwrap(),
        b"#!/bin/sh\n"
    );
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("net.d/10-weft.conflist")).unwrap())
            .unwrap();
    assert_eq!(conf["name"], "weft");
    assert_eq!(conf["plugins"][0]["type"], "weft-cni");
    assert_eq!(conf["plugins"][0]["pinRoot"], "/sys/fs/bpf/weft-x");
    assert_eq!(
        conf["plugins"][0]["subnetFile"],
        dir.join("subnet.env").to_str().unwrap()
    );
    // The IPAM directory the agent reads pods' namespaces from.
    assert_eq!(
        conf["plugins"][0]["dataDir"],
        dir.join("ipam").to_str().unwrap()
    );
    // Nothing else happened: no datapath, no subnet file.
    assert!(!dir.join("subnet.env").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

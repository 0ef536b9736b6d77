//! The real `weft-agent` on node namespaces sharing one etcd: distinct subnets, routes to every
//! peer, nodes joining and leaving, lease races, restarts that adopt the datapath, and an etcd
//! outage that leaves forwarding untouched.
use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use serde_json::json;
use weft_agent::{
    config::{BackendType, FlannelNetConf},
    datapath::{Maps, link_pin_path},
    datastore::{Datastore, LocalNode, NodeLease, etcd::EtcdDatastore},
    node_net::vtep_mac_for,
};
use weft_common::{CONFIG_F_READY, RouteMode, prog_names};
use weft_tests::{
    cluster::{Cluster, Node},
    process::wait_until,
};

const PREFIX: &str = "/coreos.com/network";

fn vxlan_conf() -> serde_json::Value {
    json!({"Network": "10.244.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}})
}

/// Asserts that every node routes exactly the other nodes' subnets to their addresses.
fn assert_full_mesh(c: &Cluster, mode: RouteMode) {
    let subnets: Vec<Ipv4Net> = c.nodes.iter().map(|n| n.subnet_env().subnet).collect();
    let distinct: HashSet<_> = subnets.iter().collect();
    assert_eq!(
        distinct.len(),
        subnets.len(),
        "subnets not distinct: {subnets:?}"
    );
    for (i, node) in c.nodes.iter().enumerate() {
        let routes: BTreeMap<_, _> = node.maps().routes().unwrap().into_iter().collect();
        let nodes: BTreeMap<_, _> = node.maps().nodes().unwrap().into_iter().collect();
        assert_eq!(routes.len(), c.nodes.len() - 1, "{}: {routes:?}", node.name);
        for (j, peer) in c.nodes.iter().enumerate() {
            if i == j {
                assert!(
                    !routes.contains_key(&subnets[j]),
                    "{} routes its own subnet",
                    node.name
                );
                continue;
            }
            let r = routes.get(&subnets[j]).unwrap_or_else(|| {
                panic!(
                    "{} has no route to {} ({})",
                    node.name, peer.name, subnets[j]
                )
            });
            assert_eq!(
                Ipv4Addr::from(r.node_ip),
                peer.ip,
                "{} -> {}",
                node.name,
                peer.name
            );
            assert_eq!(r.vtep_mac, vtep_mac_for(peer.ip));
            assert_eq!(r.mode, mode as u8);
            let n = nodes
                .get(&peer.ip)
                .unwrap_or_else(|| panic!("{} has no node entry for {}", node.name, peer.ip));
            assert_eq!(n.vtep_mac, vtep_mac_for(peer.ip));
        }
        let cfg = node.maps().config().unwrap();
        assert_eq!(Ipv4Addr::from(cfg.node_ip), node.ip);
        assert_eq!(cfg.flags & CONFIG_F_READY, CONFIG_F_READY);
        assert_eq!(cfg.vtep_mac, vtep_mac_for(node.ip));
        assert_eq!(cfg.vni, 1);
        assert_eq!(cfg.vxlan_port, 8472);
    }
}

#[test]
fn agents_share_etcd_join_and_leave() {
    let mut c = Cluster::agents(3, vxlan_conf(), 3);
    c.wait_all_converged(Duration::from_secs(40));
    assert_full_mesh(&c, RouteMode::Vxlan);

    // Subnet files for the CNI plugin; leases in flannel's format.
    for node in &c.nodes {
        let env = node.subnet_env();
        assert_eq!(env.network, "10.244.0.0/16".parse().unwrap());
        assert_eq!(env.mtu, 1500, "pods' interfaces take the underlay's MTU");
        assert_eq!(
            env.route_mtu,
            Some(1450),
            "their default route the underlay's minus the VXLAN overhead"
        );
        assert_eq!(env.pin_root, node.pins.path);
        assert!(env.ipmasq);
    }
    let endpoint = c.etcd.endpoint();
    let leases = c.in_underlay(move || {
        let client = weft_agent::datastore::etcd::EtcdClient::new(&[endpoint]).unwrap();
        client
            .range_prefix(&format!("{PREFIX}/subnets/"))
            .unwrap()
            .1
    });
    assert_eq!(leases.len(), 3);
    for kv in &leases {
        let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
        let ip: Ipv4Addr = v["PublicIP"].as_str().unwrap().parse().unwrap();
        let owner = c.nodes.iter().find(|n| n.ip == ip).unwrap();
        assert_eq!(
            v["NodeName"],
            owner.name.as_str(),
            "a weft lease names its node"
        );
        assert_eq!(v["BackendType"], "vxlan");
        assert_eq!(v["BackendData"]["VNI"], 1);
        assert_eq!(
            v["BackendData"]["VtepMAC"],
            weft_agent::datastore::format_mac(&vtep_mac_for(ip))
        );
        assert_ne!(kv.lease, 0, "{} has no TTL lease", kv.key);
    }
    // Every node records every node's name, its own included (`weft monitor`, `weft nodes`).
    let names_on = |n: &Node| -> BTreeMap<Ipv4Addr, String> {
        n.maps().node_names().unwrap().into_iter().collect()
    };
    for node in &c.nodes {
        let want: BTreeMap<Ipv4Addr, String> =
            c.nodes.iter().map(|n| (n.ip, n.name.clone())).collect();
        wait_until(
            &format!("{} to record the node names", node.name),
            Duration::from_secs(10),
            || names_on(node) == want,
        );
    }

    // Health, readiness and metrics.
    for node in &c.nodes {
        wait_until(
            &format!("{} /readyz", node.name),
            Duration::from_secs(10),
            || node.http_get("/readyz").is_some_and(|(s, _)| s == 200),
        );
        assert_eq!(node.http_get("/healthz").map(|r| r.0), Some(200));
        assert_eq!(node.metric("weft_routes"), Some(2.0));
        assert_eq!(node.metric("weft_peers"), Some(2.0));
        assert_eq!(node.metric("weft_datastore_connected"), Some(1.0));
        assert_eq!(node.metric("weft_drops_total"), Some(0.0));
        // The harness asks for `--xdp=on`: a veth runs XDP in its driver.
        let (_, body) = node.http_get("/metrics").unwrap();
        assert!(
            body.contains(
                r#"weft_decap_hook{hook="xdp",reason="--xdp=on, native XDP in the driver",vxlan="xdp"} 1"#
            ),
            "{body}"
        );
        assert_eq!(node.http_get("/nope").map(|r| r.0), Some(404));
    }
    // Masquerade rule and sysctls inside the node.
    let nft = c.nodes[0]
        .ns
        .exec("nft", &["list", "table", "ip", "weft_nat"]);
    assert!(
        nft.contains("masquerade") && nft.contains("10.244.0.0/16"),
        "{nft}"
    );
    assert_eq!(
        c.nodes[0]
            .ns
            .exec("sysctl", &["-n", "net.ipv4.ip_forward"])
            .trim(),
        "1"
    );
    let route = c.nodes[0].ns.ip("route show 10.244.0.0/16");
    assert!(route.contains("dev weft_host"), "{route}");

    // A peer record changes address, MAC and backend, then goes: no stale entry anywhere.
    let endpoint = c.etcd.endpoint();
    let fake = c.unheld_subnets()[0];
    let key = format!("{PREFIX}/subnets/{}-{}", fake.network(), fake.prefix_len());
    let put = |ip: &str, mac: &str, backend: &str| {
        let (endpoint, key) = (endpoint.clone(), key.clone());
        let value = json!({"PublicIP": ip, "BackendType": backend, "BackendData": {"VNI": 1, "VtepMAC": mac}}).to_string();
        c.in_underlay(move || {
            let client = weft_agent::datastore::etcd::EtcdClient::new(&[endpoint]).unwrap();
            client.put(&key, value.as_bytes(), 0).unwrap();
        })
    };
    let route_on = |n: &Node| {
        n.maps()
            .routes()
            .unwrap()
            .into_iter()
            .find(|(s, _)| *s == fake)
            .map(|(_, r)| r)
    };
    put("192.168.100.200", "aa:00:00:00:00:01", "vxlan");
    for n in &c.nodes {
        wait_until("fake peer", Duration::from_secs(10), || {
            route_on(n).is_some_and(|r| r.node_ip == [192, 168, 100, 200])
        });
        // A lease as flanneld writes it names no node: the peer goes by its address.
        let names = names_on(n);
        assert!(
            !names.contains_key(&Ipv4Addr::new(192, 168, 100, 200)),
            "{names:?}"
        );
        assert_eq!(names.len(), c.nodes.len(), "{names:?}");
    }
    put("192.168.100.201", "aa:00:00:00:00:02", "ipip");
    for n in &c.nodes {
        wait_until("fake peer moved", Duration::from_secs(10), || {
            route_on(n).is_some_and(|r| {
                r.node_ip == [192, 168, 100, 201] && r.vtep_mac == [0xaa, 0, 0, 0, 0, 2]
            })
        });
        let nodes = n.maps().nodes().unwrap();
        assert!(
            !nodes
                .iter()
                .any(|(ip, _)| *ip == Ipv4Addr::new(192, 168, 100, 200)),
            "stale node entry on {}",
            n.name
        );
        assert!(
            nodes
                .iter()
                .any(|(ip, _)| *ip == Ipv4Addr::new(192, 168, 100, 201))
        );
    }
    {
        let (endpoint, key) = (endpoint.clone(), key.clone());
        c.in_underlay(move || {
            weft_agent::datastore::etcd::EtcdClient::new(&[endpoint])
                .unwrap()
                .delete(&key)
                .unwrap()
        });
    }
    for n in &c.nodes {
        wait_until("fake peer gone", Duration::from_secs(10), || {
            route_on(n).is_none() && n.maps().nodes().unwrap().len() == 2
        });
    }

    // A fourth node joins: everyone routes to it.
    c.add_node();
    c.wait_all_converged(Duration::from_secs(40));
    assert_full_mesh(&c, RouteMode::Vxlan);

    // Node 1 crashes for good: its lease expires (TTL 3 s) and every other node forgets it.
    let gone = c.nodes.remove(1);
    let gone_subnet = gone.subnet_env().subnet;
    let gone_ip = gone.ip;
    drop(gone);
    for node in &c.nodes {
        wait_until(
            &format!("{} to forget {gone_subnet}", node.name),
            Duration::from_secs(20),
            || node.route_count() == 2,
        );
        let maps = node.maps();
        assert!(
            !maps
                .routes()
                .unwrap()
                .iter()
                .any(|(n, _)| *n == gone_subnet)
        );
        assert!(
            !maps.nodes().unwrap().iter().any(|(a, _)| *a == gone_ip),
            "stale node entry"
        );
    }
    assert_full_mesh(&c, RouteMode::Vxlan);
}

/// Snapshot of a node's forwarding state: routes, nodes, config.
fn forwarding_state(maps: &Maps) -> String {
    format!(
        "{:?} {:?} {:?}",
        maps.routes().unwrap(),
        maps.nodes().unwrap(),
        maps.config().unwrap()
    )
}

fn link_id(pin: &Path) -> u64 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(pin)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool link show pinned {}: {}",
        pin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["id"].as_u64().expect("link id")
}

#[test]
fn sigkilled_agent_restarts_without_touching_the_datapath() {
    let mut c = Cluster::agents(3, vxlan_conf(), 10);
    c.wait_all_converged(Duration::from_secs(40));
    let node = &c.nodes[0];
    wait_until("readyz", Duration::from_secs(10), || {
        node.http_get("/readyz").is_some_and(|r| r.0 == 200)
    });
    let before = forwarding_state(&node.maps());
    let subnet_before = node.subnet_env().subnet;
    let links: Vec<_> = [
        (prog_names::FROM_UNDERLAY, "eth0"),
        (prog_names::XDP_UNDERLAY, "eth0"),
        (prog_names::FROM_HOST, "weft_net"),
    ]
    .iter()
    .map(|(p, i)| link_pin_path(&node.pins.path, p, i))
    .collect();
    let ids: Vec<u64> = links.iter().map(|l| link_id(l)).collect();

    // Watch the maps while the agent dies and comes back: they must never change.
    let stop = Arc::new(AtomicBool::new(false));
    let pins = node.pins.path.clone();
    let expected = before.clone();
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut samples = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let maps = Maps::open_pinned(&pins).expect("pins survive the agent");
                assert_eq!(
                    forwarding_state(&maps),
                    expected,
                    "forwarding state changed during the restart"
                );
                samples += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            samples
        })
    };
    c.restart_agent(0);
    let node = &c.nodes[0];
    wait_until(
        &format!("restarted agent ready\n{}", node.log()),
        Duration::from_secs(30),
        || node.http_get("/readyz").is_some_and(|r| r.0 == 200),
    );
    // A few resync-free moments after readiness, then stop watching.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let samples = watcher.join().expect("maps changed during the restart");
    assert!(samples > 20, "too few samples: {samples}");

    assert_eq!(forwarding_state(&node.maps()), before);
    assert_eq!(
        node.subnet_env().subnet,
        subnet_before,
        "the node kept its subnet"
    );
    // Same links (the new programs were swapped into them), nothing written on adoption.
    let ids_after: Vec<u64> = links.iter().map(|l| link_id(l)).collect();
    assert_eq!(ids, ids_after, "links were recreated instead of adopted");
    assert_eq!(
        node.metric("weft_reconcile_writes_total"),
        Some(0.0),
        "{}",
        node.log()
    );
    // And the cluster still converges around it.
    c.add_node();
    c.wait_all_converged(Duration::from_secs(40));
    assert_full_mesh(&c, RouteMode::Vxlan);
}

#[test]
fn etcd_outage_leaves_forwarding_alone_and_reconverges() {
    let mut c = Cluster::agents(3, vxlan_conf(), 4);
    c.wait_all_converged(Duration::from_secs(40));
    let before: Vec<_> = c
        .nodes
        .iter()
        .map(|n| forwarding_state(&n.maps()))
        .collect();
    c.etcd.stop();
    let start = Instant::now();
    let mut saw_disconnect = false;
    // A minute, as the issue asks, and far longer than the 4 s lease TTL: etcd extends leases
    // when it comes back.
    while start.elapsed() < Duration::from_secs(60) {
        for (node, b) in c.nodes.iter().zip(&before) {
            assert_eq!(
                &forwarding_state(&node.maps()),
                b,
                "{} changed during the outage",
                node.name
            );
            assert_eq!(node.http_get("/healthz").map(|r| r.0), Some(200));
        }
        saw_disconnect |= c.nodes[0].metric("weft_datastore_connected") == Some(0.0);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(saw_disconnect, "the agent never noticed the outage");
    c.etcd.resume();
    // Reconnected: a new node is seen by everyone within seconds, nobody lost anyone.
    let t = Instant::now();
    c.add_node();
    c.wait_all_converged(Duration::from_secs(30));
    assert_full_mesh(&c, RouteMode::Vxlan);
    eprintln!("reconverged {:?} after etcd came back", t.elapsed());
    for node in &c.nodes {
        wait_until("reconnected", Duration::from_secs(10), || {
            node.metric("weft_datastore_connected") == Some(1.0)
        });
    }
}

#[test]
fn racing_nodes_never_share_a_subnet() {
    let c = Cluster::agents(0, json!({}), 10);
    // Ten subnets for twelve racing nodes.
    let conf = FlannelNetConf::parse(
        r#"{"Network": "10.50.0.0/16", "SubnetMin": "10.50.1.0", "SubnetMax": "10.50.10.0"}"#,
    )
    .unwrap();
    let endpoint = c.etcd.endpoint();
    let results = c.in_underlay(move || {
        let barrier = Arc::new(std::sync::Barrier::new(12));
        let handles: Vec<_> = (0..12u8)
            .map(|i| {
                let (conf, endpoint, barrier) = (conf.clone(), endpoint.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut ds = EtcdDatastore::new(&[endpoint], PREFIX, 30).unwrap();
                    let ip = Ipv4Addr::new(10, 0, 0, 10 + i);
                    let local = LocalNode {
                        name: format!("racer-{i}"),
                        public_ip: ip,
                        backend: BackendType::Vxlan,
                        vtep_mac: vtep_mac_for(ip),
                        previous_subnet: None,
                    };
                    barrier.wait();
                    ds.acquire(&local, &conf).map_err(|e| format!("{e:#}"))
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();

        // A node restarting reuses its record; a node with a remembered free subnet gets it.
        let mut again = EtcdDatastore::new(std::slice::from_ref(&endpoint), PREFIX, 30).unwrap();
        let first_ok = results.iter().position(|r| r.is_ok()).unwrap();
        let ip = Ipv4Addr::new(10, 0, 0, 10 + first_ok as u8);
        let local = LocalNode {
            name: "again".into(),
            public_ip: ip,
            backend: BackendType::Vxlan,
            vtep_mac: vtep_mac_for(ip),
            previous_subnet: None,
        };
        let reused = again.acquire(&local, &conf).unwrap();
        let client = again.client().clone();
        let (_, kvs) = client.range_prefix(&format!("{PREFIX}/subnets/")).unwrap();
        (results, first_ok, reused, kvs.len(), client)
    });
    let (results, first_ok, reused, lease_count, _client) = results;
    let won: Vec<Ipv4Net> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    let lost: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(won.len(), 10, "{results:?}");
    assert_eq!(
        won.iter().collect::<HashSet<_>>().len(),
        10,
        "two nodes share a subnet: {won:?}"
    );
    assert!(won.iter().all(conf_contains), "{won:?}");
    assert_eq!(lost.len(), 2);
    assert!(
        lost.iter().all(|e| e.contains("no free subnet")),
        "{lost:?}"
    );
    assert_eq!(
        Ok(reused),
        results[first_ok].clone(),
        "a restarted node reuses its subnet"
    );
    assert_eq!(lease_count, 10);
}

fn conf_contains(s: &Ipv4Net) -> bool {
    let a = u32::from(s.network());
    s.prefix_len() == 24
        && a >= u32::from(Ipv4Addr::new(10, 50, 1, 0))
        && a <= u32::from(Ipv4Addr::new(10, 50, 10, 0))
}

#[test]
fn previous_subnet_is_reused_and_flannel_leases_are_read() {
    let c = Cluster::agents(0, json!({}), 10);
    let conf = FlannelNetConf::parse(r#"{"Network": "10.60.0.0/16"}"#).unwrap();
    let endpoint = c.etcd.endpoint();
    let (prev, lease) = c.in_underlay(move || {
        let mut ds = EtcdDatastore::new(std::slice::from_ref(&endpoint), PREFIX, 30).unwrap();
        let ip = Ipv4Addr::new(10, 0, 0, 99);
        let local = LocalNode {
            name: "n".into(),
            public_ip: ip,
            backend: BackendType::Ipip,
            vtep_mac: vtep_mac_for(ip),
            previous_subnet: Some("10.60.77.0/24".parse().unwrap()),
        };
        let got = ds.acquire(&local, &conf).unwrap();
        // net-conf.json from `<prefix>/config` when no file is given, as flanneld reads it.
        assert_eq!(ds.net_conf().unwrap(), None);
        let text = r#"{"Network": "10.60.0.0/16", "Backend": {"Type": "ipip"}}"#;
        ds.client().put(&format!("{PREFIX}/config"), text.as_bytes(), 0).unwrap();
        assert_eq!(ds.net_conf().unwrap().as_deref(), Some(text));
        // A lease as flanneld writes it is readable.
        let flannel = r#"{"PublicIP":"10.0.0.5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:11:22"}}"#;
        ds.client().put(&format!("{PREFIX}/subnets/10.60.5.0-24"), flannel.as_bytes(), 0).unwrap();
        let kv = ds.client().get(&format!("{PREFIX}/subnets/10.60.5.0-24")).unwrap().unwrap();
        (got, NodeLease::from_flannel_json("10.60.5.0/24".parse().unwrap(), &kv.value).unwrap())
    });
    assert_eq!(prev, "10.60.77.0/24".parse().unwrap());
    assert_eq!(lease.public_ip, Ipv4Addr::new(10, 0, 0, 5));
    assert_eq!(lease.vtep_mac, Some([0xaa, 0xbb, 0xcc, 0, 0x11, 0x22]));
}

/// Every node's routes all in `mode` (and their node entries too).
fn all_in_mode(c: &Cluster, mode: RouteMode) -> bool {
    c.nodes.iter().all(|n| {
        let maps = n.maps();
        let routes = maps.routes().unwrap();
        routes.len() == c.nodes.len() - 1
            && routes.iter().all(|(_, r)| r.mode == mode as u8)
            && maps
                .nodes()
                .unwrap()
                .iter()
                .all(|(_, i)| i.mode == mode as u8)
    })
}

#[test]
fn backends_and_live_backend_switch() {
    let c = Cluster::agents(
        3,
        json!({"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}),
        10,
    );
    c.wait_all_converged(Duration::from_secs(40));
    assert_full_mesh(&c, RouteMode::Direct);
    for n in &c.nodes {
        assert_eq!(
            n.metric("weft_offlink_peers"),
            Some(0.0),
            "all peers share the underlay"
        );
    }
    let subnets: Vec<Ipv4Net> = c.nodes.iter().map(|n| n.subnet_env().subnet).collect();
    // Live switches by editing net-conf.json: no restart, same subnets, same pod MTU.
    for (conf, mode) in [
        (
            json!({"Network": "10.244.0.0/16", "Backend": {"Type": "ipip"}}),
            RouteMode::Ipip,
        ),
        (
            json!({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7, "Port": 4789}}),
            RouteMode::Vxlan,
        ),
        // DirectRouting: every peer is on this underlay subnet, so all direct.
        (
            json!({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7, "Port": 4789, "DirectRouting": true}}),
            RouteMode::Direct,
        ),
    ] {
        std::fs::write(&c.net_conf, conf.to_string()).unwrap();
        wait_until(
            &format!("every node in {mode:?}\n{}", c.agent_logs()),
            Duration::from_secs(15),
            || all_in_mode(&c, mode),
        );
    }
    for (n, s) in c.nodes.iter().zip(&subnets) {
        let cfg = n.maps().config().unwrap();
        assert_eq!(
            (cfg.vni, cfg.vxlan_port),
            (7, 4789),
            "VNI and port applied live"
        );
        assert_eq!(n.subnet_env().subnet, *s);
        assert_eq!(
            (n.subnet_env().mtu, n.subnet_env().route_mtu),
            (1500, Some(1450))
        );
        assert!(n.agent.as_ref().unwrap().pid() > 0);
    }
}

/// The publisher of NetworkPolicy's pod address records (`<prefix>/k8s/podips/<address>`)
/// against a real etcd: only the node whose subnet holds an address writes its record, and a
/// node deletes only the records it wrote. The case: node A was away past its lease TTL, its
/// subnet went to node D, and D's first pod has the address of A's old pod.
#[test]
fn pod_address_records_are_written_and_deleted_only_by_their_subnets_holder() {
    use weft_agent::{
        datastore::etcd::{EtcdClient, lease_key},
        netpol::{etcd_source::PodPublisher, store::PodAddress},
    };
    use weft_common::policy::PolicyPodName;
    use weft_tests::{etcd::Etcd, netns::Netns};

    let ns = Netns::new("pub");
    let etcd = Etcd::start(&ns, Ipv4Addr::new(127, 0, 0, 1), 23790);
    let endpoint = etcd.endpoint();
    ns.run(move || {
        let client = EtcdClient::new(&[endpoint]).unwrap();
        let (a_ip, d_ip) = (
            Ipv4Addr::new(192, 168, 100, 10),
            Ipv4Addr::new(192, 168, 100, 11),
        );
        let old: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let new: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let hold = |subnet: Ipv4Net, ip: Ipv4Addr| {
            let value = json!({"PublicIP": ip, "BackendType": "vxlan"}).to_string();
            client
                .put(&lease_key(PREFIX, subnet), value.as_bytes(), 0)
                .unwrap();
        };
        let key = |ip: Ipv4Addr| format!("{PREFIX}/k8s/podips/{ip}");
        let record = |ip: Ipv4Addr| {
            client.get(&key(ip)).unwrap().map(|kv| {
                let a: PodAddress = serde_json::from_slice(&kv.value).unwrap();
                (a.node, a.name, kv.lease)
            })
        };
        let names = |pods: &[(Ipv4Addr, &str)]| -> Vec<(Ipv4Addr, PolicyPodName)> {
            pods.iter()
                .map(|(ip, n)| (*ip, PolicyPodName::new("default", n)))
                .collect()
        };
        let (x, y) = (Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 3));
        let (z, w) = (Ipv4Addr::new(10, 244, 3, 2), Ipv4Addr::new(10, 244, 3, 3));
        let a_pods = names(&[(x, "a-old"), (y, "a-other")]);

        // A holds the old subnet: its pods are published under its lease.
        hold(old, a_ip);
        let mut a = PodPublisher::new(client.clone(), PREFIX, "a", a_ip, 60);
        a.sync(&a_pods, Some(old)).unwrap();
        let a_lease = a.written()[&x].lease;
        assert_eq!(record(x), Some(("a".into(), "a-old".into(), a_lease)));
        assert_eq!(record(y).map(|r| r.0), Some("a".into()));

        // The subnet goes to D, whose first pod gets A's old pod's address: D's record.
        hold(old, d_ip);
        let mut d = PodPublisher::new(client.clone(), PREFIX, "d", d_ip, 60);
        d.sync(&names(&[(x, "d")]), Some(old)).unwrap();
        assert_eq!(
            record(x).map(|r| (r.0, r.1)),
            Some(("d".into(), "d".into()))
        );

        // A's agent restarts before it notices (it still believes the subnet is its own): its
        // publisher must not take the address back, nor anything of D's subnet.
        let mut restarted = PodPublisher::new(client.clone(), PREFIX, "a", a_ip, 60);
        restarted.sync(&a_pods, Some(old)).unwrap();
        assert_eq!(
            record(x).map(|r| r.0),
            Some("d".into()),
            "A overwrote D's pod"
        );

        // A learns it holds another subnet: its own old record goes, D's stays, its new pods
        // are published.
        hold(new, a_ip);
        let mut a_new_pods = a_pods.clone();
        a_new_pods.extend(names(&[(z, "a-new"), (w, "a-gone")]));
        a.sync(&a_new_pods, Some(new)).unwrap();
        assert_eq!(
            record(x).map(|r| r.0),
            Some("d".into()),
            "A deleted D's pod"
        );
        assert_eq!(record(y), None, "A left the record of its old pod");
        assert_eq!(record(z), Some(("a".into(), "a-new".into(), a_lease)));
        assert_eq!(record(w).map(|r| r.0), Some("a".into()));

        // A restarted agent starts from what etcd holds of it: a pod deleted meanwhile loses
        // its record, the others move to the new lease.
        let mut again = PodPublisher::new(client.clone(), PREFIX, "a", a_ip, 60);
        again.sync(&names(&[(z, "a-new")]), Some(new)).unwrap();
        let lease = again.written()[&z].lease;
        assert_ne!(lease, a_lease);
        assert_eq!(record(z), Some(("a".into(), "a-new".into(), lease)));
        assert_eq!(record(w), None);
        assert_eq!(record(x).map(|r| r.0), Some("d".into()));

        // Holding no subnet: nothing of A's is left.
        again.sync(&names(&[(z, "a-new")]), None).unwrap();
        assert_eq!(record(z), None);
        assert_eq!(record(x).map(|r| r.0), Some("d".into()));
    });
    drop(etcd);
}

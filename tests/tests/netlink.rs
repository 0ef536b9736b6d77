//! weft's netlink layer against the kernel, and the proof that weft's binaries spawn no `ip`:
//! refused requests carry the kernel's extended-ack text; the CNI plugin (ADD, CHECK, GC, DEL)
//! and the agent (with the bgp backend's BIRD) run with a `PATH` whose `ip` records that it ran
//! and fails loudly; routes of weft's BGP table read back as BIRD writes them.
use std::{net::Ipv4Addr, os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use serde_json::json;
use weft_agent::netlink::{BlockingNetlink, Scope};
use weft_tests::{
    cluster::{METRICS_PORT, binary},
    cni::{CniNode, TempDir, result_ip},
    netns::{Netns, unique_name, veth_pair},
    pins::PinDir,
    process::{NsProcess, wait_until},
};

#[test]
fn refused_requests_carry_the_kernels_extended_ack() {
    let ns = Netns::new("wnl");
    let errors = ns.run(|| {
        let nl = BlockingNetlink::open().expect("rtnetlink");
        nl.block_on(nl.create_veth("wnla", None, "wnlb", None, 1500, None))
            .expect("a veth with MTU 1500");
        let index = weft_agent::netlink::ifindex("wnla").unwrap();
        // An MTU below the device's minimum: dev_set_mtu refuses it with a message.
        let mtu = nl
            .block_on(nl.set_link(index, Some(10), None))
            .expect_err("MTU 10");
        // A gateway on no connected subnet, without onlink.
        let gw = nl
            .block_on(nl.replace_route(
                "10.9.0.0/16".parse().unwrap(),
                Some(Ipv4Addr::new(10, 77, 0, 1)),
                index,
                Scope::Universe,
                false,
                None,
            ))
            .expect_err("a route via an unreachable gateway");
        (mtu, gw)
    });
    let (mtu, gw) = errors;
    assert_eq!(mtu.errno, Some(libc::EINVAL), "{mtu}");
    let text = mtu.to_string();
    assert!(
        text.contains("kernel:") && text.contains("mtu"),
        "the kernel's reason is missing: {text}"
    );
    assert!(
        gw.to_string()
            .contains("kernel: Nexthop has invalid gateway"),
        "no extended ack for the route: {gw}"
    );
}

/// A directory with an `ip` that leaves a mark and fails, for the front of `PATH`.
fn trap_dir(dir: &Path) -> (String, std::path::PathBuf) {
    let bin = dir.join("trap-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let mark = dir.join("ip-was-run");
    let script = bin.join("ip");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"ip $*\" >> {}\necho 'weft must not run ip' >&2\nexit 99\n",
            mark.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    (path, mark)
}

#[test]
fn cni_plugin_and_agent_spawn_no_ip() {
    let dir = TempDir::new("weft-no-ip-");
    let (path, mark) = trap_dir(&dir.path);

    // The CNI plugin: every command that touches links, addresses, routes and neighbours.
    let node = CniNode::new("10.244.9.0/24", 1450);
    let pod = Netns::new("wnp");
    let env = vec![("PATH".to_string(), path.clone())];
    let mut add = node
        .call("ADD", &node.conf("1.1.0"))
        .attachment("noip", Some(&pod.path()));
    add.env = env.clone();
    let result = add.run(&node.ns).ok();
    let ip = result_ip(&result);
    let mut conf = node.conf("1.1.0");
    conf["prevResult"] = result.clone();
    let mut check = node
        .call("CHECK", &conf)
        .attachment("noip", Some(&pod.path()));
    check.env = env.clone();
    check.run(&node.ns).ok();
    let mut gc_conf = node.conf("1.1.0");
    gc_conf["cni.dev/valid-attachments"] = json!([{"containerID": "noip", "ifname": "eth0"}]);
    let mut gc = node.call("GC", &gc_conf);
    gc.env = env.clone();
    gc.run(&node.ns).ok();
    let mut del = node
        .call("DEL", &node.conf("1.1.0"))
        .attachment("noip", Some(&pod.path()));
    del.env = env.clone();
    del.run(&node.ns).ok();
    assert!(node.subnet.contains(&ip));

    // The agent: underlay detection, the weft_host pair and its route, sysctls, the datapath;
    // with the bgp backend, so that BIRD's supervision (which reads weft's routing table every
    // second) runs too.
    let a = Netns::new("wna");
    let b = Netns::new("wnb");
    veth_pair(&a, "eth0", &b, "eth0");
    a.ip("addr add 192.168.91.1/24 dev eth0");
    a.ip("route add default via 192.168.91.2");
    let topology = dir.path.join("nodes.json");
    std::fs::write(
        &topology,
        json!({"nodes": [
            {"name": "a", "publicIP": "192.168.91.1", "subnet": "10.71.1.0/24"},
            {"name": "b", "publicIP": "192.168.91.2", "subnet": "10.71.2.0/24"},
        ]})
        .to_string(),
    )
    .unwrap();
    let conf = dir.path.join("net-conf.json");
    std::fs::write(
        &conf,
        r#"{"Network": "10.71.0.0/16", "Backend": {"Type": "bgp"}}"#,
    )
    .unwrap();
    let bird_dir = dir.path.join("bird");
    let pins = PinDir::new("noip");
    let args: Vec<String> = [
        "--datastore",
        "static",
        "--static-file",
        topology.to_str().unwrap(),
        "--net-conf",
        conf.to_str().unwrap(),
        "--node-name",
        "a",
        "--pin-root",
        pins.path.to_str().unwrap(),
        "--subnet-file",
        dir.path.join("a.env").to_str().unwrap(),
        "--metrics-addr",
        &format!("127.0.0.1:{METRICS_PORT}"),
        "--no-ip-masq",
        "--bgp-dir",
        bird_dir.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let agent = NsProcess::spawn(
        &a,
        &binary("weft-agent"),
        &args,
        &[("PATH", path)],
        &dir.path.join(format!("{}.log", unique_name("agent"))),
    );
    wait_until(
        &format!("the agent to program its peer\n{}", agent.log()),
        Duration::from_secs(30),
        || {
            weft_agent::datapath::Maps::open_pinned(&pins.path)
                .and_then(|m| m.routes())
                .is_ok_and(|r| r.len() == 1)
        },
    );
    let route = a.ip("route show 10.71.0.0/16");
    assert!(route.contains("dev weft_host"), "{route}");
    wait_until(
        &format!("the agent's BIRD to answer\n{}", agent.log()),
        Duration::from_secs(30),
        || weft_agent::bgp::speaker::answers(&bird_dir.join("bird.ctl")),
    );
    // A few turns of the supervisor's table reads.
    std::thread::sleep(Duration::from_secs(3));
    drop(agent);
    assert!(
        !mark.exists(),
        "weft ran ip: {}",
        std::fs::read_to_string(&mark).unwrap_or_default()
    );
}

/// weft's BGP table as the agent reads it: unicast routes of that table only (gateways, ECMP
/// next hops, on-link routes), not unreachable or blackhole routes, not other tables'.
#[test]
fn bgp_table_routes_read_back() {
    let ns = Netns::new("wnt");
    ns.ip("link add wnta type veth peer name wntb");
    ns.ip("link set wnta up");
    ns.ip("link set wntb up");
    ns.ip("addr add 192.168.94.1/24 dev wnta");
    for route in [
        "10.244.2.0/24 via 192.168.94.2 dev wnta table 2500 proto bird",
        "10.244.3.0/24 table 2500 nexthop via 192.168.94.3 dev wnta nexthop via 192.168.94.4 dev wnta",
        "10.244.4.0/24 dev wnta table 2500",
        "unreachable 10.244.5.0/24 table 2500",
        "blackhole 10.244.6.0/24 table 2500",
        "10.244.7.0/24 via 192.168.94.2 dev wnta table 2501",
        "10.244.8.0/24 via 192.168.94.2 dev wnta",
    ] {
        ns.ip(&format!("route add {route}"));
    }
    let (table, missing) = ns.run(|| {
        (
            weft_agent::bgp::table::read(2500).unwrap(),
            weft_agent::bgp::table::read(2600).unwrap(),
        )
    });
    let ifindex = ns.ifindex("wnta");
    let want: Vec<(String, String)> = [
        ("10.244.2.0/24", format!("via 192.168.94.2 dev {ifindex}")),
        (
            "10.244.3.0/24",
            format!("via 192.168.94.3 dev {ifindex}, via 192.168.94.4 dev {ifindex}"),
        ),
        ("10.244.4.0/24", format!("on-link dev {ifindex}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let got: Vec<(String, String)> = table.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    assert_eq!(got, want);
    assert!(missing.is_empty(), "a table that does not exist is empty");
}

//! weft-cni driven as a container runtime drives it: the real binary exec'd in a node's
//! network namespace with the CNI environment and config, results checked against the spec and
//! against the real state (interfaces, addresses, routes, neighbours, endpoint map, links).
use std::net::Ipv4Addr;

use serde_json::{Value, json};
use weft_agent::{cni::names::AttachmentNames, netlink::format_mac};
use weft_common::{CONFIG_F_READY, EndpointInfo, Stat};
use weft_tests::{
    cni::{CniNode, result_ip},
    netns::Netns,
};

const VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// Checks the pod's and the node's state for an attachment created by ADD.
fn assert_wired(node: &CniNode, cid: &str, pod: &Netns, ip: Ipv4Addr) {
    let names = AttachmentNames::of(cid, "eth0");
    let addr = pod.ip("-o -4 addr show dev eth0");
    assert!(
        addr.contains(&format!("inet {ip}/32")),
        "pod address: {addr}"
    );
    let link = pod.ip("-o link show dev eth0");
    assert!(
        link.contains(&format!("mtu {}", node.mtu)),
        "pod MTU: {link}"
    );
    assert!(
        link.contains(&format_mac(&names.pod_mac)),
        "pod MAC: {link}"
    );
    assert!(link.contains(",UP"), "pod link up: {link}");
    let routes = pod.ip("-4 route show");
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0 onlink"),
        "pod routes: {routes}"
    );
    let neigh = pod.ip("neigh show 169.254.1.1 dev eth0");
    assert!(
        neigh.contains(&format_mac(&names.host_mac)) && neigh.contains("PERMANENT"),
        "pod gateway neighbour: {neigh}"
    );
    let host = &names.host_ifname;
    let hlink = node.ns.ip(&format!("-o link show dev {host}"));
    assert!(hlink.contains(&format!("mtu {}", node.mtu)), "{hlink}");
    assert!(hlink.contains(&format_mac(&names.host_mac)), "{hlink}");
    let hroutes = node.ns.ip("-4 route show");
    assert!(
        hroutes.contains(&format!("{ip} dev {host} scope link")),
        "host routes: {hroutes}"
    );
    let host_ifindex = node.ns.ifindex(host);
    let eps = node.maps().endpoints().unwrap();
    let ep = eps
        .iter()
        .find(|(a, _)| *a == ip)
        .unwrap_or_else(|| panic!("no endpoint for {ip}: {eps:?}"));
    assert_eq!(
        ep.1,
        EndpointInfo {
            host_ifindex,
            pod_mac: names.pod_mac,
            host_mac: names.host_mac,
            flags: 0
        }
    );
    // Both programs hang off the host side as cls_bpf filters of a clsact qdisc, running the
    // node's pinned programs; nothing is pinned for them.
    assert!(node.link_pins().is_empty(), "{:?}", node.link_pins());
    let root = node.pins.path.clone();
    let ifindex = host_ifindex;
    let (filters, prog_ids) = node.ns.run(move || {
        let nl = weft_agent::netlink::BlockingNetlink::open().unwrap();
        let filters =
            [false, true].map(|egress| nl.block_on(nl.bpf_filters(ifindex, egress)).unwrap());
        let prog_ids = ["from_pod", "to_pod"].map(|name| {
            let out = std::process::Command::new("bpftool")
                .args(["prog", "show", "pinned"])
                .arg(
                    weft_agent::datapath::pin_dir(&root)
                        .join("progs")
                        .join(name),
                )
                .output()
                .expect("bpftool");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.split(':')
                .next()
                .unwrap()
                .trim()
                .parse::<u32>()
                .unwrap()
        });
        (filters, prog_ids)
    });
    for ((list, name), id) in filters.iter().zip(["from_pod", "to_pod"]).zip(prog_ids) {
        assert!(
            list.iter()
                .any(|f| f.priority == weft_agent::datapath::POD_FILTER_PRIORITY
                    && f.name == name
                    && f.prog_id == Some(id)),
            "{name} (program {id}) on {host}: {list:?}"
        );
    }
    // Router advertisements from the pod are ignored by the node; the pod sends no IPv6.
    let accept_ra = node.ns.exec(
        "sysctl",
        &["-n", &format!("net.ipv6.conf.{host}.accept_ra")],
    );
    assert_eq!(accept_ra.trim(), "0");
    let disabled = pod.exec("sysctl", &["-n", "net.ipv6.conf.eth0.disable_ipv6"]);
    assert_eq!(disabled.trim(), "1");
}

fn assert_gone(node: &CniNode, cid: &str, ip: Ipv4Addr) {
    let names = AttachmentNames::of(cid, "eth0");
    assert!(!node.host_links().contains(&names.host_ifname));
    assert!(
        !node
            .maps()
            .endpoints()
            .unwrap()
            .iter()
            .any(|(a, _)| *a == ip),
        "endpoint {ip} left behind"
    );
    assert!(node.link_pins().is_empty(), "{:?}", node.link_pins());
    assert!(
        !node.allocations().iter().any(|(_, c, _)| c == cid),
        "{:?}",
        node.allocations()
    );
}

#[test]
fn add_check_del_in_every_version() {
    let node = CniNode::new("10.244.5.0/24", 1450);
    for (i, version) in VERSIONS.iter().enumerate() {
        let pod = Netns::new("wcp");
        let cid = format!("ctr-{i}");
        let r = node.add(&cid, &pod, version);
        assert_eq!(r["cniVersion"], *version, "{r}");
        let names = AttachmentNames::of(&cid, "eth0");
        let ifaces = r["interfaces"].as_array().unwrap();
        assert_eq!(ifaces.len(), 2, "{r}");
        assert_eq!(ifaces[0]["name"], names.host_ifname.as_str());
        assert!(ifaces[0].get("sandbox").is_none(), "{r}");
        assert_eq!(ifaces[1]["name"], "eth0");
        assert_eq!(ifaces[1]["sandbox"], pod.path().as_str());
        assert_eq!(ifaces[1]["mac"], format_mac(&names.pod_mac).as_str());
        let ips = r["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 1);
        assert_eq!(ips[0]["gateway"], "169.254.1.1");
        assert_eq!(ips[0]["interface"], 1);
        assert_eq!(ips[0].get("version").is_some(), *version == "0.4.0", "{r}");
        assert_eq!(ifaces[1].get("mtu").is_some(), *version == "1.1.0", "{r}");
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(r["routes"][0]["gw"], "169.254.1.1");
        assert!(r["dns"].is_object());
        let ip = result_ip(&r);
        assert!(ips[0]["address"].as_str().unwrap().ends_with("/32"));
        assert!(node.subnet.contains(&ip) && ip != Ipv4Addr::new(10, 244, 5, 1));
        assert_wired(&node, &cid, &pod, ip);

        let check = node.check(&cid, &pod, &r);
        assert!(check.success, "CHECK: {} {}", check.stdout, check.stderr);
        assert!(
            check.stdout.trim().is_empty(),
            "CHECK printed {}",
            check.stdout
        );

        let del = node.del(&cid, Some(&pod), version);
        assert!(del.success && del.stdout.trim().is_empty(), "{del:?}");
        assert_gone(&node, &cid, ip);
        assert!(!pod.ip("-o link show").contains("eth0"));
        // DEL again: nothing left to do, still a success.
        assert!(node.del(&cid, Some(&pod), version).success);
    }
}

/// The node's route MTU (`WEFT_ROUTE_MTU`, the path MTU under the agent's backend) goes on
/// the pod's default route when below the interface's MTU, and the pod's namespace is recorded
/// for the agent, which changes that route on a live backend switch.
#[test]
fn add_gives_the_default_route_the_nodes_route_mtu() {
    let node = CniNode::new("10.244.16.0/24", 1500);
    let mut env = weft_agent::subnet_env::SubnetEnv::read(&node.subnet_file()).unwrap();
    env.route_mtu = Some(1450);
    env.write(&node.subnet_file()).unwrap();
    let pod = Netns::new("wcp");
    let r = node.add("routed", &pod, "1.1.0");
    assert_eq!(r["interfaces"][1]["mtu"], 1500, "{r}");
    assert!(pod.ip("link show dev eth0").contains("mtu 1500"));
    let route = pod.ip("-4 route show default");
    assert!(route.contains("mtu 1450"), "{route}");
    let ip = result_ip(&r);
    assert_wired(&node, "routed", &pod, ip);
    let check = node.check("routed", &pod, &r);
    assert!(check.success, "CHECK: {} {}", check.stdout, check.stderr);
    let recorded = weft_agent::ipam::read_all(&node.data_dir());
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].netns.as_deref(), Some(pod.path().as_ref()));
    // An interface MTU at or below the route's needs no route MTU: a config's `mtu`.
    let mut conf = node.conf("1.1.0");
    conf["mtu"] = json!(1400);
    let small = Netns::new("wcp");
    let out = node
        .call("ADD", &conf)
        .attachment("small", Some(&small.path()))
        .run(&node.ns);
    assert_eq!(out.ok()["interfaces"][1]["mtu"], 1400);
    let route = small.ip("-4 route show default");
    assert!(!route.contains("mtu"), "{route}");
}

#[test]
fn repeated_add_returns_the_same_address() {
    let node = CniNode::new("10.244.6.0/24", 1400);
    let pod = Netns::new("wcp");
    let a = result_ip(&node.add("again", &pod, "1.1.0"));
    let b = result_ip(&node.add("again", &pod, "1.1.0"));
    assert_eq!(a, b);
    assert_eq!(node.allocations().len(), 1);
    assert_wired(&node, "again", &pod, a);
    // Addresses are handed out round robin: a new pod does not get a just-freed address.
    assert!(node.del("again", Some(&pod), "1.1.0").success);
    let pod2 = Netns::new("wcp");
    let c = result_ip(&node.add("other", &pod2, "1.1.0"));
    assert_ne!(c, a);
}

#[test]
fn two_pods_on_one_node_ping_each_other() {
    let node = CniNode::new("10.244.7.0/24", 1450);
    let pod_a = Netns::new("wcp");
    let pod_b = Netns::new("wcp");
    let a = result_ip(&node.add("ping-a", &pod_a, "1.1.0"));
    let b = result_ip(&node.add("ping-b", &pod_b, "1.1.0"));
    let before = node.maps().stat_count(Stat::LocalDelivered).unwrap();
    pod_a.exec("ping", &["-c", "3", "-W", "1", &b.to_string()]);
    pod_b.exec("ping", &["-c", "3", "-W", "1", &a.to_string()]);
    let after = node.maps().stat_count(Stat::LocalDelivered).unwrap();
    assert!(
        after >= before + 12,
        "local deliveries {before} -> {after}: the datapath did not carry the pings"
    );
}

#[test]
fn version_lists_supported_versions() {
    let node = CniNode::new("10.244.8.0/24", 1450);
    for (asked, answered) in [("1.0.0", "1.0.0"), ("0.4.0", "0.4.0"), ("9.9.9", "1.1.0")] {
        let out = node
            .call("VERSION", &json!({"cniVersion": asked}))
            .run(&node.ns)
            .ok();
        assert_eq!(out["cniVersion"], answered);
        assert_eq!(out["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
    }
}

#[test]
fn status_reports_readiness() {
    let node = CniNode::new("10.244.9.0/24", 1450);
    let status = |conf: &Value| node.call("STATUS", conf).run(&node.ns);
    let ok = status(&node.conf("1.1.0"));
    assert!(ok.success && ok.stdout.trim().is_empty(), "{ok:?}");
    // STATUS exists from 1.1.0 on.
    assert_eq!(status(&node.conf("1.0.0")).err_code(), 1);
    // Pins elsewhere (no agent there): not ready.
    let mut conf = node.conf("1.1.0");
    conf["pinRoot"] = json!(node.dir.path.join("nopins"));
    let out = status(&conf);
    assert_eq!(out.err_code(), 50);
    assert!(out.err_msg().contains("weft-agent"), "{}", out.err_msg());
    // Config map not READY.
    let mut cfg = node.maps().config().unwrap();
    cfg.flags &= !CONFIG_F_READY;
    node.maps().set_config(&cfg).unwrap();
    let out = status(&node.conf("1.1.0"));
    assert_eq!(out.err_code(), 50);
    assert!(out.err_msg().contains("READY"), "{}", out.err_msg());
    cfg.flags |= CONFIG_F_READY;
    node.maps().set_config(&cfg).unwrap();
    assert!(status(&node.conf("1.1.0")).success);
    // The agent's pinned from_pod program is missing: not ready.
    let progs = weft_agent::datapath::pin_dir(&node.pins.path).join("progs");
    std::fs::rename(progs.join("from_pod"), progs.join("from_pod_away")).unwrap();
    let out = status(&node.conf("1.1.0"));
    assert_eq!(out.err_code(), 50);
    assert!(out.err_msg().contains("from_pod"), "{}", out.err_msg());
    std::fs::rename(progs.join("from_pod_away"), progs.join("from_pod")).unwrap();
    assert!(status(&node.conf("1.1.0")).success);
    // No subnet file: not ready.
    std::fs::remove_file(node.subnet_file()).unwrap();
    let out = status(&node.conf("1.1.0"));
    assert_eq!(out.err_code(), 50);
    assert!(out.err_msg().contains("subnet file"), "{}", out.err_msg());
}

#[test]
fn errors_carry_the_spec_codes() {
    let node = CniNode::new("10.244.10.0/24", 1450);
    let pod = Netns::new("wcp");
    let conf = node.conf("1.1.0");
    let add = |conf: &Value| {
        node.call("ADD", conf)
            .attachment("err-ctr", Some(&pod.path()))
    };

    // 4: environment.
    let mut c = add(&conf);
    c.command = String::new();
    let out = c.run(&node.ns);
    assert_eq!(out.err_code(), 4);
    assert!(out.err_msg().contains("CNI_COMMAND"));
    let mut c = add(&conf);
    c.command = "FROB".into();
    assert_eq!(c.run(&node.ns).err_code(), 4);
    let mut c = add(&conf);
    c.container_id = None;
    let out = c.run(&node.ns);
    assert_eq!(out.err_code(), 4);
    assert!(out.err_msg().contains("CNI_CONTAINERID"));
    let mut c = add(&conf);
    c.netns = None;
    let out = c.run(&node.ns);
    assert_eq!(out.err_code(), 4);
    assert!(out.err_msg().contains("CNI_NETNS"));
    let mut c = add(&conf);
    c.netns = Some("/run/netns/does-not-exist-weft".into());
    let out = c.run(&node.ns);
    assert_eq!(out.err_code(), 4);
    assert!(out.err_msg().contains("CNI_NETNS"));
    let mut c = add(&conf);
    c.ifname = Some("this-name-is-too-long".into());
    let out = c.run(&node.ns);
    assert_eq!(out.err_code(), 4);
    assert!(out.err_msg().contains("CNI_IFNAME"));

    // 6: decoding.
    let mut c = add(&conf);
    c.stdin = b"{not json".to_vec();
    assert_eq!(c.run(&node.ns).err_code(), 6);
    let mut c = add(&conf);
    c.stdin = b"[1,2]".to_vec();
    assert_eq!(c.run(&node.ns).err_code(), 6);

    // 1: version.
    let mut bad = conf.clone();
    bad["cniVersion"] = json!("0.3.1");
    let out = add(&bad).run(&node.ns);
    assert_eq!(out.err_code(), 1);
    assert!(out.err_msg().contains("0.3.1"));

    // 7: configuration, naming the field.
    for (field, value) in [
        ("name", Value::Null),
        ("cniVersion", Value::Null),
        ("subnetFile", json!(42)),
        ("dataDir", json!("")),
        ("pinRoot", json!(["x"])),
        ("mtu", json!(10)),
        // Above the node's underlay MTU (1500, subnet.env) minus the largest overhead (50).
        ("mtu", json!(1451)),
        ("prevResult", json!("nope")),
    ] {
        let mut bad = conf.clone();
        if value.is_null() {
            bad.as_object_mut().unwrap().remove(field);
        } else {
            bad[field] = value;
        }
        let out = add(&bad).run(&node.ns);
        assert_eq!(out.err_code(), 7, "{field}: {}", out.stdout);
        assert!(out.err_msg().contains(field), "{field}: {}", out.err_msg());
    }
    let mut bad = conf.clone();
    bad["prevResult"] = json!({"ips": [{"address": "10.0.0.300/24"}]});
    assert_eq!(add(&bad).run(&node.ns).err_code(), 7);

    // 11: the node is not set up yet (no subnet file / no datapath).
    let mut later = conf.clone();
    later["subnetFile"] = json!(node.dir.path.join("missing.env"));
    let out = add(&later).run(&node.ns);
    assert_eq!(out.err_code(), 11);
    assert!(out.err_msg().contains("weft-agent"), "{}", out.err_msg());
    let mut later = conf.clone();
    later["pinRoot"] = json!(node.dir.path.join("nopins"));
    assert_eq!(add(&later).run(&node.ns).err_code(), 11);

    // 3: CHECK of an attachment never added.
    let out = node.check("never-added", &pod, &json!({"cniVersion": "1.1.0"}));
    assert_eq!(out.err_code(), 3);

    // GC: 1.1.0 only; valid-attachments required.
    let mut old = node.conf("1.0.0");
    old["cni.dev/valid-attachments"] = json!([]);
    assert_eq!(node.call("GC", &old).run(&node.ns).err_code(), 1);
    let out = node.call("GC", &node.conf("1.1.0")).run(&node.ns);
    assert_eq!(out.err_code(), 7);
    assert!(out.err_msg().contains("valid-attachments"));

    // 101: the interface name is taken in the pod; everything done so far is undone.
    pod.ip("link add eth0 type veth peer name eth0peer");
    let out = add(&conf).run(&node.ns);
    assert_eq!(out.err_code(), 101, "{}", out.stdout);
    assert!(out.err_msg().contains("eth0"), "{}", out.err_msg());
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.host_links().is_empty(), "{:?}", node.host_links());
    assert!(node.maps().endpoints().unwrap().is_empty());
    assert!(node.link_pins().is_empty());
    // Nothing of this went to stdout but the error object (checked by err_code's parse).
}

#[test]
fn del_is_idempotent() {
    let node = CniNode::new("10.244.11.0/24", 1450);
    // Never added, with and without a netns.
    let pod = Netns::new("wcp");
    assert!(node.del("ghost", Some(&pod), "1.1.0").success);
    assert!(node.del("ghost", None, "0.4.0").success);
    // The runtime removed the netns first: the host side went with it; DEL frees the rest.
    let r = node.add("gone-ns", &pod, "1.1.0");
    let ip = result_ip(&r);
    let path = pod.path();
    drop(pod);
    let out = node
        .call("DEL", &node.conf("1.1.0"))
        .attachment("gone-ns", Some(&path))
        .run(&node.ns);
    assert!(out.success, "{out:?}");
    assert_gone(&node, "gone-ns", ip);
    // The agent is gone (no subnet file, no pins): DEL still releases the address. The pod is
    // a shaped one (`runtimeConfig.bandwidth`), whose programs are pinned TCX links.
    let pod = Netns::new("wcp");
    let mut shaped = node.conf("1.1.0");
    shaped["runtimeConfig"] = json!({"bandwidth": {"ingressRate": 8000000, "ingressBurst": 80000}});
    let out = node
        .call("ADD", &shaped)
        .attachment("no-agent", Some(&pod.path()))
        .run(&node.ns);
    let ip = result_ip(&out.ok());
    std::fs::remove_file(node.subnet_file()).unwrap();
    assert!(node.del("no-agent", Some(&pod), "1.1.0").success);
    assert!(node.allocations().is_empty());
    assert!(!node.host_links().iter().any(|l| l.starts_with("wft")));
    // Without subnet.env DEL cannot know the pin root: GC removes the stale link pin and
    // endpoint later.
    node.write_subnet_env();
    assert_eq!(node.link_pins().len(), 2, "from_pod and to_pod");
    assert!(node.gc(&[]).success);
    assert!(node.link_pins().is_empty(), "{:?}", node.link_pins());
    assert!(
        !node
            .maps()
            .endpoints()
            .unwrap()
            .iter()
            .any(|(a, _)| *a == ip)
    );
    // The interface vanished but the allocation did not.
    let ip = result_ip(&node.add("no-link", &pod, "1.1.0"));
    node.ns.ip(&format!(
        "link del {}",
        AttachmentNames::of("no-link", "eth0").host_ifname
    ));
    assert!(node.del("no-link", Some(&pod), "1.1.0").success);
    assert_gone(&node, "no-link", ip);
}

#[test]
fn check_says_what_is_wrong() {
    let node = CniNode::new("10.244.12.0/24", 1450);
    let pod = Netns::new("wcp");
    let r = node.add("chk", &pod, "1.0.0");
    let ip = result_ip(&r);
    assert!(node.check("chk", &pod, &r).success);

    let mut wrong = r.clone();
    wrong["ips"][0]["address"] = json!("10.244.12.250/32");
    let out = node.check("chk", &pod, &wrong);
    assert_eq!(out.err_code(), 104);
    assert!(out.err_msg().contains("prevResult"), "{}", out.err_msg());

    pod.ip("route del default");
    let out = node.check("chk", &pod, &r);
    assert_eq!(out.err_code(), 104);
    assert!(out.err_msg().contains("default route"), "{}", out.err_msg());
    pod.ip("route add default via 169.254.1.1 dev eth0 onlink");
    assert!(node.check("chk", &pod, &r).success);

    pod.ip("link set eth0 mtu 1300");
    let out = node.check("chk", &pod, &r);
    assert_eq!(out.err_code(), 104);
    assert!(out.err_msg().contains("MTU"), "{}", out.err_msg());
    pod.ip("link set eth0 mtu 1450");

    node.maps().remove_endpoint(ip).unwrap();
    let out = node.check("chk", &pod, &r);
    assert_eq!(out.err_code(), 104);
    assert!(out.err_msg().contains("endpoint"), "{}", out.err_msg());

    node.ns.ip(&format!(
        "link del {}",
        AttachmentNames::of("chk", "eth0").host_ifname
    ));
    let out = node.check("chk", &pod, &r);
    assert_eq!(out.err_code(), 104);
    assert!(out.err_msg().contains("missing"), "{}", out.err_msg());
}

#[test]
fn gc_keeps_exactly_the_valid_attachments() {
    let node = CniNode::new("10.244.13.0/24", 1450);
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("wcp")).collect();
    let results: Vec<Value> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| node.add(&format!("gc-{i}"), p, "1.1.0"))
        .collect();
    // Orphans a killed plugin could leave: an endpoint and a host link no allocation owns.
    let orphan_ip = Ipv4Addr::new(10, 244, 13, 200);
    node.maps()
        .upsert_endpoint(
            orphan_ip,
            &EndpointInfo {
                host_ifindex: 999,
                pod_mac: [2; 6],
                host_mac: [2; 6],
                flags: 0,
            },
        )
        .unwrap();
    node.ns
        .ip("link add wft0000000dead type veth peer name orphan0");
    let out = node.gc(&[("gc-0", "eth0")]);
    assert!(out.success, "{out:?}");
    let ip0 = result_ip(&results[0]);
    assert_eq!(
        node.allocations(),
        vec![(ip0, "gc-0".to_string(), "eth0".to_string())]
    );
    let eps: Vec<Ipv4Addr> = node
        .maps()
        .endpoints()
        .unwrap()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(eps, vec![ip0]);
    let names0 = AttachmentNames::of("gc-0", "eth0");
    assert_eq!(node.host_links(), vec![names0.host_ifname.clone()]);
    assert!(node.link_pins().is_empty(), "{:?}", node.link_pins());
    assert!(node.check("gc-0", &pods[0], &results[0]).success);
    // GC with an empty list releases everything.
    assert!(node.gc(&[]).success);
    assert!(node.allocations().is_empty());
    assert!(node.host_links().is_empty());
    assert!(node.maps().endpoints().unwrap().is_empty());
}

#[test]
fn conflist_prev_result_is_kept() {
    let node = CniNode::new("10.244.14.0/24", 1450);
    let pod = Netns::new("wcp");
    for version in VERSIONS {
        let mut conf = node.conf(version);
        conf["prevResult"] = json!({
            "cniVersion": version,
            "interfaces": [{"name": "lo", "mac": "00:00:00:00:00:00", "sandbox": pod.path()}],
            "ips": [{"address": "127.0.0.1/8", "interface": 0}],
            "dns": {"nameservers": ["10.96.0.10"]}
        });
        let cid = format!("prev-{version}");
        let r = node
            .call("ADD", &conf)
            .attachment(&cid, Some(&pod.path()))
            .run(&node.ns)
            .ok();
        assert_eq!(r["interfaces"].as_array().unwrap().len(), 3, "{r}");
        assert_eq!(r["interfaces"][0]["name"], "lo");
        assert_eq!(r["ips"][0]["address"], "127.0.0.1/8");
        assert_eq!(r["ips"][1]["interface"], 2, "{r}");
        assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");
        let ip = result_ip(&json!({"ips": [r["ips"][1].clone()]}));
        assert_wired(&node, &cid, &pod, ip);
        assert!(node.check(&cid, &pod, &r).success);
        let mut del_conf = node.conf(version);
        del_conf["prevResult"] = r.clone();
        let out = node
            .call("DEL", &del_conf)
            .attachment(&cid, Some(&pod.path()))
            .run(&node.ns);
        assert!(out.success, "{out:?}");
        assert_gone(&node, &cid, ip);
    }
}

#[test]
fn failures_late_in_add_undo_everything() {
    let node = CniNode::new("10.244.15.0/24", 1450);
    let pod = Netns::new("wcp");
    // 103: the IPAM store cannot be written (its directory is a file).
    let mut conf = node.conf("1.1.0");
    let blocker = node.dir.path.join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    conf["dataDir"] = json!(blocker);
    let out = node
        .call("ADD", &conf)
        .attachment("late", Some(&pod.path()))
        .run(&node.ns);
    assert_eq!(out.err_code(), 103, "{}", out.stdout);
    assert!(node.host_links().is_empty(), "{:?}", node.host_links());
    assert!(!pod.ip("-o link show").contains("eth0"));

    // 102: the pinned "from_pod" is not a tc program (an XDP program in its place): the
    // attach fails after the veth, the address and the endpoint were set up.
    let progs = weft_agent::datapath::pin_dir(&node.pins.path).join("progs");
    std::fs::rename(progs.join("from_pod"), progs.join("from_pod_away")).unwrap();
    std::fs::hard_link(progs.join("xdp_underlay"), progs.join("from_pod"))
        .or_else(|_| {
            // bpffs has no hard links: pin the XDP program a second time instead.
            let root = node.pins.path.clone();
            node.ns.run(move || {
                let out = std::process::Command::new("bpftool")
                    .args(["prog", "pin", "pinned"])
                    .arg(weft_agent::datapath::pin_dir(&root).join("progs/xdp_underlay"))
                    .arg(weft_agent::datapath::pin_dir(&root).join("progs/from_pod"))
                    .output()
                    .expect("bpftool");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            });
            Ok::<(), std::io::Error>(())
        })
        .unwrap();
    let out = node
        .call("ADD", &node.conf("1.1.0"))
        .attachment("late", Some(&pod.path()))
        .run(&node.ns);
    assert_eq!(out.err_code(), 102, "{}", out.stdout);
    assert!(out.err_msg().contains("from_pod"), "{}", out.err_msg());
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.host_links().is_empty(), "{:?}", node.host_links());
    assert!(node.maps().endpoints().unwrap().is_empty());
    assert!(node.link_pins().is_empty(), "{:?}", node.link_pins());
    assert!(!pod.ip("-o link show").contains("eth0"));
    let host_routes = node.ns.ip("-4 route show");
    assert!(!host_routes.contains("10.244.15."), "{host_routes}");

    // Put the real program back: the same ADD now succeeds and GC twice is a no-op.
    std::fs::remove_file(progs.join("from_pod")).unwrap();
    std::fs::rename(progs.join("from_pod_away"), progs.join("from_pod")).unwrap();
    let r = node.add("late", &pod, "1.1.0");
    assert_wired(&node, "late", &pod, result_ip(&r));
    assert!(node.gc(&[("late", "eth0")]).success);
    assert!(node.gc(&[("late", "eth0")]).success);
    assert!(node.check("late", &pod, &r).success);
}

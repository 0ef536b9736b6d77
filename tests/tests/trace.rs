//! `weft trace` on pinned nodes: it explains a delivered local packet, an encapsulated one
//! followed into the destination node, and a dropped spoof, and changes no state on either
//! node (counters, conntrack, caches, config).
use std::{net::Ipv4Addr, path::Path, process::Command};

use serde_json::Value;
use weft_agent::datapath::{Datapath, LoadOptions, Maps};
use weft_common::{
    CONFIG_F_READY, CONFIG_F_VXLAN_DEV, EndpointInfo, NodeConfig, NodeInfo, RouteInfo, RouteMode,
    policy::{POLICY_F_INGRESS_ISOLATED, PolicyEndpoint},
};
use weft_tests::{cluster::binary, injection_node::*, netns::unique_name, pins::PinDir};

fn trace(pins: &Path, ipam: &Path, args: &[&str]) -> Value {
    let out = Command::new(binary("weft"))
        .arg("--pin-root")
        .arg(pins)
        .arg("--json")
        .arg("trace")
        .arg("--cni-data-dir")
        .arg(ipam)
        .args(args)
        .output()
        .expect("running weft trace");
    assert!(
        out.status.success(),
        "weft trace {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

/// Everything the datapath writes, and the config.
fn state(maps: &Maps) -> String {
    format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        maps.config().unwrap(),
        maps.drops().unwrap(),
        maps.stats().unwrap(),
        maps.conntrack().unwrap(),
        maps.next_hops().unwrap(),
        maps.path_mtus().unwrap(),
        maps.monitor_flags().unwrap(),
        maps.monitor_configs().unwrap(),
    )
}

/// The peer node of the fixture (192.168.50.2), pinned under `root`, owning 10.244.2.0/24 with
/// the pod 10.244.2.7.
fn peer_node(root: &Path, pod_ifindex: u32) -> Datapath {
    let mut dp = Datapath::load_pinned_with(
        root,
        &LoadOptions {
            conntrack_max: weft_tests::TEST_CONNTRACK_MAX,
            ..Default::default()
        },
    )
    .unwrap();
    dp.maps
        .set_config(&NodeConfig {
            node_ip: PEER_IP,
            underlay_ifindex: 1,
            vni: VNI,
            vxlan_port: VXLAN_PORT,
            flags: CONFIG_F_READY,
            vtep_mac: PEER_VTEP_MAC,
            _pad: [0; 2],
            bgp_table: weft_common::BGP_TABLE_DEFAULT,
        })
        .unwrap();
    dp.maps
        .upsert_endpoint(
            Ipv4Addr::from(REMOTE_VXLAN_IP),
            &EndpointInfo {
                host_ifindex: pod_ifindex,
                pod_mac: [0x02, 0xcc, 0, 0, 0, 7],
                host_mac: [0x02, 0xcc, 0, 0, 0, 1],
                flags: 0,
            },
        )
        .unwrap();
    // As an agent with no policy does: its pod is not isolated.
    dp.maps
        .put_policy_endpoint(Ipv4Addr::from(REMOTE_VXLAN_IP), Some(&PolicyEndpoint::OPEN))
        .unwrap();
    dp.maps
        .upsert_route(
            "10.244.1.0/24".parse().unwrap(),
            &RouteInfo {
                node_ip: NODE_IP,
                vtep_mac: VTEP_MAC,
                mode: RouteMode::Vxlan as u8,
                _pad: 0,
            },
        )
        .unwrap();
    dp.maps
        .upsert_node(
            Ipv4Addr::from(NODE_IP),
            &NodeInfo {
                vtep_mac: VTEP_MAC,
                mode: RouteMode::Vxlan as u8,
                _pad: 0,
            },
        )
        .unwrap();
    dp
}

fn counter(step: &Value, name: &str) -> u64 {
    step["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn trace_explains_local_encapsulated_and_spoofed_packets_without_changing_state() {
    let pins = PinDir::new("trace");
    let peer_pins = PinDir::new("trace-peer");
    let ipam = std::env::temp_dir().join(unique_name("weft-trace-ipam-"));
    std::fs::create_dir_all(ipam.join("weft")).unwrap();
    std::fs::write(
        ipam.join("weft/allocations.json"),
        serde_json::json!({"last": null, "allocations": [
            {"ip": "10.244.1.2", "containerID": "c1", "ifname": "eth0", "pod": "default/pod-one"},
            {"ip": "10.244.1.3", "containerID": "c2", "ifname": "eth0", "pod": "default/pod-two"}]})
        .to_string(),
    )
    .unwrap();
    let (root, peer_root, ipam_dir) = (pins.path.clone(), peer_pins.path.clone(), ipam.clone());
    let ns = namespace();
    ns.run(move || {
        let node = node_pinned(&root);
        let peer = peer_node(&peer_root, node.pod2_ifindex);
        let before = (state(&node.dp.maps), state(&peer.maps));

        // Pod to pod on this node: delivered into pod-two, TTL decremented, its MAC.
        let r = trace(
            &root,
            &ipam_dir,
            &[
                "--from",
                "pod-one",
                "--to",
                "default/pod-two",
                "--proto",
                "tcp",
                "--port",
                "8080",
            ],
        );
        let s = &r["steps"][0];
        assert_eq!(s["hook"], "from_pod");
        assert_eq!(s["interface"], "h1");
        assert_eq!(s["verdict"], "TC_ACT_REDIRECT");
        assert_eq!(counter(s, "local_delivered"), 1, "{s}");
        assert_eq!(
            counter(s, "conntrack_fast_new"),
            1,
            "the trace instance tracked the flow"
        );
        let lookups = s["lookups"].to_string();
        assert!(lookups.contains("source check passes"), "{lookups}");
        assert!(lookups.contains("local pod default/pod-two"), "{lookups}");
        assert!(lookups.contains("a new flow"), "{lookups}");
        assert!(
            lookups.contains("policy_endpoints[10.244.1.3]: ingress not isolated: allowed")
                && lookups.contains("policy verdict (revision 0): a new flow is allowed"),
            "{lookups}"
        );
        assert!(
            s["state"]
                .to_string()
                .contains("conntrack entry created: tcp"),
            "{s}"
        );
        assert!(s["action"].as_str().unwrap().contains("default/pod-two"));
        let leaves = &s["leaves"];
        assert!(
            leaves["summary"]
                .as_str()
                .unwrap()
                .contains("tcp 10.244.1.2:42424 -> 10.244.1.3:8080 (ttl 63)"),
            "{leaves}"
        );
        let pod2_mac = POD2_MAC
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            leaves["hex"].as_str().unwrap().starts_with(&pod2_mac),
            "{leaves}"
        );
        assert_eq!(r["steps"].as_array().unwrap().len(), 1);

        // To a pod of the peer: VXLAN out of the underlay, then the peer's XDP decapsulates
        // and its tc program delivers.
        let peer_arg = peer_root.to_str().unwrap();
        let r = trace(
            &root,
            &ipam_dir,
            &[
                "--from",
                "10.244.1.2",
                "--to",
                "10.244.2.7",
                "--proto",
                "udp",
                "--port",
                "53",
                "--peer-pin-root",
                peer_arg,
            ],
        );
        let steps = r["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 3, "{r}");
        let s = &steps[0];
        assert_eq!(s["verdict"], "TC_ACT_REDIRECT");
        assert_eq!(counter(s, "vxlan_encap"), 1, "{s}");
        assert!(
            s["lookups"]
                .to_string()
                .contains("10.244.2.0/24 -> node 192.168.50.2 (vxlan"),
            "{s}"
        );
        assert!(
            s["state"]
                .to_string()
                .contains("next hop toward 192.168.50.2 resolved by the FIB: ul0"),
            "{s}"
        );
        let summary = s["leaves"]["summary"].as_str().unwrap();
        assert!(
            summary.contains(
                "vxlan 192.168.50.1 -> 192.168.50.2 | udp 10.244.1.2:42424 -> 10.244.2.7:53"
            ),
            "{summary}"
        );
        assert_eq!(s["leaves"]["len"], 42 + 16 + 50);
        let x = &steps[1];
        assert_eq!(
            (x["hook"].as_str(), x["node"].as_str()),
            (Some("xdp_underlay"), Some("192.168.50.2"))
        );
        assert_eq!(x["verdict"], "XDP_PASS");
        assert_eq!(counter(x, "xdp_vxlan_decap"), 1, "{x}");
        // The inner frame, with XDP's metadata reported apart.
        assert!(x["leaves"]["summary"].as_str().unwrap().contains("udp 10.244.1.2:42424 -> 10.244.2.7:53 (ttl 63)"), "{x}");
        assert!(x["state"].to_string().contains("metadata for from_underlay: from node 192.168.50.1"), "{x}");
        assert!(x["lookups"].to_string().contains("a known node"), "{x}");
        let t = &steps[2];
        assert_eq!(t["hook"], "from_underlay");
        assert_eq!(t["verdict"], "TC_ACT_REDIRECT");
        assert_eq!(counter(t, "underlay_delivered"), 1, "{t}");
        assert!(
            t["lookups"].to_string().contains(
                "policy_endpoints[10.244.2.7]: ingress not isolated: allowed"
            ),
            "the peer's policy, judged on the peer: {t}"
        );
        assert!(
            t["action"]
                .as_str()
                .unwrap()
                .contains("into pod 10.244.2.7"),
            "{t}"
        );

        // ICMP over IPIP to a node whose maps are not here: one step and a note.
        let r = trace(
            &root,
            &ipam_dir,
            &["--from", "pod-one", "--to", "10.244.3.7", "--proto", "icmp"],
        );
        assert_eq!(counter(&r["steps"][0], "ipip_encap"), 1, "{r}");
        assert!(
            r["note"].as_str().unwrap().contains("--peer-pin-root"),
            "{r}"
        );

        // A spoof: pod-one's veth sends another address.
        let r = trace(
            &root,
            &ipam_dir,
            &[
                "--from",
                "10.244.1.99",
                "--via",
                "pod-one",
                "--to",
                "pod-two",
            ],
        );
        let s = &r["steps"][0];
        assert_eq!(s["verdict"], "TC_ACT_SHOT");
        assert_eq!(s["drop_reason"], "spoofed_ip");
        assert_eq!(counter(s, "drop:spoofed_ip"), 1);
        assert!(
            s["lookups"].to_string().contains("source check fails"),
            "{s}"
        );
        assert!(s.get("leaves").is_none());

        // Run on the destination node: a pod of another node arrives from the underlay, built
        // as its node sends it.
        let r = trace(&peer_root, &ipam_dir, &["--from", "10.244.1.2", "--to", "10.244.2.7", "--proto", "tcp"]);
        let steps = r["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 2, "{r}");
        assert!(r["note"].as_str().unwrap().contains("a pod of node 192.168.50.1"), "{r}");
        assert_eq!(steps[0]["hook"], "xdp_underlay");
        assert_eq!(counter(&steps[0], "xdp_vxlan_decap"), 1, "{r}");
        assert_eq!(steps[1]["hook"], "from_underlay");
        assert_eq!(counter(&steps[1], "underlay_delivered"), 1, "{r}");
        assert!(steps[1]["leaves"]["summary"].as_str().unwrap().contains("tcp 10.244.1.2:42424 -> 10.244.2.7:80 (ttl 62)"), "{r}");

        // The peer with `weft_vxlan`: its from_underlay checks the VXLAN packet carrying TCP and
        // leaves it to the kernel's vxlan socket; from_vxlan (the socket's part modelled)
        // delivers.
        let mut peer_maps = Maps::open_pinned(&peer_root).unwrap();
        let peer_cfg = peer_maps.config().unwrap();
        peer_maps
            .set_config(&NodeConfig {
                flags: peer_cfg.flags | CONFIG_F_VXLAN_DEV,
                ..peer_cfg
            })
            .unwrap();
        let r = trace(
            &root,
            &ipam_dir,
            &["--from", "pod-one", "--to", "10.244.2.7", "--peer-pin-root", peer_arg],
        );
        let steps = r["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 4, "{r}");
        let t = &steps[2];
        assert_eq!(t["hook"], "from_underlay");
        assert_eq!(t["verdict"], "TC_ACT_OK", "{t}");
        assert!(t["action"].as_str().unwrap().contains("to weft_vxlan"), "{t}");
        assert_eq!(counter(t, "tc_decap"), 0, "{t}");
        let v = &steps[3];
        assert_eq!((v["hook"].as_str(), v["interface"].as_str()), (Some("from_vxlan"), Some("weft_vxlan")));
        assert_eq!(v["verdict"], "TC_ACT_REDIRECT", "{v}");
        assert_eq!(counter(v, "vxlan_device_decap"), 1, "{v}");
        assert_eq!(counter(v, "underlay_delivered"), 1, "{v}");
        assert!(v["lookups"].to_string().contains("from node 192.168.50.1, VNI 1"), "{v}");
        assert!(v["action"].as_str().unwrap().contains("into pod 10.244.2.7"), "{v}");
        assert!(v["leaves"]["summary"].as_str().unwrap().contains("tcp 10.244.1.2:42424 -> 10.244.2.7:80 (ttl 62)"), "{v}");
        // UDP in VXLAN: decapsulated by from_underlay itself, no fourth step.
        let r = trace(
            &root,
            &ipam_dir,
            &["--from", "pod-one", "--to", "10.244.2.7", "--proto", "udp", "--peer-pin-root", peer_arg],
        );
        let steps = r["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 3, "{r}");
        assert_eq!(steps[2]["verdict"], "TC_ACT_REDIRECT", "{r}");
        assert_eq!(counter(&steps[2], "tc_decap"), 1, "{r}");
        peer_maps.set_config(&peer_cfg).unwrap();

        // With only the capabilities the manifest gives the agent container (the CLI runs
        // there): loading the instance and BPF_PROG_TEST_RUN need nothing more.
        let out = Command::new("setpriv")
            .args(["--bounding-set=-all,+bpf,+net_admin,+perfmon", "--inh-caps=-all", "--"])
            .arg(binary("weft"))
            .arg("--pin-root")
            .arg(&root)
            .args(["--json", "trace", "--cni-data-dir", ipam_dir.to_str().unwrap()])
            .args(["--from", "pod-one", "--to", "pod-two"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["steps"][0]["verdict"], "TC_ACT_REDIRECT");

        // The text form, for people.
        let out = Command::new(binary("weft"))
            .arg("--pin-root")
            .arg(&root)
            .args(["trace", "--cni-data-dir", ipam_dir.to_str().unwrap()])
            .args([
                "--from",
                "pod-one",
                "--to",
                "10.244.2.7",
                "--peer-pin-root",
                peer_arg,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!("{text}");
        for want in [
            "[1] from_pod on h1, node 192.168.50.1",
            "verdict  TC_ACT_REDIRECT: out of the underlay toward node 192.168.50.2",
            "[2] xdp_underlay",
            "[3] from_underlay",
            "underlay_delivered +1",
            "leaves   70 bytes: eth 02:cc:00:00:00:01 -> 02:cc:00:00:00:07, tcp 10.244.1.2:42424 -> 10.244.2.7:80 (ttl 62)",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }

        // Nothing changed on either node: counters, conntrack, caches, config.
        assert_eq!((state(&node.dp.maps), state(&peer.maps)), before);

        // NetworkPolicy: pod-two isolated for ingress with a rule set allowing nothing; the
        // trace judges against the live policy maps and the program drops the SYN.
        let mut node = node;
        let isolated = PolicyEndpoint {
            flags: POLICY_F_INGRESS_ISOLATED,
            ..PolicyEndpoint::OPEN
        };
        node.dp
            .maps
            .put_policy_endpoint(Ipv4Addr::from(POD2_IP), Some(&isolated))
            .unwrap();
        let before = state(&node.dp.maps);
        let r = trace(
            &root,
            &ipam_dir,
            &["--from", "pod-one", "--to", "pod-two", "--port", "8080"],
        );
        let s = &r["steps"][0];
        assert_eq!(s["verdict"], "TC_ACT_SHOT", "{s}");
        assert_eq!(s["drop_reason"], "policy_denied_ingress", "{s}");
        let lookups = s["lookups"].to_string();
        for want in [
            "policy_endpoints[10.244.1.2]: egress not isolated: allowed",
            "policy_endpoints[10.244.1.3]: ingress isolated (rule set",
            "rules for tcp port 8080: denied",
            "a new flow is denied by the ingress of 10.244.1.3 (drop reason policy_denied_ingress)",
        ] {
            assert!(lookups.contains(want), "{want:?} missing from {lookups}");
        }
        assert_eq!(
            state(&node.dp.maps),
            before,
            "the denial was counted in the trace's instance only"
        );
        drop(peer);
    });
    drop(ns);
    let _ = std::fs::remove_dir_all(&ipam);
}

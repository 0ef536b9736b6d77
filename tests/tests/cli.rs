//! The operator CLI reads a node's pinned maps and prints what the datapath holds.
use std::{net::Ipv4Addr, process::Command};

use weft_agent::datapath::Datapath;
use weft_common::{
    CONFIG_F_READY, CONFIG_F_VXLAN_DEV, DecapHook, EndpointInfo, NodeConfig, NodeInfo, RouteInfo,
    RouteMode,
};
use weft_tests::{cluster::binary, pins::PinDir};

fn weft(pins: &PinDir, args: &[&str]) -> String {
    let out = Command::new(binary("weft"))
        .arg("--pin-root")
        .arg(&pins.path)
        .args(args)
        .output()
        .expect("running weft");
    assert!(
        out.status.success(),
        "weft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cli_shows_routes_endpoints_nodes_and_status() {
    let pins = PinDir::new("cli");
    let mut dp = Datapath::load_pinned(&pins.path).unwrap();
    dp.maps
        .set_config(&NodeConfig {
            node_ip: [192, 168, 7, 1],
            underlay_ifindex: 3,
            vni: 1,
            vxlan_port: 8472,
            flags: CONFIG_F_READY | DecapHook::TcVeth.flags() | CONFIG_F_VXLAN_DEV,
            vtep_mac: [2, 0x77, 0, 0, 0, 1],
            _pad: [0; 2],
            bgp_table: weft_common::BGP_TABLE_DEFAULT,
        })
        .unwrap();
    dp.maps
        .upsert_route(
            "10.244.7.0/24".parse().unwrap(),
            &RouteInfo {
                node_ip: [192, 168, 7, 2],
                vtep_mac: [2, 0x77, 0, 0, 0, 2],
                mode: RouteMode::Ipip as u8,
                _pad: 0,
            },
        )
        .unwrap();
    dp.maps
        .upsert_endpoint(
            Ipv4Addr::new(10, 244, 1, 9),
            &EndpointInfo {
                host_ifindex: 42,
                pod_mac: [2, 0xaa, 0, 0, 0, 9],
                host_mac: [2, 0xbb, 0, 0, 0, 9],
                flags: 0,
            },
        )
        .unwrap();
    dp.maps
        .upsert_node(
            Ipv4Addr::new(192, 168, 7, 2),
            &NodeInfo {
                vtep_mac: [2, 0x77, 0, 0, 0, 2],
                mode: RouteMode::Ipip as u8,
                _pad: 0,
            },
        )
        .unwrap();
    drop(dp);

    let status = weft(&pins, &["status"]);
    assert!(
        status.contains("ready") && status.contains("192.168.7.1"),
        "{status}"
    );
    assert!(
        status.contains("1 routes, 1 endpoints, 1 nodes"),
        "{status}"
    );
    assert!(
        status.contains("decap      tc (veth: XDP would copy every frame"),
        "{status}"
    );
    assert!(
        status.contains("VXLAN: TCP by the kernel's vxlan socket after GRO (weft_vxlan)"),
        "{status}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&weft(&pins, &["status", "--json"])).unwrap();
    assert_eq!(status["decap_hook"], "tc");
    assert_eq!(status["vxlan_decap"], "weft_vxlan");
    assert!(status["ready"].as_bool().unwrap());
    let routes = weft(&pins, &["routes"]);
    assert!(
        routes.contains("10.244.7.0/24")
            && routes.contains("192.168.7.2")
            && routes.contains("ipip"),
        "{routes}"
    );
    let endpoints = weft(&pins, &["endpoints"]);
    assert!(
        endpoints.contains("10.244.1.9") && endpoints.contains("02:aa:00:00:00:09"),
        "{endpoints}"
    );
    let nodes: serde_json::Value =
        serde_json::from_str(&weft(&pins, &["nodes", "--json"])).unwrap();
    assert_eq!(nodes[0]["ip"], "192.168.7.2");
    assert_eq!(nodes[0]["mode"], "ipip");
    let drops: serde_json::Value =
        serde_json::from_str(&weft(&pins, &["drops", "--json"])).unwrap();
    assert_eq!(drops["spoofed_ip"], 0);
}

#[test]
fn cli_says_when_no_datapath_is_pinned() {
    let pins = PinDir::new("cli-empty");
    let out = Command::new(binary("weft"))
        .arg("--pin-root")
        .arg(&pins.path)
        .arg("status")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is the agent running"), "{err}");
}

//! Operators inspect weft with bpftool: maps carry BTF, so dumps print field names, and the
//! object loads with libbpf as well.
use std::net::Ipv4Addr;

use weft_agent::datapath::{Datapath, pin_dir};
use weft_common::{EndpointInfo, RouteInfo, RouteMode, map_names};
use weft_tests::{netns::run, pins::PinDir};

#[test]
fn bpftool_map_dumps_print_field_names() {
    let pins = PinDir::new("btf");
    let mut dp = Datapath::load_pinned(&pins.path).expect("loading pinned");
    dp.maps
        .upsert_route(
            "10.244.9.0/24".parse().unwrap(),
            &RouteInfo {
                node_ip: [192, 168, 1, 9],
                vtep_mac: [2, 0, 0, 0, 0, 9],
                mode: RouteMode::Vxlan as u8,
                _pad: 0,
            },
        )
        .unwrap();
    dp.maps
        .upsert_endpoint(
            Ipv4Addr::new(10, 244, 1, 5),
            &EndpointInfo {
                host_ifindex: 7,
                pod_mac: [2, 1, 1, 1, 1, 1],
                host_mac: [2, 2, 2, 2, 2, 2],
                flags: 0,
            },
        )
        .unwrap();
    let maps = pin_dir(&pins.path).join("maps");
    let routes = run(
        "bpftool",
        &[
            "map",
            "dump",
            "pinned",
            maps.join(map_names::ROUTES).to_str().unwrap(),
        ],
    );
    for field in ["prefix_len", "node_ip", "vtep_mac", "mode"] {
        assert!(routes.contains(field), "route dump lacks {field}: {routes}");
    }
    assert!(routes.contains("192") && routes.contains("24"), "{routes}");
    let endpoints = run(
        "bpftool",
        &[
            "map",
            "dump",
            "pinned",
            maps.join(map_names::ENDPOINTS).to_str().unwrap(),
        ],
    );
    for field in ["addr", "host_ifindex", "pod_mac", "host_mac"] {
        assert!(
            endpoints.contains(field),
            "endpoint dump lacks {field}: {endpoints}"
        );
    }
    let config = run(
        "bpftool",
        &[
            "map",
            "dump",
            "pinned",
            maps.join(map_names::CONFIG).to_str().unwrap(),
        ],
    );
    for field in [
        "node_ip",
        "underlay_ifindex",
        "vni",
        "vxlan_port",
        "vtep_mac",
    ] {
        assert!(
            config.contains(field),
            "config dump lacks {field}: {config}"
        );
    }
    // NetworkPolicy: every map is a BTF map, and dumps name the fields.
    dp.maps
        .put_policy_endpoint(
            Ipv4Addr::new(10, 244, 1, 5),
            Some(&weft_common::policy::PolicyEndpoint::OPEN),
        )
        .unwrap();
    for name in map_names::POLICY {
        let path = maps.join(name);
        let show = run(
            "bpftool",
            &["-j", "map", "show", "pinned", path.to_str().unwrap()],
        );
        let show: serde_json::Value = serde_json::from_str(&show).unwrap();
        assert!(
            show["btf_id"].as_u64().is_some_and(|id| id > 0),
            "{name} has no BTF: {show}"
        );
    }
    let policy = run(
        "bpftool",
        &[
            "map",
            "dump",
            "pinned",
            maps.join(map_names::POLICY_ENDPOINTS).to_str().unwrap(),
        ],
    );
    for field in ["ingress_ruleset", "egress_ruleset", "flags"] {
        assert!(
            policy.contains(field),
            "policy endpoint dump lacks {field}: {policy}"
        );
    }
}

#[test]
fn libbpf_loads_the_object_too() {
    let pins = PinDir::new("libbpf");
    let obj = std::env::temp_dir().join(format!("weft-{}.o", std::process::id()));
    std::fs::write(&obj, weft_agent::datapath::EBPF_OBJECT).unwrap();
    let dir = pins.path.join("progs");
    let out = run(
        "bpftool",
        &[
            "prog",
            "loadall",
            obj.to_str().unwrap(),
            dir.to_str().unwrap(),
        ],
    );
    let _ = std::fs::remove_file(&obj);
    let _ = out;
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "from_host",
            "from_pod",
            "from_underlay",
            "from_vxlan",
            "to_pod",
            "xdp_underlay"
        ],
        "{names:?}"
    );
}

//! The node of the packet-injection tests: a namespace holding two pod veths and an underlay veth
//! with a resolvable neighbour, and a loaded (unpinned) datapath configured for it. Test bodies
//! run on a thread inside the namespace so the programs' FIB lookups see its routes.
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use weft_agent::datapath::{Datapath, LoadOptions};
use weft_common::{
    CONFIG_F_READY, EndpointInfo, NodeConfig, NodeInfo, RouteInfo, RouteMode,
    policy::{POLICY_NS_F_SYNCED, PolicyEndpoint},
};

use crate::netns::{Netns, parse_mac};

pub const NODE_IP: [u8; 4] = [192, 168, 50, 1];
/// A peer whose underlay neighbour entry exists (FIB lookup succeeds).
pub const PEER_IP: [u8; 4] = [192, 168, 50, 2];
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x50, 0x02];
/// A peer without a neighbour entry (the program hands the packet to `bpf_redirect_neigh`).
pub const PEER_NO_NEIGH_IP: [u8; 4] = [192, 168, 50, 3];
pub const VTEP_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
pub const PEER_VTEP_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x02];
pub const VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 8472;

pub const POD1_IP: [u8; 4] = [10, 244, 1, 2];
pub const POD1_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x02];
pub const POD2_IP: [u8; 4] = [10, 244, 1, 3];
pub const POD2_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x03];
/// Remote pods, one per route mode.
pub const REMOTE_VXLAN_IP: [u8; 4] = [10, 244, 2, 7];
pub const REMOTE_IPIP_IP: [u8; 4] = [10, 244, 3, 7];
pub const REMOTE_DIRECT_IP: [u8; 4] = [10, 244, 4, 7];
pub const REMOTE_NO_NEIGH_IP: [u8; 4] = [10, 244, 5, 7];
/// A peer on another subnet, behind the on-link peer as a router.
pub const OFFLINK_PEER_IP: [u8; 4] = [192, 168, 60, 5];
/// A pod of the off-link peer (VXLAN).
pub const REMOTE_OFFLINK_IP: [u8; 4] = [10, 244, 6, 7];

pub struct Node {
    pub dp: Datapath,
    pub pod1_ifindex: u32,
    pub pod1_host_mac: [u8; 6],
    pub pod2_ifindex: u32,
    pub pod2_host_mac: [u8; 6],
    pub underlay_mac: [u8; 6],
}

/// Creates the namespace with its interfaces (call outside; returns the guard).
pub fn namespace() -> Netns {
    let ns = Netns::new("wpt");
    ns.ip("link add h1 type veth peer name p1");
    ns.ip("link add h2 type veth peer name p2");
    ns.ip("link add ul0 type veth peer name ul1");
    for dev in ["h1", "p1", "h2", "p2", "ul0", "ul1"] {
        ns.ip(&format!("link set {dev} up"));
    }
    ns.ip("addr add 192.168.50.1/24 dev ul0");
    // Nodes forward (Kubernetes requires it); the FIB helper refuses to route otherwise.
    ns.sysctl("net.ipv4.ip_forward", "1");
    ns.ip("neigh replace 192.168.50.2 lladdr 02:00:00:00:50:02 dev ul0 nud permanent");
    // With a route MTU smaller than the link's, locked (the FIB reports a route MTU for
    // forwarded packets only when locked, as the kernel's forwarding uses it).
    ns.ip("route add 192.168.60.0/24 via 192.168.50.2 mtu lock 1300");
    ns
}

/// Loads and configures the datapath; must run inside the namespace (`Netns::run`).
pub fn node() -> Node {
    node_with(&test_options())
}

fn test_options() -> LoadOptions {
    LoadOptions {
        conntrack_max: crate::TEST_CONNTRACK_MAX,
        ..Default::default()
    }
}

/// [`node`] with explicit map sizes.
pub fn node_with(options: &LoadOptions) -> Node {
    configure(Datapath::load_unpinned_with(options).expect("loading the datapath"))
}

/// `node` with the maps pinned under `pin_root` (for tools that open pins, as `weft`).
pub fn node_pinned(pin_root: &std::path::Path) -> Node {
    configure(Datapath::load_pinned_with(pin_root, &test_options()).expect("loading the datapath"))
}

/// Configures a loaded datapath as the fixture's node (inside the namespace).
pub fn configure(mut dp: Datapath) -> Node {
    let link = |dev: &str| -> (u32, [u8; 6]) {
        let out = crate::netns::ip(&format!("-o link show dev {dev}"));
        let idx = out.split(':').next().unwrap().trim().parse().unwrap();
        let mac = out
            .split("link/ether ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        (idx, parse_mac(mac))
    };
    let (pod1_ifindex, pod1_host_mac) = link("h1");
    let (pod2_ifindex, pod2_host_mac) = link("h2");
    let (ul_ifindex, underlay_mac) = link("ul0");
    dp.maps
        .set_config(&NodeConfig {
            node_ip: NODE_IP,
            underlay_ifindex: ul_ifindex,
            vni: VNI,
            vxlan_port: VXLAN_PORT,
            flags: CONFIG_F_READY,
            vtep_mac: VTEP_MAC,
            _pad: [0; 2],
            bgp_table: weft_common::BGP_TABLE_DEFAULT,
        })
        .unwrap();
    for (ip, ifindex, pod_mac, host_mac) in [
        (POD1_IP, pod1_ifindex, POD1_MAC, pod1_host_mac),
        (POD2_IP, pod2_ifindex, POD2_MAC, pod2_host_mac),
    ] {
        dp.maps
            .upsert_endpoint(
                Ipv4Addr::from(ip),
                &EndpointInfo {
                    host_ifindex: ifindex,
                    pod_mac,
                    host_mac,
                    flags: 0,
                },
            )
            .unwrap();
    }
    // As an agent with no policy does: the pods are not isolated.
    for ip in [POD1_IP, POD2_IP] {
        dp.maps
            .put_policy_endpoint(Ipv4Addr::from(ip), Some(&PolicyEndpoint::OPEN))
            .unwrap();
    }
    dp.maps
        .put_policy_ns_default("", Some(POLICY_NS_F_SYNCED))
        .unwrap();
    for (cidr, node_ip, mode) in [
        ("10.244.2.0/24", PEER_IP, RouteMode::Vxlan),
        ("10.244.3.0/24", PEER_IP, RouteMode::Ipip),
        ("10.244.4.0/24", PEER_IP, RouteMode::Direct),
        ("10.244.5.0/24", PEER_NO_NEIGH_IP, RouteMode::Vxlan),
        ("10.244.6.0/24", OFFLINK_PEER_IP, RouteMode::Vxlan),
    ] {
        let cidr: Ipv4Net = cidr.parse().unwrap();
        dp.maps
            .upsert_route(
                cidr,
                &RouteInfo {
                    node_ip,
                    vtep_mac: PEER_VTEP_MAC,
                    mode: mode as u8,
                    _pad: 0,
                },
            )
            .unwrap();
    }
    for peer in [PEER_IP, PEER_NO_NEIGH_IP, OFFLINK_PEER_IP] {
        dp.maps
            .upsert_node(
                Ipv4Addr::from(peer),
                &NodeInfo {
                    vtep_mac: PEER_VTEP_MAC,
                    mode: RouteMode::Vxlan as u8,
                    _pad: 0,
                },
            )
            .unwrap();
    }
    Node {
        dp,
        pod1_ifindex,
        pod1_host_mac,
        pod2_ifindex,
        pod2_host_mac,
        underlay_mac,
    }
}

/// Runs `test` with a configured node inside a fresh namespace.
pub fn with_node<T: Send + 'static>(test: impl FnOnce(&mut Node) -> T + Send + 'static) -> T {
    with_node_using(
        LoadOptions {
            conntrack_max: crate::TEST_CONNTRACK_MAX,
            ..Default::default()
        },
        test,
    )
}

/// [`with_node`] with explicit map sizes.
pub fn with_node_using<T: Send + 'static>(
    options: LoadOptions,
    test: impl FnOnce(&mut Node) -> T + Send + 'static,
) -> T {
    let ns = namespace();
    let result = ns.run(move || {
        let mut node = node_with(&options);
        test(&mut node)
    });
    drop(ns);
    result
}

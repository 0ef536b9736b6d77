//! Two weft nodes, every backend: pod to pod on one node and across nodes, node to remote pod
//! and pod to remote node, ICMP and TCP, with XDP, with tc through `weft_vxlan` and with tc
//! alone; and a live switch of the backend while a flow runs, with the loss counted.
use std::{net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;
use weft_agent::datapath::XdpSetting;
use weft_common::{CONFIG_F_VXLAN_DEV, DecapHook, DropReason, RouteMode, Stat, VXLAN_DEV};
use weft_tests::{
    agentless::{Pod, WeftNode, mtu_wire},
    capture::Capture,
    flow::{FlowLoss, SequencedFlow, tcp_transfer, udp_echo_sizes},
    inject::{UdpCounter, frame_send},
    netns::{Netns, veth_pair},
    packets::{Outer, udp_frame, vxlan_frame},
    process::wait_until,
};

const POD_MTU: u32 = 1450;

struct Cluster {
    a: WeftNode,
    b: WeftNode,
    a1: Pod,
    a2: Pod,
    b1: Pod,
}

/// Where the nodes decapsulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    /// XDP (`--xdp=on`).
    Xdp,
    /// tc, VXLAN through `weft_vxlan` (the agent's way on a veth underlay).
    TcDevice,
    /// tc alone, VXLAN decapsulated by `from_underlay` (where `weft_vxlan` cannot be made).
    TcDirect,
}

fn cluster(hook: Hook) -> Cluster {
    let xdp = if hook == Hook::Xdp {
        XdpSetting::On
    } else {
        XdpSetting::Off
    };
    let device = hook == Hook::TcDevice;
    let ns_a = Netns::new("na");
    let ns_b = Netns::new("nb");
    veth_pair(&ns_a, "eth0", &ns_b, "eth0");
    mtu_wire(&ns_a, "eth0");
    mtu_wire(&ns_b, "eth0");
    ns_a.ip("addr add 192.168.70.1/24 dev eth0");
    ns_b.ip("addr add 192.168.70.2/24 dev eth0");
    let a = WeftNode::with_vxlan_device(
        ns_a,
        Ipv4Addr::new(192, 168, 70, 1),
        "eth0",
        [2, 0x77, 0, 0, 0, 1],
        xdp,
        device,
    );
    let b = WeftNode::with_vxlan_device(
        ns_b,
        Ipv4Addr::new(192, 168, 70, 2),
        "eth0",
        [2, 0x77, 0, 0, 0, 2],
        xdp,
        device,
    );
    assert_eq!(a.vxlan_device, device);
    let network: Ipv4Net = "10.244.0.0/16".parse().unwrap();
    a.route_cluster_network(network);
    b.route_cluster_network(network);
    let a1 = a.add_pod(Ipv4Addr::new(10, 244, 1, 2), POD_MTU);
    let a2 = a.add_pod(Ipv4Addr::new(10, 244, 1, 3), POD_MTU);
    let b1 = b.add_pod(Ipv4Addr::new(10, 244, 2, 2), POD_MTU);
    Cluster { a, b, a1, a2, b1 }
}

fn set_mode(c: &Cluster, mode: RouteMode) {
    c.a.add_peer("10.244.2.0/24".parse().unwrap(), c.b.ip, c.b.vtep_mac, mode);
    c.b.add_peer("10.244.1.0/24".parse().unwrap(), c.a.ip, c.a.vtep_mac, mode);
}

fn ping(from: &Netns, to: Ipv4Addr) {
    from.exec(
        "ping",
        &["-c", "2", "-i", "0.2", "-W", "2", &to.to_string()],
    );
}

fn connectivity(c: &Cluster, port: u16) {
    // Same node, across nodes, both directions.
    for (from, to) in [
        (&c.a1, &c.a2),
        (&c.a2, &c.a1),
        (&c.a1, &c.b1),
        (&c.b1, &c.a1),
    ] {
        ping(&from.ns, to.ip);
    }
    // Node to local pod, node to remote pod, pod to remote node.
    ping(&c.a.ns, c.a1.ip);
    ping(&c.a.ns, c.b1.ip);
    ping(&c.b.ns, c.a2.ip);
    ping(&c.b1.ns, c.a.ip);
    // Largest unfragmented ICMP across nodes.
    let max = (POD_MTU - 28).to_string();
    c.a1.ns.exec(
        "ping",
        &[
            "-c",
            "2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            &max,
            &c.b1.ip.to_string(),
        ],
    );
    // TCP both ways across nodes and on one node.
    let t = Duration::from_secs(20);
    tcp_transfer(&c.b1.ns, c.b1.ip, port, &c.a1.ns, 4 << 20, t);
    tcp_transfer(&c.a1.ns, c.a1.ip, port + 1, &c.b1.ns, 4 << 20, t);
    tcp_transfer(&c.a2.ns, c.a2.ip, port + 2, &c.a1.ns, 4 << 20, t);
    // The node's own bulk traffic to a remote pod and back (hostNetwork pods, probes).
    tcp_transfer(&c.b1.ns, c.b1.ip, port + 3, &c.a.ns, 4 << 20, t);
    tcp_transfer(&c.b.ns, c.b.ip, port + 4, &c.a1.ns, 4 << 20, t);
    // Every datagram size from 1 to 9000 bytes across nodes: the MTU boundary and fragments.
    let retries = udp_echo_sizes(&c.a1.ns, &c.b1.ns, c.b1.ip, port + 5, 1..=9000);
    assert!(retries <= 5, "{retries} datagrams needed a retry");
    assert_eq!(
        c.a.drops_total(),
        0,
        "node A drops: {:?}",
        c.a.maps().drops().unwrap()
    );
    assert_eq!(
        c.b.drops_total(),
        0,
        "node B drops: {:?}",
        c.b.maps().drops().unwrap()
    );
}

fn stat(node: &WeftNode, s: Stat) -> u64 {
    node.maps().stat_count(s).unwrap()
}

#[test]
fn vxlan_backend_full_connectivity() {
    let c = cluster(Hook::Xdp);
    set_mode(&c, RouteMode::Vxlan);
    connectivity(&c, 6001);
    assert!(stat(&c.a, Stat::VxlanEncap) > 0 && stat(&c.b, Stat::XdpVxlanDecap) > 0);
    assert!(stat(&c.a, Stat::LocalDelivered) > 0);
}

#[test]
fn ipip_backend_full_connectivity() {
    let c = cluster(Hook::Xdp);
    set_mode(&c, RouteMode::Ipip);
    connectivity(&c, 6101);
    assert!(stat(&c.a, Stat::IpipEncap) > 0 && stat(&c.b, Stat::XdpIpipDecap) > 0);
    assert_eq!(stat(&c.a, Stat::VxlanEncap), 0);
}

#[test]
fn direct_backend_full_connectivity() {
    let c = cluster(Hook::Xdp);
    set_mode(&c, RouteMode::Direct);
    connectivity(&c, 6201);
    assert!(stat(&c.a, Stat::DirectForward) > 0 && stat(&c.b, Stat::UnderlayDelivered) > 0);
    assert_eq!(
        stat(&c.a, Stat::VxlanEncap) + stat(&c.a, Stat::IpipEncap),
        0
    );
}

/// The largest frame pod `to` receives during a bulk TCP transfer into it from `from`.
fn largest_received(from: &Netns, to: &Pod, port: u16) -> usize {
    let cap = Capture::start(&to.ns, "10.244.0.0/16".parse().unwrap());
    tcp_transfer(&to.ns, to.ip, port, from, 16 << 20, Duration::from_secs(30));
    cap.stop().max_len
}

#[test]
fn tunnels_work_without_xdp_through_tc_decapsulation() {
    let c = cluster(Hook::TcDirect);
    set_mode(&c, RouteMode::Vxlan);
    connectivity(&c, 6301);
    // Nothing aggregates VXLAN without a socket on its port: the pod gets one MTU-sized
    // segment at a time.
    let largest = largest_received(&c.a1.ns, &c.b1, 6320);
    assert!(largest <= (POD_MTU + 14) as usize, "{largest} bytes");
    set_mode(&c, RouteMode::Ipip);
    connectivity(&c, 6311);
    assert!(stat(&c.b, Stat::TcDecap) > 0);
    assert_eq!(
        stat(&c.b, Stat::XdpVxlanDecap)
            + stat(&c.b, Stat::XdpIpipDecap)
            + stat(&c.b, Stat::VxlanDeviceDecap),
        0
    );
}

/// The tc hook as the agent sets it up on a veth underlay: TCP in VXLAN through `weft_vxlan`,
/// whose socket gets the underlay's GRO, so a pod receives aggregated TCP segments (larger than
/// its MTU) on an underlay that carries MTU-sized frames; other protocols and IPIP
/// decapsulated by tc.
#[test]
fn vxlan_through_weft_vxlan_is_aggregated_and_delivered() {
    let c = cluster(Hook::TcDevice);
    for node in [&c.a, &c.b] {
        let cfg = node.maps().config().unwrap();
        assert_ne!(cfg.flags & CONFIG_F_VXLAN_DEV, 0);
        assert_eq!(weft_common::vxlan_decap(cfg.flags), VXLAN_DEV);
        let link = node.ns.ip(&format!("-d link show dev {VXLAN_DEV}"));
        assert!(
            link.contains("external") && link.contains("dstport 8472"),
            "{link}"
        );
    }
    set_mode(&c, RouteMode::Vxlan);
    connectivity(&c, 6401);
    // TCP through the device; UDP and ICMP decapsulated by from_underlay (cheaper per packet,
    // and GRO aggregates neither).
    assert!(stat(&c.b, Stat::VxlanDeviceDecap) > 0 && stat(&c.a, Stat::VxlanDeviceDecap) > 0);
    assert!(stat(&c.b, Stat::TcDecap) > 0 && stat(&c.a, Stat::TcDecap) > 0);
    let tc_decap = stat(&c.b, Stat::TcDecap);
    let decap = stat(&c.b, Stat::VxlanDeviceDecap);
    let delivered = stat(&c.b, Stat::UnderlayDelivered);
    let largest = largest_received(&c.a1.ns, &c.b1, 6420);
    assert!(
        largest > (POD_MTU + 14) as usize,
        "the pod got segments of at most {largest} bytes: no GRO"
    );
    // 16 MiB in 1398-byte segments is 12,000 segments; aggregated, far fewer packets.
    let decap = stat(&c.b, Stat::VxlanDeviceDecap) - decap;
    let delivered = stat(&c.b, Stat::UnderlayDelivered) - delivered;
    eprintln!("16 MiB into a pod through {VXLAN_DEV}: {decap} packets, largest {largest} bytes");
    assert!(delivered >= decap / 2, "{delivered} of {decap} delivered");
    assert!(decap < 6000, "{decap} packets for 12,000 segments");
    assert_eq!(
        stat(&c.b, Stat::TcDecap),
        tc_decap,
        "no TCP decapsulated in tc"
    );
    set_mode(&c, RouteMode::Ipip);
    connectivity(&c, 6411);
    assert!(stat(&c.b, Stat::TcDecap) > 0);
}

/// The kernel's vxlan socket takes VXLAN from any interface, not only the underlay (where
/// `from_underlay` checks it first): `from_vxlan` applies the checks to whatever the socket
/// decapsulated. A host on another link of node B sends VXLAN claiming to come from node A.
#[test]
fn weft_vxlan_checks_vxlan_from_any_interface() {
    let c = cluster(Hook::TcDevice);
    set_mode(&c, RouteMode::Vxlan);
    let side = Netns::new("nx");
    veth_pair(&side, "eth0", &c.b.ns, "side0");
    side.ip("addr add 192.168.74.1/24 dev eth0");
    c.b.ns.ip("addr add 192.168.74.2/24 dev side0");
    let (side_mac, b_mac) = (side.mac("eth0"), c.b.ns.mac("side0"));
    let vxlan = |inner_src: Ipv4Addr, vni: u32| {
        let inner = udp_frame(
            c.a.vtep_mac,
            c.b.vtep_mac,
            inner_src.octets(),
            c.b1.ip.octets(),
            5555,
            7707,
            b"from the side",
        );
        vxlan_frame(
            &Outer {
                src_mac: side_mac,
                dst_mac: b_mac,
                src: c.a.ip.octets(),
                dst: c.b.ip.octets(),
            },
            50000,
            8472,
            vni,
            &inner,
        )
    };
    let received = UdpCounter::start(&c.b1.ns, c.b1.ip, 7707);
    // A pod of node A: delivered through the device.
    frame_send(&side, "eth0", vxlan(c.a1.ip, 1));
    wait_until(
        "the datagram through weft_vxlan",
        Duration::from_secs(5),
        || received.count() == 1,
    );
    // Not node A's, and another VNI: dropped by from_vxlan, each with its reason.
    frame_send(&side, "eth0", vxlan(Ipv4Addr::new(8, 8, 8, 8), 1));
    frame_send(&side, "eth0", vxlan(c.a1.ip, 2));
    let maps = c.b.maps();
    wait_until("both drops counted", Duration::from_secs(5), || {
        maps.drop_count(DropReason::TunnelInnerSourceSpoofed)
            .unwrap()
            == 1
            && maps.drop_count(DropReason::VxlanVniMismatch).unwrap() == 1
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(received.count(), 1, "nothing else reached the pod");
    assert_eq!(c.b.drops_total(), 2, "{:?}", maps.drops().unwrap());
}

/// Switches the backend every 150 ms while a sequenced UDP flow runs between pods on the two
/// nodes; counts what did not arrive.
#[test]
fn live_backend_switch_loses_nothing() {
    for hook in [Hook::Xdp, Hook::TcDevice] {
        live_backend_switch(hook);
    }
}

/// Runs `step` every 150 ms, at least `rounds` times and until a bulk TCP transfer from pod a1
/// into pod b1 has arrived intact (with the tc hook, TCP in VXLAN takes `weft_vxlan`, where the
/// sequenced UDP flows of these tests do not go); returns how many steps ran.
fn during_tcp_transfer(
    c: &Cluster,
    port: u16,
    rounds: usize,
    mut step: impl FnMut(usize),
) -> usize {
    let before = stat(&c.b, Stat::VxlanDeviceDecap);
    let steps = std::thread::scope(|scope| {
        let transfer = scope.spawn(|| {
            tcp_transfer(
                &c.b1.ns,
                c.b1.ip,
                port,
                &c.a1.ns,
                64 << 20,
                Duration::from_secs(120),
            )
        });
        let mut n = 0;
        while n < rounds || !transfer.is_finished() {
            std::thread::sleep(Duration::from_millis(150));
            step(n);
            n += 1;
        }
        if let Err(e) = transfer.join() {
            std::panic::resume_unwind(e);
        }
        n
    });
    if c.b.vxlan_device {
        assert!(
            stat(&c.b, Stat::VxlanDeviceDecap) > before,
            "TCP went through weft_vxlan"
        );
    }
    steps
}

fn live_backend_switch(hook: Hook) {
    let c = cluster(hook);
    set_mode(&c, RouteMode::Vxlan);
    ping(&c.a1.ns, c.b1.ip);
    let flow = SequencedFlow::start(&c.a1.ns, &c.b1.ns, c.b1.ip, 7000);
    let modes = [
        RouteMode::Ipip,
        RouteMode::Direct,
        RouteMode::Vxlan,
        RouteMode::Direct,
        RouteMode::Ipip,
        RouteMode::Vxlan,
    ];
    let switches = during_tcp_transfer(&c, 7010, modes.len(), |n| {
        set_mode(&c, modes[n % modes.len()])
    });
    // End in vxlan whatever the count.
    set_mode(&c, RouteMode::Vxlan);
    std::thread::sleep(Duration::from_millis(150));
    let FlowLoss {
        sent,
        lost,
        missing,
    } = flow.stop();
    eprintln!(
        "live backend switch ({hook:?}): {switches} switches, {sent} packets sent, {lost} lost"
    );
    assert!(sent > 1000, "the flow ran ({sent} packets)");
    assert_eq!(
        lost, 0,
        "packets lost during live backend switches: {missing:?}"
    );
    for s in [Stat::VxlanEncap, Stat::IpipEncap, Stat::DirectForward] {
        assert!(stat(&c.a, s) > 0, "{s:?} used");
    }
}

/// What a restarted agent does to the datapath: load the object again (adopting the pinned
/// maps) and switch every pinned link to the new programs, `weft_vxlan`'s too.
fn restart_datapath(node: &WeftNode, hook: Hook) -> usize {
    let root = node.pins.path.clone();
    let dev = node.underlay.clone();
    let (mac, address) = (node.vtep_mac, node.ip);
    node.ns.run(move || {
        let mut dp = weft_agent::datapath::Datapath::load_pinned(&root).expect("reloading");
        dp.pin_programs().expect("pinning programs");
        let setting = if hook == Hook::Xdp {
            XdpSetting::On
        } else {
            XdpSetting::Off
        };
        dp.attach_underlay(&dev, setting)
            .expect("re-attaching the underlay");
        if hook == Hook::TcDevice {
            let nl = weft_agent::netlink::BlockingNetlink::open().unwrap();
            weft_agent::node_net::VxlanDevice {
                port: 8472,
                mtu: POD_MTU,
                mac,
                address,
            }
            .ensure(&nl, &root)
            .expect("adopting weft_vxlan");
        }
        dp.attach_from_host(weft_common::HOST_PEER_DEV)
            .expect("re-attaching from_host");
        dp.reattach_pods().expect("re-attaching pods")
    })
}

/// Reloading the datapath while a flow runs: links are switched atomically, maps adopted, the
/// VXLAN device kept.
#[test]
fn datapath_reload_during_a_flow_loses_nothing() {
    for hook in [Hook::Xdp, Hook::TcDevice] {
        datapath_reload(hook);
    }
}

fn datapath_reload(hook: Hook) {
    let c = cluster(hook);
    set_mode(&c, RouteMode::Vxlan);
    ping(&c.a1.ns, c.b1.ip);
    let flow = SequencedFlow::start(&c.a1.ns, &c.b1.ns, c.b1.ip, 7001);
    let reloads = during_tcp_transfer(&c, 7011, 3, |_| {
        assert_eq!(
            restart_datapath(&c.a, hook),
            2,
            "both pod links of node A switched"
        );
        assert_eq!(
            restart_datapath(&c.b, hook),
            1,
            "the pod link of node B switched"
        );
    });
    std::thread::sleep(Duration::from_millis(150));
    let FlowLoss {
        sent,
        lost,
        missing,
    } = flow.stop();
    eprintln!(
        "datapath reloads during a flow ({hook:?}): {} reloads, {sent} packets sent, {lost} lost",
        2 * reloads
    );
    assert!(sent > 1000);
    assert_eq!(lost, 0, "packets lost during reloads: {missing:?}");
    // The maps survived: routes and endpoints still there, traffic still flows.
    assert_eq!(c.a.maps().endpoints().unwrap().len(), 2);
    assert_eq!(c.a.maps().routes().unwrap().len(), 1);
    ping(&c.b1.ns, c.a2.ip);
}

/// `--xdp=auto` (the default) on a veth underlay decapsulates in tc, and says why; `on` attaches
/// XDP in the veth's driver; switching back to `auto` removes it again. The hook is recorded in
/// the config map, where `weft status` and the metrics read it.
#[test]
fn auto_decapsulates_in_tc_on_a_veth_underlay() {
    let ns_a = Netns::new("na");
    let ns_b = Netns::new("nb");
    veth_pair(&ns_a, "eth0", &ns_b, "eth0");
    ns_a.ip("addr add 192.168.71.1/24 dev eth0");
    let a = WeftNode::new(
        ns_a,
        Ipv4Addr::new(192, 168, 71, 1),
        "eth0",
        [2, 0x77, 0, 0, 0, 1],
        XdpSetting::Auto,
    );
    assert_eq!(a.decap, DecapHook::TcVeth);
    assert_eq!(a.decap.hook(), "tc");
    assert_eq!(
        DecapHook::of_flags(a.maps().config().unwrap().flags),
        DecapHook::TcVeth
    );
    assert!(!a.ns.ip("-d link show dev eth0").contains("xdp"));
    let switch = |setting: XdpSetting| {
        let root = a.pins.path.clone();
        a.ns.run(move || {
            let mut dp = weft_agent::datapath::Datapath::load_pinned(&root).unwrap();
            dp.attach_underlay("eth0", setting).unwrap()
        })
    };
    assert_eq!(switch(XdpSetting::On), DecapHook::XdpForced);
    let link = a.ns.ip("-d link show dev eth0");
    assert!(
        link.contains("xdp") && !link.contains("xdpgeneric"),
        "{link}"
    );
    assert_eq!(switch(XdpSetting::Auto), DecapHook::TcVeth);
    assert!(!a.ns.ip("-d link show dev eth0").contains("xdp"));
    assert_eq!(switch(XdpSetting::Off), DecapHook::TcOff);
    drop(ns_b);
}

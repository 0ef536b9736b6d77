//! `cargo xtask bench`'s datapath part: weft's backends side by side with the kernel's own
//! paths on the same two-node namespace testbed, in one run, on both wire models (DESIGN.md:
//! `datapath` = MTU-sized frames on the underlay, `datapath_veth` = ideal veth offloads), plus
//! the per-program cost through BPF_PROG_TEST_RUN. Prints one JSON object.
//!
//! The machine may be shared and has few cores, so throughput moves between runs: every
//! contestant is measured in several rounds, interleaved (round 1 of every contestant on both
//! wires, then round 2, ...), each round on a fresh testbed; a figure is the median over the
//! rounds (`_min`/`_max` beside it), and each ratio to the kernel's contestant is the median of
//! the per-round ratios (same round, same load). CPU is measured at a fixed rate (a TCP stream
//! paced at 2 Gbit/s, 64-byte UDP at 30,000 packets/s): busy time of all cores from
//! `/proc/stat` (wall time minus idle time), which does not depend on how the work lands on the
//! cores.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weft_agent::datapath::XdpSetting;
use weft_common::{DecapHook, RouteMode, prog_names};
use weft_tests::{
    agentless::{FlannelNode, Pod, WeftNode, mtu_wire},
    injection_node::*,
    netns::{Netns, veth_pair},
    packets::*,
    testrun::{run_tc, run_xdp},
};

/// Flannel's VXLAN pods' MTU (and the kernel's vxlan pods'): the underlay's 1500 minus 50.
/// weft's pods get the underlay's on their interface and the path's on their default route
/// (`weft_pod_mtus`).
const POD_MTU: u32 = 1450;

/// `--pod-mtu N`: every contestant's pods get MTU N, the kernel's routed ones (`kernel-hostgw`,
/// `kernel-routed`, otherwise at the veth default, 1500, as host-gw and BGP setups without
/// weft give) included. Host-gw at 1450 against 1500 moves TCP on the MTU-sized wire by about
/// a fifth for the kernel alone: at equal MTU the datapaths are compared, not the MTUs.
static POD_MTU_SET: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// The MTU of flannel's and the kernel's tunnel pods.
fn pod_mtu() -> u32 {
    POD_MTU_SET.get().copied().unwrap_or(POD_MTU)
}

/// The underlay's MTU on both wires (veths at their default).
const UNDERLAY_MTU: u32 = 1500;

/// What the agent gives weft's pods by default under `mode`: the underlay's MTU on the
/// interface and the path's (the underlay's minus the mode's overhead) on the default route
/// when smaller. `--pod-mtu N`: N on the interface, no route MTU.
fn weft_pod_mtus(mode: RouteMode) -> (u32, Option<u32>) {
    match POD_MTU_SET.get() {
        Some(mtu) => (*mtu, None),
        None => (
            UNDERLAY_MTU,
            Some(UNDERLAY_MTU - mode.overhead()).filter(|m| *m < UNDERLAY_MTU),
        ),
    }
}

/// Builds a contestant's testbed; the argument selects the MTU-sized wire.
type BuildTestbed = fn(bool) -> Testbed;
const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 80, 1);
const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 80, 2);

struct Settings {
    rounds: usize,
    tcp_secs: u32,
    udp_secs: u32,
    /// Length of each paced stream measuring CPU.
    cpu_secs: u32,
    pings: u32,
    prog_calls: u64,
    /// TCP throughput alone (`--tcp-only`, for profiling one contestant's TCP stream).
    tcp_only: bool,
    /// 64-byte UDP alone (`--udp-only`).
    udp_only: bool,
}

/// The fixed rates CPU is measured at.
const TCP_CPU_RATE_BPS: u64 = 2_000_000_000;
const UDP_CPU_RATE_PPS: u64 = 30_000;

/// What a contestant's testbed must keep alive while it is measured.
enum Testbed {
    Weft {
        _a: WeftNode,
        _b: WeftNode,
        pa: Pod,
        pb: Pod,
        /// The hook the nodes decapsulate in.
        decap: DecapHook,
        /// Whether VXLAN goes through `weft_vxlan`.
        vxlan_device: bool,
    },
    Flannel {
        _a: FlannelNode,
        b: FlannelNode,
        pa_ns: String,
    },
    HostGw {
        _a: Netns,
        _b: Netns,
        pa: Pod,
        pb: Pod,
    },
    /// Two nodes on two subnets with a router namespace between them.
    Routed {
        _nodes: Vec<Box<dyn std::any::Any>>,
        _router: Netns,
        pa: Pod,
        pb: Pod,
    },
}

impl Testbed {
    fn client_ns(&self) -> &str {
        match self {
            Testbed::Weft { pa, .. } | Testbed::HostGw { pa, .. } | Testbed::Routed { pa, .. } => {
                &pa.ns.name
            }
            Testbed::Flannel { pa_ns, .. } => pa_ns,
        }
    }
    fn server(&self) -> (&str, Ipv4Addr) {
        match self {
            Testbed::Weft { pb, .. } | Testbed::HostGw { pb, .. } | Testbed::Routed { pb, .. } => {
                (&pb.ns.name, pb.ip)
            }
            Testbed::Flannel { b, .. } => (&b.pod.ns.name, b.pod.ip),
        }
    }
}

fn underlay(mtu_sized: bool) -> (Netns, Netns) {
    let a = Netns::new("ba");
    let b = Netns::new("bb");
    veth_pair(&a, "eth0", &b, "eth0");
    if mtu_sized {
        mtu_wire(&a, "eth0");
        mtu_wire(&b, "eth0");
    }
    a.ip(&format!("addr add {NODE_A}/24 dev eth0"));
    b.ip(&format!("addr add {NODE_B}/24 dev eth0"));
    (a, b)
}

fn weft(mode: RouteMode, mtu_sized: bool, xdp: XdpSetting) -> Testbed {
    weft_with(mode, mtu_sized, xdp, true)
}

/// `weft`, choosing whether the tc hook sends VXLAN through `weft_vxlan` (the agent's way) or
/// decapsulates it in `from_underlay` (the fallback, `-tcdirect`).
fn weft_with(mode: RouteMode, mtu_sized: bool, xdp: XdpSetting, vxlan_device: bool) -> Testbed {
    let (na, nb) = underlay(mtu_sized);
    let a =
        WeftNode::with_vxlan_device(na, NODE_A, "eth0", [2, 0x77, 0, 0, 0, 1], xdp, vxlan_device);
    let b =
        WeftNode::with_vxlan_device(nb, NODE_B, "eth0", [2, 0x77, 0, 0, 0, 2], xdp, vxlan_device);
    let (mtu, route_mtu) = weft_pod_mtus(mode);
    let pa = a.add_pod_with_route_mtu(Ipv4Addr::new(10, 244, 1, 2), mtu, route_mtu);
    let pb = b.add_pod_with_route_mtu(Ipv4Addr::new(10, 244, 2, 2), mtu, route_mtu);
    a.add_peer("10.244.2.0/24".parse().unwrap(), NODE_B, b.vtep_mac, mode);
    b.add_peer("10.244.1.0/24".parse().unwrap(), NODE_A, a.vtep_mac, mode);
    let (decap, vxlan_device) = (a.decap, a.vxlan_device);
    Testbed::Weft {
        _a: a,
        _b: b,
        pa,
        pb,
        decap,
        vxlan_device,
    }
}

fn flannel(mtu_sized: bool) -> Testbed {
    let (na, nb) = underlay(mtu_sized);
    let a = FlannelNode::new(
        na,
        NODE_A,
        "eth0",
        "10.244.1.0/24".parse().unwrap(),
        pod_mtu(),
    );
    let b = FlannelNode::new(
        nb,
        NODE_B,
        "eth0",
        "10.244.2.0/24".parse().unwrap(),
        pod_mtu(),
    );
    a.add_peer(b.subnet, NODE_B, b.vtep_mac);
    b.add_peer(a.subnet, NODE_A, a.vtep_mac);
    let pa_ns = a.pod.ns.name.clone();
    Testbed::Flannel { _a: a, b, pa_ns }
}

/// A pod on each node (`10.244.1.2` on `nodes[0]`, `10.244.2.2` on `nodes[1]`) on a veth its
/// node routes with kernel routes, no eBPF: the other pod subnet via `next_hops[i]` (the peer
/// node on one L2 segment, or a router).
fn kernel_pods(nodes: [&Netns; 2], next_hops: [Ipv4Addr; 2]) -> (Pod, Pod) {
    let mut pods = Vec::new();
    for ((node, next_hop), (subnet, peer_subnet)) in
        nodes.into_iter().zip(next_hops).zip([(1, 2), (2, 1)])
    {
        node.sysctl("net.ipv4.ip_forward", "1");
        let pod = Netns::new("bp");
        node.ip(&format!(
            "link add hv type veth peer name eth0 netns {}",
            pod.name
        ));
        if let Some(mtu) = POD_MTU_SET.get() {
            node.ip(&format!("link set hv mtu {mtu}"));
            pod.ip(&format!("link set eth0 mtu {mtu}"));
        }
        node.ip(&format!("addr add 10.244.{subnet}.1/24 dev hv"));
        node.ip("link set hv up");
        pod.ip("link set eth0 up");
        let ip = Ipv4Addr::new(10, 244, subnet, 2);
        pod.ip(&format!("addr add {ip}/24 dev eth0"));
        pod.ip(&format!("route add default via 10.244.{subnet}.1"));
        node.ip(&format!(
            "route add 10.244.{peer_subnet}.0/24 via {next_hop}"
        ));
        pods.push(Pod {
            ns: pod,
            ip,
            host_ifname: "hv".into(),
        });
    }
    let pb = pods.pop().unwrap();
    let pa = pods.pop().unwrap();
    (pa, pb)
}

/// The limit: plain kernel routing between nodes on one L2 segment, no encapsulation, pods on
/// veths routed by the node (as host-gw does; 1500 MTU since nothing is added).
fn kernel_host_gw(mtu_sized: bool) -> Testbed {
    let (na, nb) = underlay(mtu_sized);
    let (pa, pb) = kernel_pods([&na, &nb], [NODE_B, NODE_A]);
    Testbed::HostGw {
        _a: na,
        _b: nb,
        pa,
        pb,
    }
}

/// Node addresses on two subnets joined by a router (the bgp backend's setting).
const ROUTED_A: Ipv4Addr = Ipv4Addr::new(192, 168, 81, 2);
const ROUTED_B: Ipv4Addr = Ipv4Addr::new(192, 168, 82, 2);
const ROUTER_A: Ipv4Addr = Ipv4Addr::new(192, 168, 81, 1);
const ROUTER_B: Ipv4Addr = Ipv4Addr::new(192, 168, 82, 1);

/// Node A - router - node B, each link a veth pair (MTU-sized on request). The router forwards
/// the pod subnets to their nodes with kernel routes, as BIRD on a router installs them.
fn routed_underlay(mtu_sized: bool) -> (Netns, Netns, Netns) {
    let a = Netns::new("bra");
    let r = Netns::new("brr");
    let b = Netns::new("brb");
    veth_pair(&a, "eth0", &r, "ra");
    veth_pair(&r, "rb", &b, "eth0");
    if mtu_sized {
        for (ns, dev) in [(&a, "eth0"), (&r, "ra"), (&r, "rb"), (&b, "eth0")] {
            mtu_wire(ns, dev);
        }
    }
    a.ip(&format!("addr add {ROUTED_A}/24 dev eth0"));
    b.ip(&format!("addr add {ROUTED_B}/24 dev eth0"));
    r.ip(&format!("addr add {ROUTER_A}/24 dev ra"));
    r.ip(&format!("addr add {ROUTER_B}/24 dev rb"));
    r.sysctl("net.ipv4.ip_forward", "1");
    a.ip(&format!("route add default via {ROUTER_A}"));
    b.ip(&format!("route add default via {ROUTER_B}"));
    r.ip(&format!("route add 10.244.1.0/24 via {ROUTED_A}"));
    r.ip(&format!("route add 10.244.2.0/24 via {ROUTED_B}"));
    (a, r, b)
}

/// weft's bgp mode through the router: `bgp` routes, next hop from weft's BGP table, where the
/// route to the other node's pods points at the router (as BIRD installs it).
fn weft_bgp(mtu_sized: bool, xdp: XdpSetting) -> Testbed {
    let (na, router, nb) = routed_underlay(mtu_sized);
    let a = WeftNode::new(na, ROUTED_A, "eth0", [2, 0x77, 0, 0, 0, 1], xdp);
    let b = WeftNode::new(nb, ROUTED_B, "eth0", [2, 0x77, 0, 0, 0, 2], xdp);
    let (mtu, route_mtu) = weft_pod_mtus(RouteMode::Bgp);
    let pa = a.add_pod_with_route_mtu(Ipv4Addr::new(10, 244, 1, 2), mtu, route_mtu);
    let pb = b.add_pod_with_route_mtu(Ipv4Addr::new(10, 244, 2, 2), mtu, route_mtu);
    for (node, subnet, peer, peer_mac, gw) in [
        (&a, "10.244.2.0/24", ROUTED_B, b.vtep_mac, ROUTER_A),
        (&b, "10.244.1.0/24", ROUTED_A, a.vtep_mac, ROUTER_B),
    ] {
        node.add_peer(subnet.parse().unwrap(), peer, peer_mac, RouteMode::Bgp);
        node.ns.ip(&format!(
            "route add {subnet} via {gw} dev eth0 table {} proto bird",
            weft_common::BGP_TABLE_DEFAULT
        ));
    }
    Testbed::Routed {
        _nodes: vec![Box::new(a), Box::new(b)],
        _router: router,
        pa,
        pb,
    }
}

/// The kernel's own routing through the same router: pods on veths routed by their node, the
/// other node's pod subnet via the router (what Calico's BGP mode programs), no eBPF.
fn kernel_routed(mtu_sized: bool) -> Testbed {
    let (na, router, nb) = routed_underlay(mtu_sized);
    let (pa, pb) = kernel_pods([&na, &nb], [ROUTER_A, ROUTER_B]);
    Testbed::Routed {
        _nodes: vec![Box::new(na), Box::new(nb)],
        _router: router,
        pa,
        pb,
    }
}

fn netns_cmd(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn iperf3(bed: &Testbed, extra: &[&str]) -> Value {
    let (server_ns, server_ip) = bed.server();
    let _server = Server(
        netns_cmd(
            server_ns,
            &["iperf3", "-s", "-1", "-B", &server_ip.to_string()],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting iperf3 -s"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let ip = server_ip.to_string();
    let mut args = vec!["iperf3", "-c", ip.as_str(), "-J"];
    args.extend_from_slice(extra);
    let out = netns_cmd(bed.client_ns(), &args)
        .output()
        .expect("running iperf3 -c");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn tcp_gbps(bed: &Testbed, s: &Settings) -> f64 {
    let secs = s.tcp_secs.to_string();
    let v = iperf3(bed, &["-t", &secs]);
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// Idle time of all CPUs, in seconds, from `/proc/stat`'s first line (idle + iowait). With a
/// tickless kernel these two are measured exactly (the kernel's idle-period accounting), while
/// user, system and softirq are sampled at each tick: a paced stream whose bursts start and end
/// between two ticks (iperf3's pacing timer) is charged nothing, so summing the busy fields
/// read 1-36% for the same 2 Gbit/s stream on this machine. Busy time is therefore taken as
/// wall time minus idle time (`busy_pct`).
fn idle_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("reading /proc/stat");
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    // SAFETY: sysconf only reads a constant.
    let ticks_per_sec = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    };
    idle as f64 / ticks_per_sec
}

/// Percent of all cores busy over `f`: wall time times cores, minus what the cores spent idle.
fn busy_pct(f: impl FnOnce()) -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (idle0, t0) = (idle_secs(), Instant::now());
    f();
    let (idle1, wall) = (idle_secs(), t0.elapsed().as_secs_f64());
    (100.0 * (1.0 - (idle1 - idle0) / (wall * cores))).clamp(0.0, 100.0)
}

/// CPU time (user + system) of the waited-for children (the iperf3 client and server), in
/// seconds.
fn children_cpu_secs() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .expect("getrusage");
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    secs(u.user_time()) + secs(u.system_time())
}

/// CPU at a fixed rate while iperf3 runs with `extra` (a paced stream).
struct CpuAtRate {
    /// Busy time of all cores (percent) from `/proc/stat`, over the stream's middle (the first
    /// and last half second left out): everything the machine did.
    all_pct: f64,
    /// The same over the second before the stream (no traffic): what else the machine was
    /// doing. Near 0 on an idle machine; near 100 it makes `all_pct` meaningless.
    background_pct: f64,
    /// CPU time of the iperf3 client and server processes (user + system, which includes the
    /// softirq work the kernel does in their context: most of a veth path's), as a percent of
    /// all cores over the stream. Robust to other load on the machine; misses work done in
    /// ksoftirqd.
    procs_pct: f64,
    /// The rate achieved (bits/s for TCP, packets/s for UDP).
    rate: f64,
}

fn cpu_pct_during(bed: &Testbed, s: &Settings, extra: &[&str], udp: bool) -> CpuAtRate {
    let secs = s.cpu_secs.to_string();
    let mut args = extra.to_vec();
    args.extend_from_slice(&["-t", &secs]);
    let window = Duration::from_secs_f64(f64::from(s.cpu_secs) - 1.0);
    let background_pct = busy_pct(|| std::thread::sleep(Duration::from_secs(1)));
    let children0 = children_cpu_secs();
    let (tx, rx) = std::sync::mpsc::channel();
    let sampler = std::thread::spawn(move || {
        // iperf3's server starts 300 ms before the client; skip the ramp-up.
        std::thread::sleep(Duration::from_millis(800));
        let _ = tx.send(busy_pct(|| std::thread::sleep(window)));
    });
    let v = iperf3(bed, &args);
    let _ = sampler.join();
    let all_pct = rx.recv().unwrap_or(f64::NAN);
    // The server is waited for when `iperf3` returns.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let procs_pct = 100.0 * (children_cpu_secs() - children0) / (f64::from(s.cpu_secs) * cores);
    let rate = if udp {
        let sum = &v["end"]["sum"];
        let packets =
            sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0);
        packets / sum["seconds"].as_f64().unwrap_or(1.0).max(0.001)
    } else {
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
    };
    CpuAtRate {
        all_pct,
        background_pct,
        procs_pct,
        rate,
    }
}

fn udp64_kpps(bed: &Testbed, s: &Settings) -> f64 {
    let secs = s.udp_secs.to_string();
    let v = iperf3(bed, &["-u", "-l", "64", "-b", "0", "-t", &secs]);
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().unwrap_or(0.0);
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().unwrap_or(1.0).max(0.001);
    (packets - lost) / seconds / 1e3
}

fn rtt_us(bed: &Testbed, s: &Settings) -> (f64, f64) {
    let (_, server_ip) = bed.server();
    let out = netns_cmd(
        bed.client_ns(),
        &[
            "ping",
            "-c",
            &s.pings.to_string(),
            "-i",
            "0.002",
            "-W",
            "1",
            &server_ip.to_string(),
        ],
    )
    .output()
    .expect("running ping");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    if rtts.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| rtts[((rtts.len() as f64 - 1.0) * p).round() as usize];
    (pct(0.50), pct(0.99))
}

fn measure(bed: &Testbed, s: &Settings) -> BTreeMap<&'static str, f64> {
    // Warm up neighbour entries and caches.
    let (_, ip) = bed.server();
    let _ = netns_cmd(
        bed.client_ns(),
        &["ping", "-c", "2", "-i", "0.2", "-W", "1", &ip.to_string()],
    )
    .output();
    if s.udp_only {
        return BTreeMap::from([("udp64_kpps", round(udp64_kpps(bed, s), 1))]);
    }
    let tcp = tcp_gbps(bed, s);
    if s.tcp_only {
        return BTreeMap::from([("tcp_gbps", round(tcp, 3))]);
    }
    let udp = udp64_kpps(bed, s);
    let (p50, p99) = rtt_us(bed, s);
    let tcp_rate = TCP_CPU_RATE_BPS.to_string();
    let tcp_cpu = cpu_pct_during(bed, s, &["-b", &tcp_rate], false);
    // iperf3 paces UDP by payload bits.
    let udp_rate = (UDP_CPU_RATE_PPS * 64 * 8).to_string();
    let udp_cpu = cpu_pct_during(bed, s, &["-u", "-l", "64", "-b", &udp_rate], true);
    BTreeMap::from([
        ("tcp_gbps", round(tcp, 3)),
        ("udp64_kpps", round(udp, 1)),
        ("rtt_p50_us", round(p50, 1)),
        ("rtt_p99_us", round(p99, 1)),
        ("tcp_cpu_pct_at_2g", round(tcp_cpu.all_pct, 1)),
        (
            "tcp_cpu_pct_at_2g_background",
            round(tcp_cpu.background_pct, 1),
        ),
        ("tcp_cpu_pct_at_2g_procs", round(tcp_cpu.procs_pct, 1)),
        ("tcp_gbps_at_2g", round(tcp_cpu.rate / 1e9, 3)),
        ("udp64_cpu_pct_at_30k", round(udp_cpu.all_pct, 1)),
        (
            "udp64_cpu_pct_at_30k_background",
            round(udp_cpu.background_pct, 1),
        ),
        ("udp64_cpu_pct_at_30k_procs", round(udp_cpu.procs_pct, 1)),
        ("udp64_kpps_at_30k", round(udp_cpu.rate / 1e3, 1)),
    ])
}

/// The kernel contestant a weft contestant is compared with: its vxlan device for tunnels,
/// its routing for host-gw, its routing through the same router for bgp.
fn baseline_of(name: &str) -> Option<&'static str> {
    if name.starts_with("kernel-") {
        None
    } else if name.contains("hostgw") {
        Some("kernel-hostgw")
    } else if name.contains("bgp") {
        Some("kernel-routed")
    } else {
        Some("kernel-vxlan")
    }
}

/// The keys whose ratio to the baseline is reported (`<key>_ratio`).
const RATIO_KEYS: [&str; 7] = [
    "tcp_gbps",
    "udp64_kpps",
    "rtt_p99_us",
    "tcp_cpu_pct_at_2g",
    "udp64_cpu_pct_at_30k",
    "tcp_cpu_pct_at_2g_procs",
    "udp64_cpu_pct_at_30k_procs",
];

/// Median, min and max of one figure over the rounds.
fn summarize(values: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// Every round's figures of one wire (`rounds[r][contestant][key]`) as the report's section:
/// per contestant the median of each key with `_min` and `_max`, and per weft contestant the
/// median over the rounds of its ratio to the kernel's contestant of the same round.
fn section(rounds: &[BTreeMap<String, BTreeMap<&'static str, f64>>]) -> Value {
    let mut out = serde_json::Map::new();
    let names: Vec<String> = rounds
        .first()
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default();
    for name in names {
        let mut entry = serde_json::Map::new();
        let keys: Vec<&'static str> = rounds[0][&name].keys().copied().collect();
        for key in keys {
            let values: Vec<f64> = rounds.iter().map(|r| r[&name][key]).collect();
            let (median, min, max) = summarize(&values);
            let digits = if key.contains("gbps") { 3 } else { 1 };
            entry.insert(key.into(), json!(round(median, digits)));
            entry.insert(format!("{key}_min"), json!(round(min, digits)));
            entry.insert(format!("{key}_max"), json!(round(max, digits)));
        }
        // No ratio when the baseline did not run (`--only` without it).
        if let Some(base) = baseline_of(&name).filter(|b| rounds[0].contains_key(*b)) {
            // (`--tcp-only` measures one key.)
            for key in RATIO_KEYS
                .into_iter()
                .filter(|k| rounds[0][&name].contains_key(k))
            {
                let ratios: Vec<f64> = rounds
                    .iter()
                    .map(|r| r[&name][key] / r[base][key])
                    .collect();
                let (median, min, max) = summarize(&ratios);
                entry.insert(format!("{key}_ratio"), json!(round(median, 3)));
                entry.insert(format!("{key}_ratio_min"), json!(round(min, 3)));
                entry.insert(format!("{key}_ratio_max"), json!(round(max, 3)));
            }
            entry.insert("baseline".into(), json!(base));
        }
        entry.insert("rounds".into(), json!(rounds.len()));
        out.insert(name, Value::Object(entry));
    }
    Value::Object(out)
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// One program run measured by `prog_costs`.
enum Hook {
    /// A tc program by name, the packet arriving on `ifindex` (0: none).
    Tc(&'static str, u32),
    Xdp,
}

/// A case of `prog_costs`: frames cycled through, one per run.
struct Case {
    name: &'static str,
    hook: Hook,
    frames: Vec<Vec<u8>>,
}

/// The interquartile mean of `samples` (sorted in place): the mean of the middle half. As
/// robust to outliers (a preempted or interrupted run) as the median, but the kernel reports
/// single runs in steps of about 10 ns here, and a median of such steps jumps a whole step
/// between two runs of the bench (41 vs 50 ns measured); the mean of the middle half does not.
fn interquartile_mean(samples: &mut [u64]) -> f64 {
    samples.sort_unstable();
    let n = samples.len();
    if n == 0 {
        return f64::NAN;
    }
    let middle = &samples[n / 4..(n - n / 4).max(n / 4 + 1)];
    middle.iter().sum::<u64>() as f64 / middle.len() as f64
}

/// `--prog-case NAME`: the one `prog_costs` case to run (profiling one path).
fn only_case() -> Option<String> {
    std::env::args().skip_while(|a| a != "--prog-case").nth(1)
}

/// Per-program cost through BPF_PROG_TEST_RUN. Every run is one syscall with `repeat` 1, so
/// the kernel copies the frame afresh each time (a repeated run would see the frame the
/// previous run rewrote, and measure another path). The cases are interleaved in short
/// batches, so a burst of load elsewhere on the machine hits them all alike, and each figure
/// is the interquartile mean of its runs: a preempted or interrupted run is an outlier, not a
/// share of the mean. The ARP baselines (the program's prologue, a drop or a pass) are subtracted for the
/// net figures: what is left is what the path itself costs.
fn prog_costs(s: &Settings) -> Value {
    let calls = s.prog_calls;
    with_node(move |node| {
        let idx = node.pod1_ifindex;
        let pod = |dst| tcp_frame(POD1_MAC, [0xee; 6], POD1_IP, dst, 40000, 80, &[0u8; 64]);
        let from_pod = |name, frames| Case {
            name,
            hook: Hook::Tc(prog_names::FROM_POD, idx),
            frames,
        };
        let inner = tcp_frame(
            PEER_VTEP_MAC,
            VTEP_MAC,
            REMOTE_VXLAN_IP,
            POD1_IP,
            80,
            40000,
            &[0u8; 64],
        );
        let nic = [2, 0, 0, 0, 0x50, 1];
        let mut delivered = inner.clone();
        delivered[0..6].copy_from_slice(&nic);
        let outer = Outer {
            src_mac: PEER_MAC,
            dst_mac: nic,
            src: PEER_IP,
            dst: NODE_IP,
        };
        let vx = vxlan_frame(&outer, 50000, VXLAN_PORT, VNI, &inner);
        let ipip = ipip_frame(PEER_MAC, nic, PEER_IP, NODE_IP, &inner);
        let arp = raw_frame(PEER_MAC, [0xff; 6], 0x0806, &[0u8; 46]);
        // Conntrack misses: every run opens a new flow (a miss and an insert; past the map's
        // size, LRU eviction too).
        let new_flows: Vec<Vec<u8>> = (0..calls)
            .map(|i| {
                let (sport, dport) = (1024 + (i % 60_000) as u16, 80 + (i / 60_000) as u16);
                tcp_frame(
                    POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, sport, dport, &[0u8; 64],
                )
            })
            .collect();
        // A Service's backend answering: the stack delivered the request (to_pod records the
        // flow), so the reply is handed back to the stack (the stack's own cost not included).
        let request = tcp_frame(
            POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, 50_000, 8080, &[0u8; 64],
        );
        let reply = tcp_frame(
            POD2_MAC, [0xee; 6], POD2_IP, POD1_IP, 8080, 50_000, &[0u8; 64],
        );
        let mut cases = vec![
            from_pod(
                "from_pod_baseline_arp",
                vec![raw_frame(POD1_MAC, [0xff; 6], 0x0806, &[0u8; 46])],
            ),
            // Conntrack hits from the second run on (the first creates the entry).
            from_pod("from_pod_vxlan_encap", vec![pod(REMOTE_VXLAN_IP)]),
            from_pod("from_pod_ipip_encap", vec![pod(REMOTE_IPIP_IP)]),
            from_pod("from_pod_direct", vec![pod(REMOTE_DIRECT_IP)]),
            from_pod("from_pod_local_delivery", vec![pod(POD2_IP)]),
            from_pod("from_pod_ct_new_flow", new_flows),
            Case {
                name: "to_pod_stack_flow",
                hook: Hook::Tc(prog_names::TO_POD, node.pod2_ifindex),
                frames: vec![request],
            },
            Case {
                name: "from_pod_stack_flow",
                hook: Hook::Tc(prog_names::FROM_POD, node.pod2_ifindex),
                frames: vec![reply],
            },
            Case {
                name: "from_underlay_delivery",
                hook: Hook::Tc(prog_names::FROM_UNDERLAY, 0),
                frames: vec![delivered],
            },
            Case {
                name: "from_underlay_tc_vxlan_decap",
                hook: Hook::Tc(prog_names::FROM_UNDERLAY, 0),
                frames: vec![vx.clone()],
            },
            Case {
                name: "xdp_baseline_arp",
                hook: Hook::Xdp,
                frames: vec![arp],
            },
            Case {
                name: "xdp_vxlan_decap",
                hook: Hook::Xdp,
                frames: vec![vx],
            },
            Case {
                name: "xdp_ipip_decap",
                hook: Hook::Xdp,
                frames: vec![ipip],
            },
        ];
        // `--prog-case NAME` (profiling one path): that case alone (net figures are then
        // against a zero baseline).
        if let Some(only) = only_case() {
            cases.retain(|c| c.name == only);
        }
        // The stack flow's request first, so its reply finds the entry from the first run on.
        cases.sort_by_key(|c| c.name != "to_pod_stack_flow");
        const BATCH: u64 = 50;
        let mut samples: Vec<Vec<u64>> = vec![Vec::with_capacity(calls as usize); cases.len()];
        let mut next = vec![0usize; cases.len()];
        for _ in 0..calls.div_ceil(BATCH) {
            for (i, case) in cases.iter().enumerate() {
                for _ in 0..BATCH {
                    let frame = &case.frames[next[i] % case.frames.len()];
                    next[i] += 1;
                    let ns = match case.hook {
                        Hook::Tc(prog, ifindex) => {
                            let p = node.dp.tc_program(prog).unwrap();
                            run_tc(p, frame, ifindex, 1).duration_ns
                        }
                        Hook::Xdp => run_xdp(node.dp.xdp_program().unwrap(), frame, 1).duration_ns,
                    };
                    samples[i].push(ns);
                }
            }
        }
        let mut gross = BTreeMap::new();
        for (case, mut s) in cases.iter().zip(samples) {
            gross.insert(case.name.to_string(), interquartile_mean(&mut s));
        }
        let base = |name: &str| gross.get(name).copied().unwrap_or(0.0);
        let (tc_base, xdp_base) = (base("from_pod_baseline_arp"), base("xdp_baseline_arp"));
        let mut net = BTreeMap::new();
        for case in &cases {
            if case.name.contains("baseline") {
                continue;
            }
            let base = match case.hook {
                Hook::Tc(..) => tc_base,
                Hook::Xdp => xdp_base,
            };
            net.insert(case.name.to_string(), round(gross[case.name] - base, 1));
        }
        let gross: BTreeMap<String, f64> = gross
            .into_iter()
            .map(|(name, ns)| (name, round(ns, 1)))
            .collect();
        // `--prog-case` profiles one path: the monitor's cases would only dilute it.
        let monitor = if only_case().is_some() {
            BTreeMap::new()
        } else {
            monitor_costs(node, calls)
        };
        json!({
            "prog_ns": gross,
            "prog_ns_monitor": monitor,
            "prog_ns_net": net,
            "prog_ns_baseline": {"tc": round(tc_base, 1), "xdp": round(xdp_base, 1)},
            "prog_ns_runs": calls,
        })
    })
}

/// `weft monitor`'s cost per packet: a forwarded packet (VXLAN encapsulation) and a dropped one
/// (a spoofed source), with no monitor attached, with one attached that reports every drop
/// and every forwarding decision (no sampling, no budget limit), and with two such monitors
/// (each event is written into both slots' rings). Interleaved rounds, interquartile means of
/// single runs; `*_monitor_off_b` repeats the off case in each round: its difference from
/// `*_monitor_off` is the noise of the measurement.
fn monitor_costs(node: &mut Node, calls: u64) -> BTreeMap<String, f64> {
    use weft_common::monitor::{MONITOR_F_DROPS, MONITOR_F_TRACE, MonitorConfig};
    let sockets = [
        std::os::unix::net::UnixDatagram::unbound().unwrap(),
        std::os::unix::net::UnixDatagram::unbound().unwrap(),
    ];
    let slots: Vec<u32> = sockets
        .iter()
        .map(|s| node.dp.maps.claim_monitor_slot(s).unwrap().unwrap())
        .collect();
    let mut rings: Vec<aya::maps::RingBuf<aya::maps::MapData>> = slots
        .iter()
        .map(|slot| {
            let name = weft_common::map_names::EVENTS[*slot as usize];
            aya::maps::RingBuf::try_from(node.dp.maps.take(name).unwrap()).unwrap()
        })
        .collect();
    let unlimited = MonitorConfig {
        rate_per_sec: u32::MAX,
        burst: u32::MAX,
        sample_every: 1,
        owner_pid: std::process::id(),
    };
    for slot in &slots {
        node.dp.maps.set_monitor_config(*slot, &unlimited).unwrap();
    }
    let (on, off) = (MONITOR_F_DROPS | MONITOR_F_TRACE, 0);
    let idx = node.pod1_ifindex;
    let fwd = tcp_frame(
        POD1_MAC,
        [0xee; 6],
        POD1_IP,
        REMOTE_VXLAN_IP,
        40000,
        80,
        &[0u8; 64],
    );
    let spoof = tcp_frame(
        POD2_MAC,
        [0xee; 6],
        POD2_IP,
        REMOTE_VXLAN_IP,
        40000,
        80,
        &[0u8; 64],
    );
    // Rounds small enough that a ring (about 3,000 events) never fills: drained after each.
    let per_round = 1000u64;
    let rounds = (calls / per_round).clamp(5, 51) as usize;
    let cases = [
        ("from_pod_vxlan_encap", &fwd),
        ("from_pod_spoofed_drop", &spoof),
    ];
    let mut samples: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for _ in 0..rounds {
        for (name, frame) in cases {
            for (suffix, cfgs) in [
                ("monitor_off", [off, off]),
                ("monitor_on", [on, off]),
                ("monitor_on_2", [on, on]),
                ("monitor_off_b", [off, off]),
            ] {
                for (slot, flags) in slots.iter().zip(cfgs) {
                    node.dp.maps.set_monitor_flags(*slot, flags).unwrap();
                }
                let p = node.dp.tc_program(prog_names::FROM_POD).unwrap();
                let runs = (0..per_round).map(|_| run_tc(p, frame, idx, 1).duration_ns);
                samples
                    .entry(format!("{name}_{suffix}"))
                    .or_default()
                    .extend(runs);
                for (ring, flags) in rings.iter_mut().zip(cfgs) {
                    let mut events = 0;
                    while ring.next().is_some() {
                        events += 1;
                    }
                    let want = if flags != 0 { per_round } else { 0 };
                    assert_eq!(events, want, "{name}_{suffix}: events emitted");
                }
            }
        }
    }
    for slot in &slots {
        node.dp.maps.set_monitor_flags(*slot, off).unwrap();
    }
    samples
        .into_iter()
        .map(|(k, mut v)| (k, round(interquartile_mean(&mut v), 1)))
        .collect()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let s = if quick {
        Settings {
            rounds: 1,
            tcp_secs: 2,
            udp_secs: 2,
            cpu_secs: 3,
            pings: 200,
            prog_calls: 20_000,
            tcp_only: false,
            udp_only: false,
        }
    } else {
        Settings {
            rounds: 3,
            tcp_secs: 5,
            udp_secs: 5,
            cpu_secs: 5,
            pings: 1000,
            prog_calls: 100_000,
            tcp_only: false,
            udp_only: false,
        }
    };
    // `--tcp-only [--tcp-secs N]` and `--udp-only [--udp-secs N]`: each contestant's TCP
    // stream (64-byte UDP) alone, N seconds long (for `perf record` while it runs).
    let mut s = s;
    s.tcp_only = std::env::args().any(|a| a == "--tcp-only");
    s.udp_only = std::env::args().any(|a| a == "--udp-only");
    let number = |flag: &str| {
        std::env::args()
            .skip_while(|a| a != flag)
            .nth(1)
            .and_then(|n| n.parse().ok())
    };
    s.tcp_secs = number("--tcp-secs").unwrap_or(s.tcp_secs);
    s.udp_secs = number("--udp-secs").unwrap_or(s.udp_secs);
    if let Some(mtu) = number("--pod-mtu") {
        let _ = POD_MTU_SET.set(mtu);
    }
    // `--prog-calls N`: runs per program case (a longer profile of one case).
    s.prog_calls = number("--prog-calls")
        .map(u64::from)
        .unwrap_or(s.prog_calls);
    let rounds = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(s.rounds);
    let mut report = serde_json::Map::new();
    if std::env::args().any(|a| a == "--prog-only") {
        if let Value::Object(costs) = prog_costs(&s) {
            report.extend(costs);
        }
        println!("{}", Value::Object(report));
        return;
    }
    // The agent's default hook (`--xdp=auto`), then XDP and tc forced, for comparison; bgp
    // through a router against the kernel's routing through the same router.
    let contestants: Vec<(&str, BuildTestbed)> = vec![
        ("kernel-hostgw", kernel_host_gw),
        ("kernel-vxlan", flannel),
        ("weft-vxlan", |m| {
            weft(RouteMode::Vxlan, m, XdpSetting::Auto)
        }),
        ("weft-ipip", |m| weft(RouteMode::Ipip, m, XdpSetting::Auto)),
        ("weft-hostgw", |m| {
            weft(RouteMode::Direct, m, XdpSetting::Auto)
        }),
        ("weft-vxlan-xdp", |m| {
            weft(RouteMode::Vxlan, m, XdpSetting::On)
        }),
        ("weft-ipip-xdp", |m| {
            weft(RouteMode::Ipip, m, XdpSetting::On)
        }),
        ("weft-hostgw-xdp", |m| {
            weft(RouteMode::Direct, m, XdpSetting::On)
        }),
        ("weft-vxlan-tc", |m| {
            weft(RouteMode::Vxlan, m, XdpSetting::Off)
        }),
        // The tc hook without `weft_vxlan` (where it cannot be made): VXLAN decapsulated by
        // `from_underlay`, no GRO.
        ("weft-vxlan-tcdirect", |m| {
            weft_with(RouteMode::Vxlan, m, XdpSetting::Off, false)
        }),
        ("weft-ipip-tc", |m| {
            weft(RouteMode::Ipip, m, XdpSetting::Off)
        }),
        ("weft-hostgw-tc", |m| {
            weft(RouteMode::Direct, m, XdpSetting::Off)
        }),
        ("kernel-routed", kernel_routed),
        ("weft-bgp", |m| weft_bgp(m, XdpSetting::Auto)),
        ("weft-bgp-xdp", |m| weft_bgp(m, XdpSetting::On)),
        ("weft-bgp-tc", |m| weft_bgp(m, XdpSetting::Off)),
    ];
    // `--only a,b` (a partial run while working on one path): those contestants alone, and no
    // per-program costs.
    let only: Option<Vec<String>> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|l| l.split(',').map(str::to_string).collect());
    let contestants: Vec<(&str, BuildTestbed)> = contestants
        .into_iter()
        .filter(|(name, _)| only.as_ref().is_none_or(|o| o.iter().any(|n| n == name)))
        .collect();
    // `--wire datapath` or `--wire datapath_veth`: one wire model alone (profiling).
    let wire: Option<String> = std::env::args().skip_while(|a| a != "--wire").nth(1);
    let wires: Vec<(&str, bool)> = [("datapath", true), ("datapath_veth", false)]
        .into_iter()
        .filter(|(key, _)| wire.as_deref().is_none_or(|w| w == *key))
        .collect();
    let mut results: Vec<Vec<BTreeMap<String, BTreeMap<&'static str, f64>>>> =
        vec![Vec::new(); wires.len()];
    let mut hooks = BTreeMap::new();
    for round in 0..rounds {
        for (w, (key, mtu_sized)) in wires.iter().enumerate() {
            let mut this_round = BTreeMap::new();
            for (name, build) in &contestants {
                eprintln!("bench: round {}/{rounds} {key} {name}", round + 1);
                let bed = build(*mtu_sized);
                if let Testbed::Weft {
                    decap,
                    vxlan_device,
                    ..
                } = &bed
                {
                    hooks.insert(
                        name.to_string(),
                        json!({"hook": decap.hook(), "reason": decap.reason(),
                            "vxlan_device": vxlan_device}),
                    );
                }
                this_round.insert(name.to_string(), measure(&bed, &s));
            }
            results[w].push(this_round);
        }
    }
    for (w, (key, _)) in wires.iter().enumerate() {
        report.insert(key.to_string(), section(&results[w]));
    }
    report.insert("decap_hooks".into(), json!(hooks));
    report.insert("rounds".into(), json!(rounds));
    if let Some(mtu) = POD_MTU_SET.get() {
        report.insert("pod_mtu".into(), json!(mtu));
    }
    // `--no-prog`: the contestants alone (profiling one of them).
    if only.is_none() && !std::env::args().any(|a| a == "--no-prog") {
        eprintln!("bench: per-program cost");
        if let Value::Object(costs) = prog_costs(&s) {
            report.extend(costs);
        }
    }
    println!("{}", Value::Object(report));
}

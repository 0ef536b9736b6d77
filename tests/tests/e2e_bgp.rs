//! End to end, the bgp backend: real agents running real BIRDs, nodes on two underlay subnets
//! behind a router running BIRD as a route reflector, or a full mesh on one subnet; traffic
//! unencapsulated (counters and a capture on the router), hijacks refused, convergence measured,
//! restarts of the agent, of BIRD and of the router, live switches to and from bgp.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use serde_json::json;
use weft_common::{BGP_TABLE_DEFAULT, DropReason, RouteMode, Stat};
use weft_tests::{
    capture::Capture,
    cluster::{CLUSTER_NETWORK, Cluster, ClusterOptions, Node, binary},
    flow::{FlowLoss, SequencedFlow},
    inject::{UdpCounter, frame_send, udp_send},
    packets::udp_frame,
    process::wait_until,
    route_watch::RouteWatch,
};

const PORT: u16 = 9999;

fn network() -> Ipv4Net {
    CLUSTER_NETWORK.parse().unwrap()
}

fn cluster(nodes: usize, two_subnets: bool, extra: serde_json::Value, rr: bool) -> Cluster {
    let mut c = Cluster::new(ClusterOptions {
        nodes,
        backend: "bgp".into(),
        two_subnets,
        backend_extra: extra,
        route_reflector: rr,
        ..Default::default()
    });
    for node in 0..c.nodes.len() {
        c.add_pod(node);
    }
    c
}

/// The route reflector topology: nodes peer only with the router's address on their subnet.
fn rr_extra() -> serde_json::Value {
    json!({"Mesh": false, "Peers": Cluster::route_reflector_peers()})
}

fn subnet(node: &Node) -> Ipv4Net {
    node.subnet()
}

fn learned(node: &Node) -> BTreeSet<Ipv4Net> {
    node.bgp_learned()
}

/// A node's BGP table: prefix -> next hops.
fn bgp_routes(node: &Node) -> BTreeMap<Ipv4Net, String> {
    node.ns
        .run(|| weft_agent::bgp::table::read(BGP_TABLE_DEFAULT).expect("reading the BGP table"))
}

fn wait_learned(c: &Cluster, timeout: Duration) {
    c.wait_bgp_converged(timeout)
}

fn metric(node: &Node, name: &str) -> Option<f64> {
    let addr = std::net::SocketAddr::from((node.ip, 9402));
    let (_, body) = weft_tests::cluster::http_get(&node.ns, addr, "/metrics")?;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn wait_metric(node: &Node, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = metric(node, name);
        if got == Some(want) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{}: {name} is {got:?}, want {want}\n{}\n{}",
                node.name,
                weft_status(node, false),
                node.agent.as_ref().map(|a| a.log()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stat(node: &Node, s: Stat) -> u64 {
    node.maps().stat_count(s).unwrap()
}

fn drops(node: &Node, r: DropReason) -> u64 {
    node.maps().drop_count(r).unwrap()
}

/// `weft status` on a node (the CLI reads the pins and asks the node's BIRD).
fn weft_status(node: &Node, json: bool) -> String {
    let mut args = vec![
        format!("--net={}", node.ns.path()),
        binary("weft").display().to_string(),
        "--pin-root".into(),
        node.pins.path.display().to_string(),
        "--bird-socket".into(),
        node.bird_socket().display().to_string(),
        "status".into(),
    ];
    if json {
        args.push("--json".into());
    }
    let out = std::process::Command::new("nsenter")
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Nodes on two subnets behind a route reflector: every pair answers, nothing is encapsulated
/// (the datapath's counters and a capture on the router say so), sessions and learned prefixes
/// show in `weft status` and the metrics; routes the router announces for pod subnets it does
/// not own (more specific than a node's, a node's own, or nobody's) are refused, and never
/// reach a node's BGP table, not even for a moment.
#[test]
fn route_reflector_across_two_subnets() {
    let mut c = cluster(3, true, rr_extra(), true);
    wait_learned(&c, Duration::from_secs(30));
    for node in &c.nodes {
        wait_metric(node, "weft_bgp_sessions_established", 1.0);
        wait_metric(node, "weft_bgp_learned_routes", 2.0);
    }
    assert_eq!(c.router.as_ref().unwrap().established(), 3);

    let capture = Capture::start(&c.underlay, network());
    c.assert_full_matrix();
    c.assert_tcp_udp_matrix();
    let seen = capture.stop();
    assert_eq!(
        (seen.ipip, seen.vxlan),
        (0, 0),
        "tunnel packets on the router"
    );
    assert!(
        seen.plain_pod > 100,
        "plain pod packets on the router: {seen:?}"
    );
    for node in &c.nodes {
        assert_eq!(stat(node, Stat::VxlanEncap), 0, "{}", node.name);
        assert_eq!(stat(node, Stat::IpipEncap), 0, "{}", node.name);
        assert!(stat(node, Stat::BgpForward) > 0, "{}", node.name);
        let modes: Vec<u8> = node
            .maps()
            .routes()
            .unwrap()
            .iter()
            .map(|(_, r)| r.mode)
            .collect();
        assert!(
            modes.iter().all(|m| *m == RouteMode::Bgp as u8),
            "{modes:?}"
        );
    }
    // Node 0 (subnet A) reaches node 1 (subnet B) through the router: the next hop in its BGP
    // table is the router, not node 1.
    let route = c.nodes[0].ns.ip(&format!(
        "route show {} table {BGP_TABLE_DEFAULT}",
        subnet(&c.nodes[1])
    ));
    assert!(route.contains("via 192.168.100.1"), "{route}");

    let status = weft_status(&c.nodes[0], false);
    assert!(
        status.contains("bgp        1/1 sessions established, 2 prefixes learned"),
        "{status}"
    );
    assert!(status.contains("192.168.100.1"), "{status}");
    for other in &c.nodes[1..] {
        assert!(status.contains(&subnet(other).to_string()), "{status}");
    }
    let v: serde_json::Value = serde_json::from_str(&weft_status(&c.nodes[0], true)).unwrap();
    assert_eq!(v["bgp"]["sessions"][0]["established"], json!(true), "{v}");
    assert_eq!(v["bgp"]["learned"].as_array().unwrap().len(), 2, "{v}");

    // The router announces, as its own: a more specific prefix inside node 1's subnet (it
    // would win every longest-prefix match), node 2's own subnet (the exact prefix: node 2's
    // route must stay as it is), a pod subnet no node holds and a foreign prefix. All refused,
    // and none of them touches a node's BGP table at any moment: every change of the table is
    // recorded while the router announces (a route installed and withdrawn between two reads
    // of the table would be a window for steered traffic).
    let hijack = Ipv4Net::new(subnet(&c.nodes[1]).network(), 25).unwrap();
    let exact = subnet(&c.nodes[2]);
    let unowned = c.unheld_subnets()[0];
    let foreign: Ipv4Net = "10.99.0.0/16".parse().unwrap();
    let announced = [hijack, exact, unowned, foreign];
    let before: Vec<_> = c.nodes.iter().map(bgp_routes).collect();
    let watches: Vec<RouteWatch> = c
        .nodes
        .iter()
        .map(|n| RouteWatch::start(&n.ns, BGP_TABLE_DEFAULT))
        .collect();
    c.router_announces = announced.to_vec();
    c.reconfigure_router(None);
    for node in &c.nodes {
        // Node 2 refuses its own subnet from the router, the others refuse the router's path
        // for it and keep node 2's.
        wait_metric(node, "weft_bgp_refused_routes", 4.0);
    }
    let status = weft_status(&c.nodes[0], false);
    assert!(status.contains(&format!("refused  {hijack}")), "{status}");
    for ((node, watch), before) in c.nodes.iter().zip(&watches).zip(&before) {
        let events = watch.events_for(&announced);
        assert!(
            events.is_empty(),
            "{}: announced {announced:?}, refused, yet its BGP table changed: {events:#?}",
            node.name
        );
        assert_eq!(&bgp_routes(node), before, "{}", node.name);
    }
    drop(watches);
    // The router itself forwards node 2's subnet into its own blackhole (its static route wins
    // over the BGP one in its table): the nodes cannot help that. Once it stops, every pair
    // answers again.
    c.router_announces.retain(|n| *n != exact);
    c.reconfigure_router(None);
    for node in &c.nodes {
        wait_metric(node, "weft_bgp_refused_routes", 3.0);
    }
    c.assert_full_matrix();

    // The reverse-path check: node 1's pods reach node 0's through the router, so node 0 takes
    // plain frames from them only from the router's MAC. A host beside the router (on node 0's
    // subnet) forging a node 1 pod's source delivers nothing; the same frame from the router
    // arrives. A host routed through the router with its own address is no peer: refused too
    // (routed access needs --accept-routed-pod-traffic).
    let outside = c.add_outside_host();
    let (local, remote) = (c.nodes[0].pods[0].ip, c.nodes[1].pods[0].ip);
    let counter = UdpCounter::start(&c.nodes[0].pods[0].ns, local, PORT);
    let node0_mac = c.nodes[0].ns.mac("eth0");
    let frame = |src_mac| {
        udp_frame(
            src_mac,
            node0_mac,
            remote.octets(),
            local.octets(),
            1,
            PORT,
            b"bgp",
        )
    };
    frame_send(&outside.ns, "eth0", frame(outside.ns.mac("eth0")));
    udp_send(
        &outside.ns,
        std::net::SocketAddr::from((local, PORT)),
        b"routed".to_vec(),
    );
    wait_until(
        "node 0 to refuse the forged and the routed frames",
        Duration::from_secs(5),
        || {
            drops(&c.nodes[0], DropReason::BgpReversePath) == 1
                && drops(&c.nodes[0], DropReason::PlainFromNonPeer) == 1
        },
    );
    frame_send(&c.underlay, "br0", frame(c.underlay.mac("br0")));
    wait_until(
        "the router's frame to arrive",
        Duration::from_secs(5),
        || counter.count() == 1,
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter.count(), 1, "only the router's frame arrived");
    assert_eq!(drops(&c.nodes[0], DropReason::BgpReversePath), 1);
}

/// Waits until `check` holds on every node of `nodes`; returns how long it took.
fn time_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    wait_until(what, timeout, &mut check);
    start.elapsed()
}

/// Convergence behind the route reflector, with the timers weft sets (connect delay 1 s, the
/// route reflector's hold time 9 s): a joining node is routed by every other node and its pod
/// answers within seconds of its agent starting; a node leaving (its record deleted) is
/// withdrawn from every node's BGP table. Then the router goes away: for the graceful restart
/// time it announced (10 s) nodes keep forwarding along its last routes (no loss across a
/// router restart); past it they withdraw them and pod traffic is dropped and counted
/// (`no_bgp_route`) until the router is back.
#[test]
fn join_leave_and_the_router_going_away() {
    let mut c = cluster(3, true, rr_extra(), true);
    wait_learned(&c, Duration::from_secs(30));

    // Join: a fourth node (on the second subnet, behind the router from node 0).
    let start = Instant::now();
    let new = c.add_node();
    c.wait_converged(new);
    let new_subnet = subnet(&c.nodes[new]);
    let routed = time_until(
        "every node to learn the new node's subnet",
        Duration::from_secs(30),
        || {
            c.nodes[..new]
                .iter()
                .all(|n| learned(n).contains(&new_subnet))
        },
    );
    let routed = start.elapsed().max(routed);
    let pod = c.add_pod(new);
    let from = c.nodes[0].pods[0].ns.name.clone();
    let answered = time_until(
        "node 0's pod to reach the new pod",
        Duration::from_secs(30),
        || weft_tests::cluster::ping_rtt_in(&from, pod).is_some(),
    );
    eprintln!(
        "bgp join: new node's subnet in every BGP table {:.2} s after its agent started; its pod answered {:.2} s after being created",
        routed.as_secs_f64(),
        answered.as_secs_f64()
    );
    assert!(routed < Duration::from_secs(15), "join took {routed:?}");
    wait_learned(&c, Duration::from_secs(10));

    // Leave: the node's record goes (as `kubectl delete node`, or its lease expiring).
    let start = Instant::now();
    let gone = c.remove_node(new);
    let withdrawn = time_until(
        "every node to withdraw the left node's subnet",
        Duration::from_secs(30),
        || c.nodes.iter().all(|n| !learned(n).contains(&new_subnet)),
    );
    eprintln!(
        "bgp leave: subnet withdrawn from every BGP table {:.2} s after the node's record was deleted (total {:.2} s with its agent's stop)",
        withdrawn.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        withdrawn < Duration::from_secs(15),
        "leave took {withdrawn:?}"
    );
    drop(gone);
    // The operator removes the node from the route reflector too.
    c.reconfigure_router(None);
    wait_learned(&c, Duration::from_secs(10));

    // The router's BIRD dies and comes back within its restart time: nothing is lost.
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    let flow = SequencedFlow::start(&a.ns, &b.ns, b.ip, 7500);
    std::thread::sleep(Duration::from_millis(500));
    c.router.as_mut().unwrap().kill();
    std::thread::sleep(Duration::from_secs(3));
    c.router.as_mut().unwrap().restart();
    wait_until("sessions back", Duration::from_secs(30), || {
        c.router.as_ref().unwrap().established() == 3
    });
    std::thread::sleep(Duration::from_secs(1));
    let FlowLoss {
        sent,
        lost,
        missing,
    } = flow.stop();
    eprintln!("bgp router restart within its restart time: {sent} packets sent, {lost} lost");
    assert!(sent > 10_000);
    assert_eq!(lost, 0, "lost across a router restart: {missing:?}");
    wait_learned(&c, Duration::from_secs(10));

    // The router stays away past its restart time: routes are withdrawn, traffic is dropped
    // and counted; it comes back and everything converges again.
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    let drops_before = drops(&c.nodes[0], DropReason::NoBgpRoute);
    let flow = SequencedFlow::start(&a.ns, &b.ns, b.ip, 7502);
    let killed = Instant::now();
    c.router.as_mut().unwrap().kill();
    let forgotten = time_until(
        "nodes to forget the router's routes",
        Duration::from_secs(60),
        || c.nodes.iter().all(|n| learned(n).is_empty()),
    );
    let dead_for = killed.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let back = Instant::now();
    c.router.as_mut().unwrap().restart();
    wait_learned(&c, Duration::from_secs(30));
    let relearned = back.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let FlowLoss {
        sent,
        lost,
        missing,
    } = flow.stop();
    let dropped = drops(&c.nodes[0], DropReason::NoBgpRoute) - drops_before;
    eprintln!(
        "bgp router gone: routes kept {:.2} s (graceful restart), then withdrawn; {dropped} packets dropped as no_bgp_route; router back: relearned in {:.2} s; flow {sent} sent, {lost} lost in {} gap(s)",
        forgotten.as_secs_f64(),
        relearned.as_secs_f64(),
        missing.len()
    );
    assert!(
        forgotten >= Duration::from_secs(9),
        "routes kept for the router's restart time, not {forgotten:?}"
    );
    assert!(dead_for < Duration::from_secs(30));
    assert!(lost > 0 && dropped > 0, "the outage is visible");
    assert!(
        dropped >= lost / 2,
        "the loss is counted: {dropped} drops for {lost} lost"
    );
    assert!(relearned < Duration::from_secs(15));
    c.assert_full_matrix();
}

/// The pid of the BIRD a node's agent runs.
fn bird_pid(node: &Node) -> u32 {
    let path = node.bird_socket().with_file_name("bird.pid");
    std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}", path.display()))
}

/// Full mesh on one subnet: every node peers with every other, routes go straight to the
/// owning node. A rogue node (a real record, its own BIRD) announces its own subnet (accepted)
/// and another node's subnet, a more specific prefix of a third's and a foreign prefix (all
/// refused: a mesh peer may only announce its own subnets). A bad `Peers` entry written to
/// net-conf.json is refused naming the key and changes nothing. SIGKILL of an agent (its BIRD
/// dies with it) and of a BIRD alone lose nothing: graceful restart.
#[test]
fn full_mesh_on_one_subnet_hijacks_and_restarts() {
    let c = cluster(3, false, json!({"Mesh": true}), false);
    wait_learned(&c, Duration::from_secs(30));
    for node in &c.nodes {
        wait_metric(node, "weft_bgp_sessions_established", 2.0);
        assert_eq!(
            stat(node, Stat::VxlanEncap) + stat(node, Stat::IpipEncap),
            0
        );
    }
    c.assert_full_matrix();
    for node in &c.nodes {
        assert_eq!(
            stat(node, Stat::VxlanEncap) + stat(node, Stat::IpipEncap),
            0
        );
        assert!(stat(node, Stat::BgpForward) > 0);
    }
    // On one subnet the BGP next hop is the owning node itself.
    let route = c.nodes[0].ns.ip(&format!(
        "route show {} table {BGP_TABLE_DEFAULT}",
        subnet(&c.nodes[1])
    ));
    assert!(route.contains(&format!("via {}", c.nodes[1].ip)), "{route}");

    // A rogue node: a record of its own (so it is in the mesh) and a BIRD announcing more.
    let rogue_ip = Ipv4Addr::new(192, 168, 100, 50);
    let rogue_subnet = c.unheld_subnets()[0];
    let rogue = weft_tests::netns::Netns::new("wrg");
    let port = weft_tests::netns::unique_name("rg");
    c.underlay.ip(&format!(
        "link add {port} type veth peer name eth0 netns {}",
        rogue.name
    ));
    c.underlay.ip(&format!("link set {port} master br0 up"));
    rogue.ip("link set eth0 up");
    rogue.ip(&format!("addr add {rogue_ip}/24 dev eth0"));
    let hijacked = subnet(&c.nodes[1]);
    let more_specific = Ipv4Net::new(subnet(&c.nodes[2]).network(), 25).unwrap();
    let foreign: Ipv4Net = "10.99.0.0/16".parse().unwrap();
    let mut conf =
        format!("router id {rogue_ip};\nprotocol device {{}}\nprotocol static {{ ipv4;\n");
    for net in [rogue_subnet, hijacked, more_specific, foreign] {
        conf += &format!("  route {net} blackhole;\n");
    }
    conf += "}\n";
    for (i, node) in c.nodes.iter().enumerate() {
        conf += &format!(
            "protocol bgp n{i} {{ local {rogue_ip} as 64512; neighbor {} as 64512; connect delay time 1; ipv4 {{ import none; export all; }}; }}\n",
            node.ip
        );
    }
    let _rogue_bird = weft_tests::bird::Bird::start(&rogue, conf);
    c.etcd.put(
        &format!(
            "{}/subnets/{}-{}",
            weft_tests::cluster::FLANNEL_PREFIX,
            rogue_subnet.network(),
            rogue_subnet.prefix_len()
        ),
        &json!({"PublicIP": rogue_ip.to_string(), "BackendType": "bgp"}).to_string(),
    );
    for node in &c.nodes {
        wait_metric(node, "weft_bgp_sessions_established", 3.0);
        wait_until(
            &format!("{} to learn the rogue node's own subnet", node.name),
            Duration::from_secs(20),
            || learned(node).contains(&rogue_subnet),
        );
    }
    let others: Vec<(Ipv4Net, Ipv4Addr)> = c.nodes.iter().map(|n| (subnet(n), n.ip)).collect();
    for (i, node) in c.nodes.iter().enumerate() {
        // Refused: the hijacked subnet (from the rogue; node 1 itself keeps announcing it), the
        // more specific prefix, the foreign prefix. Node 1 refuses its own subnet from the rogue.
        wait_metric(node, "weft_bgp_refused_routes", 3.0);
        let table = learned(node);
        assert!(
            !table.contains(&more_specific) && !table.contains(&foreign),
            "{table:?}"
        );
        for (j, (s, ip)) in others.iter().enumerate() {
            if i == j {
                continue;
            }
            let route = node
                .ns
                .ip(&format!("route show {s} table {BGP_TABLE_DEFAULT}"));
            assert!(
                route.contains(&format!("via {ip} ")),
                "{}: {route}",
                node.name
            );
        }
    }
    c.assert_full_matrix();

    // A bad Peers entry while running: refused naming the key, nothing changes.
    let good = std::fs::read(&c.net_conf).unwrap();
    let mut bad: serde_json::Value = serde_json::from_slice(&good).unwrap();
    bad["Backend"]["Peers"] = json!([{"Address": "192.168.100.1", "AS": 70000000000u64}]);
    std::fs::write(&c.net_conf, bad.to_string()).unwrap();
    for node in &c.nodes {
        wait_until(
            &format!("{} to refuse the bad Peers entry", node.name),
            Duration::from_secs(10),
            || {
                node.agent
                    .as_ref()
                    .unwrap()
                    .log()
                    .contains("Backend.Peers[0].AS")
            },
        );
    }
    std::fs::write(&c.net_conf, &good).unwrap();
    assert!(
        c.nodes
            .iter()
            .all(|n| metric(n, "weft_bgp_sessions_established") == Some(3.0))
    );

    // SIGKILL of node 1's agent (its BIRD dies with it): flows to and from node 1 lose nothing.
    let mut c = c;
    let restart_checks = |c: &mut Cluster, what: &str, kill: &dyn Fn(&mut Cluster)| {
        let (p0, p1, p2) = (
            &c.nodes[0].pods[0],
            &c.nodes[1].pods[0],
            &c.nodes[2].pods[0],
        );
        let to = SequencedFlow::start(&p0.ns, &p1.ns, p1.ip, 7600);
        let from = SequencedFlow::start(&p1.ns, &p2.ns, p2.ip, 7602);
        std::thread::sleep(Duration::from_millis(500));
        let pid = bird_pid(&c.nodes[1]);
        kill(c);
        wait_until(
            &format!("a new BIRD after {what}"),
            Duration::from_secs(30),
            || {
                std::fs::read_to_string(c.nodes[1].bird_socket().with_file_name("bird.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .is_some_and(|p| p != pid)
            },
        );
        wait_metric(&c.nodes[1], "weft_bgp_sessions_established", 3.0);
        std::thread::sleep(Duration::from_secs(1));
        for (name, flow) in [("to node 1", to), ("from node 1", from)] {
            let FlowLoss {
                sent,
                lost,
                missing,
            } = flow.stop();
            eprintln!("bgp {what}: flow {name}: {sent} packets sent, {lost} lost");
            assert!(sent > 5_000);
            assert_eq!(lost, 0, "{what}, flow {name}: {missing:?}");
        }
        wait_learned_with_rogue(c, rogue_subnet);
    };
    restart_checks(&mut c, "agent SIGKILL", &|c| c.restart_agent(1));
    restart_checks(&mut c, "BIRD SIGKILL", &|c| {
        let pid = bird_pid(&c.nodes[1]);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    });
    wait_metric(&c.nodes[1], "weft_bgp_speaker_restarts_total", 1.0);
    c.assert_full_matrix();
}

/// Every node has the others' and the rogue's subnets again.
fn wait_learned_with_rogue(c: &Cluster, rogue: Ipv4Net) {
    for (i, node) in c.nodes.iter().enumerate() {
        let mut want: BTreeSet<Ipv4Net> = c
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| subnet(n))
            .collect();
        want.insert(rogue);
        wait_until(
            &format!("{} to have every route again", node.name),
            Duration::from_secs(30),
            || learned(node) == want,
        );
    }
}

/// CrossSubnet: routes on the node's own subnet are native along BGP's routes, across subnets
/// IPIP; BGP still distributes every route (every node's table has every other subnet).
#[test]
fn cross_subnet_tunnels_across_and_routes_within() {
    let c = cluster(
        3,
        true,
        json!({"Mesh": true, "Encapsulation": "CrossSubnet"}),
        false,
    );
    wait_learned(&c, Duration::from_secs(30));
    for (i, node) in c.nodes.iter().enumerate() {
        for (_, r) in node.maps().routes().unwrap() {
            let peer = Ipv4Addr::from(r.node_ip);
            let want = if peer.octets()[..3] == node.ip.octets()[..3] {
                RouteMode::Bgp
            } else {
                RouteMode::Ipip
            };
            assert_eq!(r.mode, want as u8, "node {i} -> {peer}");
        }
    }
    c.assert_full_matrix();
    // Nodes 0 and 2 share a subnet; node 1 is on the other.
    for i in [0, 2] {
        assert!(stat(&c.nodes[i], Stat::BgpForward) > 0);
        assert!(stat(&c.nodes[i], Stat::IpipEncap) > 0);
    }
    assert_eq!(stat(&c.nodes[1], Stat::BgpForward), 0);
    assert!(stat(&c.nodes[1], Stat::IpipEncap) > 0);
    for node in &c.nodes {
        assert_eq!(stat(node, Stat::VxlanEncap), 0);
    }
}

/// Switching to bgp and back while a flow runs: every route goes to bgp once BIRD installed
/// its route (never before), then back to vxlan; the loss is counted. BIRD stops after the
/// switch away, cleanly (its routes leave the kernel table).
#[test]
fn live_switch_to_and_from_bgp() {
    let mut c = Cluster::new(ClusterOptions {
        nodes: 3,
        backend: "vxlan".into(),
        ..Default::default()
    });
    for node in 0..c.nodes.len() {
        c.add_pod(node);
    }
    let modes = |node: &Node| -> Vec<u8> {
        node.maps()
            .routes()
            .unwrap()
            .iter()
            .map(|(_, r)| r.mode)
            .collect()
    };
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    let flow = SequencedFlow::start(&a.ns, &b.ns, b.ip, 7700);
    let mut took = Vec::new();
    for (backend, want) in [("bgp", RouteMode::Bgp), ("vxlan", RouteMode::Vxlan)] {
        std::thread::sleep(Duration::from_millis(500));
        c.options.backend = backend.into();
        c.write_net_conf();
        let start = Instant::now();
        for node in &c.nodes {
            wait_until(
                &format!("{} to switch to {backend}", node.name),
                Duration::from_secs(30),
                || modes(node).iter().all(|m| *m == want as u8),
            );
        }
        took.push((backend, start.elapsed()));
        if backend == "bgp" {
            // Routes went to bgp only once BIRD had installed them: nothing met a missing
            // route, and nothing was encapsulated after.
            let encap: Vec<u64> = c.nodes.iter().map(|n| stat(n, Stat::VxlanEncap)).collect();
            c.assert_full_matrix();
            for (node, before) in c.nodes.iter().zip(encap) {
                assert_eq!(
                    stat(node, Stat::VxlanEncap),
                    before,
                    "{} encapsulated",
                    node.name
                );
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let FlowLoss {
        sent,
        lost,
        missing,
    } = flow.stop();
    eprintln!(
        "bgp live switch vxlan -> bgp -> vxlan: {sent} packets sent, {lost} lost; every route switched in {took:?}"
    );
    assert!(sent > 5_000);
    assert_eq!(lost, 0, "packets lost across the switches: {missing:?}");
    for node in &c.nodes {
        assert_eq!(drops(node, DropReason::NoBgpRoute), 0, "{}", node.name);
    }
    for node in &c.nodes {
        wait_until(
            &format!("{}'s BIRD to stop after the switch away", node.name),
            Duration::from_secs(30),
            || !weft_agent::bgp::speaker::answers(&node.bird_socket()) && learned(node).is_empty(),
        );
    }
    c.assert_full_matrix();
}

/// A bad `Peers` entry at start: the agent refuses to start, naming the key.
#[test]
fn bad_peers_are_refused_at_start_naming_the_key() {
    let dir = std::env::temp_dir().join(weft_tests::netns::unique_name("weft-bgp-bad-"));
    std::fs::create_dir_all(&dir).unwrap();
    let nodes = dir.join("nodes.json");
    std::fs::write(
        &nodes,
        r#"{"nodes": [{"name": "a", "publicIP": "192.168.7.1", "subnet": "10.244.1.0/24"}]}"#,
    )
    .unwrap();
    for (peers, key) in [
        (
            json!([{"Address": "192.168.7.300"}]),
            "Backend.Peers[0].Address",
        ),
        (
            json!([{"Address": "192.168.7.2"}, {"Address": "192.168.7.3", "AS": 4294967296u64}]),
            "Backend.Peers[1].AS",
        ),
    ] {
        let conf = dir.join("net-conf.json");
        std::fs::write(
            &conf,
            json!({"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "Peers": peers}})
                .to_string(),
        )
        .unwrap();
        // In a namespace of its own, with its own pins and files: were the config accepted,
        // the agent would touch nothing outside.
        let ns = weft_tests::netns::Netns::new("wbad");
        let pins = weft_tests::pins::PinDir::new("bad");
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg(binary("weft-agent"))
            .args(["--datastore", "static", "--node-name", "a", "--iface", "lo"])
            .arg("--static-file")
            .arg(&nodes)
            .arg("--net-conf")
            .arg(&conf)
            .arg("--pin-root")
            .arg(&pins.path)
            .arg("--subnet-file")
            .arg(dir.join("subnet.env"))
            .arg("--bgp-dir")
            .arg(dir.join("bird"))
            .arg("--metrics-addr")
            .arg("127.0.0.1:0")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(key), "{key} not named in: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

//! `weft monitor` against a pinned injection node: drops arrive with their reason, hook,
//! 5-tuple and pod name; filters select; the datapath emits nothing without a listener, also
//! after the monitor is SIGKILLed; the in-kernel budget caps a flood. Several monitors listen at
//! once, each with its own options and budget, up to the slot limit; killing one frees its slot
//! and leaves the others working.
use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, RingBuf};
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};
use serde_json::Value;
use weft_agent::datapath::pin_dir;
use weft_common::{
    TunnelKey, map_names,
    monitor::{MONITOR_F_DROPS, MONITOR_F_TRACE, MONITOR_SLOTS},
    policy::{POLICY_F_INGRESS_ISOLATED, PolicyEndpoint},
    prog_names,
};
use weft_tests::{
    cluster::binary, injection_node::*, netns::unique_name, packets::*, pins::PinDir,
    testrun::run_tc, testrun::run_xdp,
};

const UNKNOWN_NODE_IP: [u8; 4] = [192, 168, 50, 77];

struct Monitor {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// The listener slot it holds.
    slot: u32,
    /// The last `lost` report it printed (its own losses since it attached).
    lost: std::cell::RefCell<Option<Value>>,
}

impl Monitor {
    /// Starts `weft monitor --json` (in the calling thread's network namespace) and waits until
    /// it is attached.
    fn start(node: &Node, pins: &Path, ipam: &Path, extra: &[&str]) -> Self {
        let (mut child, lines) = Self::spawn(pins, ipam, extra);
        let deadline = Instant::now() + Duration::from_secs(10);
        let slot = loop {
            let configs = node.dp.maps.monitor_configs().unwrap();
            if let Some(slot) = configs.iter().position(|c| c.owner_pid == child.id()) {
                break slot as u32;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "weft monitor exited before attaching"
            );
            assert!(Instant::now() < deadline, "weft monitor did not attach");
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            child,
            lines,
            slot,
            lost: Default::default(),
        }
    }

    fn spawn(pins: &Path, ipam: &Path, extra: &[&str]) -> (Child, mpsc::Receiver<String>) {
        // With only the capabilities the manifest gives the agent container (the CLI runs
        // there).
        let mut child = Command::new("setpriv")
            .args([
                "--bounding-set=-all,+bpf,+net_admin,+perfmon",
                "--inh-caps=-all",
                "--",
            ])
            .arg(binary("weft"))
            .arg("--pin-root")
            .arg(pins)
            .arg("--json")
            .arg("monitor")
            .arg("--cni-data-dir")
            .arg(ipam)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting weft monitor");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (child, lines)
    }

    /// The flags of its slot.
    fn flags(&self, node: &Node) -> u32 {
        node.dp.maps.monitor_flags().unwrap()[self.slot as usize] as u32
    }

    /// The next event record within `wait` (`lost` reports are kept aside).
    fn next_within(&self, wait: Duration) -> Option<Value> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            let v: Value = serde_json::from_str(&line).expect("monitor prints JSON lines");
            if v["type"] != "lost" {
                return Some(v);
            }
            *self.lost.borrow_mut() = Some(v);
        }
    }

    /// The next event record.
    fn next(&self) -> Option<Value> {
        self.next_within(Duration::from_secs(3))
    }

    /// Nothing but loss reports arrives within a short wait.
    fn assert_quiet(&self) {
        if let Some(v) = self.next_within(Duration::from_millis(500)) {
            panic!("unexpected event: {v}");
        }
    }

    /// Waits for its loss report (printed every 2 s when it changed).
    fn lost(&self) -> Option<Value> {
        if self.lost.borrow().is_none() {
            self.assert_quiet();
            let _ = self.next_within(Duration::from_secs(3));
        }
        self.lost.borrow().clone()
    }

    fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spoofed_from_pod1() -> Vec<u8> {
    // Pod 2's address from pod 1's veth.
    tcp_frame(
        POD2_MAC,
        [0xee; 6],
        POD2_IP,
        REMOTE_VXLAN_IP,
        40000,
        80,
        b"",
    )
}

fn vxlan_from_unknown(node: &Node) -> Vec<u8> {
    let inner = tcp_frame(
        VTEP_MAC,
        [0xee; 6],
        [10, 244, 2, 7],
        POD1_IP,
        5555,
        443,
        b"x",
    );
    vxlan_frame(
        &Outer {
            src_mac: PEER_MAC,
            dst_mac: node.underlay_mac,
            src: UNKNOWN_NODE_IP,
            dst: NODE_IP,
        },
        50000,
        VXLAN_PORT,
        VNI,
        &inner,
    )
}

fn from_pod(node: &mut Node, frame: &[u8], repeat: u32) -> i32 {
    let ifindex = node.pod1_ifindex;
    let prog = node.dp.tc_program(prog_names::FROM_POD).unwrap();
    run_tc(prog, frame, ifindex, repeat).verdict
}

/// Events the ring buffers of every slot hold that nobody read.
fn unread_events(pins: &Path) -> usize {
    let mut n = 0;
    for name in map_names::EVENTS {
        let path = pin_dir(pins).join("maps").join(name);
        let map = Map::from_map_data(MapData::from_pin(&path).unwrap()).unwrap();
        let mut ring = RingBuf::try_from(map).unwrap();
        while ring.next().is_some() {
            n += 1;
        }
    }
    n
}

/// No slot asks for events.
fn all_off(node: &Node) -> bool {
    node.dp.maps.monitor_flags().unwrap() == [0; MONITOR_SLOTS as usize]
}

/// Events emitted into a slot and refused by its budget, summed over CPUs.
fn rates(node: &Node, slot: u32) -> (u64, u64) {
    let r = node.dp.maps.monitor_rates(slot).unwrap();
    (
        r.iter().map(|r| r.emitted).sum(),
        r.iter().map(|r| r.over_budget).sum(),
    )
}

/// An IPAM store naming the fixture's two pods.
fn ipam_store() -> std::path::PathBuf {
    let ipam = std::env::temp_dir().join(unique_name("weft-monitor-ipam-"));
    std::fs::create_dir_all(ipam.join("weft")).unwrap();
    std::fs::write(
        ipam.join("weft/allocations.json"),
        serde_json::json!({"last": null, "allocations": [
            {"ip": "10.244.1.2", "containerID": "c1", "ifname": "eth0", "pod": "default/pod-one"},
            {"ip": "10.244.1.3", "containerID": "c2", "ifname": "eth0", "pod": "default/pod-two"}]})
        .to_string(),
    )
    .unwrap();
    ipam
}

#[test]
fn monitor_reports_drops_filters_stops_without_listener_and_keeps_its_budget() {
    let pins = PinDir::new("monitor");
    let ipam = ipam_store();
    let pin_root = pins.path.clone();
    let ipam_dir = ipam.clone();
    let ns = namespace();
    ns.run(move || {
        let pins = pin_root.as_path();
        let ipam = ipam_dir.as_path();
        let mut node = node_pinned(pins);

        // Nobody listens: the flags are off and a drop emits nothing.
        assert!(all_off(&node));
        assert_eq!(from_pod(&mut node, &spoofed_from_pod1(), 1), 2);
        assert_eq!(unread_events(pins), 0, "no listener, no event");

        // A spoofed packet from a pod, and a tunnel packet from an unknown node (XDP and tc).
        let mon = Monitor::start(&node, pins, ipam, &[]);
        assert_eq!(from_pod(&mut node, &spoofed_from_pod1(), 1), 2);
        let ev = mon.next().expect("the spoof's drop event");
        assert_eq!(ev["type"], "drop");
        assert_eq!(ev["hook"], "from_pod");
        assert_eq!(ev["reason"], "spoofed_ip");
        assert_eq!(ev["interface"], "h1");
        assert_eq!(ev["endpoint"], "default/pod-one", "the veth's pod by name");
        assert_eq!(ev["src"], "10.244.1.3");
        assert_eq!(ev["dst"], "10.244.2.7");
        assert_eq!(ev["protocol"], "tcp");
        assert_eq!(ev["sport"], 40000);
        assert_eq!(ev["dport"], 80);
        assert_eq!(ev["src_pod"], "default/pod-two");
        assert_eq!(ev["dst_node"], "192.168.50.2");

        let vx = vxlan_from_unknown(&node);
        let xdp = node.dp.xdp_program().unwrap();
        assert_eq!(run_xdp(xdp, &vx, 1).verdict, 1, "XDP_DROP");
        let ev = mon.next().expect("the XDP drop event");
        assert_eq!(ev["hook"], "xdp_underlay");
        assert_eq!(ev["reason"], "unknown_tunnel_source");
        assert_eq!(ev["tunnel"]["kind"], "vxlan");
        assert_eq!(ev["tunnel"]["src"], "192.168.50.77");
        assert_eq!(ev["dst"], "10.244.1.2");
        assert_eq!(ev["dst_pod"], "default/pod-one");
        assert_eq!(ev["dport"], 443);
        let tc = node.dp.tc_program(prog_names::FROM_UNDERLAY).unwrap();
        assert_eq!(run_tc(tc, &vx, 0, 1).verdict, 2);
        let ev = mon.next().expect("the tc drop event");
        assert_eq!(ev["hook"], "from_underlay");
        assert_eq!(ev["reason"], "unknown_tunnel_source");
        // What the kernel's vxlan socket decapsulated (`weft_vxlan`), refused by from_vxlan.
        node.dp
            .set_trace_tunnel(Some(TunnelKey {
                peer: PEER_IP,
                vni: VNI,
                valid: 1,
            }))
            .unwrap();
        let spoofed = tcp_frame(
            PEER_VTEP_MAC,
            VTEP_MAC,
            [8, 8, 8, 8],
            POD1_IP,
            5555,
            443,
            b"",
        );
        let vx_prog = node.dp.tc_program(prog_names::FROM_VXLAN).unwrap();
        assert_eq!(run_tc(vx_prog, &spoofed, 0, 1).verdict, 2);
        let ev = mon.next().expect("the from_vxlan drop event");
        assert_eq!(ev["hook"], "from_vxlan");
        assert_eq!(ev["reason"], "tunnel_inner_source_spoofed");
        assert_eq!(ev["src"], "8.8.8.8");
        assert_eq!(ev["dst_pod"], "default/pod-one");
        mon.assert_quiet();

        // A clean exit clears the flags at once.
        mon.stop();
        assert!(all_off(&node));
        assert_eq!(from_pod(&mut node, &spoofed_from_pod1(), 1), 2);
        assert_eq!(unread_events(pins), 0);

        // Filters: pod, reason, protocol, port, node; forwarding events with --trace.
        let mon = Monitor::start(
            &node,
            pins,
            ipam,
            &[
                "--reason",
                "unknown_tunnel_source",
                "--protocol",
                "tcp",
                "--port",
                "443",
            ],
        );
        assert_eq!(from_pod(&mut node, &spoofed_from_pod1(), 1), 2);
        let tc = node.dp.tc_program(prog_names::FROM_UNDERLAY).unwrap();
        assert_eq!(run_tc(tc, &vx, 0, 1).verdict, 2);
        let ev = mon.next().expect("the matching event");
        assert_eq!(ev["reason"], "unknown_tunnel_source");
        mon.assert_quiet();
        mon.stop();
        let mon = Monitor::start(
            &node,
            pins,
            ipam,
            &["--trace", "--pod", "pod-two", "--node", "192.168.50.2"],
        );
        // Pod 1 to pod 2 on this node names pod-two but not node 192.168.50.2: filtered out.
        // Pod 2's address toward a pod of 192.168.50.2 (the spoof) matches both.
        let local = tcp_frame(POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, 1000, 2000, b"");
        assert_eq!(from_pod(&mut node, &local, 1), 7, "delivered locally");
        assert_eq!(from_pod(&mut node, &spoofed_from_pod1(), 1), 2);
        let ev = mon.next().expect("the spoof, matching both filters");
        assert_eq!(ev["reason"], "spoofed_ip");
        mon.assert_quiet();
        mon.stop();
        let mon = Monitor::start(&node, pins, ipam, &["--trace", "--pod", "default/pod-two"]);
        assert_eq!(from_pod(&mut node, &local, 1), 7);
        let ev = mon.next().expect("the forwarding event");
        assert_eq!(ev["type"], "forward");
        assert_eq!(ev["action"], "redirect");
        assert_eq!(ev["hook"], "from_pod");
        assert_eq!(ev["dst_pod"], "default/pod-two");
        mon.stop();

        // A NetworkPolicy denial is a drop event with its reason: pod-two isolated for
        // ingress with no rule; a new flow into it from pod-one.
        let mon = Monitor::start(&node, pins, ipam, &["--reason", "policy_denied_ingress"]);
        let isolated = PolicyEndpoint {
            flags: POLICY_F_INGRESS_ISOLATED,
            ..PolicyEndpoint::OPEN
        };
        node.dp
            .maps
            .put_policy_endpoint(Ipv4Addr::from(POD2_IP), Some(&isolated))
            .unwrap();
        let denied = tcp_frame(POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, 1001, 2001, b"");
        assert_eq!(
            from_pod(&mut node, &denied, 1),
            2,
            "denied by pod-two's ingress"
        );
        let ev = mon.next().expect("the policy denial's drop event");
        assert_eq!(ev["type"], "drop");
        assert_eq!(ev["hook"], "from_pod");
        assert_eq!(ev["reason"], "policy_denied_ingress");
        assert_eq!(ev["src_pod"], "default/pod-one");
        assert_eq!(ev["dst_pod"], "default/pod-two");
        assert_eq!(ev["dport"], 2001);
        mon.assert_quiet();
        mon.stop();
        node.dp
            .maps
            .put_policy_endpoint(Ipv4Addr::from(POD2_IP), Some(&PolicyEndpoint::OPEN))
            .unwrap();

        // SIGKILL: the kernel closes the monitor's socket, empties the sockmap slot, and the
        // datapath stops emitting (and clears the flags) at its next event.
        let mut mon = Monitor::start(&node, pins, ipam, &["--trace"]);
        mon.child.kill().unwrap();
        mon.child.wait().unwrap();
        assert_ne!(
            mon.flags(&node),
            0,
            "a killed monitor could not clear its flags itself"
        );
        assert_eq!(from_pod(&mut node, &spoofed_from_pod1(), 1), 2);
        assert_eq!(unread_events(pins), 0, "nothing emitted after SIGKILL");
        assert_eq!(
            mon.flags(&node),
            0,
            "the datapath cleared the flags of the dead monitor"
        );
        drop(mon);

        // The budget: a flood of 5000 drops on one CPU yields at most the burst plus what the
        // rate refills while it runs; the rest is counted as over budget. The bucket is per
        // CPU, and a repeated test run may move to another CPU between runs when the machine
        // is busy (each CPU's burst then counts): the flood is pinned to one CPU.
        let mon = Monitor::start(&node, pins, ipam, &["--budget", "20", "--burst", "10"]);
        let (emitted0, over0) = rates(&node, mon.slot);
        let cpus = sched_getaffinity(Pid::from_raw(0)).unwrap();
        let mut one = CpuSet::new();
        one.set(
            (0..CpuSet::count())
                .find(|&c| cpus.is_set(c).unwrap_or(false))
                .unwrap(),
        )
        .unwrap();
        sched_setaffinity(Pid::from_raw(0), &one).unwrap();
        let started = Instant::now();
        let verdict = from_pod(&mut node, &spoofed_from_pod1(), 5000);
        let elapsed = started.elapsed().as_secs_f64();
        sched_setaffinity(Pid::from_raw(0), &cpus).unwrap();
        assert_eq!(verdict, 2);
        let (emitted1, over1) = rates(&node, mon.slot);
        let emitted = emitted1 - emitted0;
        let allowed = 10 + (20.0 * elapsed).ceil() as u64;
        assert!(
            (10..=allowed).contains(&emitted),
            "{emitted} events for a 5000-drop flood (budget 20/s, burst 10, {elapsed:.3} s)"
        );
        assert_eq!(
            emitted + (over1 - over0),
            5000,
            "every refused event is counted"
        );
        let mut received = 0;
        while mon.next().is_some() {
            received += 1;
            if received == emitted {
                break;
            }
        }
        assert_eq!(received, emitted, "the monitor printed every emitted event");
        mon.stop();
    });
    drop(ns);
    let _ = std::fs::remove_dir_all(&ipam);
}

#[test]
fn several_monitors_listen_at_once_each_with_its_own_options_until_the_slots_run_out() {
    let pins = PinDir::new("monitors");
    let ipam = ipam_store();
    let pin_root = pins.path.clone();
    let ipam_dir = ipam.clone();
    let ns = namespace();
    ns.run(move || {
        let pins = pin_root.as_path();
        let ipam = ipam_dir.as_path();
        let mut node = node_pinned(pins);
        let local = tcp_frame(POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, 1000, 2000, b"");

        // A: drops and forwarding. B: spoofed-address drops only, on a budget of its own.
        let a = Monitor::start(&node, pins, ipam, &["--trace"]);
        let b = Monitor::start(
            &node,
            pins,
            ipam,
            &["--reason", "spoofed_ip", "--budget", "5", "--burst", "5"],
        );
        assert_ne!(a.slot, b.slot);
        let cb = node.dp.maps.monitor_config(b.slot).unwrap();
        assert_eq!(a.flags(&node), MONITOR_F_DROPS | MONITOR_F_TRACE);
        assert_eq!(b.flags(&node), MONITOR_F_DROPS);
        assert_eq!(
            (cb.rate_per_sec, cb.burst, cb.owner_pid),
            (5, 5, b.child.id())
        );

        // A forwarded packet reaches A only; a drop reaches both.
        assert_eq!(from_pod(&mut node, &local, 1), 7, "delivered locally");
        let ev = a.next().expect("A's forwarding event");
        assert_eq!(
            (ev["type"].as_str(), ev["action"].as_str()),
            (Some("forward"), Some("redirect"))
        );
        b.assert_quiet();
        assert_eq!(from_pod(&mut node, &spoofed_from_pod1(), 1), 2);
        for m in [&a, &b] {
            let ev = m.next().expect("the spoof's drop event");
            assert_eq!(ev["reason"], "spoofed_ip");
            assert_eq!(ev["src_pod"], "default/pod-two");
        }
        a.assert_quiet();
        b.assert_quiet();

        // Budgets are per slot: a flood of 200 drops fills B's small budget (its burst of 5,
        // plus what 5/s refills while it runs) and not A's (1000 per CPU by default).
        let (a0, a_over0) = rates(&node, a.slot);
        let (b0, b_over0) = rates(&node, b.slot);
        let started = Instant::now();
        assert_eq!(from_pod(&mut node, &spoofed_from_pod1(), 200), 2);
        let elapsed = started.elapsed().as_secs_f64();
        let (a1, a_over1) = rates(&node, a.slot);
        let (b1, b_over1) = rates(&node, b.slot);
        assert_eq!(
            (a1 - a0, a_over1 - a_over0),
            (200, 0),
            "A's budget holds 200"
        );
        let b_sent = b1 - b0;
        assert!(
            (4..=5 + (5.0 * elapsed).ceil() as u64).contains(&b_sent),
            "B emitted {b_sent} of a 200-drop flood (budget 5/s, burst 5, {elapsed:.3} s)"
        );
        assert_eq!(b_sent + (b_over1 - b_over0), 200);
        for (m, n) in [(&a, 200), (&b, b_sent)] {
            for i in 0..n {
                m.next()
                    .unwrap_or_else(|| panic!("event {i} of {n} missing on slot {}", m.slot));
            }
        }
        // Each monitor reports its own losses: B those over its budget, A none.
        let lost = b.lost().expect("B reports its losses");
        assert_eq!(lost["over_budget"], 200 - b_sent, "{lost}");
        assert_eq!(lost["ring_full"], 0);
        a.assert_quiet();
        assert!(a.lost.borrow().is_none(), "A lost nothing");

        // Two more take the last slots; a fifth monitor is refused with the limit and the
        // holders named.
        let c = Monitor::start(&node, pins, ipam, &[]);
        let d = Monitor::start(&node, pins, ipam, &[]);
        let out = Command::new(binary("weft"))
            .arg("--pin-root")
            .arg(pins)
            .args(["monitor", "--count", "1"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("all {MONITOR_SLOTS} monitor slots"))
                && err.contains(&format!("at most {MONITOR_SLOTS} monitors")),
            "{err}"
        );
        for m in [&a, &b, &c, &d] {
            assert!(err.contains(&m.child.id().to_string()), "{err}");
        }

        // SIGKILL A: the kernel frees its slot at once; B keeps working.
        let mut a = a;
        let a_slot = a.slot;
        a.child.kill().unwrap();
        a.child.wait().unwrap();
        drop(a);
        assert_eq!(from_pod(&mut node, &spoofed_from_pod1(), 1), 2);
        assert_eq!(
            b.next().expect("B after A was killed")["reason"],
            "spoofed_ip"
        );
        // A new monitor gets A's slot, with its own options: A's --trace is gone (forwarding
        // reaches nobody).
        let e = Monitor::start(&node, pins, ipam, &[]);
        assert_eq!(e.slot, a_slot, "the killed monitor's slot is free");
        assert_eq!(e.flags(&node), MONITOR_F_DROPS);
        assert_eq!(from_pod(&mut node, &local, 1), 7);
        e.assert_quiet();
        b.assert_quiet();
        assert_eq!(from_pod(&mut node, &spoofed_from_pod1(), 1), 2);
        for m in [&b, &c, &d, &e] {
            assert_eq!(m.next().expect("the drop")["reason"], "spoofed_ip");
        }
        for m in [b, c, d, e] {
            m.stop();
        }
        assert!(all_off(&node));
        assert_eq!(from_pod(&mut node, &spoofed_from_pod1(), 1), 2);
        assert_eq!(unread_events(pins), 0);
    });
    drop(ns);
    let _ = std::fs::remove_dir_all(&ipam);
}

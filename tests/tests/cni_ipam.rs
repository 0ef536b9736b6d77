//! weft-cni's address management under the conditions a runtime creates: parallel ADDs, a full
//! subnet, and plugins killed at random points over 1,000 ADD/DEL cycles.
use std::{
    collections::HashSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::{Value, json};
use weft_agent::cni::names::AttachmentNames;
use weft_tests::{
    cni::{CniNode, CniOutput, result_ip},
    netns::Netns,
};

#[test]
fn fifty_parallel_adds_get_distinct_addresses() {
    let node = CniNode::new("10.244.20.0/24", 1450);
    let pods: Vec<Netns> = (0..50).map(|_| Netns::new("wpp")).collect();
    let children: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            node.call("ADD", &node.conf("1.1.0"))
                .attachment(&format!("par-{i}"), Some(&pod.path()))
                .spawn(&node.ns)
        })
        .collect();
    let mut ips = HashSet::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().expect("waiting for ADD");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "ADD par-{i}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_str(&stdout).unwrap();
        let ip = result_ip(&v);
        assert!(node.subnet.contains(&ip));
        assert!(ips.insert(ip), "{ip} handed out twice");
    }
    assert_eq!(ips.len(), 50);
    let allocated: HashSet<Ipv4Addr> = node.allocations().iter().map(|a| a.0).collect();
    assert_eq!(allocated, ips);
    let endpoints: HashSet<Ipv4Addr> = node
        .maps()
        .endpoints()
        .unwrap()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(endpoints, ips);
    assert_eq!(node.host_links().len(), 50);
    for (i, pod) in pods.iter().enumerate() {
        let addr = pod.ip("-o -4 addr show dev eth0");
        assert!(
            ips.iter().any(|ip| addr.contains(&format!("inet {ip}/32"))),
            "par-{i}: {addr}"
        );
    }
}

#[test]
fn exhaustion_is_a_clear_error_not_a_hang() {
    // A /28: 16 addresses minus network, broadcast and the gateway address = 13.
    let node = CniNode::new("10.244.21.0/28", 1450);
    let pods: Vec<Netns> = (0..14).map(|_| Netns::new("wpx")).collect();
    for (i, pod) in pods.iter().take(13).enumerate() {
        node.add(&format!("ex-{i}"), pod, "1.1.0");
    }
    let started = Instant::now();
    let out = node
        .call("ADD", &node.conf("1.1.0"))
        .attachment("ex-13", Some(&pods[13].path()))
        .run(&node.ns);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(out.err_code(), 100, "{}", out.stdout);
    assert!(
        out.err_msg().contains("no free address") && out.err_msg().contains("10.244.21.0/28"),
        "{}",
        out.err_msg()
    );
    // The failed ADD left nothing behind.
    assert_eq!(node.allocations().len(), 13);
    assert_eq!(node.host_links().len(), 13);
    assert!(!pods[13].ip("-o link show").contains("eth0"));
    // Freeing one address makes room again.
    assert!(node.del("ex-4", Some(&pods[4]), "1.1.0").success);
    let r = node.add("ex-13", &pods[13], "1.1.0");
    assert!(node.subnet.contains(&result_ip(&r)));
}

/// xorshift64*: reproducible randomness without a dependency (the seed is printed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Runs `call` and, when `kill_after` is set, SIGKILLs the plugin (by its pid) after that
/// delay unless it finished first.
fn run_maybe_killed(
    node: &CniNode,
    call: &weft_tests::cni::Call,
    kill_after: Option<Duration>,
) -> Option<CniOutput> {
    let mut child = call.spawn(&node.ns);
    if let Some(delay) = kill_after {
        std::thread::sleep(delay);
        if child.try_wait().expect("try_wait").is_none() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            return None;
        }
    }
    let out = child.wait_with_output().expect("waiting for the plugin");
    Some(CniOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

#[test]
fn no_leaks_after_a_thousand_cycles_with_killed_plugins() {
    const CYCLES: usize = 1000;
    const POOL: usize = 6;
    // Room for every leak (abandoned sandboxes) until the final GC.
    let node = CniNode::new("10.244.24.0/22", 1450);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("leak test seed {seed}");
    let mut rng = Rng(seed);
    // Sandboxes are reused; one whose attachment may be left half-made is replaced (the
    // runtime removed it without a successful DEL, which is what GC is for).
    let mut pool: Vec<Netns> = (0..POOL).map(|_| Netns::new("wlk")).collect();
    let mut live: Vec<(String, Netns, Value)> = Vec::new();
    let (mut killed_adds, mut killed_dels, mut abandoned) = (0, 0, 0);
    let conf = node.conf("1.1.0");
    for i in 0..CYCLES {
        let cid = format!("leak-{i}");
        // Every 100th pod stays: the live pods GC must keep.
        if i % 100 == 50 {
            let pod = Netns::new("wlv");
            let r = node.add(&cid, &pod, "1.1.0");
            live.push((cid, pod, r));
            continue;
        }
        let slot = i % POOL;
        let path = pool[slot].path();
        let add = node.call("ADD", &conf).attachment(&cid, Some(&path));
        let kill_add = rng.below(3) == 0;
        let delay = Duration::from_micros(rng.below(15_000));
        let add_out = run_maybe_killed(&node, &add, kill_add.then_some(delay));
        match &add_out {
            None => killed_adds += 1,
            Some(out) => assert!(out.success, "ADD {cid}: {out:?}"),
        }
        // Sometimes the runtime never gets to DEL (it crashed, the sandbox went away).
        if rng.below(5) == 0 {
            abandoned += 1;
            pool[slot] = Netns::new("wlk");
            continue;
        }
        let del = node.call("DEL", &conf).attachment(&cid, Some(&path));
        let kill_del = rng.below(3) == 0;
        let delay = Duration::from_micros(rng.below(12_000));
        match run_maybe_killed(&node, &del, kill_del.then_some(delay)) {
            None => {
                killed_dels += 1;
                // Half the time the runtime retries DEL (it must succeed on the leftovers),
                // otherwise it gives up on the sandbox.
                if rng.below(2) == 0 {
                    let out = del.run(&node.ns);
                    assert!(out.success, "DEL retry {cid}: {out:?}");
                } else {
                    abandoned += 1;
                    pool[slot] = Netns::new("wlk");
                }
            }
            Some(out) => assert!(out.success, "DEL {cid}: {out:?}"),
        }
    }
    eprintln!(
        "{CYCLES} cycles: {killed_adds} ADDs and {killed_dels} DELs killed, {abandoned} sandboxes abandoned, {} live",
        live.len()
    );
    assert!(
        killed_adds > 50 && killed_dels > 20,
        "too few kills to mean anything"
    );
    drop(pool);

    let valid: Vec<(&str, &str)> = live.iter().map(|(c, _, _)| (c.as_str(), "eth0")).collect();
    let out = node.gc(&valid);
    assert!(out.success, "GC: {out:?}");

    let mut want_allocs: Vec<(Ipv4Addr, String, String)> = live
        .iter()
        .map(|(c, _, r)| (result_ip(r), c.clone(), "eth0".to_string()))
        .collect();
    want_allocs.sort();
    assert_eq!(node.allocations(), want_allocs);
    let mut want_ips: Vec<Ipv4Addr> = want_allocs.iter().map(|a| a.0).collect();
    want_ips.sort();
    let eps: Vec<Ipv4Addr> = node
        .maps()
        .endpoints()
        .unwrap()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(eps, want_ips);
    let mut want_links: Vec<String> = live
        .iter()
        .map(|(c, _, _)| AttachmentNames::of(c, "eth0").host_ifname)
        .collect();
    want_links.sort();
    // Host links of abandoned sandboxes vanish with their namespace asynchronously.
    weft_tests::process::wait_until("abandoned links to vanish", Duration::from_secs(10), || {
        node.host_links() == want_links
    });
    // clsact filters go with their device: no pins.
    assert!(node.link_pins().is_empty(), "{:?}", node.link_pins());
    for (cid, pod, r) in &live {
        let out = node.check(cid, pod, r);
        assert!(out.success, "CHECK {cid} after GC: {out:?}");
    }
    // No half-written state anywhere: the store parses (allocations() did) and no
    // temporary file survives a successful write by the same pid... stray ones are harmless
    // but must not be mistaken for the store.
    let store = node.data_dir().join("weft").join("allocations.json");
    assert!(store.exists());
}

#[test]
fn gc_in_a_loop_while_fifty_adds_run() {
    let node = CniNode::new("10.244.25.0/24", 1450);
    // Garbage for GC to find meanwhile: an attachment the runtime no longer lists, and a pod
    // link no allocation accounts for (an ADD killed after creating it).
    let stale_pod = Netns::new("wgs");
    let stale = node.add("gc-stale", &stale_pod, "1.1.0");
    let orphan = AttachmentNames::of("gc-orphan", "eth0").host_ifname;
    node.ns
        .ip(&format!("link add {orphan} type veth peer name {orphan}p"));
    let pods: Vec<Netns> = (0..50).map(|_| Netns::new("wgp")).collect();
    let cids: Vec<String> = (0..50).map(|i| format!("gc-par-{i}")).collect();
    let valid: Vec<(&str, &str)> = cids.iter().map(|c| (c.as_str(), "eth0")).collect();

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (results, gcs) = std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = node.gc(&valid);
                assert!(out.success, "GC during the ADDs: {out:?}");
                runs += 1;
            }
            runs
        });
        let children: Vec<_> = pods
            .iter()
            .zip(&cids)
            .map(|(pod, cid)| {
                node.call("ADD", &node.conf("1.1.0"))
                    .attachment(cid, Some(&pod.path()))
                    .spawn(&node.ns)
            })
            .collect();
        let results: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().expect("waiting for ADD"))
            .collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (results, gc.join().expect("the GC loop"))
    });
    eprintln!("{gcs} GCs ran during the 50 ADDs");
    assert!(gcs >= 3, "GC barely ran: {gcs}");
    let mut ips = HashSet::new();
    for (cid, out) in cids.iter().zip(&results) {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "ADD {cid} failed while GC ran: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ips.insert(result_ip(&serde_json::from_str(&stdout).unwrap()));
    }
    assert_eq!(ips.len(), 50);
    // Every pod is intact: GC removed nothing it should keep...
    let allocated: HashSet<Ipv4Addr> = node.allocations().iter().map(|a| a.0).collect();
    assert_eq!(allocated, ips);
    let endpoints: HashSet<Ipv4Addr> = node
        .maps()
        .endpoints()
        .unwrap()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(endpoints, ips);
    let mut want_links: Vec<String> = cids
        .iter()
        .map(|c| AttachmentNames::of(c, "eth0").host_ifname)
        .collect();
    want_links.sort();
    assert_eq!(node.host_links(), want_links);
    for link in &want_links {
        assert!(
            node.pod_programs_attached(link),
            "from_pod and to_pod on {link}"
        );
    }
    for (pod, cid) in pods.iter().zip(&cids).step_by(7) {
        let r = json!({"cniVersion": "1.1.0", "ips": [{"address": format!("{}/32", node.allocations().iter().find(|a| a.1 == *cid).unwrap().0)}]});
        let out = node.check(cid, pod, &r);
        assert!(out.success, "CHECK {cid}: {out:?}");
    }
    // ...and what it should collect is gone.
    assert!(!allocated.contains(&result_ip(&stale)));
    assert!(!node.host_links().contains(&orphan));
}

/// Writes weft-cni's conflist for `node` (as `weft-agent --install-cni` does) for the CLI.
fn conflist(node: &CniNode) -> std::path::PathBuf {
    let mut entry = node.conf("1.1.0");
    entry.as_object_mut().unwrap().remove("cniVersion");
    entry.as_object_mut().unwrap().remove("name");
    let list = json!({"cniVersion": "1.1.0", "name": "weft", "plugins": [entry]});
    let path = node.dir.path.join("10-weft.conflist");
    std::fs::write(&path, list.to_string()).unwrap();
    path
}

#[test]
fn a_corrupt_store_keeps_del_working_fails_add_and_is_rebuilt() {
    let node = CniNode::new("10.244.26.0/24", 1450);
    let pods: Vec<Netns> = (0..4).map(|_| Netns::new("wcc")).collect();
    let results: Vec<Value> = pods
        .iter()
        .take(3)
        .enumerate()
        .map(|(i, pod)| node.add(&format!("cor-{i}"), pod, "1.1.0"))
        .collect();
    let ips: Vec<Ipv4Addr> = results.iter().map(result_ip).collect();
    let store = node.data_dir().join("weft").join("allocations.json");
    let corrupt = |node: &CniNode| {
        // Half a file, as a full disk or a broken restore would leave it.
        let text = std::fs::read(&store).unwrap();
        std::fs::write(&store, &text[..text.len() / 2]).unwrap();
        let _ = node;
    };
    corrupt(&node);

    // DEL still removes the pod's link, its endpoint and its programs.
    let out = node.del("cor-0", Some(&pods[0]), "1.1.0");
    assert!(out.success, "DEL with a corrupt store: {out:?}");
    let gone = AttachmentNames::of("cor-0", "eth0").host_ifname;
    assert!(!node.host_links().contains(&gone));
    assert!(
        !node
            .maps()
            .endpoints()
            .unwrap()
            .iter()
            .any(|(a, _)| *a == ips[0]),
        "the endpoint stayed"
    );
    assert!(!node.link_pins().iter().any(|p| p.ends_with(&gone)));

    // ADD fails, naming the file and the way out, with weft's IPAM store code.
    let out = node
        .call("ADD", &node.conf("1.1.0"))
        .attachment("cor-3", Some(&pods[3].path()))
        .run(&node.ns);
    assert_eq!(out.err_code(), 103, "{}", out.stdout);
    let msg = out.err_msg();
    assert!(
        msg.contains(&store.display().to_string()) && msg.contains("weft ipam rebuild"),
        "{msg}"
    );
    assert!(
        !pods[3].ip("-o link show").contains("eth0"),
        "nothing wired"
    );

    // GC rebuilds it from the links that remain: the two live pods, not the deleted one.
    let out = node.gc(&[("cor-1", "eth0"), ("cor-2", "eth0")]);
    assert!(out.success, "GC: {out:?}");
    let want = |ids: &[usize]| -> Vec<(Ipv4Addr, String, String)> {
        let mut v: Vec<_> = ids
            .iter()
            .map(|i| (ips[*i], format!("cor-{i}"), "eth0".to_string()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(node.allocations(), want(&[1, 2]));
    let kept: Vec<_> = std::fs::read_dir(store.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "the corrupt file is kept for a post-mortem");
    let r3 = node.add("cor-3", &pods[3], "1.1.0");
    assert!(
        !ips[1..].contains(&result_ip(&r3)),
        "a live address handed out twice"
    );
    for i in [1, 2] {
        let out = node.check(&format!("cor-{i}"), &pods[i], &results[i]);
        assert!(out.success, "CHECK cor-{i} after the rebuild: {out:?}");
    }

    // The documented command does the same without a runtime: corrupt, rebuild, compare.
    let before = node.allocations();
    corrupt(&node);
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node.ns.path()))
        .arg(weft_tests::cluster::binary("weft"))
        .args(["ipam", "rebuild", "--json", "--pin-root"])
        .arg(&node.pins.path)
        .arg("--conflist")
        .arg(conflist(&node))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "weft ipam rebuild: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["allocations"].as_array().unwrap().len(),
        3,
        "{report}"
    );
    assert_eq!(node.allocations(), before);
}

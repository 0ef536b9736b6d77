//! The agent's HTTP server under hostile clients: a client that sends its request a byte at a
//! time, one that sends a 1 GB request line, and a hundred that hold connections open (more than
//! the server serves at once, again and again), all from another host on the underlay, must not
//! stop `/healthz` probes from the node itself (where the kubelet probes from) from answering
//! within a second, and the agent's memory stays flat.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::json;
use weft_tests::{
    cluster::{METRICS_PORT, binary},
    cni::TempDir,
    netns::{Netns, enter, veth_pair},
    pins::PinDir,
    process::{NsProcess, wait_until},
};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .expect("VmRSS of the agent")
}

/// GET `path` with a 1 s budget for connecting and answering; the status code.
fn get_within_1s(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n").ok()?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).ok()?;
    std::str::from_utf8(&head[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn slow_and_huge_requests_do_not_block_healthz() {
    let a = Netns::new("wha");
    let b = Netns::new("whb");
    veth_pair(&a, "eth0", &b, "eth0");
    a.ip("addr add 192.168.92.1/24 dev eth0");
    // The hostile clients' host.
    b.ip("addr add 192.168.92.2/24 dev eth0");
    let dir = TempDir::new("weft-http-");
    let topology = dir.path.join("nodes.json");
    std::fs::write(
        &topology,
        json!({"nodes": [{"name": "a", "publicIP": "192.168.92.1", "subnet": "10.72.1.0/24"}]})
            .to_string(),
    )
    .unwrap();
    let conf = dir.path.join("net-conf.json");
    std::fs::write(&conf, r#"{"Network": "10.72.0.0/16"}"#).unwrap();
    let pins = PinDir::new("http");
    let args: Vec<String> = [
        "--datastore",
        "static",
        "--static-file",
        topology.to_str().unwrap(),
        "--net-conf",
        conf.to_str().unwrap(),
        "--node-name",
        "a",
        "--iface",
        "eth0",
        "--pin-root",
        pins.path.to_str().unwrap(),
        "--subnet-file",
        dir.path.join("a.env").to_str().unwrap(),
        "--no-ip-masq",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let agent = NsProcess::spawn(
        &a,
        &binary("weft-agent"),
        &args,
        &[],
        &dir.path.join("agent.log"),
    );
    // The default address: the node's own, on the documented port.
    let addr = SocketAddr::from(([192, 168, 92, 1], METRICS_PORT));
    let ns_path = a.path();
    let hostile_ns = b.path();
    let results = std::thread::spawn(move || {
        enter(&ns_path);
        wait_until("the agent's /healthz", Duration::from_secs(30), || {
            get_within_1s(addr, "/healthz") == Some(200)
        });
        // Let the agent settle (first resync, allocator warm-up) before the baseline.
        std::thread::sleep(Duration::from_millis(500));
        let pid = agent.pid();
        let rss_before = rss_kib(pid);
        let stop = Arc::new(AtomicBool::new(false));
        let huge_sent = Arc::new(AtomicU64::new(0));
        let slow = {
            let (stop, hostile_ns) = (stop.clone(), hostile_ns.clone());
            std::thread::spawn(move || {
                enter(&hostile_ns);
                // One byte every 100 ms for as long as the server listens.
                let mut s = TcpStream::connect(addr).unwrap();
                let mut sent = 0;
                for b in b"GET /healthz HTTP/1.1\r\nHost: slowly".iter().cycle() {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                        break;
                    }
                    sent += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                sent
            })
        };
        let huge = {
            let (stop, huge_sent) = (stop.clone(), huge_sent.clone());
            let hostile_ns = hostile_ns.clone();
            std::thread::spawn(move || {
                enter(&hostile_ns);
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                let chunk = vec![b'a'; 64 << 10];
                let _ = s.write_all(b"GET /");
                let deadline = Instant::now() + Duration::from_secs(20);
                // 1 GB of request line, or until the server closes the connection.
                while huge_sent.load(Ordering::Relaxed) < 1 << 30
                    && !stop.load(Ordering::Relaxed)
                    && Instant::now() < deadline
                {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                    huge_sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            })
        };
        // More idle connections than the server serves at once, renewed as it drops them.
        let hold = {
            let (stop, hostile_ns) = (stop.clone(), hostile_ns.clone());
            std::thread::spawn(move || {
                enter(&hostile_ns);
                let mut held: Vec<TcpStream> = Vec::new();
                let mut opened = 0;
                while !stop.load(Ordering::Relaxed) {
                    held.retain_mut(|s| {
                        let mut b = [0u8; 1];
                        s.set_nonblocking(true).unwrap();
                        // Still open while a read would block.
                        matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                    });
                    while held.len() < 100 {
                        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                        else {
                            break;
                        };
                        let _ = s.write_all(b"GET /");
                        held.push(s);
                        opened += 1;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                opened
            })
        };
        let mut answers = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            let t = Instant::now();
            answers.push((get_within_1s(addr, "/healthz"), t.elapsed()));
            std::thread::sleep(Duration::from_millis(100));
        }
        let rss_after = rss_kib(pid);
        stop.store(true, Ordering::Relaxed);
        let slow_bytes = slow.join().unwrap();
        huge.join().unwrap();
        let held = hold.join().unwrap();
        assert!(held > 100, "the server never dropped an idle connection: {held} opened");
        (
            answers,
            rss_before,
            rss_after,
            slow_bytes,
            huge_sent.load(Ordering::Relaxed),
            agent,
        )
    })
    .join()
    .unwrap();
    let (answers, rss_before, rss_after, slow_bytes, huge_bytes, agent) = results;
    let failed: Vec<_> = answers
        .iter()
        .filter(|(status, took)| *status != Some(200) || *took > Duration::from_secs(1))
        .collect();
    assert!(
        failed.is_empty(),
        "/healthz did not answer within 1 s: {failed:?}\n{}",
        agent.log()
    );
    assert!(answers.len() >= 20, "{answers:?}");
    // The slow client was cut off by the head timeout (2 s = ~20 bytes), not served forever.
    assert!(slow_bytes < 40, "the slow client sent {slow_bytes} bytes");
    // The huge line was refused early: the server read at most its head limit plus socket
    // buffers, not a gigabyte.
    assert!(
        huge_bytes < 64 << 20,
        "the server kept reading the huge request line: {huge_bytes} bytes"
    );
    assert!(
        rss_after < rss_before + 10 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

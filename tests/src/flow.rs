//! Traffic between namespaces for end-to-end checks: TCP bulk transfers with a content hash,
//! run on threads inside the sender's and receiver's namespaces.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// FNV-1a over a byte stream: cheap, order-sensitive, enough to prove the bytes arrived intact.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
    pub fn value(self) -> u64 {
        self.0
    }
}

/// Deterministic non-repeating test data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub struct Transfer {
    pub bytes: usize,
    pub elapsed: Duration,
}

/// Sends `len` bytes over TCP from `client_ns` to `server_ip:port` in `server_ns` and checks
/// that exactly those bytes arrived. Panics with context on any failure or after `timeout`.
pub fn tcp_transfer(
    server_ns: &Netns,
    server_ip: Ipv4Addr,
    port: u16,
    client_ns: &Netns,
    len: usize,
    timeout: Duration,
) -> Transfer {
    tcp_transfer_to(
        server_ns,
        server_ip,
        port,
        client_ns,
        SocketAddr::from((server_ip, port)),
        len,
        timeout,
    )
}

/// `tcp_transfer` with the client connecting to `target` (a Service address translated to
/// `server_ip:port` on the way) instead of the server's own address.
pub fn tcp_transfer_to(
    server_ns: &Netns,
    server_ip: Ipv4Addr,
    port: u16,
    client_ns: &Netns,
    target: SocketAddr,
    len: usize,
    timeout: Duration,
) -> Transfer {
    let data = pattern(len, port as u64);
    let mut expected = Fnv::default();
    expected.update(&data);
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = server_ns.spawn(move || {
        let listener = TcpListener::bind(SocketAddr::from((server_ip, port)))
            .unwrap_or_else(|e| panic!("binding {server_ip}:{port}: {e}"));
        ready_tx.send(()).unwrap();
        let (mut conn, _) = listener
            .accept()
            .expect("accepting the transfer connection");
        conn.set_read_timeout(Some(timeout)).unwrap();
        let mut hash = Fnv::default();
        let mut total = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = conn
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("receiving after {total} bytes: {e}"));
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            total += n;
        }
        (total, hash.value())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server did not start");
    let start = Instant::now();
    client_ns.run(move || {
        let mut conn = TcpStream::connect_timeout(&target, timeout)
            .unwrap_or_else(|e| panic!("connecting to {target}: {e}"));
        conn.set_write_timeout(Some(timeout)).unwrap();
        conn.write_all(&data)
            .unwrap_or_else(|e| panic!("sending to {target}: {e}"));
        conn.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let (total, hash) = server
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    let elapsed = start.elapsed();
    assert_eq!(total, len, "bytes received");
    assert_eq!(hash, expected.value(), "content hash of the received bytes");
    Transfer {
        bytes: total,
        elapsed,
    }
}

/// A sequenced UDP flow at about 5,000 packets a second from one namespace to another; on
/// `stop` it reports how many packets were sent and how many never arrived. Used to count
/// loss across reloads, restarts and backend switches.
pub struct SequencedFlow {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sender: std::thread::JoinHandle<u64>,
    receiver: std::thread::JoinHandle<std::collections::BTreeSet<u64>>,
}

pub struct FlowLoss {
    pub sent: u64,
    pub lost: u64,
    /// Missing sequence numbers as inclusive ranges: one long run points at a datapath gap,
    /// scattered singles at a receiver that could not keep up.
    pub missing: Vec<(u64, u64)>,
}

impl SequencedFlow {
    pub fn start(sender_ns: &Netns, receiver_ns: &Netns, server_ip: Ipv4Addr, port: u16) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (ready_tx, ready_rx) = mpsc::channel();
        let receiver = receiver_ns.spawn(move || {
            let sock = std::net::UdpSocket::bind(SocketAddr::from((server_ip, port)))
                .unwrap_or_else(|e| panic!("binding {server_ip}:{port}: {e}"));
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            // A large receive buffer: a receiver thread starved by a busy machine must not
            // turn into counted loss.
            nix::sys::socket::setsockopt(
                &sock,
                nix::sys::socket::sockopt::RcvBufForce,
                &(16 << 20),
            )
            .expect("SO_RCVBUFFORCE");
            ready_tx.send(()).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            let mut buf = [0u8; 64];
            while let Ok(n) = sock.recv(&mut buf) {
                if n >= 8 {
                    seen.insert(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                }
            }
            seen
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("receiver did not start");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stop_tx = stop.clone();
        let sender = sender_ns.spawn(move || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut seq = 0u64;
            let start = Instant::now();
            while !stop_tx.load(Ordering::Relaxed) {
                sock.send_to(&seq.to_be_bytes(), SocketAddr::from((server_ip, port)))
                    .unwrap_or_else(|e| panic!("sending packet {seq}: {e}"));
                seq += 1;
                let due = start + Duration::from_micros(200 * seq);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            seq
        });
        Self {
            stop,
            sender,
            receiver,
        }
    }

    /// Stops sending, waits for the receiver to drain (2 s of silence) and counts.
    pub fn stop(self) -> FlowLoss {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = self
            .sender
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        let seen = self
            .receiver
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        let mut missing: Vec<(u64, u64)> = Vec::new();
        for seq in (0..sent).filter(|s| !seen.contains(s)) {
            match missing.last_mut() {
                Some((_, end)) if *end + 1 == seq => *end = seq,
                _ => missing.push((seq, seq)),
            }
        }
        FlowLoss {
            sent,
            lost: sent - seen.range(..sent).count() as u64,
            missing,
        }
    }
}

/// Sends one UDP datagram of every size in `sizes` from `client_ns` to an echo server at
/// `server_ip:port` in `server_ns` and checks each echo byte for byte. Datagrams above the MTU
/// are fragmented by the pod's stack, so this proves fragments and MTU-boundary sizes cross.
/// A lost datagram is retried once; returns how many retries were needed.
pub fn udp_echo_sizes(
    client_ns: &Netns,
    server_ns: &Netns,
    server_ip: Ipv4Addr,
    port: u16,
    sizes: std::ops::RangeInclusive<usize>,
) -> usize {
    let (ready_tx, ready_rx) = mpsc::channel();
    let max = *sizes.end();
    let server = server_ns.spawn(move || {
        let sock = std::net::UdpSocket::bind(SocketAddr::from((server_ip, port)))
            .unwrap_or_else(|e| panic!("binding {server_ip}:{port}: {e}"));
        // Idle for a second after the last datagram (twice the client's retry wait): done.
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            sock.send_to(&buf[..n], from).unwrap();
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("echo server did not start");
    let retries = client_ns.run(move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let target = SocketAddr::from((server_ip, port));
        let data = pattern(max, 7);
        let mut buf = vec![0u8; 65536];
        let mut retries = 0;
        for size in sizes {
            let mut attempts = 0;
            loop {
                attempts += 1;
                sock.send_to(&data[..size], target)
                    .unwrap_or_else(|e| panic!("sending {size} bytes: {e}"));
                match sock.recv_from(&mut buf) {
                    Ok((n, _)) => {
                        assert_eq!(n, size, "echo of a {size}-byte datagram");
                        assert!(buf[..n] == data[..size], "{size}-byte datagram corrupted");
                        break;
                    }
                    Err(e) if attempts < 2 => {
                        let _ = e;
                        retries += 1;
                    }
                    Err(e) => panic!("{size}-byte datagram lost twice: {e}"),
                }
            }
        }
        retries
    });
    server
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    retries
}

/// A sequenced UDP request/response flow at about 5,000 requests a second: the client sends
/// numbered datagrams to `target` (a Service address or a pod), a server bound to `bind` echoes
/// them, and the client counts the echoes that came back. Both directions of a translated flow
/// are exercised, so a reply that misses the translation counts as lost.
pub struct EchoFlow {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    client: std::thread::JoinHandle<(u64, std::collections::BTreeSet<u64>)>,
    server: std::thread::JoinHandle<()>,
}

impl EchoFlow {
    pub fn start(
        client_ns: &Netns,
        server_ns: &Netns,
        bind: SocketAddr,
        target: SocketAddr,
    ) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let server = {
            let stop = stop.clone();
            server_ns.spawn(move || {
                let sock = std::net::UdpSocket::bind(bind)
                    .unwrap_or_else(|e| panic!("binding {bind}: {e}"));
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                nix::sys::socket::setsockopt(
                    &sock,
                    nix::sys::socket::sockopt::RcvBufForce,
                    &(16 << 20),
                )
                .expect("SO_RCVBUFFORCE");
                ready_tx.send(()).unwrap();
                let mut buf = [0u8; 64];
                // Echo until stopped and a second of silence has passed (late requests).
                let mut idle_since: Option<Instant> = None;
                loop {
                    match sock.recv_from(&mut buf) {
                        Ok((n, peer)) => {
                            idle_since = None;
                            let _ = sock.send_to(&buf[..n], peer);
                        }
                        Err(_) => {
                            if stop.load(Ordering::Relaxed) {
                                let since = *idle_since.get_or_insert_with(Instant::now);
                                if since.elapsed() > Duration::from_secs(1) {
                                    break;
                                }
                            }
                        }
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("echo server did not start");
        let client = {
            let stop = stop.clone();
            client_ns.spawn(move || {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                sock.connect(target).unwrap();
                nix::sys::socket::setsockopt(
                    &sock,
                    nix::sys::socket::sockopt::RcvBufForce,
                    &(16 << 20),
                )
                .expect("SO_RCVBUFFORCE");
                let receiver_sock = sock.try_clone().unwrap();
                receiver_sock
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                let receiver = std::thread::spawn(move || {
                    let mut seen = std::collections::BTreeSet::new();
                    let mut buf = [0u8; 64];
                    while let Ok(n) = receiver_sock.recv(&mut buf) {
                        if n >= 8 {
                            seen.insert(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                        }
                    }
                    seen
                });
                let mut seq = 0u64;
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    // A refused send (ICMP unreachable seen by the socket) is loss, not a crash.
                    let _ = sock.send(&seq.to_be_bytes());
                    seq += 1;
                    let due = start + Duration::from_micros(200 * seq);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                (seq, receiver.join().unwrap())
            })
        };
        Self {
            stop,
            client,
            server,
        }
    }

    /// Stops sending, waits for the echoes to drain (2 s of silence) and counts.
    pub fn stop(self) -> FlowLoss {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (sent, seen) = self
            .client
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        self.server
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        let mut missing: Vec<(u64, u64)> = Vec::new();
        for seq in (0..sent).filter(|s| !seen.contains(s)) {
            match missing.last_mut() {
                Some((_, end)) if *end + 1 == seq => *end = seq,
                _ => missing.push((seq, seq)),
            }
        }
        FlowLoss {
            sent,
            lost: sent - seen.range(..sent).count() as u64,
            missing,
        }
    }
}

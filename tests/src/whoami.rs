//! "Who answered, and whom did it see": TCP and UDP servers in a namespace that answer every
//! connection or datagram with their own address and the peer address they saw. Service tests
//! use them to tell which backend a Service sent a client to and whether the client's source
//! was preserved or masqueraded.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::Netns;

/// What a server answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The server's own address.
    pub server: Ipv4Addr,
    /// The client address the server saw.
    pub peer: SocketAddr,
}

impl Answer {
    fn parse(text: &str) -> Option<Self> {
        let mut words = text.split_whitespace();
        Some(Self {
            server: words.next()?.parse().ok()?,
            peer: words.next()?.parse().ok()?,
        })
    }
}

/// TCP and UDP servers on `ip:port` inside a namespace; stopped when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    pub fn start(ns: &Netns, ip: Ipv4Addr, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let addr = SocketAddr::from((ip, port));
        let (tx, rx) = std::sync::mpsc::channel();
        let tcp = {
            let stop = stop.clone();
            let tx = tx.clone();
            ns.spawn(move || {
                let listener =
                    TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding TCP {addr}: {e}"));
                listener.set_nonblocking(true).unwrap();
                tx.send(()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, peer)) => {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.write_all(format!("{ip} {peer}\n").as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        let udp = {
            let stop = stop.clone();
            ns.spawn(move || {
                let sock =
                    UdpSocket::bind(addr).unwrap_or_else(|e| panic!("binding UDP {addr}: {e}"));
                sock.set_read_timeout(Some(Duration::from_millis(20)))
                    .unwrap();
                tx.send(()).unwrap();
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(format!("{ip} {peer}\n").as_bytes(), peer);
                    }
                }
            })
        };
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("whoami server did not start");
        }
        Self {
            stop,
            threads: vec![tcp, udp],
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP question from the calling thread's namespace.
pub fn tcp_ask_here(target: SocketAddr, timeout: Duration) -> Result<Answer, String> {
    let mut conn = TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    conn.set_read_timeout(Some(timeout)).unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text)
        .map_err(|e| format!("reading from {target}: {e}"))?;
    Answer::parse(&text).ok_or_else(|| format!("{target} answered {text:?}"))
}

/// One UDP question (retried once) from the calling thread's namespace.
pub fn udp_ask_here(target: SocketAddr, timeout: Duration) -> Result<Answer, String> {
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 256];
    let mut last = String::new();
    for _ in 0..2 {
        sock.send_to(b"who", target)
            .map_err(|e| format!("sending to {target}: {e}"))?;
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                return Answer::parse(&text).ok_or_else(|| format!("{target} answered {text:?}"));
            }
            Err(e) => last = format!("no UDP answer from {target}: {e}"),
        }
    }
    Err(last)
}

/// `count` TCP questions from inside `ns`, one connection each.
pub fn tcp_ask(
    ns: &Netns,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Vec<Result<Answer, String>> {
    ns.run(move || (0..count).map(|_| tcp_ask_here(target, timeout)).collect())
}

/// One UDP question from inside `ns`.
pub fn udp_ask(ns: &Netns, target: SocketAddr, timeout: Duration) -> Result<Answer, String> {
    ns.run(move || udp_ask_here(target, timeout))
}

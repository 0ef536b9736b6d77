//! Sending hand-made packets from inside a namespace (what an attacker in a pod or on the
//! underlay can send), and counting what arrives at a UDP port.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::Netns;

/// Sends `payload` as a UDP datagram from inside `ns` to `target` (the kernel builds the IP
/// and UDP headers).
pub fn udp_send(ns: &Netns, target: SocketAddr, payload: Vec<u8>) {
    ns.run(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.send_to(&payload, target)
            .unwrap_or_else(|e| panic!("sending to {target}: {e}"));
    });
}

/// Sends `payload` (an IPv4 packet) as the payload of an IP-in-IP packet (protocol 4) from
/// inside `ns` to `target`: the kernel adds the outer header.
pub fn ipip_send(ns: &Netns, target: Ipv4Addr, payload: Vec<u8>) {
    ns.run(move || {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_IPIP) };
        assert!(
            fd >= 0,
            "raw IPIP socket: {}",
            std::io::Error::last_os_error()
        );
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(target.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid buffer and address of the sizes passed.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                payload.as_ptr() as *const _,
                payload.len(),
                0,
                &addr as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert!(n >= 0, "sending IPIP: {}", std::io::Error::last_os_error());
    });
}

/// Sends a whole Ethernet frame out of `ifname` inside `ns` (AF_PACKET): any source address
/// and MAC the sender likes.
pub fn frame_send(ns: &Netns, ifname: &str, frame: Vec<u8>) {
    let ifindex = ns.ifindex(ifname);
    ns.run(move || {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            )
        };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: valid buffer and address of the sizes passed.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr() as *const _,
                frame.len(),
                0,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert!(
            n >= 0,
            "sending a frame: {}",
            std::io::Error::last_os_error()
        );
    });
}

/// Counts the UDP datagrams arriving at `ip:port` inside a namespace (from any source).
pub struct UdpCounter {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpCounter {
    pub fn start(ns: &Netns, ip: Ipv4Addr, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, count) = (stop.clone(), count.clone());
            ns.spawn(move || {
                let sock = UdpSocket::bind((ip, port))
                    .unwrap_or_else(|e| panic!("binding {ip}:{port}: {e}"));
                sock.set_read_timeout(Some(Duration::from_millis(20)))
                    .unwrap();
                tx.send(()).unwrap();
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if sock.recv(&mut buf).is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        rx.recv_timeout(Duration::from_secs(10))
            .expect("UDP counter did not start");
        Self {
            stop,
            count,
            thread: Some(thread),
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for UdpCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

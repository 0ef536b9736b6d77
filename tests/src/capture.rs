//! A packet capture on every interface of a namespace (an unbound `AF_PACKET` socket), run on
//! a thread inside it, counting what crosses: tunnel packets (IPIP, VXLAN) and plain pod-to-pod
//! packets. Enough to check what a router in the path sees, without tcpdump.
use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use ipnet::Ipv4Net;

use crate::netns::Netns;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// IPv4 protocol 4.
    pub ipip: u64,
    /// UDP to port 8472 or 4789.
    pub vxlan: u64,
    /// IPv4 with both addresses in the cluster network, not in a tunnel.
    pub plain_pod: u64,
    /// The largest frame seen (a packet aggregated by GRO is larger than the MTU).
    pub max_len: usize,
}

pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Counts>,
}

const ETH_P_ALL: u16 = 0x0003;

fn classify(frame: &[u8], network: Ipv4Net, counts: &mut Counts) {
    counts.max_len = counts.max_len.max(frame.len());
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    let proto = frame[23];
    let src = Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
    let dst = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    match proto {
        4 => counts.ipip += 1,
        17 if frame.len() >= 14 + ihl + 4 => {
            let dport = u16::from_be_bytes([frame[14 + ihl + 2], frame[14 + ihl + 3]]);
            if dport == 8472 || dport == 4789 {
                counts.vxlan += 1;
            } else if network.contains(&src) && network.contains(&dst) {
                counts.plain_pod += 1;
            }
        }
        _ if network.contains(&src) && network.contains(&dst) => counts.plain_pod += 1,
        _ => {}
    }
}

impl Capture {
    /// Starts capturing in `ns`; pod packets are those inside `network`.
    pub fn start(ns: &Netns, network: Ipv4Net) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_rx = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            // SAFETY: plain socket calls on a descriptor this thread owns.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    (ETH_P_ALL.to_be()) as libc::c_int,
                )
            };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
            }
            ready_tx.send(()).unwrap();
            let mut counts = Counts::default();
            // Room for the largest GRO packet (64 KiB of payload plus headers).
            let mut buf = vec![0u8; 70000];
            while !stop_rx.load(Ordering::Relaxed) {
                let n =
                    unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
                if n > 0 {
                    classify(&buf[..n as usize], network, &mut counts);
                }
            }
            unsafe { libc::close(fd) };
            counts
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("capture did not start");
        Self { stop, thread }
    }

    pub fn stop(self) -> Counts {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

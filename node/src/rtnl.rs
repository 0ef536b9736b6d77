//! A minimal synchronous rtnetlink client for the few requests ADD and DEL make (veth, address,
//! route, neighbour, link deletion): one socket, one request at a time, each acknowledged.
//! In-process instead of exec'ing `ip`: an ADD under load spends its time in the kernel, not
//! in starting processes. The socket works in the network namespace of the thread that opened
//! it (combine with [`crate::ns::run_in`]).
use std::{
    ffi::CString,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use anyhow::{Context as _, Result, anyhow};
use ipnet::Ipv4Net;

// From the kernel's uapi headers (netlink.h, rtnetlink.h, if_link.h, neighbour.h, veth.h).
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWNEIGH: u16 = 28;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const IFF_UP: u32 = 0x1;
const AF_INET: u8 = libc::AF_INET as u8;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;
const RTNH_F_ONLINK: u32 = 4;
const NUD_PERMANENT: u16 = 0x80;

pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_LINK: u8 = 253;

/// A netlink message under construction: header, fixed body, attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(msg_type: u16, flags: u16) -> Self {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&msg_type.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        Self { buf }
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self.pad();
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// `struct ifinfomsg`.
    fn ifinfomsg(&mut self, index: i32, flags: u32, change: u32) -> &mut Self {
        let mut b = [0u8; 16];
        b[4..8].copy_from_slice(&index.to_ne_bytes());
        b[8..12].copy_from_slice(&flags.to_ne_bytes());
        b[12..16].copy_from_slice(&change.to_ne_bytes());
        self.bytes(&b)
    }

    fn attr(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = (4 + payload.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    fn attr_u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    fn attr_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let c = CString::new(s).expect("interface names have no NUL");
        self.attr(ty, c.as_bytes_with_nul())
    }

    fn nest_start(&mut self, ty: u16) -> usize {
        let pos = self.buf.len();
        self.attr(ty, &[]);
        pos
    }

    fn nest_end(&mut self, pos: usize) {
        let len = (self.buf.len() - pos) as u16;
        self.buf[pos..pos + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// One rtnetlink socket in the calling thread's network namespace.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening a netlink socket");
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 1 })
    }

    /// Sends `msg` and waits for its acknowledgement; a negative ack is the errno.
    fn request(&mut self, msg: Msg) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let buf = msg.finish(seq);
        // SAFETY: zeroed sockaddr_nl addresses the kernel (pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: buf and addr are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rbuf = vec![0u8; 16384];
        loop {
            // SAFETY: rbuf is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), rbuf.as_mut_ptr().cast(), rbuf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut off = 0usize;
            let n = n as usize;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(rbuf[off..off + 4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes(rbuf[off + 4..off + 6].try_into().unwrap());
                let rseq = u32::from_ne_bytes(rbuf[off + 8..off + 12].try_into().unwrap());
                if len < 16 || off + len > n {
                    break;
                }
                if ty == NLMSG_ERROR && rseq == seq && len >= 20 {
                    let err = i32::from_ne_bytes(rbuf[off + 16..off + 20].try_into().unwrap());
                    return if err == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-err))
                    };
                }
                off += (len + 3) & !3;
            }
        }
    }

    /// Creates a veth pair, `host` (up) here, `peer` in the namespace `peer_netns`.
    #[allow(clippy::too_many_arguments)]
    pub fn create_veth(
        &mut self,
        host: &str,
        host_mac: &[u8; 6],
        peer: &str,
        peer_mac: &[u8; 6],
        mtu: u32,
        peer_netns: RawFd,
    ) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
        m.ifinfomsg(0, IFF_UP, IFF_UP)
            .attr_str(IFLA_IFNAME, host)
            .attr_u32(IFLA_MTU, mtu)
            .attr(IFLA_ADDRESS, host_mac);
        let linkinfo = m.nest_start(IFLA_LINKINFO);
        m.attr(IFLA_INFO_KIND, b"veth");
        let data = m.nest_start(IFLA_INFO_DATA);
        let peer_info = m.nest_start(VETH_INFO_PEER);
        // Not up yet: the kernel opens the peer before pairing it (ENOTCONN); `set_up` later.
        m.ifinfomsg(0, 0, 0)
            .attr_str(IFLA_IFNAME, peer)
            .attr_u32(IFLA_MTU, mtu)
            .attr(IFLA_ADDRESS, peer_mac)
            .attr_u32(IFLA_NET_NS_FD, peer_netns as u32);
        m.nest_end(peer_info);
        m.nest_end(data);
        m.nest_end(linkinfo);
        self.request(m)
    }

    /// Sets the link `ifindex` up.
    pub fn set_up(&mut self, ifindex: u32) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, 0);
        m.ifinfomsg(ifindex as i32, IFF_UP, IFF_UP);
        self.request(m)
    }

    /// Deletes the link `name`; Ok(false) when there is none.
    pub fn delete_link(&mut self, name: &str) -> io::Result<bool> {
        let mut m = Msg::new(RTM_DELLINK, 0);
        m.ifinfomsg(0, 0, 0).attr_str(IFLA_IFNAME, name);
        match self.request(m) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Adds (or replaces) `addr` on `ifindex`.
    pub fn replace_address(&mut self, ifindex: u32, addr: Ipv4Net) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE);
        let mut ifa = [0u8; 8];
        ifa[0] = AF_INET;
        ifa[1] = addr.prefix_len();
        ifa[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        m.bytes(&ifa)
            .attr(IFA_LOCAL, &addr.addr().octets())
            .attr(IFA_ADDRESS, &addr.addr().octets());
        self.request(m)
    }

    /// Adds (or replaces) a main-table route to `dst` out of `ifindex`, via `gateway` if any.
    /// `onlink` lets the gateway be outside every connected subnet.
    pub fn replace_route(
        &mut self,
        dst: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        ifindex: u32,
        scope: u8,
        onlink: bool,
    ) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE);
        let mut rtm = [0u8; 12];
        rtm[0] = AF_INET;
        rtm[1] = dst.prefix_len();
        rtm[4] = RT_TABLE_MAIN;
        rtm[5] = RTPROT_BOOT;
        rtm[6] = scope;
        rtm[7] = RTN_UNICAST;
        let flags = if onlink { RTNH_F_ONLINK } else { 0 };
        rtm[8..12].copy_from_slice(&flags.to_ne_bytes());
        m.bytes(&rtm);
        if dst.prefix_len() > 0 {
            m.attr(RTA_DST, &dst.network().octets());
        }
        if let Some(gw) = gateway {
            m.attr(RTA_GATEWAY, &gw.octets());
        }
        m.attr_u32(RTA_OIF, ifindex);
        self.request(m)
    }

    /// Adds (or replaces) a permanent neighbour entry `addr` -> `mac` on `ifindex`.
    pub fn replace_neighbour(
        &mut self,
        ifindex: u32,
        addr: Ipv4Addr,
        mac: &[u8; 6],
    ) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE);
        let mut nd = [0u8; 12];
        nd[0] = AF_INET;
        nd[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
        nd[8..10].copy_from_slice(&NUD_PERMANENT.to_ne_bytes());
        m.bytes(&nd)
            .attr(NDA_DST, &addr.octets())
            .attr(NDA_LLADDR, mac);
        self.request(m)
    }
}

/// The ifindex of `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|e| anyhow!("no interface {name}: {e}"))
}

//! weft's one netlink layer: links, addresses, routes and neighbours through `rtnetlink` (typed
//! messages from `netlink-packet-route`), for the agent and the CNI plugin alike. No `ip` process
//! is ever spawned.
//!
//! A [`Netlink`] talks to the kernel from the network namespace of the thread that opened it and
//! is async (the agent uses it on its tokio runtime); [`BlockingNetlink`] owns a current-thread
//! runtime for synchronous callers (the CNI plugin, which opens one per namespace it configures:
//! opening costs a socket and a few microseconds, see `bench-cni`).
//!
//! The sockets ask for extended acknowledgements (`NETLINK_EXT_ACK`), so a refused request
//! carries the kernel's own explanation ("mtu less than device minimum"), which every error here
//! shows next to the errno.
use std::{
    fmt,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr},
    ops::Deref,
    os::fd::RawFd,
};

use futures_util::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
    packet_core::ErrorMessage,
    packet_route::{
        AddressFamily,
        address::AddressAttribute,
        link::{
            InfoData, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as LinkInfoAttribute,
            LinkMessage, LinkXdp, XdpAttached,
        },
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        route::{
            RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteScope,
            RouteType,
        },
        tc::{TcAttribute, TcFilterBpfOption, TcOption},
    },
};

/// A refused or failed netlink request: the errno and the kernel's extended-ack text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The errno the kernel answered with (positive), if it answered.
    pub errno: Option<i32>,
    /// `NLMSGERR_ATTR_MSG` of the acknowledgement: the kernel's reason in words.
    pub ext_ack: Option<String>,
    /// Anything else (a socket failure, an unexpected answer).
    pub detail: String,
}

impl Error {
    fn from_rtnetlink(e: rtnetlink::Error) -> Self {
        match e {
            rtnetlink::Error::NetlinkError(msg) => Self::from_ack(&msg),
            other => Self {
                errno: None,
                ext_ack: None,
                detail: other.to_string(),
            },
        }
    }

    fn from_ack(msg: &ErrorMessage) -> Self {
        Self {
            errno: Some(msg.raw_code().abs()),
            ext_ack: ext_ack_message(&msg.header),
            detail: String::new(),
        }
    }

    fn io(e: io::Error) -> Self {
        Self {
            errno: e.raw_os_error(),
            ext_ack: None,
            detail: e.to_string(),
        }
    }

    pub fn is(&self, errno: i32) -> bool {
        self.errno == Some(errno)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errno {
            Some(e) if self.detail.is_empty() => write!(f, "{}", io::Error::from_raw_os_error(e))?,
            _ => write!(f, "{}", self.detail)?,
        }
        if let Some(msg) = &self.ext_ack {
            write!(f, " (kernel: {msg})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The `NLMSGERR_ATTR_MSG` attribute of an error acknowledgement. `payload` is what follows the
/// error code: the request's header (and body, unless the kernel capped it), then the
/// extended-ack attributes.
pub fn ext_ack_message(payload: &[u8]) -> Option<String> {
    const NLMSG_HDRLEN: usize = 16;
    const NLMSGERR_ATTR_MSG: u16 = 1;
    let align = |n: usize| (n + 3) & !3;
    let request_len = u32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?) as usize;
    // Uncapped: the whole request is echoed; capped (NETLINK_CAP_ACK): only its header.
    let mut off = if request_len >= NLMSG_HDRLEN && align(request_len) <= payload.len() {
        align(request_len)
    } else {
        NLMSG_HDRLEN
    };
    while off + 4 <= payload.len() {
        let len = u16::from_ne_bytes([payload[off], payload[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([payload[off + 2], payload[off + 3]]) & 0x3fff;
        if len < 4 || off + len > payload.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &payload[off + 4..off + len];
            let text = text.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        off += align(len);
    }
    None
}

/// A link as weft reads it back (CHECK, GC, the agent's underlay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub ifindex: u32,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub up: bool,
    /// The link's kind (`veth`, `bridge`, ...); `None` for a physical NIC.
    pub kind: Option<String>,
    /// How an XDP program is attached to it, if one is.
    pub xdp: Option<XdpMode>,
    /// The link's alias (`ip link set DEV alias ...`), if any.
    pub alias: Option<String>,
    /// For a VXLAN link: its UDP port and whether it is in metadata mode.
    pub vxlan: Option<VxlanLink>,
}

/// What weft needs to know of a VXLAN link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanLink {
    /// UDP destination port (`dstport`), the port its socket listens on.
    pub port: u16,
    /// Metadata mode (`external`, collect_md): one device for every VNI and peer, the tunnel
    /// key in each packet's metadata.
    pub external: bool,
}

/// How an XDP program runs on a device (`IFLA_XDP_ATTACHED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver, on its own buffers.
    Driver,
    /// Generic (skb) mode: after the skb is built, usually a copy.
    Generic,
    /// Offloaded to the NIC, or several modes at once.
    Other,
}

impl LinkInfo {
    fn from_message(m: &LinkMessage) -> Self {
        let mut info = Self {
            name: String::new(),
            ifindex: m.header.index,
            mac: None,
            mtu: 0,
            up: m.header.flags.contains(LinkFlags::Up),
            kind: None,
            xdp: None,
            alias: None,
            vxlan: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => info.name = n.clone(),
                LinkAttribute::Mtu(v) => info.mtu = *v,
                LinkAttribute::Address(a) => info.mac = a.as_slice().try_into().ok(),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfoAttribute::Kind(kind) => info.kind = Some(kind.to_string()),
                            LinkInfoAttribute::Data(InfoData::Vxlan(data)) => {
                                let mut vxlan = VxlanLink {
                                    port: 0,
                                    external: false,
                                };
                                for d in data {
                                    match d {
                                        InfoVxlan::Port(p) => vxlan.port = *p,
                                        InfoVxlan::CollectMetadata(m) => vxlan.external = *m,
                                        _ => {}
                                    }
                                }
                                info.vxlan = Some(vxlan);
                            }
                            _ => {}
                        }
                    }
                }
                LinkAttribute::Xdp(xdp) => {
                    for x in xdp {
                        if let LinkXdp::Attached(mode) = x {
                            info.xdp = match mode {
                                XdpAttached::None => None,
                                XdpAttached::Driver => Some(XdpMode::Driver),
                                XdpAttached::SocketBuffer => Some(XdpMode::Generic),
                                _ => Some(XdpMode::Other),
                            };
                        }
                    }
                }
                LinkAttribute::IfAlias(a) => info.alias = Some(a.clone()),
                _ => {}
            }
        }
        info
    }
}

/// An IPv4 route of the main table as weft reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    /// The route's `mtu` metric, if it has one.
    pub mtu: Option<u32>,
}

impl RouteInfo {
    /// Whether this is the default route via `gateway` out of `ifindex` (a pod's, as the CNI
    /// plugin writes it).
    pub fn is_default_via(&self, gateway: Ipv4Addr, ifindex: u32) -> bool {
        self.dst == Ipv4Net::default() && self.gateway == Some(gateway) && self.oif == Some(ifindex)
    }
}

/// A unicast IPv4 route of a table other than main (weft's BGP table, which BIRD fills).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRoute {
    pub dst: Ipv4Net,
    /// Every next hop (several for an ECMP route): gateway (none when on-link) and device.
    pub next_hops: Vec<(Option<Ipv4Addr>, Option<u32>)>,
}

/// Route scopes weft uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Directly attached (a pod's /32 on its host veth).
    Link,
    /// Through a gateway (a pod's default route).
    Universe,
}

const RT_TABLE_MAIN: u8 = 254;

/// An rtnetlink connection in the network namespace of the thread that opened it.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace; its I/O task runs on the
    /// current tokio runtime.
    pub fn open() -> Result<Self> {
        use rtnetlink::sys::AsyncSocket as _;
        let (mut connection, handle, _) = rtnetlink::new_connection().map_err(Error::io)?;
        connection
            .socket_mut()
            .socket_mut()
            .set_ext_ack(true)
            .map_err(Error::io)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Creates a veth pair: `host` here (up), `peer` (down: the kernel refuses to open a peer
    /// before pairing it) in the namespace `peer_netns`, both with their MAC and `mtu`.
    /// Without MACs the kernel picks random ones; without a namespace the peer stays here.
    pub async fn create_veth(
        &self,
        host: &str,
        host_mac: Option<&[u8; 6]>,
        peer: &str,
        peer_mac: Option<&[u8; 6]>,
        mtu: u32,
        peer_netns: Option<RawFd>,
    ) -> Result<()> {
        let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .mtu(mtu);
        if let Some(mac) = peer_mac {
            peer_msg = peer_msg.address(mac.to_vec());
        }
        if let Some(fd) = peer_netns {
            peer_msg = peer_msg.setns_by_fd(fd);
        }
        let mut msg = LinkVeth::new(host, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
            .mtu(mtu)
            .up();
        if let Some(mac) = host_mac {
            msg = msg.address(mac.to_vec());
        }
        let msg = msg.build();
        self.add_link(msg).await
    }

    /// Adds the link `msg` describes.
    async fn add_link(&self, msg: LinkMessage) -> Result<()> {
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(Error::from_rtnetlink)
    }

    /// Creates a metadata-mode (`external`) VXLAN link `name` listening on UDP `port`, with
    /// `mtu` and `mac`, up: `ip link add NAME address MAC mtu MTU type vxlan external dstport
    /// PORT nolearning`. Its socket decapsulates VXLAN of every VNI from every peer and leaves
    /// the tunnel key in the packet's metadata.
    pub async fn create_vxlan_external(
        &self,
        name: &str,
        port: u16,
        mtu: u32,
        mac: &[u8; 6],
    ) -> Result<()> {
        let msg = LinkMessageBuilder::<LinkVxlan>::new(name)
            .collect_metadata(true)
            .port(port)
            .learning(false)
            .mtu(mtu)
            .address(mac.to_vec())
            .up()
            .build();
        self.add_link(msg).await
    }

    /// Sets the link `ifindex` up, optionally changing its MTU and turning ARP off.
    pub async fn set_link(&self, ifindex: u32, mtu: Option<u32>, arp: Option<bool>) -> Result<()> {
        let mut msg = LinkUnspec::new_with_index(ifindex).up();
        if let Some(m) = mtu {
            msg = msg.mtu(m);
        }
        if let Some(a) = arp {
            msg = msg.arp(a);
        }
        self.handle
            .link()
            .set(msg.build())
            .execute()
            .await
            .map_err(Error::from_rtnetlink)
    }

    /// Sets the alias of the link `ifindex` (the kernel keeps up to 255 bytes).
    pub async fn set_alias(&self, ifindex: u32, alias: &str) -> Result<()> {
        let mut msg = LinkUnspec::new_with_index(ifindex).build();
        msg.attributes
            .push(LinkAttribute::IfAlias(alias.to_string()));
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(Error::from_rtnetlink)
    }

    /// Deletes the link `name`; Ok(false) when there is none.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.ifindex).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = Error::from_rtnetlink(e);
                // Gone in between (a racing DEL): the goal is reached.
                if e.is(libc::ENODEV) {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The link `name`, or None when it does not exist.
    pub async fn link(&self, name: &str) -> Result<Option<LinkInfo>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(m)) => Ok(Some(LinkInfo::from_message(&m))),
            Ok(None) => Ok(None),
            Err(e) => {
                let e = Error::from_rtnetlink(e);
                if e.is(libc::ENODEV) { Ok(None) } else { Err(e) }
            }
        }
    }

    /// The link with index `ifindex`, or None when there is none.
    pub async fn link_by_index(&self, ifindex: u32) -> Result<Option<LinkInfo>> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        match links.try_next().await {
            Ok(m) => Ok(m.map(|m| LinkInfo::from_message(&m))),
            Err(e) => {
                let e = Error::from_rtnetlink(e);
                if e.is(libc::ENODEV) { Ok(None) } else { Err(e) }
            }
        }
    }

    /// Every link of the namespace.
    pub async fn links(&self) -> Result<Vec<LinkInfo>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(Error::from_rtnetlink)?;
        Ok(msgs.iter().map(LinkInfo::from_message).collect())
    }

    /// Adds (or replaces) `addr` on `ifindex`.
    pub async fn replace_address(&self, ifindex: u32, addr: Ipv4Net) -> Result<()> {
        self.handle
            .address()
            .add(ifindex, IpAddr::V4(addr.addr()), addr.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(Error::from_rtnetlink)
    }

    /// The IPv4 addresses of `ifindex` (address with its prefix length).
    pub async fn addresses(&self, ifindex: u32) -> Result<Vec<Ipv4Net>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute()
            .try_collect()
            .await
            .map_err(Error::from_rtnetlink)?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == ifindex)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => {
                        Ipv4Net::new(*ip, m.header.prefix_len).ok()
                    }
                    _ => None,
                })
            })
            .collect())
    }

    /// Adds (or replaces) a main-table route to `dst` out of `ifindex`, via `gateway` if any,
    /// preferring `src` as source. `onlink` lets the gateway be outside every connected subnet.
    pub async fn replace_route(
        &self,
        dst: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        ifindex: u32,
        scope: Scope,
        onlink: bool,
        src: Option<Ipv4Addr>,
    ) -> Result<()> {
        let msg = route_message(dst, gateway, ifindex, scope, onlink, src);
        self.add_route(msg).await
    }

    /// Adds (or replaces) a pod's default route: via `gateway` `onlink` out of `ifindex`, with
    /// the route metric `mtu` when given (`ip route replace default via GW dev IF onlink mtu
    /// MTU`). The metric caps what the pod sends and the TCP MSS it advertises below its
    /// interface's MTU (as Cilium's route MTU does), and can change under running connections.
    pub async fn replace_default_route(
        &self,
        gateway: Ipv4Addr,
        ifindex: u32,
        mtu: Option<u32>,
    ) -> Result<()> {
        let mut msg = route_message(
            Ipv4Net::default(),
            Some(gateway),
            ifindex,
            Scope::Universe,
            true,
            None,
        );
        if let Some(mtu) = mtu {
            msg.attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
        }
        self.add_route(msg).await
    }

    async fn add_route(&self, msg: RouteMessage) -> Result<()> {
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(Error::from_rtnetlink)
    }

    /// Deletes the main-table route to `dst` out of `ifindex`; Ok(false) when there is none.
    pub async fn delete_route(&self, dst: Ipv4Net, ifindex: u32) -> Result<bool> {
        // Any protocol and scope (what `ip route del` matches).
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(ifindex)
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::NoWhere)
            .build();
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = Error::from_rtnetlink(e);
                if e.is(libc::ESRCH) || e.is(libc::ENODEV) {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// IPv4 routes of the main table.
    pub async fn routes(&self) -> Result<Vec<RouteInfo>> {
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(Error::from_rtnetlink)?;
        Ok(msgs
            .iter()
            .filter(|m| {
                m.header.address_family == AddressFamily::Inet
                    && m.attributes.iter().all(|a| match a {
                        RouteAttribute::Table(t) => *t == u32::from(RT_TABLE_MAIN),
                        _ => true,
                    })
                    && m.header.table == RT_TABLE_MAIN
            })
            .map(|m| {
                let mut dst = Ipv4Addr::UNSPECIFIED;
                let mut gateway = None;
                let mut oif = None;
                let mut mtu = None;
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Metrics(metrics) => {
                            mtu = metrics.iter().find_map(|m| match m {
                                RouteMetric::Mtu(v) => Some(*v),
                                _ => None,
                            })
                        }
                        _ => {}
                    }
                }
                RouteInfo {
                    dst: Ipv4Net::new(dst, m.header.destination_prefix_length).unwrap_or_default(),
                    gateway,
                    oif,
                    mtu,
                }
            })
            .collect())
    }

    /// The unicast IPv4 routes of routing table `table` (empty when the table does not exist:
    /// the kernel creates a table with its first route). Blackhole, unreachable and other
    /// non-forwarding routes are left out: the datapath cannot forward along them.
    pub async fn table_routes(&self, table: u32) -> Result<Vec<TableRoute>> {
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .table_id(table)
                    .build(),
            )
            .execute()
            .try_collect()
            .await
            .map_err(Error::from_rtnetlink)?;
        Ok(msgs
            .iter()
            .filter(|m| {
                // Tables above 255 are named by the attribute only.
                let id = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(m.header.table));
                m.header.address_family == AddressFamily::Inet
                    && m.header.kind == RouteType::Unicast
                    && id == table
            })
            .map(|m| {
                let mut dst = Ipv4Addr::UNSPECIFIED;
                let (mut gateway, mut oif) = (None, None);
                let mut next_hops = Vec::new();
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::MultiPath(hops) => {
                            for h in hops {
                                let gw = h.attributes.iter().find_map(|a| match a {
                                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
                                    _ => None,
                                });
                                next_hops.push((gw, Some(h.interface_index)));
                            }
                        }
                        _ => {}
                    }
                }
                if next_hops.is_empty() {
                    next_hops.push((gateway, oif));
                }
                TableRoute {
                    dst: Ipv4Net::new(dst, m.header.destination_prefix_length).unwrap_or_default(),
                    next_hops,
                }
            })
            .collect())
    }

    /// Adds (or replaces) a permanent neighbour entry `addr` -> `mac` on `ifindex`.
    pub async fn replace_neighbour(
        &self,
        ifindex: u32,
        addr: Ipv4Addr,
        mac: &[u8; 6],
    ) -> Result<()> {
        self.handle
            .neighbours()
            .add(ifindex, IpAddr::V4(addr))
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(Error::from_rtnetlink)
    }

    /// The MAC of the permanent neighbour entry of `addr` on `ifindex`, if there is one.
    pub async fn permanent_neighbour(
        &self,
        ifindex: u32,
        addr: Ipv4Addr,
    ) -> Result<Option<[u8; 6]>> {
        let msgs: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(Error::from_rtnetlink)?;
        Ok(msgs.iter().find_map(|m| {
            if m.header.ifindex != ifindex || m.header.state != NeighbourState::Permanent {
                return None;
            }
            let dst = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                _ => None,
            })?;
            if dst != addr {
                return None;
            }
            m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(mac) => mac.as_slice().try_into().ok(),
                _ => None,
            })
        }))
    }
}

/// A cls_bpf filter on a device's clsact hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfFilter {
    pub priority: u16,
    /// The program's name as given at attach time.
    pub name: String,
    pub prog_id: Option<u32>,
}

impl Netlink {
    /// The cls_bpf filters on the ingress (or egress) hook of `ifindex`'s clsact qdisc.
    pub async fn bpf_filters(&self, ifindex: u32, egress: bool) -> Result<Vec<BpfFilter>> {
        let mut request = self.handle.traffic_filter(ifindex as i32).get();
        request = if egress {
            request.egress()
        } else {
            request.ingress()
        };
        let msgs: Vec<_> = match request.execute().try_collect().await {
            Ok(m) => m,
            // No clsact qdisc: no filters.
            Err(e) if Error::from_rtnetlink(e.clone()).is(libc::EINVAL) => Vec::new(),
            Err(e) => return Err(Error::from_rtnetlink(e)),
        };
        Ok(msgs
            .iter()
            .filter(|m| {
                m.attributes
                    .iter()
                    .any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"))
            })
            .map(|m| {
                let options = m.attributes.iter().find_map(|a| match a {
                    TcAttribute::Options(o) => Some(o),
                    _ => None,
                });
                let bpf = || {
                    options.into_iter().flatten().filter_map(|o| match o {
                        TcOption::Bpf(b) => Some(b),
                        _ => None,
                    })
                };
                BpfFilter {
                    // tcm_info: protocol in the low 16 bits, priority in the high ones.
                    priority: (m.header.info >> 16) as u16,
                    name: bpf()
                        .find_map(|b| match b {
                            TcFilterBpfOption::ProgName(n) => Some(n.clone()),
                            _ => None,
                        })
                        .unwrap_or_default(),
                    prog_id: bpf().find_map(|b| match b {
                        TcFilterBpfOption::ProgId(id) => Some(*id),
                        _ => None,
                    }),
                }
            })
            .collect())
    }
}

/// A [`Netlink`] for synchronous code, on its own current-thread runtime. Open it on the thread
/// (in the namespace) it is to work in; `block_on` drives one request at a time.
pub struct BlockingNetlink {
    runtime: tokio::runtime::Runtime,
    netlink: Netlink,
}

impl BlockingNetlink {
    pub fn open() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(Error::io)?;
        let netlink = {
            let _entered = runtime.enter();
            Netlink::open()?
        };
        Ok(Self { runtime, netlink })
    }

    /// Runs one request (a future of this connection's [`Netlink`]) to completion.
    pub fn block_on<T>(&self, request: impl Future<Output = T>) -> T {
        self.runtime.block_on(request)
    }
}

impl Deref for BlockingNetlink {
    type Target = Netlink;

    fn deref(&self) -> &Netlink {
        &self.netlink
    }
}

/// A main-table route as `ip route` writes one: to `dst` out of `ifindex`, via `gateway` if
/// any, preferring `src` as source, `onlink` when the gateway is outside every connected subnet.
fn route_message(
    dst: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    ifindex: u32,
    scope: Scope,
    onlink: bool,
    src: Option<Ipv4Addr>,
) -> RouteMessage {
    let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .output_interface(ifindex)
        // What iproute2 writes: routes of the administrator, not of a routing daemon.
        .protocol(RouteProtocol::Boot)
        .scope(match scope {
            Scope::Link => RouteScope::Link,
            Scope::Universe => RouteScope::Universe,
        });
    if let Some(gw) = gateway {
        msg = msg.gateway(gw);
    }
    if let Some(src) = src {
        msg = msg.pref_source(src);
    }
    if onlink {
        msg = msg.onlink();
    }
    msg.build()
}

/// The ifindex of `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> anyhow::Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|e| anyhow::anyhow!("no interface {name}: {e}"))
}

pub use crate::mac::{format_mac, parse_mac};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext_ack_text_after_the_echoed_request() {
        // An echoed 20-byte request (header + 4 bytes), then NLMSGERR_ATTR_MSG "bad mtu\0".
        let mut payload = vec![0u8; 20];
        payload[0..4].copy_from_slice(&20u32.to_ne_bytes());
        let msg = b"bad mtu\0";
        payload.extend_from_slice(&((4 + msg.len()) as u16).to_ne_bytes());
        payload.extend_from_slice(&1u16.to_ne_bytes());
        payload.extend_from_slice(msg);
        assert_eq!(ext_ack_message(&payload).as_deref(), Some("bad mtu"));
        // Capped: only the 16-byte header is echoed although the request was longer.
        let mut capped = vec![0u8; 16];
        capped[0..4].copy_from_slice(&64u32.to_ne_bytes());
        capped.extend_from_slice(&payload[20..]);
        assert_eq!(ext_ack_message(&capped).as_deref(), Some("bad mtu"));
        assert_eq!(ext_ack_message(&payload[..20]), None);
        assert_eq!(ext_ack_message(&[1, 2]), None);
    }
}

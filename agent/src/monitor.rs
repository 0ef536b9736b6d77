//! `weft monitor`: attaches to a node's datapath event ring buffer (the protocol is described
//! in `weft_common::monitor`), turns each event into a [`Record`] (the 5-tuple parsed from the
//! captured bytes, inner and outer for tunnel packets; endpoints named from the node's maps
//! and IPAM store, nodes by the names the agent records from its datastore, by address when a
//! node has none) and filters them.
//!
//! Parsing, naming and filtering are pure functions over plain data, unit-tested without a
//! kernel; [`Attached`] is the part that talks to the maps.
use std::{
    collections::HashMap,
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::net::UnixDatagram},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::maps::{MapData, RingBuf};
use etherparse::{LaxNetSlice, LaxSlicedPacket, TransportSlice};
use ipnet::Ipv4Net;
use serde::Serialize;
use weft_common::{
    DropReason, map_names,
    monitor::{
        EVENT_DROP, EVENT_FORWARD, Hook, MONITOR_F_DROPS, MONITOR_F_TRACE, MONITOR_SLOTS,
        MonitorConfig, MonitorEvent,
    },
};

use crate::datapath::Maps;

/// What the monitor asks the datapath for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Also emit forwarding events.
    pub trace: bool,
    /// Forwarding events: one in this many.
    pub sample_every: u32,
    /// Events per second per CPU.
    pub rate_per_sec: u32,
    /// Largest burst per CPU.
    pub burst: u32,
}

/// Events the datapath could not deliver, since the monitor attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Losses {
    /// Refused by the in-kernel budget.
    pub over_budget: u64,
    /// Lost to a full ring buffer.
    pub ring_full: u64,
}

/// Every listener slot is taken: the message names the limit and the holders.
#[derive(Debug, thiserror::Error)]
#[error(
    "all {slots} monitor slots of this node's datapath are taken (weft monitor pids {}): at most \
     {slots} monitors listen at once; stop one of them",
    holders.iter().map(|p| if *p == 0 { "?".to_string() } else { p.to_string() }).collect::<Vec<_>>().join(", ")
)]
pub struct SlotsTaken {
    pub slots: u32,
    /// The pid of each slot's monitor (0: not known yet, one that is attaching).
    pub holders: Vec<u32>,
}

/// A monitor attached to one listener slot of the datapath. Dropping it detaches (its slot's
/// flags cleared, its socket closed, which frees the slot); if the process dies instead, the
/// kernel closes the socket, the slot is free at once and the datapath stops emitting into it
/// by itself.
pub struct Attached {
    maps: Maps,
    slot: u32,
    ring: RingBuf<MapData>,
    _socket: UnixDatagram,
    baseline: Losses,
}

impl Attached {
    pub fn attach(mut maps: Maps, opts: &Options) -> Result<Self> {
        let socket = UnixDatagram::unbound().context("creating the monitor's socket")?;
        let Some(slot) = maps.claim_monitor_slot(&socket)? else {
            let holders = maps
                .monitor_configs()?
                .iter()
                .map(|c| c.owner_pid)
                .collect();
            return Err(SlotsTaken {
                slots: MONITOR_SLOTS,
                holders,
            }
            .into());
        };
        // A monitor killed in this slot left its flags (the datapath clears them only at its
        // next event) and maybe events: nothing reaches the ring with the flags off, then the
        // leftovers are read away.
        maps.set_monitor_flags(slot, 0)?;
        let ring = RingBuf::try_from(maps.take(map_names::EVENTS[slot as usize])?)
            .context("opening the slot's event ring buffer")?;
        let mut attached = Self {
            maps,
            slot,
            ring,
            _socket: socket,
            baseline: Losses::default(),
        };
        while attached.ring.next().is_some() {}
        attached.baseline = attached.total_losses()?;
        attached.maps.set_monitor_config(
            slot,
            &MonitorConfig {
                rate_per_sec: opts.rate_per_sec,
                burst: opts.burst.max(1),
                sample_every: opts.sample_every.max(1),
                owner_pid: std::process::id(),
            },
        )?;
        // Last: the programs read the config only for a slot whose flags are set.
        attached.maps.set_monitor_flags(
            slot,
            MONITOR_F_DROPS | if opts.trace { MONITOR_F_TRACE } else { 0 },
        )?;
        Ok(attached)
    }

    /// The listener slot this monitor holds.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    fn total_losses(&self) -> Result<Losses> {
        let rates = self.maps.monitor_rates(self.slot)?;
        Ok(Losses {
            over_budget: rates.iter().map(|r| r.over_budget).sum(),
            ring_full: rates.iter().map(|r| r.ring_full).sum(),
        })
    }

    /// This monitor's losses since attaching.
    pub fn losses(&self) -> Result<Losses> {
        let now = self.total_losses()?;
        Ok(Losses {
            over_budget: now.over_budget - self.baseline.over_budget,
            ring_full: now.ring_full - self.baseline.ring_full,
        })
    }

    /// The maps (for naming).
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The next event, waiting up to `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<MonitorEvent>> {
        if let Some(ev) = self.pop() {
            return Ok(Some(ev));
        }
        let mut pfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("waiting for events");
            }
        }
        Ok(self.pop())
    }

    fn pop(&mut self) -> Option<MonitorEvent> {
        let item = self.ring.next()?;
        let bytes: &[u8] = &item;
        if bytes.len() < std::mem::size_of::<MonitorEvent>() {
            return None;
        }
        Some(bytemuck::pod_read_unaligned(
            &bytes[..std::mem::size_of::<MonitorEvent>()],
        ))
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Ok(cfg) = self.maps.monitor_config(self.slot)
            && cfg.owner_pid == std::process::id()
        {
            let _ = self.maps.set_monitor_flags(self.slot, 0);
        }
    }
}

/// An IPv4 flow as read from a packet's headers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Flow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    /// ICMP type and code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp: Option<(u8, u8)>,
}

/// The outer headers of a tunnel packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Tunnel {
    /// `vxlan` or `ipip`.
    pub kind: &'static str,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// The names of the nodes at either end, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_node: Option<String>,
}

/// What the captured bytes say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The packet's flow (for a tunnel packet, the inner one when the capture holds it).
    pub flow: Option<Flow>,
    pub tunnel: Option<Tunnel>,
    /// Not IPv4: the ethertype.
    pub ethertype: Option<u16>,
}

pub fn protocol_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        4 => "ipip".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        p => p.to_string(),
    }
}

fn flow_of(pkt: &LaxSlicedPacket) -> Option<Flow> {
    let Some(LaxNetSlice::Ipv4(ip)) = &pkt.net else {
        return None;
    };
    let h = ip.header();
    let mut flow = Flow {
        src: h.source_addr(),
        dst: h.destination_addr(),
        protocol: protocol_name(h.protocol().0),
        sport: None,
        dport: None,
        icmp: None,
    };
    match &pkt.transport {
        Some(TransportSlice::Tcp(t)) => {
            flow.sport = Some(t.source_port());
            flow.dport = Some(t.destination_port());
        }
        Some(TransportSlice::Udp(u)) => {
            flow.sport = Some(u.source_port());
            flow.dport = Some(u.destination_port());
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let b = i.slice();
            flow.icmp = Some((b[0], b[1]));
        }
        _ => {
            // Truncated transport header: the ports when the bytes are there.
            let p = &ip.payload().payload;
            if matches!(h.protocol().0, 6 | 17 | 132) && p.len() >= 4 && !ip.payload().fragmented {
                flow.sport = Some(u16::from_be_bytes([p[0], p[1]]));
                flow.dport = Some(u16::from_be_bytes([p[2], p[3]]));
            }
        }
    }
    Some(flow)
}

/// Parses captured bytes (an Ethernet frame, maybe truncated). A VXLAN packet (UDP to
/// `vxlan_port`) or an IPIP packet yields its tunnel and its inner flow.
pub fn parse(data: &[u8], vxlan_port: u16) -> Parsed {
    let Ok(pkt) = LaxSlicedPacket::from_ethernet(data) else {
        return Parsed::default();
    };
    let Some(outer) = flow_of(&pkt) else {
        let ethertype = data.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]]));
        return Parsed {
            ethertype,
            ..Parsed::default()
        };
    };
    let payload = match &pkt.net {
        Some(LaxNetSlice::Ipv4(ip)) => ip.payload().payload,
        _ => &[][..],
    };
    let inner = if outer.protocol == "udp" && outer.dport == Some(vxlan_port) {
        payload
            .get(16..)
            .and_then(|eth| LaxSlicedPacket::from_ethernet(eth).ok())
            .map(|p| ("vxlan", flow_of(&p)))
    } else if outer.protocol == "ipip" {
        LaxSlicedPacket::from_ip(payload)
            .ok()
            .map(|p| ("ipip", flow_of(&p)))
    } else {
        None
    };
    match inner {
        Some((kind, flow)) => Parsed {
            flow,
            tunnel: Some(Tunnel {
                kind,
                src: outer.src,
                dst: outer.dst,
                src_node: None,
                dst_node: None,
            }),
            ethertype: None,
        },
        None => Parsed {
            flow: Some(outer),
            ..Parsed::default()
        },
    }
}

/// Names for addresses and interfaces, read from the node's maps (node names included: the
/// agent records them from its datastore) and IPAM store.
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// This node's address.
    pub node_ip: Option<Ipv4Addr>,
    /// Local pods: address -> host-side ifindex.
    pub endpoints: HashMap<Ipv4Addr, u32>,
    /// Local pods: address -> `namespace/name` (IPAM, when the runtime said).
    pub pods: HashMap<Ipv4Addr, String>,
    /// Pod CIDRs of other nodes -> node address.
    pub routes: Vec<(Ipv4Net, Ipv4Addr)>,
    /// Known nodes.
    pub nodes: Vec<Ipv4Addr>,
    /// Node names by address (this node's and its peers'; a node whose record names none,
    /// e.g. a flannel lease, is absent and shown by its address).
    pub node_names: HashMap<Ipv4Addr, String>,
    /// Interface names by index.
    pub interfaces: HashMap<u32, String>,
}

impl Names {
    /// Reads the maps, the IPAM stores under `cni_data_dir` (one directory per network) and
    /// the interface names of the current network namespace.
    pub fn load(maps: &Maps, cni_data_dir: &Path) -> Result<Self> {
        let mut names = Names {
            node_ip: maps
                .config()
                .ok()
                .map(|c| Ipv4Addr::from(c.node_ip))
                .filter(|ip| !ip.is_unspecified()),
            ..Names::default()
        };
        for (ip, ep) in maps.endpoints()? {
            names.endpoints.insert(ip, ep.host_ifindex);
            if let Ok(name) = nix_if_name(ep.host_ifindex) {
                names.interfaces.insert(ep.host_ifindex, name);
            }
        }
        names.routes = maps
            .routes()?
            .into_iter()
            .map(|(net, r)| (net, Ipv4Addr::from(r.node_ip)))
            .collect();
        names.nodes = maps.nodes()?.into_iter().map(|(ip, _)| ip).collect();
        names.node_names = maps.node_names()?.into_iter().collect();
        for a in crate::ipam::read_all(cni_data_dir) {
            if let Some(pod) = a.pod {
                names.pods.insert(a.ip, pod);
            }
        }
        Ok(names)
    }

    fn interface(&mut self, ifindex: u32) -> String {
        if let Some(n) = self.interfaces.get(&ifindex) {
            return n.clone();
        }
        let name = nix_if_name(ifindex).unwrap_or_else(|_| format!("if{ifindex}"));
        self.interfaces.insert(ifindex, name.clone());
        name
    }

    /// A local pod's name: `namespace/name`, else its address.
    pub fn pod(&self, ip: Ipv4Addr) -> Option<String> {
        if let Some(p) = self.pods.get(&ip) {
            return Some(p.clone());
        }
        self.endpoints.contains_key(&ip).then(|| ip.to_string())
    }

    /// The node an address belongs to: this node, a known node, or the owner of its pod CIDR.
    pub fn node(&self, ip: Ipv4Addr) -> Option<Ipv4Addr> {
        if Some(ip) == self.node_ip || self.endpoints.contains_key(&ip) {
            return self.node_ip;
        }
        if self.nodes.contains(&ip) {
            return Some(ip);
        }
        self.routes
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, node)| *node)
    }

    /// The name of the node at `node_ip`, or its address when it has none.
    pub fn node_name(&self, node_ip: Ipv4Addr) -> String {
        self.node_names
            .get(&node_ip)
            .cloned()
            .unwrap_or_else(|| node_ip.to_string())
    }

    /// The name of the node at `node_ip`, only when it has one.
    fn known_node_name(&self, node_ip: Ipv4Addr) -> Option<String> {
        self.node_names.get(&node_ip).cloned()
    }

    /// Whether `name` is a node name or an address (for checking `--node` values).
    pub fn knows_node(&self, name: &str) -> bool {
        name.parse::<Ipv4Addr>().is_ok() || self.node_names.values().any(|n| n == name)
    }

    /// The pod whose veth an interface is.
    fn endpoint_of(&self, ifindex: u32) -> Option<Ipv4Addr> {
        self.endpoints
            .iter()
            .find(|(_, i)| **i == ifindex)
            .map(|(ip, _)| *ip)
    }
}

fn nix_if_name(ifindex: u32) -> std::io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

/// One event as printed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Record {
    /// Wall-clock time (RFC 3339, UTC).
    pub time: String,
    /// `drop` or `forward`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The program: `from_pod`, `to_pod`, `from_host`, `from_underlay`, `xdp_underlay`.
    pub hook: &'static str,
    /// Drops: the reason (`weft drops` names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Forwarding: what the program did (`redirect`, `pass`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    pub interface: String,
    pub ifindex: u32,
    /// The local pod whose veth the program ran on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The node the event happened on (its name, or its address when it has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub flow: Option<Flow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_pod: Option<String>,
    /// The node the source address belongs to: its name, or its address when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_node: Option<String>,
    /// That node's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_node_ip: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_node_ip: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Tunnel>,
    /// Not IPv4: the ethertype.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ethertype: Option<String>,
    /// The packet's length.
    pub len: u32,
    pub cpu: u32,
}

fn action_name(hook: Hook, verdict: u32) -> String {
    if hook == Hook::XdpUnderlay {
        return match verdict {
            2 => "decapsulated".into(),
            v => format!("xdp_{v}"),
        };
    }
    match verdict as i32 {
        0 => "to_stack".into(),
        -1 => "to_stack_classic".into(),
        7 => "redirect".into(),
        v => format!("tc_{v}"),
    }
}

/// Turns an event into a record. `realtime_offset_ns` converts the event's monotonic time to
/// wall-clock time; `vxlan_port` tells VXLAN packets apart.
pub fn record(
    ev: &MonitorEvent,
    names: &mut Names,
    vxlan_port: u16,
    realtime_offset_ns: i128,
) -> Record {
    let hook = Hook::from_u8(ev.hook);
    let cap = (ev.cap_len as usize).min(ev.data.len());
    let parsed = parse(&ev.data[..cap], vxlan_port);
    let time = jiff::Timestamp::from_nanosecond(ev.ts_ns as i128 + realtime_offset_ns)
        .map(|t| format!("{t:.3}"))
        .unwrap_or_else(|_| ev.ts_ns.to_string());
    let (kind, reason, action) = match ev.kind {
        EVENT_DROP => (
            "drop",
            Some(
                DropReason::ALL
                    .get(ev.code as usize)
                    .map(|r| r.name().to_string())
                    .unwrap_or_else(|| format!("unknown_{}", ev.code)),
            ),
            None,
        ),
        EVENT_FORWARD => (
            "forward",
            None,
            Some(match hook {
                Some(h) => action_name(h, ev.code),
                None => ev.code.to_string(),
            }),
        ),
        _ => ("unknown", None, None),
    };
    let flow = parsed.flow;
    let (src_pod, dst_pod, src_node_ip, dst_node_ip) = match &flow {
        Some(f) => (
            names.pod(f.src),
            names.pod(f.dst),
            names.node(f.src),
            names.node(f.dst),
        ),
        None => (None, None, None, None),
    };
    let tunnel = parsed.tunnel.map(|t| Tunnel {
        src_node: names.known_node_name(t.src),
        dst_node: names.known_node_name(t.dst),
        ..t
    });
    Record {
        time,
        kind,
        hook: hook.map(|h| h.name()).unwrap_or("unknown"),
        reason,
        action,
        interface: names.interface(ev.ifindex),
        ifindex: ev.ifindex,
        endpoint: names.endpoint_of(ev.ifindex).and_then(|ip| names.pod(ip)),
        node: names.node_ip.map(|ip| names.node_name(ip)),
        flow,
        src_pod,
        dst_pod,
        src_node: src_node_ip.map(|ip| names.node_name(ip)),
        src_node_ip,
        dst_node: dst_node_ip.map(|ip| names.node_name(ip)),
        dst_node_ip,
        tunnel,
        ethertype: parsed.ethertype.map(|t| format!("{t:#06x}")),
        len: ev.pkt_len,
        cpu: ev.cpu,
    }
}

/// `--protocol`: a name or an IP protocol number.
pub fn parse_protocol(s: &str) -> Result<String> {
    match s.to_ascii_lowercase().as_str() {
        p @ ("tcp" | "udp" | "icmp" | "sctp" | "ipip") => Ok(p.to_string()),
        p => p
            .parse::<u8>()
            .map(protocol_name)
            .map_err(|_| anyhow!("--protocol {s}: expected tcp, udp, icmp, sctp or a number")),
    }
}

/// Which records to print. Empty fields match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// A pod (`namespace/name`, `name` or address): source, destination or the endpoint.
    pub pods: Vec<String>,
    /// A node, by name or address: the source's or the destination's node, or a tunnel end.
    pub nodes: Vec<String>,
    /// Drop reasons (with a reason, forwarding events never match).
    pub reasons: Vec<String>,
    pub protocol: Option<String>,
    /// Source or destination port.
    pub port: Option<u16>,
}

impl Filter {
    /// Checks the reason names against the datapath's.
    pub fn validate(&self) -> Result<()> {
        for r in &self.reasons {
            if !DropReason::ALL.iter().any(|d| d.name() == r) {
                let known: Vec<_> = DropReason::ALL.iter().map(|d| d.name()).collect();
                bail!(
                    "--reason {r}: unknown drop reason (known: {})",
                    known.join(", ")
                );
            }
        }
        Ok(())
    }

    pub fn matches(&self, r: &Record) -> bool {
        let pod_match = |p: &String| {
            let names = [&r.src_pod, &r.dst_pod, &r.endpoint];
            names.iter().filter_map(|n| n.as_ref()).any(|n| {
                n == p
                    || n.rsplit_once('/')
                        .map(|(_, name)| name == p)
                        .unwrap_or(false)
            }) || r
                .flow
                .as_ref()
                .is_some_and(|f| f.src.to_string() == *p || f.dst.to_string() == *p)
        };
        if !self.pods.is_empty() && !self.pods.iter().any(pod_match) {
            return false;
        }
        let node_match = |n: &String| {
            let named = |name: &Option<String>| name.as_ref() == Some(n);
            let at = |ip: Option<Ipv4Addr>| ip.is_some_and(|ip| ip.to_string() == *n);
            named(&r.src_node)
                || named(&r.dst_node)
                || at(r.src_node_ip)
                || at(r.dst_node_ip)
                || r.tunnel.as_ref().is_some_and(|t| {
                    at(Some(t.src)) || at(Some(t.dst)) || named(&t.src_node) || named(&t.dst_node)
                })
        };
        if !self.nodes.is_empty() && !self.nodes.iter().any(node_match) {
            return false;
        }
        if !self.reasons.is_empty() && !r.reason.as_ref().is_some_and(|x| self.reasons.contains(x))
        {
            return false;
        }
        if let Some(p) = &self.protocol
            && r.flow.as_ref().map(|f| &f.protocol) != Some(p)
        {
            return false;
        }
        if let Some(port) = self.port
            && !r
                .flow
                .as_ref()
                .is_some_and(|f| f.sport == Some(port) || f.dport == Some(port))
        {
            return false;
        }
        true
    }
}

/// One line for a terminal.
pub fn format_text(r: &Record) -> String {
    let what = match (&r.reason, &r.action) {
        (Some(reason), _) => format!("DROP {reason}"),
        (None, Some(action)) => format!("FWD  {action}"),
        _ => r.kind.to_uppercase(),
    };
    let endpoint = r
        .endpoint
        .as_ref()
        .map(|e| format!(" [{e}]"))
        .unwrap_or_default();
    // `addr:port (pod on node)`: the pod when it has a name, the node always when known.
    let end = |ip: Ipv4Addr, port: Option<u16>, pod: &Option<String>, node: &Option<String>| {
        let addr = match port {
            Some(p) => format!("{ip}:{p}"),
            None => ip.to_string(),
        };
        let pod = pod.as_ref().filter(|p| **p != ip.to_string());
        let node = node.as_ref().filter(|n| **n != ip.to_string());
        match (pod, node) {
            (Some(p), Some(n)) => format!("{addr} ({p} on {n})"),
            (Some(p), None) => format!("{addr} ({p})"),
            (None, Some(n)) => format!("{addr} (on {n})"),
            (None, None) => addr,
        }
    };
    let flow = match &r.flow {
        Some(f) => {
            let icmp = f
                .icmp
                .map(|(t, c)| format!(" type {t} code {c}"))
                .unwrap_or_default();
            format!(
                "{} {} -> {}{icmp}",
                f.protocol,
                end(f.src, f.sport, &r.src_pod, &r.src_node),
                end(f.dst, f.dport, &r.dst_pod, &r.dst_node)
            )
        }
        None => match &r.ethertype {
            Some(t) => format!("ethertype {t}"),
            None => "unparsed".into(),
        },
    };
    let tunnel_end = |ip: Ipv4Addr, node: &Option<String>| match node {
        Some(n) => format!("{ip} ({n})"),
        None => ip.to_string(),
    };
    let tunnel = r
        .tunnel
        .as_ref()
        .map(|t| {
            format!(
                "{} {} -> {} | ",
                t.kind,
                tunnel_end(t.src, &t.src_node),
                tunnel_end(t.dst, &t.dst_node)
            )
        })
        .unwrap_or_default();
    format!(
        "{} {what:<32} {:<14} {}{endpoint}  {tunnel}{flow}  {} bytes",
        r.time, r.hook, r.interface, r.len
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src, dst, 64)
            .tcp(sport, dport, 1, 1000);
        let mut out = Vec::new();
        b.write(&mut out, b"payload").unwrap();
        out
    }

    fn vxlan(inner: &[u8], port: u16) -> Vec<u8> {
        let mut payload = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        payload.extend_from_slice(inner);
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 3], [2, 0, 0, 0, 0, 4])
            .ipv4([192, 168, 1, 2], [192, 168, 1, 1], 64)
            .udp(50000, port);
        let mut out = Vec::new();
        b.write(&mut out, &payload).unwrap();
        out
    }

    #[test]
    fn parses_plain_vxlan_ipip_and_truncated_packets() {
        let plain = tcp_frame([10, 0, 1, 2], [10, 0, 2, 3], 40000, 80);
        let p = parse(&plain, 8472);
        let f = p.flow.unwrap();
        assert_eq!(
            (f.src, f.dst, f.protocol.as_str(), f.sport, f.dport),
            (
                Ipv4Addr::new(10, 0, 1, 2),
                Ipv4Addr::new(10, 0, 2, 3),
                "tcp",
                Some(40000),
                Some(80)
            )
        );
        assert!(p.tunnel.is_none());

        let v = vxlan(&plain, 8472);
        let p = parse(&v, 8472);
        assert_eq!(p.tunnel.as_ref().unwrap().kind, "vxlan");
        assert_eq!(p.tunnel.unwrap().src, Ipv4Addr::new(192, 168, 1, 2));
        assert_eq!(p.flow.unwrap().dport, Some(80));
        // The same bytes to another port are plain UDP.
        let p = parse(&vxlan(&plain, 4789), 8472);
        assert!(p.tunnel.is_none());
        assert_eq!(p.flow.unwrap().protocol, "udp");

        // IPIP: outer header with protocol 4 around the inner IPv4 packet.
        let mut ipip = plain[..14].to_vec();
        let inner = &plain[14..];
        let mut outer = etherparse::Ipv4Header::new(
            inner.len() as u16,
            64,
            etherparse::IpNumber(4),
            [192, 168, 1, 2],
            [192, 168, 1, 1],
        )
        .unwrap();
        outer.header_checksum = outer.calc_header_checksum();
        outer.write(&mut ipip).unwrap();
        ipip.extend_from_slice(inner);
        let p = parse(&ipip, 8472);
        assert_eq!(p.tunnel.unwrap().kind, "ipip");
        assert_eq!(p.flow.unwrap().sport, Some(40000));

        // A capture cut inside the TCP header still has the ports.
        let p = parse(&plain[..14 + 20 + 6], 8472);
        assert_eq!(p.flow.unwrap().dport, Some(80));
        // IPv6: the ethertype.
        let mut v6 = plain.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(parse(&v6[..14], 8472).ethertype, Some(0x86dd));
    }

    fn names() -> Names {
        let mut n = Names {
            node_ip: Some(Ipv4Addr::new(192, 168, 1, 1)),
            ..Names::default()
        };
        n.endpoints.insert(Ipv4Addr::new(10, 0, 1, 2), 7);
        n.pods
            .insert(Ipv4Addr::new(10, 0, 1, 2), "default/client".into());
        n.interfaces.insert(7, "veth7".into());
        n.routes.push((
            "10.0.2.0/24".parse().unwrap(),
            Ipv4Addr::new(192, 168, 1, 2),
        ));
        // A peer whose record names no node (a flannel lease).
        n.routes.push((
            "10.0.3.0/24".parse().unwrap(),
            Ipv4Addr::new(192, 168, 1, 3),
        ));
        n.nodes = vec![Ipv4Addr::new(192, 168, 1, 2), Ipv4Addr::new(192, 168, 1, 3)];
        n.node_names
            .insert(Ipv4Addr::new(192, 168, 1, 1), "node-a".into());
        n.node_names
            .insert(Ipv4Addr::new(192, 168, 1, 2), "node-b".into());
        n
    }

    fn event(kind: u8, hook: Hook, code: u32, frame: &[u8]) -> MonitorEvent {
        let mut data = [0u8; 128];
        let n = frame.len().min(128);
        data[..n].copy_from_slice(&frame[..n]);
        MonitorEvent {
            ts_ns: 1_000_000_000,
            kind,
            hook: hook as u8,
            _pad: 0,
            code,
            ifindex: 7,
            pkt_len: frame.len() as u32,
            cap_len: n as u32,
            cpu: 0,
            data,
        }
    }

    #[test]
    fn records_name_pods_and_nodes_and_filters_select_them() {
        let mut n = names();
        let frame = tcp_frame([10, 0, 1, 2], [10, 0, 2, 3], 40000, 80);
        let ev = event(
            EVENT_DROP,
            Hook::FromPod,
            DropReason::SpoofedMac as u32,
            &frame,
        );
        let r = record(&ev, &mut n, 8472, 0);
        assert_eq!(r.kind, "drop");
        assert_eq!(r.hook, "from_pod");
        assert_eq!(r.reason.as_deref(), Some("spoofed_mac"));
        assert_eq!(r.interface, "veth7");
        assert_eq!(r.endpoint.as_deref(), Some("default/client"));
        assert_eq!(r.src_pod.as_deref(), Some("default/client"));
        assert_eq!(r.dst_pod, None);
        assert_eq!(r.node.as_deref(), Some("node-a"));
        assert_eq!(r.src_node.as_deref(), Some("node-a"));
        assert_eq!(r.src_node_ip, Some(Ipv4Addr::new(192, 168, 1, 1)));
        assert_eq!(r.dst_node.as_deref(), Some("node-b"));
        assert_eq!(r.dst_node_ip, Some(Ipv4Addr::new(192, 168, 1, 2)));
        assert_eq!(r.time, "1970-01-01T00:00:01.000Z");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["dport"], 80);
        assert_eq!(json["type"], "drop");
        assert_eq!(json["dst_node"], "node-b");
        assert_eq!(json["dst_node_ip"], "192.168.1.2");
        let text = format_text(&r);
        assert!(text.contains("DROP spoofed_mac"), "{text}");
        assert!(
            text.contains("10.0.1.2:40000 (default/client on node-a) -> 10.0.2.3:80 (on node-b)"),
            "{text}"
        );

        let all = Filter::default();
        assert!(all.matches(&r));
        let f = |f: Filter| f.matches(&r);
        assert!(f(Filter {
            pods: vec!["client".into()],
            ..Filter::default()
        }));
        assert!(f(Filter {
            pods: vec!["default/client".into()],
            ..Filter::default()
        }));
        assert!(f(Filter {
            pods: vec!["10.0.2.3".into()],
            ..Filter::default()
        }));
        assert!(!f(Filter {
            pods: vec!["server".into()],
            ..Filter::default()
        }));
        // --node: by name or by address.
        for node in ["node-b", "192.168.1.2", "node-a"] {
            assert!(
                f(Filter {
                    nodes: vec![node.into()],
                    ..Filter::default()
                }),
                "{node}"
            );
        }
        for node in ["node-c", "192.168.1.9", "192.168.1.3"] {
            assert!(
                !f(Filter {
                    nodes: vec![node.into()],
                    ..Filter::default()
                }),
                "{node}"
            );
        }
        assert!(f(Filter {
            reasons: vec!["spoofed_mac".into()],
            ..Filter::default()
        }));
        assert!(!f(Filter {
            reasons: vec!["spoofed_ip".into()],
            ..Filter::default()
        }));
        assert!(f(Filter {
            protocol: Some("tcp".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            protocol: Some("udp".into()),
            ..Filter::default()
        }));
        assert!(f(Filter {
            port: Some(40000),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            port: Some(443),
            ..Filter::default()
        }));

        // A forwarding event never matches a reason filter.
        let fwd = record(
            &event(EVENT_FORWARD, Hook::FromPod, 7, &frame),
            &mut n,
            8472,
            0,
        );
        assert_eq!(fwd.action.as_deref(), Some("redirect"));
        assert!(
            !Filter {
                reasons: vec!["spoofed_mac".into()],
                ..Filter::default()
            }
            .matches(&fwd)
        );

        assert!(
            Filter {
                reasons: vec!["nope".into()],
                ..Filter::default()
            }
            .validate()
            .is_err()
        );
        assert_eq!(parse_protocol("TCP").unwrap(), "tcp");
        assert_eq!(parse_protocol("17").unwrap(), "udp");
        assert!(parse_protocol("tcpx").is_err());
    }

    #[test]
    fn nodes_without_a_name_show_their_address_and_tunnel_ends_are_named() {
        let mut n = names();
        // From the unnamed peer 192.168.1.3 to this node (node-a), a pod of its to ours.
        let inner = tcp_frame([10, 0, 3, 5], [10, 0, 1, 2], 5555, 443);
        let mut frame = vxlan(&inner, 8472);
        // vxlan() sends from 192.168.1.2: make it 192.168.1.3 (the checksum is not checked).
        frame[14 + 15] = 3;
        let r = record(
            &event(EVENT_DROP, Hook::XdpUnderlay, 1, &frame),
            &mut n,
            8472,
            0,
        );
        let t = r.tunnel.clone().unwrap();
        assert_eq!(t.src, Ipv4Addr::new(192, 168, 1, 3));
        assert_eq!(t.src_node, None, "no name recorded for it");
        assert_eq!(t.dst_node.as_deref(), Some("node-a"));
        assert_eq!(r.src_node.as_deref(), Some("192.168.1.3"), "its address");
        assert_eq!(r.src_node_ip, Some(Ipv4Addr::new(192, 168, 1, 3)));
        assert_eq!(r.dst_node.as_deref(), Some("node-a"));
        assert_eq!(r.dst_pod.as_deref(), Some("default/client"));
        let text = format_text(&r);
        assert!(
            text.contains(
                "vxlan 192.168.1.3 -> 192.168.1.1 (node-a) | tcp 10.0.3.5:5555 (on 192.168.1.3) -> \
                 10.0.1.2:443 (default/client on node-a)"
            ),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["tunnel"]["dst_node"], "node-a");
        assert!(json["tunnel"].get("src_node").is_none(), "{json}");
        for node in ["192.168.1.3", "node-a", "192.168.1.1"] {
            assert!(
                Filter {
                    nodes: vec![node.into()],
                    ..Filter::default()
                }
                .matches(&r),
                "{node}"
            );
        }
        assert!(
            !Filter {
                nodes: vec!["node-b".into()],
                ..Filter::default()
            }
            .matches(&r)
        );
        assert!(n.knows_node("node-b") && n.knows_node("10.1.2.3"));
        assert!(!n.knows_node("node-c"));
        // Without any name (an agent that records none), every node is its address.
        let mut bare = names();
        bare.node_names.clear();
        let r = record(
            &event(EVENT_DROP, Hook::XdpUnderlay, 1, &frame),
            &mut bare,
            8472,
            0,
        );
        assert_eq!(r.node.as_deref(), Some("192.168.1.1"));
        assert_eq!(r.dst_node.as_deref(), Some("192.168.1.1"));
        assert_eq!(r.tunnel.unwrap().dst_node, None);
    }
}

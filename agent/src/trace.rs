//! `weft trace`: what the datapath would do with a packet, computed by the datapath itself.
//!
//! The packet is built here (a TCP SYN, a UDP datagram or an ICMP echo request) and run with
//! `BPF_PROG_TEST_RUN` through weft's real programs: `from_pod` on the sending pod's veth, then,
//! when the destination node's pins are reachable (`--peer-pin-root`, e.g. the simulated nodes of
//! one machine), `xdp_underlay` and `from_underlay` there on the bytes that left, and, for TCP in
//! VXLAN where it goes through `weft_vxlan`, `from_vxlan` on the inner frame (the kernel's vxlan
//! socket is modelled: the inner frame cut out, the tunnel key supplied).
//!
//! **No state changes.** The programs run as a second instance of the object
//! (`Datapath::load_for_trace`): the maps they only read (config, routes, endpoints, nodes,
//! policy) are the live pinned ones, the maps they write (counters, conntrack, the next-hop
//! and path-MTU caches, the monitor's) are private to the instance. The live state a decision
//! depends on is copied in first (the flow's conntrack entries, learned path MTUs). The other
//! way, a "trace" flag in the packet's context tested at every write, would put a test into
//! every write site of the hot path and lose state the moment someone adds a write and
//! forgets it; the instance costs one program load (verifier) per trace and nothing per packet.
//! What the run wrote to the private maps is read back: it is what the packet would have done
//! (a conntrack entry created, a next hop resolved, which counters moved).
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use etherparse::PacketBuilder;
use serde::Serialize;
use weft_common::{
    CONFIG_F_VXLAN_DEV, DECAP_META_MAGIC, DECAP_META_MAGIC_POD, DecapMeta, EndpointInfo, RouteMode,
    Stat, TunnelKey, VXLAN_DEV,
    conntrack::{CtEntry, CtKey, CtOrigin},
    monitor::Hook,
};

use crate::{
    datapath::{Datapath, Maps},
    mac::format_mac,
    monitor::{Names, parse},
    test_run::{try_run_tc_gso, try_run_xdp},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "icmp" => Ok(Self::Icmp),
            _ => bail!("--proto {s}: expected tcp, udp or icmp"),
        }
    }

    fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Icmp => 1,
        }
    }
}

/// What to trace.
#[derive(Clone, Debug)]
pub struct Request {
    /// A local pod (`namespace/name`, `name` or address), or any address with `via`.
    pub from: String,
    /// A pod or any address.
    pub to: String,
    pub proto: Proto,
    /// Destination port (TCP, UDP); default 80 (TCP) or 53 (UDP).
    pub port: Option<u16>,
    /// Send from this local pod's veth (e.g. a `from` address that is not the pod's: a spoof).
    pub via: Option<String>,
    /// The IPAM directory where pods' names are recorded.
    pub cni_data_dir: PathBuf,
    /// Pin roots of other nodes (their maps must be reachable from here).
    pub peer_pin_roots: Vec<PathBuf>,
}

/// The source port of traced TCP and UDP packets.
pub const TRACE_SPORT: u16 = 42424;

/// One program run.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub hook: &'static str,
    /// The node the program ran for.
    pub node: Option<Ipv4Addr>,
    /// The interface the packet arrives on.
    pub interface: String,
    /// The map lookups the program makes for this packet, and what they return.
    pub lookups: Vec<String>,
    /// Counters this packet moved (the private instance's).
    pub counters: BTreeMap<String, u64>,
    /// State the packet would create or change (conntrack entries, next hops, path MTUs).
    pub state: Vec<String>,
    /// The drop reason, when dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    /// The program's verdict, named.
    pub verdict: String,
    /// Where the packet goes next.
    pub action: String,
    /// The bytes that leave (after the program's rewrite), when the packet goes on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaves: Option<Leaves>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Leaves {
    pub len: usize,
    /// Headers, read back from the bytes.
    pub summary: String,
    pub hex: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    pub steps: Vec<Step>,
    /// Why the trace stops where it does (when it does not end in a pod or a drop).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// An address named on the command line: a pod name known to IPAM or an IPv4 address.
fn resolve(names: &Names, s: &str) -> Result<Ipv4Addr> {
    if let Ok(ip) = s.parse() {
        return Ok(ip);
    }
    let hits: Vec<_> = names
        .pods
        .iter()
        .filter(|(_, p)| *p == s || p.rsplit_once('/').is_some_and(|(_, n)| n == s))
        .map(|(ip, _)| *ip)
        .collect();
    match hits[..] {
        [ip] => Ok(ip),
        [] => bail!(
            "{s}: neither an IPv4 address nor a pod of this node (pods are named from the CNI \
             plugin's IPAM records)"
        ),
        _ => bail!("{s}: several pods have this name; give namespace/name or the address"),
    }
}

fn build(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: Proto,
    dport: u16,
    ttl: u8,
) -> Result<Vec<u8>> {
    let ip = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src.octets(), dst.octets(), ttl);
    let payload = b"weft trace probe";
    let mut out = Vec::new();
    match proto {
        Proto::Tcp => ip
            .tcp(TRACE_SPORT, dport, 1, 64240)
            .syn()
            .write(&mut out, payload),
        Proto::Udp => ip.udp(TRACE_SPORT, dport).write(&mut out, payload),
        Proto::Icmp => ip
            .icmpv4_echo_request(TRACE_SPORT, 1)
            .write(&mut out, payload),
    }
    .context("building the packet")?;
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn summary(bytes: &[u8], vxlan_port: u16) -> String {
    let p = parse(bytes, vxlan_port);
    let flow = p.flow.map(|f| {
        let port = |x: Option<u16>| x.map(|p| format!(":{p}")).unwrap_or_default();
        format!(
            "{} {}{} -> {}{} (ttl {})",
            f.protocol,
            f.src,
            port(f.sport),
            f.dst,
            port(f.dport),
            inner_ttl(bytes, vxlan_port).map_or("?".into(), |t| t.to_string())
        )
    });
    let eth = if bytes.len() >= 12 {
        format!(
            "eth {} -> {}",
            format_mac(&bytes[6..12].try_into().unwrap_or([0; 6])),
            format_mac(&bytes[0..6].try_into().unwrap_or([0; 6]))
        )
    } else {
        String::new()
    };
    let tunnel = p
        .tunnel
        .map(|t| format!("{} {} -> {} | ", t.kind, t.src, t.dst))
        .unwrap_or_default();
    format!(
        "{eth}, {tunnel}{}",
        flow.unwrap_or_else(|| "not IPv4".into())
    )
}

/// The TTL of the packet's (inner) IPv4 header.
fn inner_ttl(bytes: &[u8], vxlan_port: u16) -> Option<u8> {
    let p = parse(bytes, vxlan_port);
    let off = match p.tunnel.as_ref().map(|t| t.kind) {
        // Ethernet, outer IPv4 (no options in weft's), UDP, VXLAN, inner Ethernet.
        Some("vxlan") => 14 + 20 + 8 + 8 + 14,
        Some("ipip") => 14 + 20,
        _ => 14,
    };
    bytes.get(off + 8).copied()
}

fn mode_name(mode: u8) -> &'static str {
    match RouteMode::from_u8(mode) {
        Some(RouteMode::Vxlan) => "vxlan",
        Some(RouteMode::Ipip) => "ipip",
        Some(RouteMode::Direct) => "direct",
        Some(RouteMode::Bgp) => "bgp",
        None => "unknown",
    }
}

fn ct_line(k: &CtKey, e: &CtEntry) -> String {
    let origin = match CtOrigin::from_u8(e.origin) {
        Some(CtOrigin::Fast) => "fast path",
        Some(CtOrigin::Stack) => "host stack",
        None => "unknown",
    };
    format!(
        "{} {}:{} <-> {}:{}, {origin}, flags {:#04x}",
        crate::monitor::protocol_name(k.protocol),
        Ipv4Addr::from(k.addr_lo),
        u16::from_be_bytes(k.port_lo),
        Ipv4Addr::from(k.addr_hi),
        u16::from_be_bytes(k.port_hi),
        e.flags
    )
}

/// The live conntrack entries between two addresses for a protocol.
fn flow_entries(maps: &Maps, a: Ipv4Addr, b: Ipv4Addr, proto: u8) -> Result<Vec<(CtKey, CtEntry)>> {
    let (a, b) = (a.octets(), b.octets());
    Ok(maps
        .conntrack()?
        .into_iter()
        .filter(|(k, _)| {
            k.protocol == proto
                && ((k.addr_lo == a && k.addr_hi == b) || (k.addr_lo == b && k.addr_hi == a))
        })
        .take(512)
        .collect())
}

/// Counters of a map set, by name, for deltas.
fn counters(maps: &Maps) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for (r, n) in maps.drops()? {
        out.insert(format!("drop:{}", r.name()), n);
    }
    for (s, n) in maps.stats()? {
        out.insert(s.name().to_string(), n);
    }
    Ok(out)
}

fn if_name(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("ifindex {ifindex}");
    }
    // SAFETY: NUL-terminated by if_indextoname.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn tc_verdict(v: i32) -> &'static str {
    match v {
        -1 => "TC_ACT_UNSPEC",
        0 => "TC_ACT_OK",
        2 => "TC_ACT_SHOT",
        7 => "TC_ACT_REDIRECT",
        _ => "other",
    }
}

fn xdp_verdict(v: i32) -> &'static str {
    match v {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        2 => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "other",
    }
}

/// Runs one program of `dp` on `frame` and reads back what it did.
fn run(
    dp: &mut Datapath,
    hook: Hook,
    frame: &[u8],
    ifindex: u32,
    vxlan_port: u16,
    mut step: Step,
) -> Result<(Step, i32, Vec<u8>)> {
    let before = counters(&dp.maps)?;
    let ct_before = dp.maps.conntrack()?;
    let hops_before = dp.maps.next_hops()?;
    let out = match hook {
        Hook::XdpUnderlay => try_run_xdp(dp.xdp_program()?, frame, 1)?,
        _ => try_run_tc_gso(dp.tc_program(hook.name())?, frame, ifindex, 0, 1)?,
    };
    for (name, n) in counters(&dp.maps)? {
        let delta = n - before.get(&name).copied().unwrap_or(0);
        if delta == 0 {
            continue;
        }
        if let Some(reason) = name.strip_prefix("drop:") {
            step.drop_reason = Some(reason.to_string());
        }
        step.counters.insert(name, delta);
    }
    for (k, e) in dp.maps.conntrack()? {
        match ct_before.iter().find(|(bk, _)| *bk == k) {
            None => step
                .state
                .push(format!("conntrack entry created: {}", ct_line(&k, &e))),
            Some((_, old)) if old.flags != e.flags || old.origin != e.origin => step
                .state
                .push(format!("conntrack entry updated: {}", ct_line(&k, &e))),
            Some(_) => {}
        }
    }
    for (node, h) in dp.maps.next_hops()? {
        if !hops_before.iter().any(|(n, _)| *n == node) {
            step.state.push(format!(
                "next hop toward {node} resolved by the FIB: {} {} -> {}, mtu {}",
                if_name(h.ifindex),
                format_mac(&h.smac),
                format_mac(&h.dmac),
                h.mtu
            ));
        }
    }
    let mut data = out.data;
    if hook == Hook::XdpUnderlay {
        // The test run returns the metadata in front of the packet.
        let meta_len = std::mem::size_of::<DecapMeta>();
        if let Some(meta) = data.get(..meta_len)
            && let Ok(meta) = bytemuck::try_pod_read_unaligned::<DecapMeta>(meta)
            && (meta.magic == DECAP_META_MAGIC || meta.magic == DECAP_META_MAGIC_POD)
        {
            step.state.push(format!(
                "metadata for from_underlay: from node {}",
                Ipv4Addr::from(meta.peer)
            ));
            data.drain(..meta_len);
        }
    }
    step.verdict = match hook {
        Hook::XdpUnderlay => xdp_verdict(out.verdict),
        _ => tc_verdict(out.verdict),
    }
    .to_string();
    let went_on = match hook {
        Hook::XdpUnderlay => out.verdict == 2,
        _ => out.verdict == 0 || out.verdict == 7 || out.verdict == -1,
    };
    if went_on {
        step.leaves = Some(Leaves {
            len: data.len(),
            summary: summary(&data, vxlan_port),
            hex: hex(&data),
        });
    }
    Ok((step, out.verdict, data))
}

/// The NetworkPolicy lookups the programs make for a new flow `src → dst`, read from the live
/// policy maps with the compiler's emulation of the datapath's probes, and the verdict they
/// give. `local` says which addresses are pods of this node (the only ones judged here); a
/// local pod without policy state is denied both ways, as the programs do. `egress`: whether
/// the source's egress is judged at this hook (at `from_pod` a Service address is judged by
/// its backend, after the host stack's translation).
fn policy_lookups(
    live: &Maps,
    (src, dst, proto, port): (Ipv4Addr, Ipv4Addr, u8, u16),
    local: impl Fn(Ipv4Addr) -> bool,
    egress: bool,
) -> Result<Vec<String>> {
    use weft_common::policy::{
        POLICY_CLASS_HOST, POLICY_CLASS_NONE, POLICY_DIR_EGRESS, POLICY_DIR_INGRESS,
        POLICY_F_EGRESS_ISOLATED, POLICY_F_INGRESS_ISOLATED,
    };
    let snap = crate::netpol::maps::snapshot(live, crate::netpol::maps::capacities(live)?)?;
    let revision = live.policy_config()?.revision;
    let class_name = |c: u32| match c {
        POLICY_CLASS_NONE => "none (no policy peer selects it)".to_string(),
        POLICY_CLASS_HOST => "host (always allowed)".to_string(),
        c => format!("{c}"),
    };
    let port_text = if port == 0 {
        String::new()
    } else {
        format!(" port {port}")
    };
    let mut out = Vec::new();
    let mut denied = None;
    let judged = [
        (src, dst, POLICY_DIR_EGRESS, "egress", egress),
        (dst, src, POLICY_DIR_INGRESS, "ingress", true),
    ];
    for (endpoint, remote, dir, name, judge) in judged {
        if !local(endpoint) || endpoint == remote {
            continue;
        }
        if !judge {
            out.push(format!(
                "policy {name} of {endpoint}: {remote} is a Service address: judged by its \
                 backend after the host stack's translation"
            ));
            continue;
        }
        let (flag, allowed) = if dir == POLICY_DIR_INGRESS {
            (
                POLICY_F_INGRESS_ISOLATED,
                snap.ingress(endpoint, remote, proto, port),
            )
        } else {
            (
                POLICY_F_EGRESS_ISOLATED,
                snap.egress(endpoint, remote, proto, port),
            )
        };
        let line = match snap.endpoints.get(&endpoint) {
            None => format!(
                "policy_endpoints[{endpoint}]: none: a pod without policy state is isolated \
                 both ways: {name} denied"
            ),
            Some(st) if st.flags & flag == 0 => {
                format!("policy_endpoints[{endpoint}]: {name} not isolated: allowed")
            }
            Some(st) => {
                let ruleset = if dir == POLICY_DIR_INGRESS {
                    st.ingress_ruleset
                } else {
                    st.egress_ruleset
                };
                format!(
                    "policy_endpoints[{endpoint}]: {name} isolated (rule set {ruleset}); class of \
                     {remote}: {}; rules for {}{port_text}: {}",
                    class_name(snap.class_of(remote)),
                    crate::monitor::protocol_name(proto),
                    if allowed { "allowed" } else { "denied" }
                )
            }
        };
        out.push(line);
        if !allowed && denied.is_none() {
            denied = Some(format!("{name} of {endpoint}"));
        }
    }
    if out.is_empty() {
        return Ok(out);
    }
    out.push(match denied {
        None => format!("policy verdict (revision {revision}): a new flow is allowed"),
        Some(by) => format!(
            "policy verdict (revision {revision}): a new flow is denied by the {by} \
             (drop reason policy_denied_{})",
            by.split(' ').next().unwrap_or_default()
        ),
    });
    Ok(out)
}

fn new_step(hook: Hook, node: Option<Ipv4Addr>, interface: String) -> Step {
    Step {
        hook: hook.name(),
        node,
        interface,
        lookups: Vec::new(),
        counters: BTreeMap::new(),
        state: Vec::new(),
        drop_reason: None,
        verdict: String::new(),
        action: String::new(),
        leaves: None,
    }
}

/// Copies the live state a decision about `src`-`dst` depends on into the trace instance.
fn seed(dp: &mut Datapath, live: &Maps, src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Result<()> {
    for (k, e) in flow_entries(live, src, dst, proto)? {
        dp.maps.upsert_conntrack(&k, &e)?;
    }
    for (peer, mtu) in live.path_mtus()? {
        dp.maps.upsert_path_mtu(peer, &mtu)?;
    }
    Ok(())
}

/// Traces `req` on the node pinned under `pin_root` (run in that node's network namespace:
/// the programs' FIB lookups use it).
pub fn trace(pin_root: &Path, req: &Request) -> Result<Report> {
    let live = Maps::open_pinned(pin_root)?;
    let cfg = live.config()?;
    let node_ip = Ipv4Addr::from(cfg.node_ip);
    let names = Names::load(&live, &req.cni_data_dir)?;
    let src = resolve(&names, &req.from)?;
    let dst = resolve(&names, &req.to)?;
    let dport = match (req.proto, req.port) {
        (Proto::Icmp, Some(_)) => bail!("--port: ICMP has no ports"),
        (Proto::Icmp, None) => None,
        (Proto::Tcp, p) => Some(p.unwrap_or(80)),
        (Proto::Udp, p) => Some(p.unwrap_or(53)),
    };
    let endpoints = live.endpoints()?;
    let endpoint = |ip: Ipv4Addr| -> Option<EndpointInfo> {
        endpoints.iter().find(|(a, _)| *a == ip).map(|(_, e)| *e)
    };
    let sender_ip = match &req.via {
        Some(v) => resolve(&names, v)?,
        None => src,
    };
    let routes = live.routes()?;
    let route_of = |ip: Ipv4Addr| {
        routes
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .copied()
    };
    let Some(sender) = endpoint(sender_ip) else {
        // A pod of another node to a pod of this one: the packet arrives from the underlay.
        if req.via.is_none()
            && let Some((net, route)) = route_of(src)
            && endpoint(dst).is_some()
        {
            let peer = Ipv4Addr::from(route.node_ip);
            let peer_mac = live
                .next_hops()?
                .into_iter()
                .find(|(n, _)| *n == peer)
                .map(|(_, h)| h.dmac)
                .unwrap_or([0; 6]);
            let nl = crate::netlink::BlockingNetlink::open()?;
            let nic_mac = nl
                .block_on(nl.link_by_index(cfg.underlay_ifindex))?
                .and_then(|l| l.mac)
                .unwrap_or([0; 6]);
            let frame = arrival_frame(
                &cfg,
                &route,
                (peer_mac, nic_mac),
                (src, dst, req.proto, dport.unwrap_or(0)),
            )?;
            let mut report = Report {
                src,
                dst,
                protocol: crate::monitor::protocol_name(req.proto.number()),
                dport,
                steps: Vec::new(),
                note: Some(format!(
                    "{src} is a pod of node {peer} ({net}): the packet is built as that node \
                     sends it ({}) and enters this node ({node_ip}) from the underlay",
                    mode_name(route.mode)
                )),
            };
            underlay_steps(
                &mut report,
                pin_root,
                node_ip,
                &frame,
                cfg.vxlan_port,
                req.proto,
            )?;
            return Ok(report);
        }
        bail!(
            "{sender_ip} is not a pod of this node ({node_ip}) and not a pod of another node \
             sending to one of this node's pods: run the trace on the node of the sending pod, \
             or name the pod whose interface sends the packet with --via"
        );
    };
    let pod_name = |ip: Ipv4Addr| names.pod(ip).unwrap_or_else(|| ip.to_string());
    let frame = build(
        sender.pod_mac,
        sender.host_mac,
        src,
        dst,
        req.proto,
        dport.unwrap_or(0),
        64,
    )?;

    let mut dp = Datapath::load_for_trace(pin_root)?;
    seed(&mut dp, &live, src, dst, req.proto.number())?;

    // Step 1: from_pod on the sender's veth.
    let mut step = new_step(Hook::FromPod, Some(node_ip), if_name(sender.host_ifindex));
    step.lookups.push(format!(
        "sent by pod {} on its veth {} (ifindex {}), MAC {}",
        pod_name(sender_ip),
        if_name(sender.host_ifindex),
        sender.host_ifindex,
        format_mac(&sender.pod_mac)
    ));
    step.lookups.push(match endpoint(src) {
        Some(e) if e.host_ifindex == sender.host_ifindex => {
            format!("endpoints[{src}]: this veth: source check passes")
        }
        Some(e) => format!(
            "endpoints[{src}]: another pod's veth (ifindex {}): source check fails",
            e.host_ifindex
        ),
        None => format!("endpoints[{src}]: none: source check fails"),
    });
    let dest_line = if let Some(e) = endpoint(dst) {
        format!(
            "endpoints[{dst}]: local pod {} on veth {} (ifindex {})",
            pod_name(dst),
            if_name(e.host_ifindex),
            e.host_ifindex
        )
    } else if let Some((net, r)) = route_of(dst) {
        format!(
            "routes[{dst}]: {net} -> node {} ({}, VTEP {})",
            Ipv4Addr::from(r.node_ip),
            mode_name(r.mode),
            format_mac(&r.vtep_mac)
        )
    } else {
        format!("endpoints[{dst}], routes[{dst}]: none: not a pod address (the host stack's)")
    };
    step.lookups.push(dest_line);
    let live_ct = flow_entries(&live, src, dst, req.proto.number())?;
    if live_ct.is_empty() {
        step.lookups
            .push("conntrack: no entry between these addresses (a new flow)".into());
    }
    for (k, e) in &live_ct {
        step.lookups.push(format!("conntrack: {}", ct_line(k, e)));
    }
    let service = live
        .policy_config()
        .is_ok_and(|c| c.is_service(dst.octets()));
    let egress_here = !(endpoint(dst).is_none() && route_of(dst).is_none() && service);
    step.lookups.extend(policy_lookups(
        &live,
        (src, dst, req.proto.number(), dport.unwrap_or(0)),
        |ip| endpoint(ip).is_some(),
        egress_here,
    )?);
    let (mut step, verdict, out) = run(
        &mut dp,
        Hook::FromPod,
        &frame,
        sender.host_ifindex,
        cfg.vxlan_port,
        step,
    )?;
    let stat = |s: Stat| step.counters.contains_key(s.name());
    let mut next_node = None;
    step.action = if step.drop_reason.is_some() {
        "dropped".into()
    } else if verdict == 7 && stat(Stat::LocalDelivered) {
        format!("into pod {}'s namespace (bpf_redirect_peer)", pod_name(dst))
    } else if verdict == 7 {
        let node = route_of(dst).map(|(_, r)| Ipv4Addr::from(r.node_ip));
        next_node = node;
        format!(
            "out of the underlay toward node {}",
            node.map_or("?".into(), |n| n.to_string())
        )
    } else {
        "to the host stack (it routes, translates or delivers)".into()
    };
    let mut report = Report {
        src,
        dst,
        protocol: crate::monitor::protocol_name(req.proto.number()),
        dport,
        steps: vec![step],
        note: None,
    };

    // Step 2: the destination node's underlay programs, when its pins are reachable.
    if let Some(peer_ip) = next_node {
        let peer_root = req.peer_pin_roots.iter().find(|root| {
            Maps::open_pinned(root)
                .and_then(|m| m.config())
                .is_ok_and(|c| Ipv4Addr::from(c.node_ip) == peer_ip)
        });
        match peer_root {
            None => {
                report.note = Some(format!(
                    "node {peer_ip}'s maps are not reachable from here (give its pin root with \
                     --peer-pin-root to follow the packet there)"
                ));
            }
            Some(root) => {
                underlay_steps(&mut report, root, peer_ip, &out, cfg.vxlan_port, req.proto)?
            }
        }
    }
    Ok(report)
}

/// `xdp_underlay`, then `from_underlay`, on the node pinned under `root` (address `node_ip`),
/// for `frame` as it arrives from the underlay.
fn underlay_steps(
    report: &mut Report,
    root: &Path,
    node_ip: Ipv4Addr,
    frame: &[u8],
    vxlan_port: u16,
    proto: Proto,
) -> Result<()> {
    let (src, dst) = (report.src, report.dst);
    let live = Maps::open_pinned(root)?;
    let cfg = live.config()?;
    let mut dp = Datapath::load_for_trace(root)?;
    seed(&mut dp, &live, src, dst, proto.number())?;
    let p = parse(frame, vxlan_port);
    let mut xdp = new_step(Hook::XdpUnderlay, Some(node_ip), "underlay".into());
    match &p.tunnel {
        Some(t) => xdp.lookups.push(format!(
            "nodes[{}]: {}",
            t.src,
            if live.nodes()?.iter().any(|(n, _)| *n == t.src) {
                "a known node: decapsulation allowed"
            } else {
                "unknown: dropped"
            }
        )),
        None => xdp
            .lookups
            .push("not a tunnel packet: XDP leaves it to tc".into()),
    }
    let (mut xdp, xv, _) = run(&mut dp, Hook::XdpUnderlay, frame, 0, cfg.vxlan_port, xdp)?;
    xdp.action = match (xv, xdp.drop_reason.is_some()) {
        (_, true) => "dropped".into(),
        (2, false) if xdp.counters.is_empty() => "passed untouched".into(),
        (2, false) => "decapsulated, to from_underlay".into(),
        _ => "other".into(),
    };
    let dropped_in_xdp = xdp.drop_reason.is_some();
    report.steps.push(xdp);
    if dropped_in_xdp {
        return Ok(());
    }
    // The tc program on the bytes as they arrived: its decapsulation applies the same checks
    // as XDP's, then delivers.
    let mut delivery_lookups = vec![match live.endpoints()?.iter().find(|(a, _)| *a == dst) {
        Some((_, e)) => format!(
            "endpoints[{dst}]: local pod on ifindex {} of node {node_ip}",
            e.host_ifindex
        ),
        None => format!("endpoints[{dst}]: none on node {node_ip}"),
    }];
    let local_pods = live.endpoints()?;
    delivery_lookups.extend(policy_lookups(
        &live,
        (src, dst, proto.number(), report.dport.unwrap_or(0)),
        |ip| local_pods.iter().any(|(a, _)| *a == ip),
        true,
    )?);
    // As `from_underlay` decides: TCP in VXLAN goes to `weft_vxlan` (a traced packet is never
    // GSO).
    let to_device = cfg.flags & CONFIG_F_VXLAN_DEV != 0
        && proto == Proto::Tcp
        && p.tunnel.as_ref().is_some_and(|t| t.kind == "vxlan");
    let mut tc = new_step(Hook::FromUnderlay, Some(node_ip), "underlay".into());
    if !to_device {
        tc.lookups.extend(delivery_lookups.iter().cloned());
    }
    let (mut tc, tv, _) = run(&mut dp, Hook::FromUnderlay, frame, 0, cfg.vxlan_port, tc)?;
    if to_device && tc.drop_reason.is_none() && tv == 0 {
        tc.action = format!(
            "checked, to {VXLAN_DEV}: the kernel's vxlan socket decapsulates it (after the underlay's GRO)"
        );
        report.steps.push(tc);
        return vxlan_device_step(report, &mut dp, node_ip, frame, delivery_lookups);
    }
    tc.action = delivery_action(&tc, tv, dst, node_ip);
    report.steps.push(tc);
    Ok(())
}

/// Where a delivering step (`from_underlay`, `from_vxlan`) sent the packet.
fn delivery_action(step: &Step, verdict: i32, dst: Ipv4Addr, node_ip: Ipv4Addr) -> String {
    let delivered = step.counters.contains_key(Stat::UnderlayDelivered.name());
    if step.drop_reason.is_some() {
        "dropped".into()
    } else if verdict == 7 && delivered {
        format!("into pod {dst}'s namespace on node {node_ip} (bpf_redirect_peer)")
    } else {
        format!("to node {node_ip}'s host stack")
    }
}

/// `from_vxlan` on `weft_vxlan`, on what the kernel's vxlan socket makes of the VXLAN packet
/// `frame`: the inner frame, with the tunnel key (sending node, VNI) as metadata. The socket's
/// part is modelled here (the inner frame cut out, the key supplied to the trace instance);
/// the program is the real one.
fn vxlan_device_step(
    report: &mut Report,
    dp: &mut Datapath,
    node_ip: Ipv4Addr,
    frame: &[u8],
    lookups: Vec<String>,
) -> Result<()> {
    let ihl = usize::from(frame.get(14).copied().unwrap_or(0x45) & 0x0f) * 4;
    let vxlan = 14 + ihl + 8;
    let (Some(header), Some(inner)) = (frame.get(vxlan..vxlan + 8), frame.get(vxlan + 8..)) else {
        bail!("the VXLAN packet is truncated");
    };
    let vni = u32::from_be_bytes([0, header[4], header[5], header[6]]);
    let peer = [
        frame[14 + 12],
        frame[14 + 13],
        frame[14 + 14],
        frame[14 + 15],
    ];
    dp.set_trace_tunnel(Some(TunnelKey {
        peer,
        vni,
        valid: 1,
    }))?;
    let mut step = new_step(Hook::FromVxlan, Some(node_ip), VXLAN_DEV.into());
    step.lookups.push(format!(
        "tunnel key (the socket's metadata, modelled): from node {}, VNI {vni}",
        Ipv4Addr::from(peer)
    ));
    step.lookups.extend(lookups);
    let (mut step, verdict, _) = run(dp, Hook::FromVxlan, inner, 0, 0, step)?;
    step.action = delivery_action(&step, verdict, report.dst, node_ip);
    report.steps.push(step);
    Ok(())
}

/// The packet a pod of another node sends to a pod of this one, as its node puts it on the
/// underlay toward this node (`route`: how this node reaches the sender's node; clusters use
/// one backend). The sender's `from_pod` decremented the TTL.
fn arrival_frame(
    cfg: &weft_common::NodeConfig,
    route: &weft_common::RouteInfo,
    (peer_mac, nic_mac): ([u8; 6], [u8; 6]),
    (src, dst, proto, dport): (Ipv4Addr, Ipv4Addr, Proto, u16),
) -> Result<Vec<u8>> {
    let ports = match proto {
        Proto::Icmp => [0; 4],
        _ => {
            let (s, d) = (TRACE_SPORT.to_be_bytes(), dport.to_be_bytes());
            [s[0], s[1], d[0], d[1]]
        }
    };
    match RouteMode::from_u8(route.mode) {
        Some(RouteMode::Vxlan) => {
            let inner = build(route.vtep_mac, cfg.vtep_mac, src, dst, proto, dport, 63)?;
            let hash = weft_common::flow_hash(src.octets(), dst.octets(), proto.number(), ports);
            let vni = cfg.vni.to_be_bytes();
            let mut payload = vec![0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0];
            payload.extend_from_slice(&inner);
            let mut out = Vec::new();
            PacketBuilder::ethernet2(peer_mac, nic_mac)
                .ipv4(route.node_ip, cfg.node_ip, 64)
                .udp(weft_common::vxlan_source_port(hash), cfg.vxlan_port)
                .write(&mut out, &payload)
                .context("building the VXLAN packet")?;
            Ok(out)
        }
        Some(RouteMode::Ipip) => {
            let inner = build([0; 6], [0; 6], src, dst, proto, dport, 63)?;
            let ip = &inner[14..];
            let mut outer = etherparse::Ipv4Header::new(
                ip.len() as u16,
                64,
                etherparse::IpNumber(4),
                route.node_ip,
                cfg.node_ip,
            )
            .context("building the IPIP header")?;
            outer.header_checksum = outer.calc_header_checksum();
            let mut out = Vec::new();
            etherparse::Ethernet2Header {
                source: peer_mac,
                destination: nic_mac,
                ether_type: etherparse::EtherType::IPV4,
            }
            .write(&mut out)
            .context("building the IPIP packet")?;
            outer.write(&mut out).context("building the IPIP packet")?;
            out.extend_from_slice(ip);
            Ok(out)
        }
        _ => build(peer_mac, nic_mac, src, dst, proto, dport, 63),
    }
}

/// The report for a terminal.
pub fn format_text(r: &Report) -> String {
    let mut out = format!(
        "trace {} {} -> {}{}\n",
        r.protocol,
        r.src,
        r.dst,
        r.dport.map(|p| format!(" port {p}")).unwrap_or_default()
    );
    for (i, s) in r.steps.iter().enumerate() {
        out += &format!(
            "\n[{}] {} on {}{}\n",
            i + 1,
            s.hook,
            s.interface,
            s.node.map(|n| format!(", node {n}")).unwrap_or_default()
        );
        for l in &s.lookups {
            out += &format!("    lookup   {l}\n");
        }
        for l in &s.state {
            out += &format!("    would    {l}\n");
        }
        if !s.counters.is_empty() {
            let c: Vec<_> = s
                .counters
                .iter()
                .map(|(k, v)| format!("{k} +{v}"))
                .collect();
            out += &format!("    counters {}\n", c.join(", "));
        }
        out += &format!("    verdict  {}: {}\n", s.verdict, s.action);
        if let Some(l) = &s.leaves {
            out += &format!("    leaves   {} bytes: {}\n", l.len, l.summary);
            for line in l.hex.lines() {
                out += &format!("             {line}\n");
            }
        }
    }
    if let Some(n) = &r.note {
        out += &format!("\n{n}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_three_protocols_and_names_pods() {
        let src = Ipv4Addr::new(10, 0, 1, 2);
        let dst = Ipv4Addr::new(10, 0, 2, 3);
        for (proto, name) in [
            (Proto::Tcp, "tcp"),
            (Proto::Udp, "udp"),
            (Proto::Icmp, "icmp"),
        ] {
            let f = build([2; 6], [4; 6], src, dst, proto, 8080, 64).unwrap();
            let p = parse(&f, 8472).flow.unwrap();
            assert_eq!((p.src, p.dst, p.protocol.as_str()), (src, dst, name));
            if proto != Proto::Icmp {
                assert_eq!(p.dport, Some(8080));
            }
            assert_eq!(inner_ttl(&f, 8472), Some(64));
        }
        let mut names = Names::default();
        names.pods.insert(src, "default/client".into());
        assert_eq!(resolve(&names, "client").unwrap(), src);
        assert_eq!(resolve(&names, "default/client").unwrap(), src);
        assert_eq!(resolve(&names, "10.0.2.3").unwrap(), dst);
        assert!(resolve(&names, "server").is_err());
        assert!(Proto::parse("sctp").is_err());
    }
}

//! tc ingress on `weft_net`, the peer of the node's `weft_host` veth: what the node's stack
//! sends to pods on other nodes. The agent routes the cluster network through `weft_host`;
//! here it is encapsulated or routed like pod traffic, as Cilium does with
//! `cilium_host`/`cilium_net`.
//!
//! Only the node's own traffic (its address, also what it masqueraded) and pod traffic the
//! stack carried (a Service's DNAT to a remote backend, a flow the fast path handed over) may
//! pass: anything else would relay a packet from outside into the overlay with a source the
//! peers trust. Pod flows carried here are recorded as stack flows, so their replies go back
//! through the stack that translated them.
//!
//! Only the cluster network is routed into `weft_host`, so a packet here whose destination
//! neither a local pod nor another node's subnet holds (an unassigned subnet, an address of this
//! node's subnet without a pod) would come straight back: the stack routes it into `weft_host`
//! again, until its TTL runs out. It is answered with ICMP host unreachable instead, as a router
//! answers for a route of type `unreachable` (`ping` says "Destination Host Unreachable",
//! `connect` fails at once with EHOSTUNREACH), and counted as dropped.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use weft_common::{DropReason, Stat, monitor::Hook};

use crate::{
    conntrack,
    counters::count_drop,
    forward::{self, Dest},
    icmp, monitor,
    parse::{ETH_HLEN, EthHdr, HEADERS_LEN, Ipv4Hdr, L3, parse_ipv4},
    policy, route,
};

#[classifier]
pub fn from_host(ctx: TcContext) -> i32 {
    match try_from_host(&ctx) {
        Ok(verdict) => {
            monitor::forwarded(&ctx, Hook::FromHost, verdict as u32);
            verdict
        }
        Err(reason) => {
            count_drop(&ctx, Hook::FromHost, reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_from_host(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(cfg) = route::config() else {
        return Ok(TC_ACT_OK);
    };
    let frame_len = ctx.len() as usize;
    if ctx.data() + HEADERS_LEN > ctx.data_end() && frame_len > ETH_HLEN {
        let want = core::cmp::min(frame_len, HEADERS_LEN) as u32;
        let _ = ctx.pull_data(want);
    }
    let frame = match parse_ipv4(ctx.data(), ctx.data_end(), frame_len) {
        L3::Other => return Ok(TC_ACT_OK),
        L3::Malformed => return Err(DropReason::MalformedIpv4),
        L3::Ipv4(frame) => frame,
    };
    let (eth, ip): (&mut EthHdr, &mut Ipv4Hdr) = unsafe { (&mut *frame.eth, &mut *frame.ip) };
    let from_pod = if ip.saddr == cfg.node_ip {
        false
    } else if route::endpoint(ip.saddr).is_some() {
        true
    } else {
        return Err(DropReason::HostForeignSource);
    };
    match forward::dest(ip.daddr) {
        Dest::Local(ep) => {
            // Into a pod past `to_pod`: its ingress is judged here.
            let track =
                conntrack::track(ctx.data(), ctx.data_end(), ip, ETH_HLEN + ip.header_len());
            conntrack::record_stack(&track, &policy::Check::of(ip))?;
            Ok(forward::deliver_to_pod(eth, ip, ep, Stat::LocalDelivered))
        }
        Dest::Remote(route) => {
            if from_pod {
                // A pod's flow the stack carried (a Service translated toward a remote
                // backend): its egress is judged here, by the backend.
                let track =
                    conntrack::track(ctx.data(), ctx.data_end(), ip, ETH_HLEN + ip.header_len());
                conntrack::record_stack(&track, &policy::Check::of(ip))?;
            }
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            // A too-big packet is answered as if by the destination: an address of this node
            // would be refused as a martian source on weft_host.
            let daddr = ip.daddr;
            forward::to_remote(ctx, cfg, ip, route, daddr, ifindex)
        }
        Dest::Other => {
            count_drop(ctx, Hook::FromHost, DropReason::NoPodRoute);
            if !icmp::may_answer(ctx.data(), ctx.data_end(), ip) {
                return Ok(TC_ACT_SHOT);
            }
            let (daddr, ifindex) = (ip.daddr, unsafe { (*ctx.skb.skb).ifindex });
            // From the unreachable address itself: an address of this node would be refused
            // as a martian source on weft_host.
            match icmp::host_unreachable(ctx, daddr, ifindex) {
                Ok(verdict) => Ok(verdict),
                // Counted once already; the packet goes either way.
                Err(_) => Ok(TC_ACT_SHOT),
            }
        }
    }
}

//! ARP from pods. A pod reaches everything through its gateway 169.254.1.1, a permanent
//! neighbour entry, so it has no reason to ARP; if it does anyway (the entry was removed), the
//! request for the gateway is answered here with the host side's MAC. A reply about the pod
//! itself (the node resolving the pod's address, should its permanent entry be gone) goes to
//! the stack. Anything else (requests for other addresses, gratuitous ARP, or anything carrying
//! another address or MAC than the pod's) is dropped: a pod cannot plant neighbour entries in
//! the node for addresses it does not own.
use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_redirect, programs::TcContext};
use weft_common::{DropReason, POD_GATEWAY, Stat};

use crate::{
    counters::count,
    forward::mac_eq,
    parse::{ARP_REPLY, ARP_REQUEST, ArpHdr, ETH_HLEN, ETH_P_IPV4, EthHdr, ptr_at, put},
    route,
};

#[inline(always)]
fn addr_eq(a: [u8; 4], b: [u8; 4]) -> bool {
    u32::from_ne_bytes(a) == u32::from_ne_bytes(b)
}

/// Answers a pod's ARP request for its gateway in place and sends it back to the pod.
#[inline(always)]
pub fn answer_gateway(ctx: &TcContext) -> Result<i32, DropReason> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(data, data_end, 0).ok_or(DropReason::MalformedArp)?;
    let arp = ptr_at::<ArpHdr>(data, data_end, ETH_HLEN).ok_or(DropReason::MalformedArp)?;
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };
    if u16::from_be_bytes(arp.htype) != 1
        || u16::from_be_bytes(arp.ptype) != ETH_P_IPV4
        || arp.hlen != 6
        || arp.plen != 4
    {
        return Err(DropReason::MalformedArp);
    }
    // The sender must be the pod behind this veth, with its own MAC on the frame and in the
    // packet.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(pod) = route::endpoint(arp.spa) else {
        return Err(DropReason::ArpSpoofed);
    };
    if pod.host_ifindex != ifindex
        || !mac_eq(&arp.sha, &pod.pod_mac)
        || !mac_eq(&eth.src, &pod.pod_mac)
    {
        return Err(DropReason::ArpSpoofed);
    }
    let oper = u16::from_be_bytes(arp.oper);
    if oper == ARP_REPLY {
        return Ok(TC_ACT_OK);
    }
    if oper != ARP_REQUEST || !addr_eq(arp.tpa, POD_GATEWAY) {
        return Err(DropReason::ArpNotGateway);
    }
    arp.oper = ARP_REPLY.to_be_bytes();
    put(&mut arp.tha, pod.pod_mac);
    arp.tpa = arp.spa;
    put(&mut arp.sha, pod.host_mac);
    arp.spa = POD_GATEWAY;
    put(&mut eth.dst, pod.pod_mac);
    put(&mut eth.src, pod.host_mac);
    count(Stat::ArpReplied);
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

//! weft's kernel-side datapath. One module per attach point (`from_pod`, `to_pod`,
//! `from_host`, `xdp_underlay`, `from_underlay`, `from_vxlan`), one per concern (parsing,
//! checksums, encapsulation, decapsulation, routing, conntrack, NetworkPolicy, path MTU, ICMP,
//! ARP, counters), as Cilium's `bpf/` tree is laid out.
#![no_std]
#![no_main]

mod arp;
mod checksum;
mod conntrack;
mod counters;
mod decap;
mod encap;
mod flows;
mod forward;
mod icmp;
mod maps;
mod monitor;
mod mtu;
mod parse;
mod policy;
mod route;

mod from_host;
mod from_pod;
mod from_underlay;
mod from_vxlan;
mod to_pod;
mod xdp_underlay;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

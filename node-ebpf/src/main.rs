//! weft's kernel-side datapath. One module per attach point (`from_pod`, `xdp_underlay`,
//! `from_underlay`), one per concern (parsing, checksums, encapsulation, decapsulation, routing,
//! counters), as Cilium's `bpf/` tree is laid out.
#![no_std]
#![no_main]

mod checksum;
mod counters;
mod decap;
mod encap;
mod forward;
mod maps;
mod parse;
mod route;

mod from_host;
mod from_pod;
mod from_underlay;
mod xdp_underlay;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

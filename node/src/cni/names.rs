//! Names and MAC addresses derived from an attachment (container id, interface name): stable
//! across repeated calls, so DEL, CHECK and GC find what ADD created without any state.
use std::net::Ipv4Addr;

/// Calico's pod gateway: link-local, the same in every pod; a permanent neighbour entry maps it
/// to the host side of the pod's veth, so pods never ARP for it.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Prefix of host-side veth names; GC treats every link with it as weft's.
pub const HOST_IF_PREFIX: &str = "wft";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentNames {
    /// Host side of the veth: `wft` + 11 hex digits (15 bytes, the kernel's limit).
    pub host_ifname: String,
    /// MAC of the pod's interface: locally administered, unicast.
    pub pod_mac: [u8; 6],
    /// MAC of the host side (the pod's gateway MAC).
    pub host_mac: [u8; 6],
}

impl AttachmentNames {
    pub fn of(container_id: &str, ifname: &str) -> Self {
        let h = fnv1a(&[container_id.as_bytes(), b"\0", ifname.as_bytes()]);
        let host_ifname = format!("{HOST_IF_PREFIX}{:011x}", h >> 20);
        let m = fnv1a(&[b"mac\0", container_id.as_bytes(), b"\0", ifname.as_bytes()]).to_be_bytes();
        // 0x0a / 0x0e: locally administered (bit 1), unicast (bit 0 clear); the two sides
        // differ in their first byte.
        let pod_mac = [0x0a, m[0], m[1], m[2], m[3], m[4]];
        let host_mac = [0x0e, m[0], m[1], m[2], m[3], m[4]];
        Self {
            host_ifname,
            pod_mac,
            host_mac,
        }
    }
}

/// 64-bit FNV-1a: tiny, stable across Rust releases (unlike `DefaultHasher`).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_distinct_and_valid() {
        let a = AttachmentNames::of("abc", "eth0");
        assert_eq!(a, AttachmentNames::of("abc", "eth0"));
        assert_ne!(
            a.host_ifname,
            AttachmentNames::of("abc", "eth1").host_ifname
        );
        assert_ne!(
            a.host_ifname,
            AttachmentNames::of("abd", "eth0").host_ifname
        );
        assert_eq!(a.host_ifname.len(), 14);
        assert!(a.host_ifname.starts_with("wft"));
        assert_eq!(a.pod_mac[0] & 0x03, 0x02);
        assert_eq!(a.host_mac[0] & 0x03, 0x02);
        assert_ne!(a.pod_mac, a.host_mac);
    }
}

//! Header layouts and bounds-checked access to packet memory, shared by tc and XDP.
//!
//! Headers are byte arrays (no alignment assumptions, no endianness surprises): fields are read
//! with the accessors below, in network order.

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const VXLAN_HLEN: usize = 8;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// 802.1Q and 802.1ad VLAN tags.
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const ICMP_HLEN: usize = 8;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// Code of a destination unreachable: no route to the host.
pub const ICMP_HOST_UNREACH: u8 = 1;
/// Enough linear bytes for every header the programs read: Ethernet, IPv4 with options, and
/// an L4 header (TCP without options, or ICMP with the start of a quoted IPv4 header).
pub const HEADERS_LEN: usize = ETH_HLEN + 60 + 20;
/// Everything that precedes the inner Ethernet header of an option-less VXLAN packet.
pub const VXLAN_ENCAP_LEN: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
/// VXLAN flags byte: the VNI is valid (RFC 7348 "I" flag).
pub const VXLAN_FLAG_VNI: u8 = 0x08;
/// IPv4 flags/fragment-offset bits that mark a fragment (MF and the offset).
pub const IPV4_FRAG_MASK: u16 = 0x3fff;
pub const IPV4_DF: u16 = 0x4000;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: [u8; 2],
}

impl EthHdr {
    #[inline(always)]
    pub fn ethertype(&self) -> u16 {
        u16::from_be_bytes(self.ethertype)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

impl Ipv4Hdr {
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.version_ihl >> 4
    }
    /// Header length in bytes.
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        ((self.version_ihl & 0x0f) as usize) * 4
    }
    #[inline(always)]
    pub fn tot_len(&self) -> usize {
        u16::from_be_bytes(self.tot_len) as usize
    }
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        u16::from_be_bytes(self.frag_off) & IPV4_FRAG_MASK != 0
    }
    /// Drops the TTL by one and patches the checksum incrementally.
    #[inline(always)]
    pub fn decrement_ttl(&mut self) {
        self.ttl -= 1;
        let check = crate::checksum::ttl_decrement(u16::from_ne_bytes(self.check));
        self.check = check.to_ne_bytes();
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanHdr {
    pub flags: u8,
    pub reserved1: [u8; 3],
    /// 24-bit VNI followed by a reserved byte.
    pub vni_reserved: [u8; 4],
}

impl VxlanHdr {
    #[inline(always)]
    pub fn vni(&self) -> u32 {
        u32::from_be_bytes(self.vni_reserved) >> 8
    }
}

/// An ICMP header (RFC 792): type, code, checksum, then four bytes whose meaning depends on the
/// type (echo: identifier and sequence; fragmentation-needed: unused and next-hop MTU).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub rest: [u8; 4],
}

/// An Ethernet/IPv4 ARP packet (RFC 826).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ArpHdr {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub oper: [u8; 2],
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

/// Stores `src` into `dst` byte by byte. A plain array assignment of a MAC address (or a few
/// zero bytes) between byte-aligned structs becomes a BPF-to-BPF call to a `memmove` or
/// `memset` subprogram, a call and a byte loop per copy on the hot paths; volatile byte stores
/// stay inline and cannot be merged back into such a call.
#[inline(always)]
pub fn put<const N: usize>(dst: &mut [u8; N], src: [u8; N]) {
    let d = dst.as_mut_ptr();
    let mut i = 0;
    while i < N {
        unsafe { core::ptr::write_volatile(d.add(i), src[i]) };
        i += 1;
    }
}

/// A bounds-checked pointer to a `T` at `offset` bytes into the packet `[data, data_end)`.
/// The shape (`start + offset + size > end`) is the one the verifier understands.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*mut T> {
    if data + offset + core::mem::size_of::<T>() > data_end {
        return None;
    }
    Some((data + offset) as *mut T)
}

/// What a frame's first headers say, for the checks every entry point makes first.
pub struct Ipv4Frame {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
}

/// Outcome of looking at a frame as Ethernet/IPv4.
pub enum L3 {
    /// Not IPv4 (ARP, IPv6, VLAN-tagged, ...): not ours, pass untouched.
    Other,
    /// Ethertype IPv4 but the header is truncated or invalid.
    Malformed,
    Ipv4(Ipv4Frame),
}

/// Parses Ethernet and the fixed IPv4 header and validates version, IHL and total length
/// against the frame (`frame_len` is the whole frame as the context reports it).
#[inline(always)]
pub fn parse_ipv4(data: usize, data_end: usize, frame_len: usize) -> L3 {
    let Some(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return L3::Other;
    };
    if unsafe { (*eth).ethertype() } != ETH_P_IPV4 {
        return L3::Other;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, ETH_HLEN) else {
        return L3::Malformed;
    };
    let hdr = unsafe { &*ip };
    let ihl = hdr.header_len();
    if hdr.version() != 4 || ihl < IPV4_HLEN {
        return L3::Malformed;
    }
    let tot_len = hdr.tot_len();
    if tot_len < ihl || ETH_HLEN + tot_len > frame_len {
        return L3::Malformed;
    }
    L3::Ipv4(Ipv4Frame { eth, ip })
}

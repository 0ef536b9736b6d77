//! Frames for packet-injection tests, built with etherparse, and the expected results of the
//! datapath's rewrites computed independently of the datapath's own code.
use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, IpDscp, IpNumber, Ipv4Header,
    PacketBuilder, TcpHeader, UdpHeader, icmpv4::DestUnreachableHeader,
};

pub const ETH_P_IPV4: u16 = 0x0800;

/// An Ethernet/IPv4/TCP SYN frame with `payload` (the first packet of a flow, which the fast
/// path carries and tracks).
pub fn tcp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240)
        .syn();
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut out, payload)
        .expect("building a TCP frame");
    out
}

/// An Ethernet/IPv4/UDP frame with `payload`.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut out, payload)
        .expect("building a UDP frame");
    out
}

/// An Ethernet frame of `ethertype` carrying `payload` verbatim.
pub fn raw_frame(src_mac: [u8; 6], dst_mac: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Ethernet2Header {
        source: src_mac,
        destination: dst_mac,
        ether_type: EtherType(ethertype),
    }
    .to_bytes()
    .to_vec();
    out.extend_from_slice(payload);
    out
}

/// An Ethernet frame whose IPv4 header is `ip` (options included) followed by `l4`.
pub fn ipv4_frame(src_mac: [u8; 6], dst_mac: [u8; 6], ip: &Ipv4Header, l4: &[u8]) -> Vec<u8> {
    let mut ip = ip.clone();
    ip.set_payload_len(l4.len()).expect("payload length");
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = raw_frame(src_mac, dst_mac, ETH_P_IPV4, &[]);
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(l4);
    out
}

/// The IPv4 packet of `frame` (after the Ethernet header) with its TTL dropped by one and the
/// header checksum recomputed from scratch: what a router's forwarding yields.
pub fn forwarded_ip(frame: &[u8]) -> Vec<u8> {
    let (mut ip, rest) = Ipv4Header::from_slice(&frame[14..]).expect("frame has an IPv4 header");
    ip.time_to_live -= 1;
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = ip.to_bytes().to_vec();
    out.extend_from_slice(rest);
    out
}

/// The outer IPv4 header weft writes: no options, DF, id 0, TTL 64.
pub fn outer_ipv4(protocol: u8, src: [u8; 4], dst: [u8; 4], payload_len: usize) -> Vec<u8> {
    let mut ip = Ipv4Header::new(payload_len as u16, 64, IpNumber(protocol), src, dst)
        .expect("outer header");
    ip.dont_fragment = true;
    ip.identification = 0;
    ip.header_checksum = ip.calc_header_checksum();
    ip.to_bytes().to_vec()
}

/// The 8-byte VXLAN header for `vni` with the I flag.
pub fn vxlan_header(vni: u32) -> [u8; 8] {
    let v = (vni << 8).to_be_bytes();
    [0x08, 0, 0, 0, v[0], v[1], v[2], v[3]]
}

/// A VXLAN packet on the wire: outer Ethernet/IPv4/UDP(sport → dport, checksum 0)/VXLAN around
/// `inner` (a whole Ethernet frame).
pub fn vxlan_frame(outer: &Outer, sport: u16, dport: u16, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut udp_payload = vxlan_header(vni).to_vec();
    udp_payload.extend_from_slice(inner);
    let udp = UdpHeader {
        source_port: sport,
        destination_port: dport,
        length: (8 + udp_payload.len()) as u16,
        checksum: 0,
    };
    let mut l4 = udp.to_bytes().to_vec();
    l4.extend_from_slice(&udp_payload);
    let mut out = raw_frame(outer.src_mac, outer.dst_mac, ETH_P_IPV4, &[]);
    out.extend_from_slice(&outer_ipv4(17, outer.src, outer.dst, l4.len()));
    out.extend_from_slice(&l4);
    out
}

/// Outer Ethernet and IPv4 addresses of a tunnel packet.
pub struct Outer {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// An IPIP packet on the wire: outer Ethernet/IPv4 (protocol 4) around the IPv4 packet of
/// `inner` (an Ethernet frame whose header is dropped).
pub fn ipip_frame(
    outer_src_mac: [u8; 6],
    outer_dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    inner: &[u8],
) -> Vec<u8> {
    let inner_ip = &inner[14..];
    let mut out = raw_frame(outer_src_mac, outer_dst_mac, ETH_P_IPV4, &[]);
    out.extend_from_slice(&outer_ipv4(4, src, dst, inner_ip.len()));
    out.extend_from_slice(inner_ip);
    out
}

/// A TCP SYN header as bytes, for hand-assembled frames.
pub fn tcp_header_bytes(sport: u16, dport: u16) -> Vec<u8> {
    let mut tcp = TcpHeader::new(sport, dport, 1, 64240);
    tcp.syn = true;
    tcp.to_bytes().to_vec()
}

/// The ICMP fragmentation-needed a router at `source` answers the IPv4 packet of `frame` with:
/// Ethernet addresses `dst_mac`/`src_mac`, next-hop MTU `mtu`, quoting the packet's header
/// and the first 64 bytes of its payload. TOS 0xc0 and TTL 64 as Linux's `icmp_send`.
pub fn frag_needed_frame(
    frame: &[u8],
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    source: [u8; 4],
    mtu: u16,
) -> Vec<u8> {
    dest_unreachable_frame(
        frame,
        src_mac,
        dst_mac,
        source,
        DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
    )
}

/// The ICMP destination unreachable (`kind`) from `source` about the IPv4 packet of `frame`,
/// as Linux's `icmp_send` builds it (TOS 0xc0, TTL 64, the packet's header and the first 64
/// bytes of its payload quoted), between `src_mac` and `dst_mac`.
pub fn dest_unreachable_frame(
    frame: &[u8],
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    source: [u8; 4],
    kind: DestUnreachableHeader,
) -> Vec<u8> {
    let (orig, _) = Ipv4Header::from_slice(&frame[14..]).expect("an IPv4 frame");
    let quote_len = (orig.header_len() + 64).min(orig.total_len as usize);
    let quote = &frame[14..14 + quote_len];
    let icmp = Icmpv4Header::with_checksum(Icmpv4Type::DestinationUnreachable(kind), quote);
    let mut ip = Ipv4Header::new(
        (icmp.header_len() + quote.len()) as u16,
        64,
        IpNumber::ICMP,
        source,
        orig.source,
    )
    .expect("header");
    ip.dont_fragment = false;
    ip.identification = 0;
    ip.dscp = IpDscp::try_new(0x30).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = raw_frame(src_mac, dst_mac, ETH_P_IPV4, &[]);
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&icmp.to_bytes());
    out.extend_from_slice(quote);
    out
}

/// An Ethernet/IPv4 ARP packet.
#[allow(clippy::too_many_arguments)]
pub fn arp_frame(
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    oper: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
) -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0x00, 6, 4];
    arp.extend_from_slice(&oper.to_be_bytes());
    arp.extend_from_slice(&sha);
    arp.extend_from_slice(&spa);
    arp.extend_from_slice(&tha);
    arp.extend_from_slice(&tpa);
    raw_frame(eth_src, eth_dst, 0x0806, &arp)
}

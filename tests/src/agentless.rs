//! A weft node configured by hand (no agent, no CNI plugin): the datapath loaded with its pins,
//! the node config written, programs attached, and pods wired as the CNI plugin wires them.
//! Used by the interop tests, which check the datapath against the kernel's own tunnels.
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use weft_agent::datapath::{Datapath, Maps, XdpSetting};
use weft_common::{
    CONFIG_F_READY, CONFIG_F_VXLAN_DEV, DecapHook, EndpointInfo, NodeConfig, NodeInfo, RouteInfo,
    RouteMode,
};

use crate::{
    netns::{Netns, format_mac},
    pins::PinDir,
};

/// Gateway address every weft pod routes through (a static neighbour entry: no ARP).
pub const POD_GATEWAY: &str = "169.254.1.1";

pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
}

pub struct WeftNode {
    pub ns: Netns,
    pub pins: PinDir,
    pub ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
    pub underlay: String,
    /// Where tunnel packets are decapsulated, as `attach_underlay` chose.
    pub decap: DecapHook,
    /// Whether VXLAN goes through `weft_vxlan` (the tc hook, as the agent sets it up).
    pub vxlan_device: bool,
}

impl WeftNode {
    /// Loads the datapath (pinned under a fresh pin dir) in `ns`, configures it for the node
    /// address `ip` on `underlay` and attaches the underlay programs; with the tc hook, VXLAN
    /// goes through `weft_vxlan`, as the agent sets it up.
    pub fn new(
        ns: Netns,
        ip: Ipv4Addr,
        underlay: &str,
        vtep_mac: [u8; 6],
        xdp: XdpSetting,
    ) -> Self {
        Self::with_vxlan_device(ns, ip, underlay, vtep_mac, xdp, true)
    }

    /// `new`, choosing whether the tc hook sends VXLAN through `weft_vxlan` (`false`:
    /// `from_underlay` decapsulates VXLAN itself, the fallback where the device cannot be made).
    pub fn with_vxlan_device(
        ns: Netns,
        ip: Ipv4Addr,
        underlay: &str,
        vtep_mac: [u8; 6],
        xdp: XdpSetting,
        vxlan_device: bool,
    ) -> Self {
        let pins = PinDir::new("node");
        ns.sysctl("net.ipv4.ip_forward", "1");
        // Pod traffic to this node arrives on the underlay while replies leave via weft_host.
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0");
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0");
        let underlay_ifindex = ns.ifindex(underlay);
        // The node's own traffic to remote pods enters the datapath through weft_host.
        ns.ip(&format!(
            "link add {} type veth peer name {}",
            weft_common::HOST_DEV,
            weft_common::HOST_PEER_DEV
        ));
        // Room for the largest encapsulation, as for pods: node traffic is tunnelled too.
        ns.ip(&format!(
            "link set {} mtu 1450 arp off up",
            weft_common::HOST_DEV
        ));
        ns.ip(&format!("link set {} up", weft_common::HOST_PEER_DEV));
        let root = pins.path.clone();
        let dev = underlay.to_string();
        let decap = ns.run(move || {
            let mut dp = Datapath::load_pinned(&root).expect("loading the pinned datapath");
            dp.pin_programs().expect("pinning programs");
            let mut config = NodeConfig {
                node_ip: ip.octets(),
                underlay_ifindex,
                vni: weft_common::VXLAN_VNI_DEFAULT,
                vxlan_port: weft_common::VXLAN_PORT_DEFAULT,
                flags: CONFIG_F_READY,
                vtep_mac,
                _pad: [0; 2],
                bgp_table: weft_common::BGP_TABLE_DEFAULT,
            };
            dp.maps.set_config(&config).expect("writing the config");
            dp.maps
                .put_policy_ns_default("", Some(weft_common::policy::POLICY_NS_F_SYNCED))
                .expect("marking the policy maps synced");
            // As the agent does: the hook `xdp` picks, recorded in the config.
            let decap = dp
                .attach_underlay(&dev, xdp)
                .expect("attaching underlay programs");
            config.flags |= decap.flags();
            let device = vxlan_device && decap.hook() == "tc";
            if device {
                let nl = weft_agent::netlink::BlockingNetlink::open().expect("netlink");
                weft_agent::node_net::VxlanDevice {
                    port: config.vxlan_port,
                    mtu: 1450,
                    mac: vtep_mac,
                    address: ip,
                }
                .ensure(&nl, &root)
                .expect("setting up weft_vxlan");
                config.flags |= CONFIG_F_VXLAN_DEV;
            }
            dp.maps.set_config(&config).expect("writing the config");
            dp.attach_from_host(weft_common::HOST_PEER_DEV)
                .expect("attaching from_host");
            (decap, device)
        });
        let (decap, vxlan_device) = decap;
        Self {
            ns,
            pins,
            ip,
            vtep_mac,
            underlay: underlay.to_string(),
            decap,
            vxlan_device,
        }
    }

    /// Routes the cluster network through `weft_host` (local pods have /32 routes, which win).
    pub fn route_cluster_network(&self, network: Ipv4Net) {
        self.ns.ip(&format!(
            "route replace {network} dev {} src {}",
            weft_common::HOST_DEV,
            self.ip
        ));
    }

    pub fn maps(&self) -> Maps {
        Maps::open_pinned(&self.pins.path).expect("opening the node's pinned maps")
    }

    /// Creates a pod namespace wired as the CNI plugin wires it: a veth whose host side carries
    /// `from_pod`, the pod address as /32, the gateway as a static neighbour, a host route.
    pub fn add_pod(&self, ip: Ipv4Addr, mtu: u32) -> Pod {
        self.add_pod_with_route_mtu(ip, mtu, None)
    }

    /// `add_pod`, the pod's default route with the MTU `route_mtu` if given (what the CNI
    /// plugin gives pods when the node's path MTU is below their interface's).
    pub fn add_pod_with_route_mtu(&self, ip: Ipv4Addr, mtu: u32, route_mtu: Option<u32>) -> Pod {
        let ns = Netns::new("wpod");
        let host_ifname = crate::netns::unique_name("wh");
        self.ns.ip(&format!(
            "link add {host_ifname} mtu {mtu} type veth peer name eth0 netns {}",
            ns.name
        ));
        self.ns.ip(&format!("link set {host_ifname} up"));
        // As the CNI plugin does: an IPv4 pod sends no IPv6.
        ns.sysctl("net.ipv6.conf.eth0.disable_ipv6", "1");
        ns.ip(&format!("link set eth0 mtu {mtu} up"));
        ns.ip(&format!("addr add {ip}/32 dev eth0"));
        let host_mac = self.ns.mac(&host_ifname);
        ns.ip(&format!(
            "neigh replace {POD_GATEWAY} lladdr {} dev eth0 nud permanent",
            format_mac(&host_mac)
        ));
        let route_mtu = route_mtu.map(|m| format!(" mtu {m}")).unwrap_or_default();
        ns.ip(&format!(
            "route add default via {POD_GATEWAY} dev eth0 onlink{route_mtu}"
        ));
        self.ns
            .ip(&format!("route add {ip}/32 dev {host_ifname} scope link"));
        let pod_mac = ns.mac("eth0");
        // As the CNI plugin does: the node never needs to ARP for its pods.
        self.ns.ip(&format!(
            "neigh replace {ip} lladdr {} dev {host_ifname} nud permanent",
            format_mac(&pod_mac)
        ));
        let host_ifindex = self.ns.ifindex(&host_ifname);
        self.maps()
            .upsert_endpoint(
                ip,
                &EndpointInfo {
                    host_ifindex,
                    pod_mac,
                    host_mac,
                    flags: 0,
                },
            )
            .expect("registering the endpoint");
        // As an agent with no policy does: the pod is not isolated.
        self.maps()
            .put_policy_endpoint(ip, Some(&weft_common::policy::PolicyEndpoint::OPEN))
            .expect("writing the pod's policy state");
        let root = self.pins.path.clone();
        let dev = host_ifname.clone();
        self.ns.run(move || {
            weft_agent::datapath::attach_pinned_pod(
                &root,
                &dev,
                weft_agent::datapath::PodHook::Clsact,
            )
            .expect("attaching the pod programs")
        });
        Pod {
            ns,
            ip,
            host_ifname,
        }
    }

    /// Routes `cidr` to the node at `node_ip` (a known tunnel peer from now on).
    pub fn add_peer(&self, cidr: Ipv4Net, node_ip: Ipv4Addr, vtep_mac: [u8; 6], mode: RouteMode) {
        let mut maps = self.maps();
        maps.upsert_node(
            node_ip,
            &NodeInfo {
                vtep_mac,
                mode: mode as u8,
                _pad: 0,
            },
        )
        .expect("adding the peer node");
        maps.upsert_route(
            cidr,
            &RouteInfo {
                node_ip: node_ip.octets(),
                vtep_mac,
                mode: mode as u8,
                _pad: 0,
            },
        )
        .expect("adding the route");
    }

    pub fn drops_total(&self) -> u64 {
        self.maps()
            .drops()
            .expect("reading drops")
            .iter()
            .map(|(_, n)| n)
            .sum()
    }
}

/// Configures `ns` as flannel's vxlan backend configures a node: kernel VXLAN device
/// `flannel.1` (VNI 1, port 8472, no learning) and the `cni0` bridge with one pod behind it.
pub struct FlannelNode {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
    pub subnet: Ipv4Net,
    pub pod: Pod,
}

impl FlannelNode {
    pub fn new(ns: Netns, ip: Ipv4Addr, underlay: &str, subnet: Ipv4Net, mtu: u32) -> Self {
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.ip(&format!(
            "link add flannel.1 type vxlan id 1 local {ip} dev {underlay} dstport 8472 nolearning"
        ));
        ns.ip(&format!("link set flannel.1 mtu {mtu} up"));
        ns.ip(&format!("addr add {}/32 dev flannel.1", subnet.network()));
        let vtep_mac = ns.mac("flannel.1");
        let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        ns.ip("link add cni0 type bridge");
        ns.ip(&format!("addr add {gw}/{} dev cni0", subnet.prefix_len()));
        ns.ip(&format!("link set cni0 mtu {mtu} up"));
        let pod_ns = Netns::new("fpod");
        let host_ifname = crate::netns::unique_name("fv");
        let pod_ip = Ipv4Addr::from(u32::from(subnet.network()) + 2);
        ns.ip(&format!(
            "link add {host_ifname} mtu {mtu} type veth peer name eth0 netns {}",
            pod_ns.name
        ));
        ns.ip(&format!("link set {host_ifname} master cni0 up"));
        pod_ns.ip(&format!("link set eth0 mtu {mtu} up"));
        pod_ns.ip(&format!(
            "addr add {pod_ip}/{} dev eth0",
            subnet.prefix_len()
        ));
        pod_ns.ip(&format!("route add default via {gw}"));
        let pod = Pod {
            ns: pod_ns,
            ip: pod_ip,
            host_ifname,
        };
        Self {
            ns,
            ip,
            vtep_mac,
            subnet,
            pod,
        }
    }

    /// What flannel does when it learns a remote node's lease: route, ARP and FDB entries.
    /// Idempotent, and a changed lease (another VTEP MAC) replaces the entries, as flanneld's
    /// watch does.
    pub fn add_peer(&self, subnet: Ipv4Net, node_ip: Ipv4Addr, vtep_mac: [u8; 6]) {
        let mac = format_mac(&vtep_mac);
        let gw = subnet.network();
        self.ns.ip(&format!(
            "neigh replace {gw} lladdr {mac} dev flannel.1 nud permanent"
        ));
        crate::netns::run(
            "bridge",
            &[
                "-n",
                &self.ns.name,
                "fdb",
                "replace",
                &mac,
                "dev",
                "flannel.1",
                "dst",
                &node_ip.to_string(),
            ],
        );
        self.ns.ip(&format!(
            "route replace {subnet} via {gw} dev flannel.1 onlink"
        ));
    }
}

/// Makes a veth underlay carry MTU-sized frames, as a real wire does (see DESIGN.md): no
/// TSO/GSO toward it, GRO on receive.
pub fn mtu_wire(ns: &Netns, dev: &str) {
    ns.exec(
        "ethtool",
        &["-K", dev, "tso", "off", "gso", "off", "gro", "on"],
    );
}

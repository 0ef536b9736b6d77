//! The rules kube-proxy writes for Services, in its two modes, installed in a node's namespace
//! as kube-proxy installs them: `iptables-restore --noflush` of the `filter` and `nat` tables
//! (iptables mode) and `nft -f` of `table ip kube-proxy` (nftables mode).
//!
//! The shapes are kube-proxy's own: chain names, hashes, comments, rule order and matches follow
//! `pkg/proxy/iptables/proxier.go` and `pkg/proxy/nftables/proxier.go` (kubernetes/kubernetes,
//! v1.31-era) and their golden test outputs (`TestOverallIPTablesRules`, `TestNodePort`,
//! `TestExternalTrafficPolicyLocal`, `TestOverallNFTablesRules`). The unit tests below check the
//! chain-name hashes against those goldens, so a Service described here gets byte-identical
//! names to what kube-proxy would write for it.
use std::{fmt::Write as _, net::Ipv4Addr};

use crate::netns::Netns;

/// kube-proxy's default masquerade mark (`--iptables-masquerade-bit 14`).
const MASQ_MARK: &str = "0x4000";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One backend of a Service port (an EndpointSlice endpoint).
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Name of the node the endpoint runs on (for `externalTrafficPolicy: Local`).
    pub node: String,
}

impl Endpoint {
    fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

/// One port of a Service, as kube-proxy sees it (a `ServicePortName` plus its spec).
#[derive(Clone, Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// `type: NodePort` when set.
    pub node_port: Option<u16>,
    /// `externalTrafficPolicy: Local` (otherwise Cluster).
    pub external_local: bool,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    /// `ServicePortName.String()`: `namespace/name:port`.
    fn port_name_string(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }

    fn proto(&self) -> &'static str {
        self.protocol.name()
    }
}

/// The node kube-proxy runs on, and its local-traffic detector (`--cluster-cidr`).
#[derive(Clone, Debug)]
pub struct ProxyNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub cluster_cidr: String,
    /// `--service-cluster-ip-range` (nftables mode drops traffic to unallocated ClusterIPs).
    pub service_cidr: String,
}

/// RFC 4648 base32 (the standard alphabet Go's `base32.StdEncoding` uses), no padding needed
/// for the prefixes taken here.
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u64, 0u32);
    for byte in data {
        buffer = (buffer << 8) | u64::from(*byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn sha256_base32(input: &str) -> String {
    base32(ring::digest::digest(&ring::digest::SHA256, input.as_bytes()).as_ref())
}

/// iptables mode: `portProtoHash(servicePortName, protocol)`.
fn port_proto_hash(svc: &Service) -> String {
    sha256_base32(&format!("{}{}", svc.port_name_string(), svc.proto()))[..16].to_string()
}

pub fn svc_chain(svc: &Service) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(svc))
}

pub fn svl_chain(svc: &Service) -> String {
    format!("KUBE-SVL-{}", port_proto_hash(svc))
}

pub fn ext_chain(svc: &Service) -> String {
    format!("KUBE-EXT-{}", port_proto_hash(svc))
}

/// `servicePortEndpointChainName(servicePortName, protocol, endpoint)`.
pub fn sep_chain(svc: &Service, ep: &Endpoint) -> String {
    let hash = sha256_base32(&format!(
        "{}{}{}",
        svc.port_name_string(),
        svc.proto(),
        ep.addr()
    ));
    format!("KUBE-SEP-{}", &hash[..16])
}

/// nftables mode: `hashAndTruncate(name)`: 8 base32 characters of the name's hash, a dash, the
/// name.
fn hash_and_truncate(name: &str) -> String {
    format!("{}-{name}", &sha256_base32(name)[..8])
}

/// `servicePortChainNameBase`: `HASH-namespace/name/protocol/port`.
pub fn nft_service_base(svc: &Service) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{}/{}",
        svc.namespace,
        svc.name,
        svc.proto(),
        svc.port_name
    ))
}

/// `servicePortEndpointChainNameBase`: `HASH-namespace/name/protocol/port__ip/port`.
pub fn nft_endpoint_base(svc: &Service, ep: &Endpoint) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{}/{}__{}/{}",
        svc.namespace,
        svc.name,
        svc.proto(),
        svc.port_name,
        ep.ip,
        ep.port
    ))
}

/// A comment argument as kube-proxy writes it: quoted when it contains a space.
fn comment(text: &str) -> String {
    if text.contains(' ') {
        format!("\"{text}\"")
    } else {
        text.to_string()
    }
}

/// The jump rules kube-proxy's iptables mode ensures in the built-in chains
/// (`iptablesJumpChains`, each `EnsureRule(Prepend, ...)`), as `iptables` argument lists.
pub fn iptables_jump_rules() -> Vec<Vec<String>> {
    let jumps: [(&str, &str, &str, &str, bool); 12] = [
        (
            "filter",
            "KUBE-EXTERNAL-SERVICES",
            "INPUT",
            "kubernetes externally-visible service portals",
            true,
        ),
        (
            "filter",
            "KUBE-EXTERNAL-SERVICES",
            "FORWARD",
            "kubernetes externally-visible service portals",
            true,
        ),
        (
            "filter",
            "KUBE-NODEPORTS",
            "INPUT",
            "kubernetes health check service ports",
            false,
        ),
        (
            "filter",
            "KUBE-SERVICES",
            "FORWARD",
            "kubernetes service portals",
            true,
        ),
        (
            "filter",
            "KUBE-SERVICES",
            "OUTPUT",
            "kubernetes service portals",
            true,
        ),
        (
            "filter",
            "KUBE-FORWARD",
            "FORWARD",
            "kubernetes forwarding rules",
            false,
        ),
        (
            "filter",
            "KUBE-PROXY-FIREWALL",
            "INPUT",
            "kubernetes load balancer firewall",
            true,
        ),
        (
            "filter",
            "KUBE-PROXY-FIREWALL",
            "OUTPUT",
            "kubernetes load balancer firewall",
            true,
        ),
        (
            "filter",
            "KUBE-PROXY-FIREWALL",
            "FORWARD",
            "kubernetes load balancer firewall",
            true,
        ),
        (
            "nat",
            "KUBE-SERVICES",
            "OUTPUT",
            "kubernetes service portals",
            false,
        ),
        (
            "nat",
            "KUBE-SERVICES",
            "PREROUTING",
            "kubernetes service portals",
            false,
        ),
        (
            "nat",
            "KUBE-POSTROUTING",
            "POSTROUTING",
            "kubernetes postrouting rules",
            false,
        ),
    ];
    jumps
        .iter()
        .map(|(table, dst, src, text, new_only)| {
            let mut args: Vec<String> = ["-w", "-t", table, "-I", src]
                .iter()
                .map(|s| s.to_string())
                .collect();
            if *new_only {
                args.extend(["-m", "conntrack", "--ctstate", "NEW"].map(String::from));
            }
            args.extend(["-m", "comment", "--comment", text, "-j", dst].map(String::from));
            args
        })
        .collect()
}

/// The `filter` and `nat` tables as kube-proxy's iptables mode feeds them to
/// `iptables-restore --noflush`.
pub fn iptables_restore(services: &[Service], node: &ProxyNode) -> String {
    let cidr = &node.cluster_cidr;
    let mut filter_rules = String::new();
    let mut nat_chains: Vec<String> = Vec::new();
    let mut nat_rules = String::new();
    let mut nodeport_rules = String::new();
    let mut service_rules = String::new();
    for svc in services {
        let name = svc.port_name_string();
        let proto = svc.proto();
        let svc_chain = svc_chain(svc);
        let ext_chain = ext_chain(svc);
        let svl_chain = svl_chain(svc);
        let local: Vec<&Endpoint> = svc
            .endpoints
            .iter()
            .filter(|e| e.node == node.name)
            .collect();
        nat_chains.push(svc_chain.clone());
        let _ = writeln!(
            service_rules,
            "-A KUBE-SERVICES -m comment --comment {} -m {proto} -p {proto} -d {} --dport {} -j {svc_chain}",
            comment(&format!("{name} cluster IP")),
            svc.cluster_ip,
            svc.port
        );
        if let Some(np) = svc.node_port {
            nat_chains.push(ext_chain.clone());
            let _ = writeln!(
                nodeport_rules,
                "-A KUBE-NODEPORTS -m comment --comment {} -m {proto} -p {proto} --dport {np} -j {ext_chain}",
                comment(&name)
            );
            if svc.external_local {
                let _ = writeln!(
                    nat_rules,
                    "-A {ext_chain} -m comment --comment {} -s {cidr} -j {svc_chain}",
                    comment(&format!("pod traffic for {name} external destinations"))
                );
                let _ = writeln!(
                    nat_rules,
                    "-A {ext_chain} -m comment --comment {} -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
                    comment(&format!(
                        "masquerade LOCAL traffic for {name} external destinations"
                    ))
                );
                let _ = writeln!(
                    nat_rules,
                    "-A {ext_chain} -m comment --comment {} -m addrtype --src-type LOCAL -j {svc_chain}",
                    comment(&format!(
                        "route LOCAL traffic for {name} external destinations"
                    ))
                );
                if local.is_empty() {
                    let _ = writeln!(
                        filter_rules,
                        "-A KUBE-EXTERNAL-SERVICES -m comment --comment {} -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j DROP",
                        comment(&format!("{name} has no local endpoints"))
                    );
                } else {
                    nat_chains.push(svl_chain.clone());
                    let _ = writeln!(nat_rules, "-A {ext_chain} -j {svl_chain}");
                }
            } else {
                let _ = writeln!(
                    nat_rules,
                    "-A {ext_chain} -m comment --comment {} -j KUBE-MARK-MASQ",
                    comment(&format!(
                        "masquerade traffic for {name} external destinations"
                    ))
                );
                let _ = writeln!(nat_rules, "-A {ext_chain} -j {svc_chain}");
            }
        }
        // Endpoint chains.
        for ep in &svc.endpoints {
            let sep = sep_chain(svc, ep);
            nat_chains.push(sep.clone());
            let _ = writeln!(
                nat_rules,
                "-A {sep} -m comment --comment {} -s {} -j KUBE-MARK-MASQ",
                comment(&name),
                ep.ip
            );
            let _ = writeln!(
                nat_rules,
                "-A {sep} -m comment --comment {} -m {proto} -p {proto} -j DNAT --to-destination {}",
                comment(&name),
                ep.addr()
            );
        }
        // The service chain: masquerade off-cluster sources, then statistic-mode balancing.
        let _ = writeln!(
            nat_rules,
            "-A {svc_chain} -m comment --comment {} -m {proto} -p {proto} -d {} --dport {} ! -s {cidr} -j KUBE-MARK-MASQ",
            comment(&format!("{name} cluster IP")),
            svc.cluster_ip,
            svc.port
        );
        write_balancing(&mut nat_rules, svc, &svc_chain, &svc.endpoints);
        if svc.node_port.is_some() && svc.external_local && !local.is_empty() {
            let local: Vec<Endpoint> = local.into_iter().cloned().collect();
            write_balancing(&mut nat_rules, svc, &svl_chain, &local);
        }
    }
    let mut out = String::new();
    out += "*filter\n";
    for chain in [
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FIREWALL",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out += &filter_rules;
    out += "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n";
    out += "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n";
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    );
    out += "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";
    out += "COMMIT\n*nat\n";
    out += ":KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n";
    nat_chains.push("KUBE-MARK-MASQ".into());
    nat_chains.push("KUBE-POSTROUTING".into());
    nat_chains.sort();
    nat_chains.dedup();
    for chain in &nat_chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out += &nodeport_rules;
    out += &service_rules;
    out += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";
    let _ = writeln!(out, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    let _ = writeln!(
        out,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(out, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    out += "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE\n";
    out += &nat_rules;
    out += "COMMIT\n";
    out
}

/// `-A <chain> ... -m statistic --mode random --probability 1/(n-i) -j KUBE-SEP-...`, the last
/// endpoint unconditional.
fn write_balancing(out: &mut String, svc: &Service, chain: &str, endpoints: &[Endpoint]) {
    let name = svc.port_name_string();
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let text = comment(&format!("{name} -> {}", ep.addr()));
        if i + 1 < n {
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment {text} -m statistic --mode random --probability {:.10} -j {}",
                1.0 / (n - i) as f64,
                sep_chain(svc, ep)
            );
        } else {
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment {text} -j {}",
                sep_chain(svc, ep)
            );
        }
    }
}

/// `table ip kube-proxy` as kube-proxy's nftables mode writes it (`setupNFTables` plus the
/// per-service chains and map elements of `syncProxyRules`), for `nft -f`.
pub fn nft_ruleset(services: &[Service], node: &ProxyNode) -> String {
    let t = "ip kube-proxy";
    let cidr = &node.cluster_cidr;
    let mut out = String::new();
    // Replace any previous ruleset atomically, as kube-proxy's first full sync does.
    let _ = writeln!(out, "add table {t}");
    let _ = writeln!(out, "delete table {t}");
    let _ = writeln!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    );
    for (name, kind, hook, priority) in [
        ("filter-prerouting", "filter", "prerouting", -110),
        ("filter-input", "filter", "input", -110),
        ("filter-forward", "filter", "forward", -110),
        ("filter-output", "filter", "output", -110),
        ("filter-output-post-dnat", "filter", "output", -90),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ] {
        let _ = writeln!(
            out,
            "add chain {t} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
        );
    }
    for chain in [
        "nodeport-endpoints-check",
        "service-endpoints-check",
        "firewall-check",
        "services",
        "masquerading",
        "cluster-ips-check",
        "mark-for-masquerade",
    ] {
        let _ = writeln!(out, "add chain {t} {chain}");
    }
    for (dst, src, extra) in [
        ("nodeport-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-forward", "ct state new "),
        ("service-endpoints-check", "filter-output", "ct state new "),
        ("firewall-check", "filter-prerouting", "ct state new "),
        ("firewall-check", "filter-output", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new "),
        (
            "cluster-ips-check",
            "filter-output-post-dnat",
            "ct state new ",
        ),
    ] {
        let _ = writeln!(out, "add rule {t} {src} {extra}jump {dst}");
    }
    let _ = writeln!(
        out,
        "add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}"
    );
    let _ = writeln!(
        out,
        "add rule {t} masquerading mark and {MASQ_MARK} == 0 return"
    );
    let _ = writeln!(
        out,
        "add rule {t} masquerading mark set mark xor {MASQ_MARK}"
    );
    let _ = writeln!(out, "add rule {t} masquerading masquerade fully-random");
    let _ = writeln!(
        out,
        "add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    );
    let _ = writeln!(
        out,
        "add rule {t} cluster-ips-check ip daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
        node.service_cidr
    );
    let _ = writeln!(
        out,
        "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    let _ = writeln!(out, "add element {t} nodeport-ips {{ {} }}", node.ip);
    let _ = writeln!(
        out,
        "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    );
    let _ = writeln!(out, "add rule {t} reject-chain reject");
    let _ = writeln!(
        out,
        "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    );
    let _ = writeln!(
        out,
        "add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
    );
    let _ = writeln!(
        out,
        "add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );
    let _ = writeln!(
        out,
        "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        out,
        "add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
    );

    for svc in services {
        let proto = svc.proto();
        let base = nft_service_base(svc);
        let cluster_chain = format!("service-{base}");
        let local_chain = format!("local-{base}");
        let external_chain = format!("external-{base}");
        let local: Vec<Endpoint> = svc
            .endpoints
            .iter()
            .filter(|e| e.node == node.name)
            .cloned()
            .collect();
        let _ = writeln!(out, "# {}", svc.port_name_string());
        // Every chain first (as `syncProxyRules` ensures them before writing rules): rules jump
        // to endpoint chains written after them.
        for ep in &svc.endpoints {
            let _ = writeln!(out, "add chain {t} endpoint-{}", nft_endpoint_base(svc, ep));
        }
        let _ = writeln!(out, "add chain {t} {cluster_chain}");
        let _ = writeln!(
            out,
            "add rule {t} {cluster_chain} ip daddr {} {proto} dport {} ip saddr != {cidr} jump mark-for-masquerade",
            svc.cluster_ip, svc.port
        );
        nft_balancing(&mut out, t, svc, &cluster_chain, &svc.endpoints);
        if let Some(np) = svc.node_port {
            let _ = writeln!(out, "add chain {t} {external_chain}");
            if svc.external_local {
                let _ = writeln!(
                    out,
                    "add rule {t} {external_chain} ip saddr {cidr} goto {cluster_chain} comment \"short-circuit pod traffic\""
                );
                let _ = writeln!(
                    out,
                    "add rule {t} {external_chain} fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\""
                );
                let _ = writeln!(
                    out,
                    "add rule {t} {external_chain} fib saddr type local goto {cluster_chain} comment \"short-circuit local traffic\""
                );
                if local.is_empty() {
                    let _ = writeln!(
                        out,
                        "add element {t} no-endpoint-nodeports {{ {proto} . {np} comment \"{}\" : drop }}",
                        svc.port_name_string()
                    );
                } else {
                    let _ = writeln!(out, "add chain {t} {local_chain}");
                    nft_balancing(&mut out, t, svc, &local_chain, &local);
                    let _ = writeln!(out, "add rule {t} {external_chain} goto {local_chain}");
                }
            } else {
                let _ = writeln!(
                    out,
                    "add rule {t} {external_chain} jump mark-for-masquerade"
                );
                let _ = writeln!(out, "add rule {t} {external_chain} goto {cluster_chain}");
            }
        }
        for ep in &svc.endpoints {
            let chain = format!("endpoint-{}", nft_endpoint_base(svc, ep));
            let _ = writeln!(
                out,
                "add rule {t} {chain} ip saddr {} jump mark-for-masquerade",
                ep.ip
            );
            let _ = writeln!(
                out,
                "add rule {t} {chain} meta l4proto {proto} dnat to {}",
                ep.addr()
            );
        }
        let _ = writeln!(out, "add element {t} cluster-ips {{ {} }}", svc.cluster_ip);
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {} . {proto} . {} : goto {cluster_chain} }}",
            svc.cluster_ip, svc.port
        );
        if let Some(np) = svc.node_port {
            let _ = writeln!(
                out,
                "add element {t} service-nodeports {{ {proto} . {np} : goto {external_chain} }}"
            );
        }
    }
    out
}

/// `writeServiceToEndpointRules`: `numgen random mod N vmap { 0 : goto endpoint-..., ... }`.
fn nft_balancing(out: &mut String, t: &str, svc: &Service, chain: &str, endpoints: &[Endpoint]) {
    let elements: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto endpoint-{}", nft_endpoint_base(svc, ep)))
        .collect();
    let _ = writeln!(
        out,
        "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
        endpoints.len(),
        elements.join(" , ")
    );
}

fn run_in(ns: &Netns, cmd: &str, args: &[&str], stdin: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, cmd])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} in {} failed: {}\ninput:\n{stdin}",
        ns.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Which of kube-proxy's modes writes the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Nftables,
}

/// Installs the Services' rules in `ns` as kube-proxy in `mode` does, replacing what the other
/// mode left (as kube-proxy's cleanup of the other mode does at start).
pub fn install(ns: &Netns, mode: Mode, services: &[Service], node: &ProxyNode) {
    remove(ns);
    match mode {
        Mode::Iptables => {
            // The chains must exist before the jumps into them (kube-proxy's EnsureChain).
            run_in(
                ns,
                "iptables-restore",
                &["-w", "--noflush"],
                &iptables_restore(services, node),
            );
            for rule in iptables_jump_rules() {
                let args: Vec<&str> = rule.iter().map(String::as_str).collect();
                run_in(ns, "iptables", &args, "");
            }
        }
        Mode::Nftables => run_in(ns, "nft", &["-f", "-"], &nft_ruleset(services, node)),
    }
}

/// Removes both modes' rules (kube-proxy `--cleanup`).
pub fn remove(ns: &Netns) {
    run_in(
        ns,
        "nft",
        &["-f", "-"],
        "add table ip kube-proxy\ndelete table ip kube-proxy\n",
    );
    // iptables: delete the jumps, then flush and delete the KUBE- chains. Missing ones are
    // fine (first install).
    for rule in iptables_jump_rules() {
        let args: Vec<String> = rule
            .iter()
            .map(|a| {
                if a == "-I" {
                    "-D".to_string()
                } else {
                    a.clone()
                }
            })
            .collect();
        let _ = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "iptables"])
            .args(&args)
            .output();
    }
    for table in ["filter", "nat"] {
        let Ok(out) = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "iptables-save", "-t", table])
            .output()
        else {
            continue;
        };
        let chains: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| c.starts_with("KUBE-"))
            .map(String::from)
            .collect();
        for flag in ["-F", "-X"] {
            for chain in &chains {
                let _ = std::process::Command::new("ip")
                    .args([
                        "netns", "exec", &ns.name, "iptables", "-w", "-t", table, flag, chain,
                    ])
                    .output();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc1() -> Service {
        Service {
            namespace: "ns1".into(),
            name: "svc1".into(),
            port_name: "p80".into(),
            protocol: Protocol::Tcp,
            cluster_ip: Ipv4Addr::new(172, 30, 0, 41),
            port: 80,
            node_port: Some(3001),
            external_local: true,
            endpoints: vec![
                Endpoint {
                    ip: Ipv4Addr::new(10, 180, 0, 1),
                    port: 80,
                    node: "other".into(),
                },
                Endpoint {
                    ip: Ipv4Addr::new(10, 180, 2, 1),
                    port: 80,
                    node: "node".into(),
                },
            ],
        }
    }

    /// The chain names kube-proxy's own golden tests expect for `ns1/svc1:p80` (TCP).
    #[test]
    fn chain_names_match_kube_proxy_goldens() {
        let svc = svc1();
        assert_eq!(svc_chain(&svc), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(ext_chain(&svc), "KUBE-EXT-XPGD46QRK7WJZT7O");
        assert_eq!(svl_chain(&svc), "KUBE-SVL-XPGD46QRK7WJZT7O");
        assert_eq!(
            sep_chain(&svc, &svc.endpoints[0]),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            sep_chain(&svc, &svc.endpoints[1]),
            "KUBE-SEP-ZX7GRIZKSNUQ3LAJ"
        );
        assert_eq!(nft_service_base(&svc), "ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(
            nft_endpoint_base(&svc, &svc.endpoints[0]),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
    }

    /// `TestExternalTrafficPolicyLocal`'s nat rules for the NodePort part of the Service.
    #[test]
    fn local_policy_rules_have_kube_proxys_shape() {
        let node = ProxyNode {
            name: "node".into(),
            ip: Ipv4Addr::new(192, 168, 0, 2),
            cluster_cidr: "10.0.0.0/8".into(),
            service_cidr: "172.30.0.0/16".into(),
        };
        let rules = iptables_restore(&[svc1()], &node);
        for line in [
            "-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-XPGD46QRK7WJZT7O",
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
            "-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment \"pod traffic for ns1/svc1:p80 external destinations\" -s 10.0.0.0/8 -j KUBE-SVC-XPGD46QRK7WJZT7O",
            "-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment \"masquerade LOCAL traffic for ns1/svc1:p80 external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
            "-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment \"route LOCAL traffic for ns1/svc1:p80 external destinations\" -m addrtype --src-type LOCAL -j KUBE-SVC-XPGD46QRK7WJZT7O",
            "-A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVL-XPGD46QRK7WJZT7O",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.2.1:80\" -j KUBE-SEP-ZX7GRIZKSNUQ3LAJ",
            "-A KUBE-SVL-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.2.1:80\" -j KUBE-SEP-ZX7GRIZKSNUQ3LAJ",
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE",
        ] {
            assert!(rules.lines().any(|l| l == line), "missing {line}\n{rules}");
        }
        let nft = nft_ruleset(&[svc1()], &node);
        for line in [
            "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80",
            "add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }",
            "add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 ip saddr 10.0.0.0/8 goto service-ULMVA6XW-ns1/svc1/tcp/p80 comment \"short-circuit pod traffic\"",
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
        ] {
            assert!(nft.lines().any(|l| l == line), "missing {line}\n{nft}");
        }
    }
}

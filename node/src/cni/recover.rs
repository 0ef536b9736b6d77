//! Rebuilding the IPAM store from the node's links, for when the store is lost or corrupt.
//!
//! Everything ADD created says what it was for: the host side of each pod's veth is named
//! after the attachment (`wft` + a hash of container id and interface name) and carries the
//! attachment in its alias (`weft-cni <container id> <ifname>`), and the host routes the pod's
//! address to it (`10.244.1.5/32 dev wft...`). So each live pod's allocation is recovered from
//! its link: the attachment from the alias (or, for links made before aliases, from the
//! attachments a runtime's GC lists as valid), the address from the route (else from the
//! endpoint map). Links that say neither are reported and left out; GC removes them as usual.
use std::{collections::HashMap, net::Ipv4Addr, path::PathBuf};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;

use super::names::{AttachmentNames, HOST_IF_PREFIX};
use crate::{
    datapath::Maps,
    ipam::{Allocation, Ipam, State},
    netlink::BlockingNetlink,
};

/// What the alias of a pod's host link starts with.
const ALIAS_PREFIX: &str = "weft-cni";

/// The alias ADD gives the host link of (container id, ifname), when it fits the kernel's 255
/// bytes (container ids are 64 hex digits in practice).
pub fn alias(container_id: &str, ifname: &str) -> Option<String> {
    let a = format!("{ALIAS_PREFIX} {container_id} {ifname}");
    (a.len() <= 255 && !container_id.contains(' ')).then_some(a)
}

/// The attachment an alias names.
pub fn parse_alias(alias: &str) -> Option<(String, String)> {
    let mut parts = alias.split(' ');
    if parts.next()? != ALIAS_PREFIX {
        return None;
    }
    let (cid, ifname) = (parts.next()?, parts.next()?);
    if parts.next().is_some() || cid.is_empty() || ifname.is_empty() {
        return None;
    }
    Some((cid.to_string(), ifname.to_string()))
}

/// What a rebuild found.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// The recovered allocations.
    pub state: State,
    /// Pod links that could not be recovered, with why.
    pub skipped: Vec<String>,
    /// Where the old store went (kept for a post-mortem), if there was one.
    pub kept: Option<PathBuf>,
}

/// A pod link as the rebuild reads it.
#[derive(Debug, Clone)]
pub struct PodLink {
    pub name: String,
    pub alias: Option<String>,
    /// The /32 the host routes to the link.
    pub routed: Option<Ipv4Addr>,
    /// The endpoint map's address for the link.
    pub endpoint: Option<Ipv4Addr>,
}

/// The allocations the pod links describe (pure: the part unit tests run). `known`: the
/// attachments a runtime's GC lists as valid, for links without an alias. `subnet`: the node's
/// subnet (addresses outside it are not this node's to allocate).
pub fn allocations(
    links: &[PodLink],
    known: &[(String, String)],
    subnet: Option<Ipv4Net>,
) -> (State, Vec<String>) {
    let by_name: HashMap<String, &(String, String)> = known
        .iter()
        .map(|k| (AttachmentNames::of(&k.0, &k.1).host_ifname, k))
        .collect();
    let mut state = State::default();
    let mut skipped = Vec::new();
    for link in links {
        let attachment = link
            .alias
            .as_deref()
            .and_then(parse_alias)
            // The alias must name this very link (a copied alias proves nothing).
            .filter(|(c, i)| AttachmentNames::of(c, i).host_ifname == link.name)
            .or_else(|| by_name.get(&link.name).map(|k| (*k).clone()));
        let Some((container_id, ifname)) = attachment else {
            skipped.push(format!(
                "{}: no attachment (no weft-cni alias, not a valid attachment)",
                link.name
            ));
            continue;
        };
        let Some(ip) = link.routed.or(link.endpoint) else {
            skipped.push(format!("{}: no address routed to it", link.name));
            continue;
        };
        if subnet.is_some_and(|s| !s.contains(&ip)) {
            skipped.push(format!(
                "{}: {ip} is outside this node's subnet {}",
                link.name,
                subnet.expect("checked")
            ));
            continue;
        }
        if state.allocations.iter().any(|a| a.ip == ip) {
            skipped.push(format!("{}: {ip} is routed to another link too", link.name));
            continue;
        }
        state.allocations.push(Allocation {
            ip,
            container_id,
            ifname,
            // Links carry neither the pod's name (`weft monitor` shows such a pod by its
            // address) nor its namespace (a live backend switch leaves its route MTU alone; path
            // MTU discovery through the datapath's fragmentation-needed still sizes its packets).
            pod: None,
            netns: None,
        });
    }
    state.allocations.sort_by_key(|a| a.ip);
    // Hand out after the highest address in use, as if allocated in order.
    state.last = state.allocations.iter().map(|a| a.ip).max();
    (state, skipped)
}

/// The node's pod links (in the calling thread's namespace) with their addresses.
pub fn pod_links(maps: Option<&Maps>) -> Result<Vec<PodLink>> {
    let nl = BlockingNetlink::open().context("opening rtnetlink")?;
    let links = nl.block_on(nl.links()).context("listing links")?;
    let routes = nl.block_on(nl.routes()).context("listing routes")?;
    let endpoints = maps
        .map(|m| m.endpoints())
        .transpose()
        .context("reading the endpoint map")?
        .unwrap_or_default();
    Ok(links
        .into_iter()
        .filter(|l| l.name.starts_with(HOST_IF_PREFIX))
        .map(|l| PodLink {
            routed: routes
                .iter()
                .find(|r| r.oif == Some(l.ifindex) && r.dst.prefix_len() == 32)
                .map(|r| r.dst.addr()),
            endpoint: endpoints
                .iter()
                .find(|(_, e)| e.host_ifindex == l.ifindex)
                .map(|(ip, _)| *ip),
            name: l.name,
            alias: l.alias,
        })
        .collect())
}

/// Rebuilds the store of `ipam` from the node's links and writes it, keeping the old file.
pub fn rebuild(
    ipam: &Ipam,
    maps: Option<&Maps>,
    known: &[(String, String)],
    subnet: Option<Ipv4Net>,
    timeout: std::time::Duration,
) -> Result<Rebuilt> {
    let mut locked = ipam.lock_unread(timeout)?;
    let links = pod_links(maps)?;
    let (state, skipped) = allocations(&links, known, subnet);
    let kept = locked.replace(state.clone())?;
    Ok(Rebuilt {
        state,
        skipped,
        kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(cid: &str, alias: bool, routed: Option<[u8; 4]>) -> PodLink {
        PodLink {
            name: AttachmentNames::of(cid, "eth0").host_ifname,
            alias: alias.then(|| super::alias(cid, "eth0").unwrap()),
            routed: routed.map(Ipv4Addr::from),
            endpoint: None,
        }
    }

    #[test]
    fn allocations_from_aliases_routes_and_known_attachments() {
        assert_eq!(
            parse_alias(&alias("abc", "net1").unwrap()),
            Some(("abc".into(), "net1".into()))
        );
        assert_eq!(parse_alias("something else"), None);
        assert_eq!(alias(&"x".repeat(300), "eth0"), None);
        let mut from_endpoint = link("d", true, None);
        from_endpoint.endpoint = Some(Ipv4Addr::new(10, 1, 0, 4));
        let mut forged = link("e", false, Some([10, 1, 0, 5]));
        forged.alias = alias("a", "eth0");
        let links = vec![
            link("a", true, Some([10, 1, 0, 7])),
            // No alias (an older plugin), but the runtime lists it.
            link("b", false, Some([10, 1, 0, 3])),
            // No alias, unknown: left out.
            link("c", false, Some([10, 1, 0, 9])),
            from_endpoint,
            forged,
            link("f", true, Some([10, 2, 0, 1])),
            link("g", true, None),
        ];
        let (state, skipped) = allocations(
            &links,
            &[("b".into(), "eth0".into())],
            Some("10.1.0.0/24".parse().unwrap()),
        );
        let got: Vec<(String, Ipv4Addr)> = state
            .allocations
            .iter()
            .map(|a| (a.container_id.clone(), a.ip))
            .collect();
        assert_eq!(
            got,
            vec![
                ("b".into(), Ipv4Addr::new(10, 1, 0, 3)),
                ("d".into(), Ipv4Addr::new(10, 1, 0, 4)),
                ("a".into(), Ipv4Addr::new(10, 1, 0, 7)),
            ]
        );
        assert_eq!(state.last, Some(Ipv4Addr::new(10, 1, 0, 7)));
        assert_eq!(skipped.len(), 4, "{skipped:?}");
    }
}

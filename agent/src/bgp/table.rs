//! Weft's BGP routing table in the kernel, as the datapath sees it: what BIRD installed, read
//! over rtnetlink (`weft_node::netlink`).
use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::Result;
use ipnet::Ipv4Net;

use crate::netlink::{BlockingNetlink, TableRoute};

/// The unicast routes of kernel table `table`: prefix -> its next hops as text (to notice a
/// changed next hop, not only a changed prefix set). Empty when the table does not exist.
/// Opens a netlink socket in the calling thread's namespace for the one read.
pub fn read(table: u32) -> Result<BTreeMap<Ipv4Net, String>> {
    read_with(&BlockingNetlink::open()?, table)
}

/// [`read`] on an open connection (the speaker's supervisor reads every second).
pub fn read_with(nl: &BlockingNetlink, table: u32) -> Result<BTreeMap<Ipv4Net, String>> {
    Ok(by_prefix(nl.block_on(nl.table_routes(table))?))
}

/// Routes by prefix, each with its next hops as text (`via 192.168.100.1 dev 2`).
pub fn by_prefix(routes: Vec<TableRoute>) -> BTreeMap<Ipv4Net, String> {
    routes
        .into_iter()
        .map(|r| {
            let mut text = String::new();
            for (gateway, oif) in &r.next_hops {
                if !text.is_empty() {
                    text.push_str(", ");
                }
                match gateway {
                    Some(g) => {
                        let _ = write!(text, "via {g}");
                    }
                    None => text.push_str("on-link"),
                }
                if let Some(i) = oif {
                    let _ = write!(text, " dev {i}");
                }
            }
            (r.dst, text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_prefix_with_their_next_hops() {
        let route = |dst: &str, hops: &[(Option<&str>, u32)]| TableRoute {
            dst: dst.parse().unwrap(),
            next_hops: hops
                .iter()
                .map(|(g, i)| (g.map(|g| g.parse().unwrap()), Some(*i)))
                .collect(),
        };
        let t = by_prefix(vec![
            route("10.244.3.0/24", &[(Some("192.168.100.1"), 2)]),
            route("10.244.2.0/24", &[(Some("192.168.100.11"), 2)]),
            route(
                "10.244.5.7/32",
                &[(Some("192.168.100.1"), 2), (Some("192.168.100.2"), 2)],
            ),
            route("10.244.6.0/24", &[(None, 2)]),
        ]);
        let keys: Vec<String> = t.keys().map(|k| k.to_string()).collect();
        assert_eq!(
            keys,
            [
                "10.244.2.0/24",
                "10.244.3.0/24",
                "10.244.5.7/32",
                "10.244.6.0/24"
            ]
        );
        assert_eq!(t.values().next().unwrap(), "via 192.168.100.11 dev 2");
        assert_eq!(
            t[&"10.244.5.7/32".parse().unwrap()],
            "via 192.168.100.1 dev 2, via 192.168.100.2 dev 2"
        );
        assert_eq!(t[&"10.244.6.0/24".parse().unwrap()], "on-link dev 2");
        assert!(by_prefix(Vec::new()).is_empty());
    }
}

//! Weft's BGP routing table in the kernel, as the datapath sees it: what BIRD installed.
use std::collections::BTreeMap;

use anyhow::Result;
use ipnet::Ipv4Net;
use serde_json::Value;

/// The unicast routes of kernel table `table`: prefix -> the route as `ip -j` prints it (to
/// notice a changed next hop, not only a changed prefix set). Empty when the table does not
/// exist.
pub fn read(table: u32) -> Result<BTreeMap<Ipv4Net, String>> {
    match crate::netlink::ip_json(&["-4", "route", "show", "table", &table.to_string()]) {
        Ok(v) => Ok(parse(&v)),
        // The kernel creates a table with its first route.
        Err(e) if format!("{e:#}").contains("table does not exist") => Ok(BTreeMap::new()),
        Err(e) => Err(e),
    }
}

pub fn parse(v: &Value) -> BTreeMap<Ipv4Net, String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["type"].as_str().is_none_or(|t| t == "unicast"))
        .filter_map(|r| {
            let dst = r["dst"].as_str()?;
            // `ip` prints a host route without its length.
            let net = dst
                .parse::<Ipv4Net>()
                .ok()
                .or_else(|| Ipv4Net::new(dst.parse().ok()?, 32).ok())?;
            Some((net, r.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicast_routes_by_prefix() {
        let v: Value = serde_json::from_str(
            r#"[{"dst":"10.244.2.0/24","gateway":"192.168.100.11","dev":"eth0","protocol":"bird","metric":32,"flags":[]},
                {"type":"unreachable","dst":"10.244.9.0/24","protocol":"bird","metric":32,"flags":[]},
                {"dst":"10.244.3.0/24","protocol":"bird","metric":32,"flags":[],
                 "nexthops":[{"gateway":"192.168.100.1","dev":"eth0","weight":1,"flags":[]}]},
                {"dst":"10.244.5.7","gateway":"192.168.100.1","dev":"eth0","flags":[]}]"#,
        )
        .unwrap();
        let t = parse(&v);
        let keys: Vec<String> = t.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["10.244.2.0/24", "10.244.3.0/24", "10.244.5.7/32"]);
        assert!(t.values().next().unwrap().contains("192.168.100.11"));
        assert!(parse(&Value::Array(vec![])).is_empty());
    }
}

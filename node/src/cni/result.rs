//! The ADD result (interfaces, ips, routes, dns) and its rendering in each supported version:
//! 0.4.0 has `ips[].version`, 1.0.0 drops it, 1.1.0 adds `interfaces[].mtu`.
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{Value, json};

use super::spec::version_at_least;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The netns path for interfaces inside the container; None on the host.
    pub sandbox: Option<String>,
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gw: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AddResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    /// Passed through from a previous result (weft configures no DNS).
    pub dns: Value,
    /// Addresses of other families or fields weft does not model, kept verbatim from a
    /// previous result so chaining loses nothing.
    pub foreign_ips: Vec<Value>,
}

impl AddResult {
    pub fn render(&self, version: &str) -> Value {
        let with_ip_version = !version_at_least(version, "1.0.0");
        let with_mtu = version_at_least(version, "1.1.0");
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = json!({"name": i.name, "mac": i.mac});
                if let Some(s) = &i.sandbox {
                    v["sandbox"] = json!(s);
                }
                if with_mtu && let Some(m) = i.mtu {
                    v["mtu"] = json!(m);
                }
                v
            })
            .collect();
        let mut ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = json!({"address": ip.address.to_string()});
                if with_ip_version {
                    v["version"] = json!("4");
                }
                if let Some(gw) = ip.gateway {
                    v["gateway"] = json!(gw.to_string());
                }
                if let Some(idx) = ip.interface {
                    v["interface"] = json!(idx);
                }
                v
            })
            .collect();
        ips.extend(self.foreign_ips.iter().cloned().map(|mut v| {
            if let Some(obj) = v.as_object_mut() {
                if with_ip_version {
                    obj.entry("version").or_insert(json!("6"));
                } else {
                    obj.remove("version");
                }
            }
            v
        }));
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut v = json!({"dst": r.dst.to_string()});
                if let Some(gw) = r.gw {
                    v["gw"] = json!(gw.to_string());
                }
                v
            })
            .collect();
        let dns = if self.dns.is_object() {
            self.dns.clone()
        } else {
            json!({})
        };
        json!({
            "cniVersion": version,
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": dns,
        })
    }

    /// Reads a result of any supported version (a `prevResult`); unparseable parts are an
    /// error naming the field.
    pub fn parse(v: &Value) -> Result<Self, String> {
        let mut out = AddResult {
            dns: v.get("dns").cloned().unwrap_or(Value::Null),
            ..Default::default()
        };
        for (i, iface) in array(v, "interfaces")?.iter().enumerate() {
            let name = str_field(iface, "name")
                .ok_or_else(|| format!("prevResult.interfaces[{i}].name must be a string"))?;
            out.interfaces.push(Interface {
                name: name.to_string(),
                mac: str_field(iface, "mac").unwrap_or_default().to_string(),
                sandbox: str_field(iface, "sandbox").map(str::to_string),
                mtu: iface.get("mtu").and_then(Value::as_u64).map(|m| m as u32),
            });
        }
        for (i, ip) in array(v, "ips")?.iter().enumerate() {
            let address = str_field(ip, "address")
                .ok_or_else(|| format!("prevResult.ips[{i}].address must be a string"))?;
            let Ok(net) = address.parse::<Ipv4Net>() else {
                if address.contains(':') {
                    out.foreign_ips.push(ip.clone());
                    continue;
                }
                return Err(format!(
                    "prevResult.ips[{i}].address {address:?} is not a CIDR address"
                ));
            };
            let gateway = match str_field(ip, "gateway") {
                None => None,
                Some(g) => Some(g.parse().map_err(|_| {
                    format!("prevResult.ips[{i}].gateway {g:?} is not an IPv4 address")
                })?),
            };
            out.ips.push(IpConfig {
                address: net,
                gateway,
                interface: ip
                    .get("interface")
                    .and_then(Value::as_u64)
                    .map(|x| x as usize),
            });
        }
        for (i, r) in array(v, "routes")?.iter().enumerate() {
            let dst = str_field(r, "dst")
                .ok_or_else(|| format!("prevResult.routes[{i}].dst must be a string"))?;
            let Ok(dst) = dst.parse::<Ipv4Net>() else {
                continue; // another family's route: not ours to keep typed
            };
            let gw = str_field(r, "gw").and_then(|g| g.parse().ok());
            out.routes.push(Route { dst, gw });
        }
        Ok(out)
    }

    /// Appends `other` (this plugin's result) after `self` (a previous plugin's), shifting
    /// `other`'s interface indices.
    pub fn merge(mut self, other: AddResult) -> AddResult {
        let offset = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        self.routes.extend(other.routes);
        self
    }
}

fn array<'a>(v: &'a Value, key: &str) -> Result<&'a [Value], String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(format!("prevResult.{key} must be an array")),
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AddResult {
        AddResult {
            interfaces: vec![
                Interface {
                    name: "wft0123".into(),
                    mac: "0e:00:00:00:00:01".into(),
                    sandbox: None,
                    mtu: Some(1450),
                },
                Interface {
                    name: "eth0".into(),
                    mac: "0a:00:00:00:00:01".into(),
                    sandbox: Some("/run/netns/x".into()),
                    mtu: Some(1450),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.5/32".parse().unwrap(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn renders_each_version() {
        let r = sample();
        let v04 = r.render("0.4.0");
        assert_eq!(v04["ips"][0]["version"], "4");
        assert!(v04["interfaces"][1].get("mtu").is_none());
        let v10 = r.render("1.0.0");
        assert!(v10["ips"][0].get("version").is_none());
        assert!(v10["interfaces"][1].get("mtu").is_none());
        let v11 = r.render("1.1.0");
        assert_eq!(v11["interfaces"][1]["mtu"], 1450);
        assert_eq!(v11["cniVersion"], "1.1.0");
        assert_eq!(v11["interfaces"][1]["sandbox"], "/run/netns/x");
        assert!(v11["interfaces"][0].get("sandbox").is_none());
    }

    #[test]
    fn parses_and_merges() {
        let prev = AddResult::parse(&sample().render("0.4.0")).unwrap();
        assert_eq!(prev.ips, sample().ips);
        let merged = prev.merge(sample());
        assert_eq!(merged.interfaces.len(), 4);
        assert_eq!(merged.ips[1].interface, Some(3));
        assert!(AddResult::parse(&json!({"ips": [{"address": "bogus"}]})).is_err());
    }
}

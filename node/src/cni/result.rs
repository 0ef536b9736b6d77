//! The ADD result (interfaces, ips, routes, dns) and its rendering in each supported version:
//! 0.4.0 has `ips[].version`, 1.0.0 drops it, 1.1.0 adds `interfaces[].mtu`.
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::Value;

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

/// A result as the spec writes it (any supported version), for reading a `prevResult`.
#[derive(Debug, Deserialize)]
struct RawResult {
    #[serde(default)]
    interfaces: Option<Vec<RawInterface>>,
    /// Kept as written: addresses of other families pass through untouched.
    #[serde(default)]
    ips: Option<Vec<Value>>,
    #[serde(default)]
    routes: Option<Vec<RawRoute>>,
    #[serde(default)]
    dns: Value,
}

#[derive(Debug, Deserialize, Serialize)]
struct RawInterface {
    name: String,
    #[serde(default)]
    mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sandbox: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtu: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize)]
struct RawIp {
    address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interface: Option<usize>,
}

#[derive(Debug, Deserialize, Serialize)]
struct RawRoute {
    dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gw: Option<String>,
}

/// A result in one version of the spec.
#[derive(Debug, Serialize)]
struct Rendered {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    interfaces: Vec<RawInterface>,
    ips: Vec<Value>,
    routes: Vec<RawRoute>,
    dns: Value,
}

fn prev_error(e: crate::json::FieldError) -> String {
    format!("prevResult.{e}")
}

impl AddResult {
    pub fn render(&self, version: &str) -> Value {
        let with_ip_version = !version_at_least(version, "1.0.0");
        let with_mtu = version_at_least(version, "1.1.0");
        let interfaces = self
            .interfaces
            .iter()
            .map(|i| RawInterface {
                name: i.name.clone(),
                mac: Some(i.mac.clone()),
                sandbox: i.sandbox.clone(),
                mtu: i.mtu.filter(|_| with_mtu),
            })
            .collect();
        let mut ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                serde_json::to_value(RawIp {
                    address: ip.address.to_string(),
                    version: with_ip_version.then(|| "4".to_string()),
                    gateway: ip.gateway.map(|g| g.to_string()),
                    interface: ip.interface,
                })
                .expect("serializable")
            })
            .collect();
        // Other families' entries as written, with or without `version` as this version has it.
        ips.extend(self.foreign_ips.iter().cloned().map(|mut v| {
            if let Some(obj) = v.as_object_mut() {
                if with_ip_version {
                    obj.entry("version").or_insert_with(|| Value::from("6"));
                } else {
                    obj.remove("version");
                }
            }
            v
        }));
        let routes = self
            .routes
            .iter()
            .map(|r| RawRoute {
                dst: r.dst.to_string(),
                gw: r.gw.map(|g| g.to_string()),
            })
            .collect();
        let dns = if self.dns.is_object() {
            self.dns.clone()
        } else {
            Value::Object(Default::default())
        };
        serde_json::to_value(Rendered {
            cni_version: version.to_string(),
            interfaces,
            ips,
            routes,
            dns,
        })
        .expect("serializable")
    }

    /// Reads a result of any supported version (a `prevResult`); unparseable parts are an
    /// error naming the field.
    pub fn parse(v: &Value) -> Result<Self, String> {
        let raw: RawResult = crate::json::from_value(v.clone()).map_err(prev_error)?;
        let mut out = AddResult {
            dns: raw.dns,
            ..Default::default()
        };
        for iface in raw.interfaces.unwrap_or_default() {
            out.interfaces.push(Interface {
                name: iface.name,
                mac: iface.mac.unwrap_or_default(),
                sandbox: iface.sandbox,
                mtu: iface.mtu,
            });
        }
        for (i, entry) in raw.ips.unwrap_or_default().into_iter().enumerate() {
            let ip: RawIp = crate::json::from_value(entry.clone()).map_err(|e| {
                prev_error(crate::json::FieldError {
                    path: format!("ips[{i}].{}", e.path),
                    ..e
                })
            })?;
            let Ok(net) = ip.address.parse::<Ipv4Net>() else {
                if ip.address.contains(':') {
                    out.foreign_ips.push(entry);
                    continue;
                }
                return Err(format!(
                    "prevResult.ips[{i}].address {:?} is not a CIDR address",
                    ip.address
                ));
            };
            let gateway = match ip.gateway {
                None => None,
                Some(g) => Some(g.parse().map_err(|_| {
                    format!("prevResult.ips[{i}].gateway {g:?} is not an IPv4 address")
                })?),
            };
            out.ips.push(IpConfig {
                address: net,
                gateway,
                interface: ip.interface,
            });
        }
        for r in raw.routes.unwrap_or_default() {
            let Ok(dst) = r.dst.parse::<Ipv4Net>() else {
                continue; // another family's route: not ours to keep typed
            };
            let gw = r.gw.and_then(|g| g.parse().ok());
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

#[cfg(test)]
mod tests {
    use serde_json::json;

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

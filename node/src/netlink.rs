//! Reading links, addresses, routes and neighbours back with iproute2's `ip -json` (CHECK and
//! GC; the hot paths ADD and DEL write through [`crate::rtnl`]). Everything acts on the network
//! namespace of the calling thread: combine with [`crate::ns::run_in`].
use std::{net::Ipv4Addr, os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// `ip`, killed when the plugin dies (a killed plugin leaves no `ip` running behind it).
fn ip_command() -> Command {
    let mut cmd = Command::new("ip");
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// `ip -json <args>` parsed; an empty output is an empty array.
pub fn ip_json(args: &[&str]) -> Result<Value> {
    let out = ip_command()
        .arg("-json")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("parsing ip -json {args:?}"))
}

/// A link as `ip -json link show` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub ifindex: u32,
    pub mac: String,
    pub mtu: u32,
    pub up: bool,
}

/// The link `name`, or None when it does not exist.
pub fn link(name: &str) -> Result<Option<LinkInfo>> {
    if nix::net::if_::if_nametoindex(name).is_err() {
        return Ok(None);
    }
    let v = ip_json(&["link", "show", "dev", name])?;
    Ok(v.as_array().and_then(|a| a.first()).map(link_info))
}

/// Every link of the namespace.
pub fn links() -> Result<Vec<LinkInfo>> {
    let v = ip_json(&["link", "show"])?;
    Ok(v.as_array()
        .map(|a| a.iter().map(link_info).collect())
        .unwrap_or_default())
}

fn link_info(v: &Value) -> LinkInfo {
    LinkInfo {
        name: v["ifname"].as_str().unwrap_or_default().to_string(),
        ifindex: v["ifindex"].as_u64().unwrap_or(0) as u32,
        mac: v["address"].as_str().unwrap_or_default().to_string(),
        mtu: v["mtu"].as_u64().unwrap_or(0) as u32,
        up: v["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP")),
    }
}

/// IPv4 addresses on `dev` as "a.b.c.d/len".
pub fn addresses(dev: &str) -> Result<Vec<String>> {
    let v = ip_json(&["-4", "addr", "show", "dev", dev])?;
    let mut out = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let (Some(ip), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                out.push(format!("{ip}/{len}"));
            }
        }
    }
    Ok(out)
}

/// IPv4 routes of the main table as (dst, gateway, dev); `dst` is "default" or a CIDR/address.
pub fn routes() -> Result<Vec<(String, Option<String>, String)>> {
    let v = ip_json(&["-4", "route", "show"])?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["dst"].as_str().unwrap_or_default().to_string(),
                r["gateway"].as_str().map(str::to_string),
                r["dev"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// The permanent neighbour entry of `addr` on `dev`, as its MAC.
pub fn permanent_neighbour(dev: &str, addr: Ipv4Addr) -> Result<Option<String>> {
    let v = ip_json(&["-4", "neigh", "show", "dev", dev, "to", &addr.to_string()])?;
    Ok(v.as_array().into_iter().flatten().find_map(|n| {
        let permanent = n["state"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == "PERMANENT"));
        if permanent {
            n["lladdr"].as_str().map(str::to_string)
        } else {
            None
        }
    }))
}

pub use crate::mac::{format_mac, parse_mac};

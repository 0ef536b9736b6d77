//! Talking to a running BIRD through `birdc` (its control socket client), and reading what it
//! prints: sessions (`show protocols`), routes (`show route ...`), reconfiguration replies.
//! The parsers are pure functions over the text, tested on BIRD 2's output.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use ipnet::Ipv4Net;

use super::render::{MESH_PREFIX, PEER_PREFIX, session_peer};

/// A system tool: from `PATH`, else from /usr/sbin (Debian installs BIRD there, and a `PATH`
/// without sbin is common outside root shells).
pub fn tool(name: &str) -> PathBuf {
    let in_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    in_path.unwrap_or_else(|| Path::new("/usr/sbin").join(name))
}

/// Runs one `birdc` command against the control socket at `socket` and returns its output
/// without the greeting line. `restricted` uses birdc's read-only mode (`-r`).
pub fn run(socket: &Path, restricted: bool, command: &str) -> Result<String> {
    let mut cmd = Command::new(tool("birdc"));
    cmd.arg("-s").arg(socket);
    if restricted {
        cmd.arg("-r");
    }
    let out = cmd
        .args(command.split_whitespace())
        .output()
        .context("running birdc (Debian package bird2)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "birdc -s {} {command}: {}{}",
            socket.display(),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(text
        .lines()
        .filter(|l| !(l.starts_with("BIRD ") && l.ends_with(" ready.")))
        .filter(|l| *l != "Access restricted")
        .collect::<Vec<_>>()
        .join("\n"))
}

/// What kind of neighbour a session is (from the names weft renders).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionKind {
    /// Another node (full mesh).
    Mesh,
    /// A configured peer: route reflector or top-of-rack router.
    Peer,
}

impl SessionKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Mesh => "mesh",
            Self::Peer => "peer",
        }
    }
}

/// The kind of a weft-rendered session from its protocol name.
pub fn session_kind(name: &str) -> Option<SessionKind> {
    if name.starts_with(MESH_PREFIX) {
        Some(SessionKind::Mesh)
    } else if name.starts_with(PEER_PREFIX) {
        Some(SessionKind::Peer)
    } else {
        None
    }
}

/// One BGP session as `show protocols` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// BIRD's protocol name (`mesh_192_168_1_7`, `peer_10_0_0_1`).
    pub name: String,
    pub kind: SessionKind,
    pub peer: Ipv4Addr,
    /// BIRD's protocol state: `up`, `start`, `down`, ...
    pub state: String,
    /// BGP state and last error: `Established`, `Active Socket: Connection refused`, ...
    pub info: String,
    /// Unix time (s) of the last state change (weft renders `timeformat protocol "%s"`).
    pub since: Option<u64>,
}

impl Session {
    pub fn established(&self) -> bool {
        self.state == "up" && self.info.starts_with("Established")
    }
}

/// The BGP sessions weft configured, from `show protocols` output.
pub fn parse_protocols(text: &str) -> Vec<Session> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut cols = line.split_whitespace();
        let (Some(name), Some(proto)) = (cols.next(), cols.next()) else {
            continue;
        };
        if proto != "BGP" {
            continue;
        }
        let Some(kind) = session_kind(name) else {
            continue;
        };
        let Some(peer) = session_peer(name) else {
            continue;
        };
        let _table = cols.next();
        let state = cols.next().unwrap_or("").to_string();
        let since = cols.next().and_then(|s| s.parse().ok());
        let info = cols.collect::<Vec<_>>().join(" ");
        out.push(Session {
            name: name.to_string(),
            kind,
            peer,
            state,
            info,
            since,
        });
    }
    out
}

/// One route as `show route` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub prefix: Ipv4Net,
    /// The protocol (session) it came from.
    pub from: String,
    /// BIRD's preferred route for the prefix (`*`).
    pub primary: bool,
    /// Next hops (`via ADDR on IFACE`), resolved.
    pub via: Vec<Ipv4Addr>,
}

/// Routes from `show route [...]` output (continuation lines carry next hops; a prefix with
/// several routes lists the others on indented lines).
pub fn parse_routes(text: &str) -> Vec<Route> {
    let mut out: Vec<Route> = Vec::new();
    let mut last_prefix: Option<Ipv4Net> = None;
    for line in text.lines() {
        if line.trim().is_empty() || line.starts_with("Table ") {
            continue;
        }
        let indented = line.starts_with(char::is_whitespace);
        let trimmed = line.trim();
        if indented && let Some(rest) = trimmed.strip_prefix("via ") {
            if let (Some(r), Some(ip)) = (
                out.last_mut(),
                rest.split_whitespace().next().and_then(|a| a.parse().ok()),
            ) {
                r.via.push(ip);
            }
            continue;
        }
        let (prefix, rest) = if indented {
            match last_prefix {
                Some(p) => (p, trimmed),
                None => continue,
            }
        } else {
            let mut parts = trimmed.splitn(2, char::is_whitespace);
            match parts.next().and_then(|p| p.parse::<Ipv4Net>().ok()) {
                Some(p) => (p, parts.next().unwrap_or("").trim()),
                None => continue,
            }
        };
        // `unicast [peer_10_0_0_1 1764150924 from 10.0.0.1] * (100) [i]`
        let Some(open) = rest.find('[') else {
            continue;
        };
        let Some(close) = rest[open..].find(']').map(|c| open + c) else {
            continue;
        };
        let from = rest[open + 1..close]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        let primary = rest[close + 1..].trim_start().starts_with('*');
        last_prefix = Some(prefix);
        out.push(Route {
            prefix,
            from,
            primary,
            via: Vec::new(),
        });
    }
    out
}

/// Whether a `configure` reply says the new configuration was taken (or queued behind one
/// being applied); otherwise the reply is BIRD's error (the old configuration stays).
pub fn configure_accepted(reply: &str) -> bool {
    reply.lines().any(|l| {
        let l = l.trim();
        l == "Reconfigured"
            || l.starts_with("Reconfiguration in progress")
            || l.starts_with("Reconfiguration already in progress")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from BIRD 2.0.12 (Debian bookworm) running a weft-rendered configuration on a
    // node of e2e_bgp's route reflector cluster, plus (last two sessions) states of sessions
    // whose peer is not up.
    const PROTOCOLS: &str = "\
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     1795687876
weft_underlay Direct     ---        up     1795687876
weft_main  Kernel     igp4       up     1795687876
weft_table Kernel     master4    up     1795687876
weft_pods  Static     master4    up     1795687876
peer_192_168_100_1 BGP        ---        up     1795687877    Established
mesh_192_168_100_11 BGP        ---        start  1795687878    Active        Socket: Connection refused
mesh_192_168_101_12 BGP        ---        start  1795687876    Connect
";

    // `show route` from the same node (recursive next hop: `(100/?)`), plus a prefix with
    // two routes and a multipath route.
    const ROUTES: &str = "\
Table master4:
10.244.96.0/24       unicast [peer_192_168_100_1 1795687877] * (100/?) [i]
\tvia 192.168.100.1 on eth0
10.244.43.0/24       unicast [peer_192_168_100_1 1795687877 from 192.168.100.1] * (100) [i]
\tvia 192.168.100.12 on eth0
                     unicast [mesh_192_168_101_12 1795687890] (100) [i]
\tvia 192.168.100.1 on eth0
10.244.78.0/24       blackhole [weft_pods 1795687876] * (200)
10.244.4.0/24        unicast [peer_192_168_100_1 1795687877] * (100) [i]
\tvia 192.168.100.11 on eth0 weight 1
\tvia 192.168.100.12 on eth0 weight 1
";

    #[test]
    fn sessions_from_show_protocols() {
        let s = parse_protocols(PROTOCOLS);
        assert_eq!(s.len(), 3, "only weft's BGP sessions: {s:?}");
        assert_eq!(s[0].kind, SessionKind::Peer);
        assert_eq!(s[0].peer, "192.168.100.1".parse::<Ipv4Addr>().unwrap());
        assert!(s[0].established());
        assert_eq!(s[0].since, Some(1795687877));
        assert_eq!(s[1].kind, SessionKind::Mesh);
        assert!(!s[1].established());
        assert_eq!(s[1].info, "Active Socket: Connection refused");
        assert_eq!(s[2].info, "Connect");
    }

    #[test]
    fn routes_from_show_route() {
        let r = parse_routes(ROUTES);
        assert_eq!(r.len(), 5, "{r:?}");
        assert_eq!(r[0].prefix, "10.244.96.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(r[0].from, "peer_192_168_100_1");
        assert!(r[0].primary);
        assert_eq!(r[0].via, vec!["192.168.100.1".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(
            r[2].prefix, r[1].prefix,
            "an alternative for the same prefix"
        );
        assert_eq!(r[2].from, "mesh_192_168_101_12");
        assert!(!r[2].primary);
        assert_eq!(r[3].from, "weft_pods");
        assert!(r[3].via.is_empty());
        assert_eq!(r[4].via.len(), 2, "multipath");
        assert!(parse_routes("Table master4:\n").is_empty());
    }

    #[test]
    fn configure_replies() {
        assert!(configure_accepted(
            "Reading configuration from /run/weft/bird/bird.conf\nReconfigured"
        ));
        assert!(configure_accepted("Reconfiguration in progress"));
        assert!(!configure_accepted(
            "Reading configuration from /x/bird.conf\n/x/bird.conf:3:1 syntax error, unexpected CF_SYM_UNDEFINED"
        ));
    }
}

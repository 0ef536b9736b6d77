//! BIRD instances the harness runs itself (not weft's): the underlay router as a route
//! reflector (or any BGP speaker a test needs, such as a rogue node announcing what it does not
//! own). Each lives in a namespace the harness created, with its files in a per-run directory
//! (never the system's /run/bird), and is killed by its pid when dropped.
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use ipnet::Ipv4Net;
use weft_agent::bgp::birdc;

use crate::{
    netns::{Netns, unique_name},
    process::{NsProcess, wait_until},
};

pub struct Bird {
    pub dir: PathBuf,
    ns_path: String,
    process: Option<NsProcess>,
    config: String,
}

impl Bird {
    /// Starts BIRD in `ns` with `config` (files under a fresh temporary directory).
    pub fn start(ns: &Netns, config: String) -> Self {
        let dir = std::env::temp_dir().join(unique_name("weft-bird-"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut bird = Self {
            dir,
            ns_path: ns.path(),
            process: None,
            config,
        };
        bird.spawn(false);
        bird
    }

    /// The running BIRD's pid.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(NsProcess::pid)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    fn spawn(&mut self, recover: bool) {
        let conf = self.dir.join("bird.conf");
        std::fs::write(&conf, &self.config).unwrap();
        let mut args: Vec<String> = vec![
            "-f".into(),
            "-c".into(),
            conf.display().to_string(),
            "-s".into(),
            self.socket().display().to_string(),
            "-P".into(),
            self.dir.join("bird.pid").display().to_string(),
        ];
        if recover {
            args.push("-R".into());
        }
        let process = NsProcess::spawn_at(
            &self.ns_path,
            &birdc::tool("bird"),
            &args,
            &[],
            &self.dir.join(format!("bird-{}.log", unique_name(""))),
        );
        self.process = Some(process);
        let socket = self.socket();
        wait_until(
            &format!("BIRD to answer on {}", socket.display()),
            Duration::from_secs(10),
            || birdc::run(&socket, true, "show status").is_ok(),
        );
    }

    /// SIGKILL: the router dies without a word to its peers.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts it again (after `kill`), in graceful restart recovery.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(true);
    }

    /// Replaces the configuration and reloads it in place.
    pub fn reconfigure(&mut self, config: String) {
        self.config = config;
        std::fs::write(self.dir.join("bird.conf"), &self.config).unwrap();
        let reply = self.birdc("configure");
        assert!(
            birdc::configure_accepted(&reply),
            "BIRD refused the configuration: {reply}\n{}",
            self.config
        );
    }

    pub fn birdc(&self, command: &str) -> String {
        birdc::run(&self.socket(), false, command)
            .unwrap_or_else(|e| panic!("birdc {command}: {e:#}"))
    }

    /// BGP sessions in state Established (whatever their names).
    pub fn established(&self) -> usize {
        self.birdc("show protocols")
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("BGP") && l.contains("Established"))
            .count()
    }

    pub fn log(&self) -> String {
        self.process.as_ref().map(|p| p.log()).unwrap_or_default()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A route reflector on the underlay router: one iBGP session per node (the nodes are listed,
/// as on a route reflector an operator configures: a restarting reflector then waits for every
/// node's routes before it sends any, instead of announcing an empty table to the first node
/// that reconnects), reflecting every node's pod routes to the others, and installing them in
/// the router's own kernel table so it forwards pod traffic between the subnets. Extra static
/// routes let a test make the router announce what it does not own.
pub struct RouteReflector {
    pub asn: u32,
    /// (router address on the subnet, the subnet)
    pub subnets: Vec<(Ipv4Addr, Ipv4Net)>,
    /// The nodes (route reflector clients).
    pub clients: Vec<Ipv4Addr>,
    /// Graceful restart time the router announces: how long nodes keep its routes when it
    /// dies.
    pub restart_time: u16,
    /// Pod subnets the router itself announces (hijack attempts).
    pub announce: Vec<Ipv4Net>,
}

impl RouteReflector {
    pub fn config(&self) -> String {
        let router_id = self.subnets[0].0;
        let mut c = format!(
            "log stderr {{ info, remote, warning, error, auth, fatal, bug }};\n\
             timeformat protocol \"%s\";\ntimeformat route \"%s\";\n\
             router id {router_id};\n\
             graceful restart wait 20;\n\
             protocol device {{ scan time 10; }}\n\
             protocol direct {{ ipv4; interface \"br*\"; }}\n\
             protocol kernel {{ graceful restart on; ipv4 {{ import none; export where source = RTS_BGP; }}; }}\n\
             protocol static announced {{ ipv4;\n"
        );
        for net in &self.announce {
            c += &format!("  route {net} blackhole;\n");
        }
        c += &format!(
            "}}\n\
             template bgp clients {{\n  \
               local as {asn};\n  \
               rr client;\n  rr cluster id {router_id};\n  \
               graceful restart on;\n  graceful restart time {};\n  \
               hold time 9;\n  keepalive time 3;\n  connect delay time 1;\n  connect retry time 2;\n  error wait time 1, 5;\n  \
               ipv4 {{ import all; export where source ~ [ RTS_BGP, RTS_STATIC ]; next hop keep; add paths tx; }};\n}}\n",
            self.restart_time,
            asn = self.asn
        );
        for client in &self.clients {
            let Some((local, _)) = self.subnets.iter().find(|(_, s)| s.contains(client)) else {
                continue;
            };
            c += &format!(
                "protocol bgp client_{} from clients {{ local {local}; neighbor {client} as {}; }}\n",
                client.to_string().replace('.', "_"),
                self.asn
            );
        }
        c
    }
}

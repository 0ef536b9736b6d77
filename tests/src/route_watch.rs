//! Every change of a kernel routing table while a test runs, as `ip -4 monitor route` reports
//! it: a route present for a moment (installed and withdrawn between two reads of the table) is
//! seen too.
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use ipnet::Ipv4Net;

use crate::{
    netns::{Netns, unique_name},
    process::{NsProcess, wait_until},
};

/// The marker route that shows the monitor is listening: a blackhole in a table of its own,
/// in the watched namespace (TEST-NET-1, never routed).
const MARKER_TABLE: u32 = 4242;
const MARKER: &str = "192.0.2.42";

/// One route event of the watched table: a line of `ip monitor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEvent {
    /// `Deleted ...`: the route went.
    pub deleted: bool,
    pub prefix: Ipv4Net,
    pub line: String,
}

pub struct RouteWatch {
    process: NsProcess,
    log: PathBuf,
    table: u32,
}

impl RouteWatch {
    /// Starts watching routing table `table` in `ns`; returns once the monitor is listening.
    pub fn start(ns: &Netns, table: u32) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("weft-route-watch-")));
        let process = NsProcess::spawn(
            ns,
            std::path::Path::new("ip"),
            &["-4".into(), "monitor".into(), "route".into()],
            &[],
            &log,
        );
        let marker = format!("blackhole {MARKER}/32 table {MARKER_TABLE}");
        let watch = Self {
            process,
            log,
            table,
        };
        // The monitor subscribes some time after it starts: a marker route it reports says it
        // listens (re-added until it does).
        wait_until(
            &format!("ip monitor to listen in {}", ns.name),
            Duration::from_secs(10),
            || {
                ns.ip(&format!("route replace {marker}"));
                ns.ip(&format!("route del {marker}"));
                watch.text().contains(&format!("table {MARKER_TABLE}"))
            },
        );
        watch
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The watched table's events so far.
    pub fn events(&self) -> Vec<RouteEvent> {
        let table = format!(" table {} ", self.table);
        self.text()
            .lines()
            .filter(|l| format!("{l} ").contains(&table))
            .filter_map(|l| {
                let deleted = l.starts_with("Deleted ");
                // `[Deleted ][type ]PREFIX ...`: the first word that is an address.
                let prefix = l.split_whitespace().find_map(|w| {
                    w.parse::<Ipv4Net>()
                        .ok()
                        .or_else(|| w.parse::<Ipv4Addr>().ok().map(Ipv4Net::from))
                })?;
                Some(RouteEvent {
                    deleted,
                    prefix,
                    line: l.to_string(),
                })
            })
            .collect()
    }

    /// Events concerning any of `prefixes`, for an assertion message.
    pub fn events_for(&self, prefixes: &[Ipv4Net]) -> Vec<RouteEvent> {
        self.events()
            .into_iter()
            .filter(|e| prefixes.contains(&e.prefix))
            .collect()
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

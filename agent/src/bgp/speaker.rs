//! BIRD as a supervised child process of weft-agent.
//!
//! One thread owns the child: it starts BIRD on the rendered configuration, reloads it in place
//! (`birdc configure`) when the configuration changes (never a restart), restarts it when it
//! dies (with `-R`, graceful restart recovery, whenever weft's table still holds routes, so the
//! kernel routes stay until the peers have re-sent theirs), and polls the sessions and weft's
//! kernel table every second for the agent's decisions, metrics and logs.
//!
//! BIRD never outlives the agent: it is started with `PR_SET_PDEATHSIG = SIGKILL`, so when the
//! agent dies, however it dies, BIRD is killed without a word to its peers. That is a graceful
//! restart for them (no NOTIFICATION: they keep forwarding along this node's routes for the
//! restart time) and the kernel routes stay; the next agent starts BIRD with `-R`. A deliberate
//! stop (the backend switched away from bgp) is a clean shutdown instead: SIGTERM, peers
//! withdraw this node's routes, BIRD removes its kernel routes.
use std::{
    collections::BTreeMap,
    io,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{
    birdc::{self, Route, Session},
    render::Files,
    table,
};
use crate::netlink::BlockingNetlink;

/// How often sessions and weft's table are read.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// Restart delays after BIRD dies: doubling from one second to half a minute; reset once a
/// BIRD stayed up for a minute.
const RESTART_DELAY_MIN: Duration = Duration::from_secs(1);
const RESTART_DELAY_MAX: Duration = Duration::from_secs(30);
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How long a clean shutdown may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What the supervisor last saw.
#[derive(Clone, Debug, Default)]
pub struct SpeakerStatus {
    pub running: bool,
    pub pid: Option<u32>,
    /// BIRD processes started (the first one included).
    pub starts: u64,
    /// Times BIRD exited without being asked to.
    pub crashes: u64,
    pub reloads: u64,
    pub reload_errors: u64,
    pub sessions: Vec<Session>,
    /// Routes the import filters refused (hijack attempts, foreign prefixes), kept by BIRD as
    /// filtered for inspection.
    pub refused: Vec<Route>,
    /// Weft's kernel table: prefix -> route (what the datapath uses).
    pub table: BTreeMap<Ipv4Net, String>,
}

enum Request {
    Configure(String, u32),
    Stop,
}

pub struct Speaker {
    commands: Sender<Request>,
    status: Arc<Mutex<SpeakerStatus>>,
    thread: Option<JoinHandle<()>>,
}

impl Speaker {
    /// Writes `config` and starts supervising BIRD with it. `table` is weft's kernel table.
    pub fn start(files: Files, table: u32, config: String) -> Result<Self> {
        std::fs::create_dir_all(&files.dir)
            .with_context(|| format!("creating BIRD's directory {}", files.dir.display()))?;
        write_config(&files, &config)?;
        let (tx, rx) = mpsc::channel();
        let status = Arc::new(Mutex::new(SpeakerStatus::default()));
        let shared = status.clone();
        // The thread that spawns BIRD is its parent for PR_SET_PDEATHSIG: it lives as long as
        // the speaker.
        let thread = std::thread::Builder::new()
            .name("bird".into())
            .spawn(move || Supervisor::new(files, table, config, shared).run(rx))?;
        Ok(Self {
            commands: tx,
            status,
            thread: Some(thread),
        })
    }

    /// Reloads BIRD with `config` when it differs from the current one; `table` is weft's
    /// kernel table from now on.
    pub fn configure(&self, config: String, table: u32) {
        let _ = self.commands.send(Request::Configure(config, table));
    }

    pub fn status(&self) -> SpeakerStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Shuts BIRD down cleanly (peers withdraw this node's routes, the kernel routes go) and
    /// waits for it.
    pub fn stop(mut self) {
        let _ = self.commands.send(Request::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Supervisor {
    files: Files,
    table: u32,
    config: String,
    status: Arc<Mutex<SpeakerStatus>>,
    child: Option<Child>,
    started_at: Instant,
    next_start: Instant,
    delay: Duration,
    /// The written configuration has not been taken by the running BIRD yet.
    reload_pending: bool,
    /// For reading weft's table (opened on the supervisor's thread, in the agent's namespace).
    netlink: Option<BlockingNetlink>,
}

impl Supervisor {
    fn new(files: Files, table: u32, config: String, status: Arc<Mutex<SpeakerStatus>>) -> Self {
        Self {
            files,
            table,
            config,
            status,
            child: None,
            started_at: Instant::now(),
            next_start: Instant::now(),
            delay: RESTART_DELAY_MIN,
            reload_pending: false,
            netlink: None,
        }
    }

    /// Weft's kernel table (empty when it cannot be read: logged).
    fn read_table(&mut self) -> BTreeMap<Ipv4Net, String> {
        if self.netlink.is_none() {
            match BlockingNetlink::open() {
                Ok(nl) => self.netlink = Some(nl),
                Err(e) => {
                    tracing::warn!("opening netlink to read weft's BGP table: {e}");
                    return BTreeMap::new();
                }
            }
        }
        let nl = self.netlink.as_ref().expect("opened above");
        match table::read_with(nl, self.table) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(table = self.table, "reading weft's BGP table: {e:#}");
                BTreeMap::new()
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut SpeakerStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    fn run(mut self, commands: Receiver<Request>) {
        self.retire_leftover();
        let mut next_poll = Instant::now();
        loop {
            self.watch_child();
            if self.reload_pending && self.child.is_some() {
                self.reload();
            }
            let now = Instant::now();
            if now >= next_poll {
                self.poll();
                next_poll = now + POLL_EVERY;
            }
            let wait = next_poll
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            match commands.recv_timeout(wait) {
                Ok(Request::Configure(text, table)) => {
                    self.table = table;
                    if text != self.config {
                        match write_config(&self.files, &text) {
                            Ok(()) => {
                                self.config = text;
                                self.reload_pending = self.child.is_some();
                            }
                            Err(e) => tracing::error!("writing BIRD's configuration: {e:#}"),
                        }
                    }
                }
                Ok(Request::Stop) => {
                    self.shutdown(Signal::SIGTERM);
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The speaker is gone without a stop: as if the agent died.
                Err(RecvTimeoutError::Disconnected) => {
                    self.shutdown(Signal::SIGKILL);
                    return;
                }
            }
        }
    }

    /// Starts BIRD when none runs (and its restart delay has passed); notices one that exited.
    fn watch_child(&mut self) {
        if let Some(child) = self.child.as_mut() {
            match child.try_wait() {
                Ok(None) => {
                    if self.started_at.elapsed() > STABLE_AFTER {
                        self.delay = RESTART_DELAY_MIN;
                    }
                    return;
                }
                Ok(Some(status)) => {
                    tracing::warn!(%status, "BIRD exited: restarting it (graceful restart)");
                }
                Err(e) => tracing::warn!("waiting for BIRD: {e}"),
            }
            self.child = None;
            self.next_start = Instant::now() + self.delay;
            self.delay = (self.delay * 2).min(RESTART_DELAY_MAX);
            self.update(|s| {
                s.running = false;
                s.pid = None;
                s.crashes += 1;
            });
        }
        if Instant::now() < self.next_start {
            return;
        }
        // Routes in weft's table: a previous BIRD ran here. Recover gracefully: keep them until
        // the peers have sent theirs again.
        let recover = !self.read_table().is_empty();
        match spawn(&self.files, recover) {
            Ok(child) => {
                tracing::info!(pid = child.id(), recover, "BIRD started");
                let pid = child.id();
                self.child = Some(child);
                self.started_at = Instant::now();
                // A fresh BIRD reads the current file.
                self.reload_pending = false;
                self.update(|s| {
                    s.running = true;
                    s.pid = Some(pid);
                    s.starts += 1;
                });
            }
            Err(e) => {
                tracing::error!("starting BIRD: {e:#}");
                self.next_start = Instant::now() + self.delay;
                self.delay = (self.delay * 2).min(RESTART_DELAY_MAX);
            }
        }
    }

    /// `birdc configure`: BIRD re-reads its file and applies the difference in place (sessions
    /// whose settings are unchanged stay up; changed filters re-evaluate the routes).
    fn reload(&mut self) {
        match birdc::run(&self.files.socket(), false, "configure") {
            Ok(reply) if birdc::configure_accepted(&reply) => {
                self.reload_pending = false;
                self.update(|s| s.reloads += 1);
                tracing::info!("BIRD reconfigured");
            }
            Ok(reply) => {
                // A rendered configuration BIRD refuses is a bug: say it, keep the old one.
                self.reload_pending = false;
                self.update(|s| s.reload_errors += 1);
                tracing::error!("BIRD refused the new configuration: {}", reply.trim());
            }
            // Not answering yet (just started): retried on the next turn.
            Err(e) => tracing::debug!("reloading BIRD: {e:#}"),
        }
    }

    fn poll(&mut self) {
        let table = self.read_table();
        let socket = self.files.socket();
        let (sessions, refused) = if self.child.is_some() {
            (
                birdc::run(&socket, true, "show protocols")
                    .map(|t| birdc::parse_protocols(&t))
                    .unwrap_or_default(),
                birdc::run(&socket, true, "show route filtered")
                    .map(|t| birdc::parse_routes(&t))
                    .unwrap_or_default(),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        self.update(|s| {
            s.table = table;
            s.sessions = sessions;
            s.refused = refused;
        });
    }

    /// A BIRD already answering on this node's socket (left by an agent that could not take
    /// it along) is told to restart gracefully, so the one started next takes over without
    /// disturbing forwarding.
    fn retire_leftover(&self) {
        let socket = self.files.socket();
        if birdc::run(&socket, true, "show status").is_err() {
            return;
        }
        tracing::warn!(socket = %socket.display(), "a BIRD is already running here: replacing it (graceful restart)");
        let _ = birdc::run(&socket, false, "graceful restart");
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline && birdc::run(&socket, true, "show status").is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn shutdown(&mut self, signal: Signal) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            tracing::info!(?signal, "BIRD stopped");
        }
        self.update(|s| {
            s.running = false;
            s.pid = None;
            s.sessions.clear();
        });
    }
}

/// Writes the configuration atomically (BIRD may read it at any time).
fn write_config(files: &Files, text: &str) -> Result<()> {
    let path = files.config();
    let tmp = path.with_extension("conf.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Starts `bird` in the foreground (so it stays this thread's child) with this node's files.
fn spawn(files: &Files, recover: bool) -> Result<Child> {
    let agent = std::process::id();
    let mut cmd = Command::new(birdc::tool("bird"));
    cmd.arg("-f")
        .arg("-c")
        .arg(files.config())
        .arg("-s")
        .arg(files.socket())
        .arg("-P")
        .arg(files.pid());
    if recover {
        cmd.arg("-R");
    }
    // Logs go to the agent's stderr (`log stderr` in the configuration).
    cmd.stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The agent died between fork and prctl: do not start an orphan (the error ends
            // the child before exec).
            if nix::unistd::getppid().as_raw() as u32 != agent {
                return Err(io::Error::other("the agent is gone"));
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("running {}", birdc::tool("bird").display()))
}

/// Whether a BIRD answers on `socket` (for the CLI and tests).
pub fn answers(socket: &Path) -> bool {
    birdc::run(socket, true, "show status").is_ok()
}

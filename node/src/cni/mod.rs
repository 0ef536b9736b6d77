//! The CNI plugin `weft-cni`: protocol types (environment, config, results, errors) and the
//! commands. The binary only wires stdin, stdout and the environment to [`run`].
//!
//! Network configuration (besides `cniVersion`, `name`, `type`):
//!
//! | field | default | what |
//! | --- | --- | --- |
//! | `subnetFile` | `/run/weft/subnet.env` | the node's subnet, MTU and pin root, written by the agent |
//! | `dataDir` | `/var/lib/weft/ipam` | IPAM store; one directory per network name |
//! | `pinRoot` | `WEFT_PIN_ROOT` of the subnet file | the node's BPF pins |
//! | `mtu` | `WEFT_MTU` of the subnet file | pod interface MTU |
//! | `logFile` | none (stderr) | where log lines go |
//!
//! Each pod gets a veth (`wft` + 11 hex digits of a hash of container id and interface name
//! on the host, `CNI_IFNAME` in the pod), MACs derived from the same hash, a /32 address from
//! the node's subnet, and a default route via 169.254.1.1 `onlink` with a permanent neighbour
//! entry for it (the host side's MAC): no ARP, no bridge. The host routes the /32 to the veth
//! (with a permanent neighbour entry for the pod), the endpoint goes into the pinned endpoint
//! map and `from_pod` is attached to the host side's TCX ingress.
//!
//! Error codes: the spec's 1, 3, 4, 5, 6, 7, 11, 50, and weft's own in [`error::code`].
//! One weft network per node: GC treats every `wft*` link, `from_pod@wft*` link pin and
//! endpoint of the node's subnet that no allocation accounts for as garbage. GC may run while
//! ADDs do: an ADD commits its allocation (under the IPAM lock) before it creates anything, so
//! GC, which holds that lock while it collects, never takes an ADD in flight for garbage.
//!
//! The host side of each pod's veth carries the attachment in its alias (`weft-cni <container
//! id> <ifname>`): a corrupt or lost IPAM store is rebuilt from the links ([`recover`]) by GC or
//! `weft ipam rebuild`; meanwhile DEL still removes a pod's link, endpoint and programs, and
//! ADD fails naming the store's file.
pub mod commands;
pub mod error;
pub mod names;
pub mod recover;
pub mod result;
pub mod spec;

use std::io::Write as _;

use serde_json::Value;

use self::{
    error::{CniError, code},
    spec::{Command, Env, NetworkConfig},
};

/// What one invocation prints and how it exits.
#[derive(Debug)]
pub struct Invocation {
    /// JSON for stdout (a result, a version answer or an error); None prints nothing.
    pub stdout: Option<Value>,
    pub success: bool,
}

/// Runs one invocation: `get` reads the environment, `stdin` is the whole config.
pub fn run(get: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Invocation {
    let mut version = spec::CURRENT_VERSION.to_string();
    match run_inner(get, stdin, &mut version) {
        Ok(stdout) => Invocation {
            stdout,
            success: true,
        },
        Err(e) => {
            eprintln!("weft-cni: {e}");
            Invocation {
                stdout: Some(e.to_json(&version)),
                success: false,
            }
        }
    }
}

fn run_inner(
    get: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    version: &mut String,
) -> Result<Option<Value>, CniError> {
    let command = Env::command(get)?;
    if command == Command::Version {
        return Ok(Some(commands::version(stdin)));
    }
    let raw = spec::decode(stdin)?;
    if let Ok(v) = spec::version_of(&raw) {
        *version = v;
    }
    let conf = NetworkConfig::parse(raw)?;
    if matches!(command, Command::Gc | Command::Status)
        && !spec::version_at_least(&conf.cni_version, "1.1.0")
    {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{command:?} needs cniVersion 1.1.0 or newer, the configuration has {}",
                conf.cni_version
            ),
        ));
    }
    let env = Env::read(command, get)?;
    let log = Log::new(&conf, &env);
    let started = std::time::Instant::now();
    let out = match command {
        Command::Add => commands::add(&env, &conf, &log).map(Some),
        Command::Del => commands::del(&env, &conf, &log).map(|()| None),
        Command::Check => commands::check(&env, &conf, &log).map(|()| None),
        Command::Gc => commands::gc(&conf, &log).map(|()| None),
        Command::Status => commands::status(&conf).map(|()| None),
        Command::Version => unreachable!("handled above"),
    };
    match &out {
        Ok(_) => log.line(&format!("{command:?} done in {:?}", started.elapsed())),
        Err(e) => log.line(&format!("{command:?} failed: {e}")),
    }
    out
}

/// Log lines go to stderr and, when the config names one, to `logFile`; never to stdout.
pub struct Log {
    prefix: String,
    file: Option<std::path::PathBuf>,
}

impl Log {
    fn new(conf: &NetworkConfig, env: &Env) -> Self {
        Self {
            prefix: format!(
                "weft-cni[{}] {} {}/{}",
                std::process::id(),
                conf.name,
                env.container_id,
                env.ifname
            ),
            file: conf.log_file.clone(),
        }
    }

    pub fn line(&self, msg: &str) {
        let line = format!("{}: {msg}\n", self.prefix);
        if let Some(path) = &self.file
            && let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        } else if self.file.is_none() {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}

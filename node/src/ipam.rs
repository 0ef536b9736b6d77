//! Address allocation for the pods of one node, persisted in a file.
//!
//! The store of a network is `<data dir>/<network>/allocations.json`, changed only under an
//! exclusive `flock` on `<data dir>/<network>/lock` (runtimes call plugins in parallel) and
//! written atomically (temporary file, fsync, rename, fsync of the directory): a plugin killed
//! at any point leaves either the old or the new file, never half of one. Allocations are keyed
//! by (container id, interface name), so a repeated ADD gets the same address. Addresses are
//! handed out round-robin after the last one given, as host-local does, so a released address
//! is not reused at once.
use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address left in {subnet} ({allocated} allocated)")]
    Exhausted { subnet: Ipv4Net, allocated: usize },
    #[error("the IPAM store {path} is locked by another plugin for more than {waited:?}")]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error("the requested address {ip} cannot be allocated: {why}")]
    Unavailable { ip: Ipv4Addr, why: String },
    #[error("IPAM store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: anyhow::Error,
    },
    #[error(
        "the IPAM store {path} is corrupt ({reason}): rebuild it from the node's links with \
         `weft ipam rebuild` (the runtime's CNI GC rebuilds it too)"
    )]
    Corrupt { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    /// The pod, `namespace/name`, when the runtime said (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`
    /// in `CNI_ARGS`): `weft monitor` names endpoints with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The pod's network namespace (`CNI_NETNS`): the agent enters it to change the MTU of the
    /// pod's default route when a live backend switch changes the path MTU. None in records
    /// written before weft recorded it or rebuilt from links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The last address handed out (round-robin cursor).
    pub last: Option<Ipv4Addr>,
    pub allocations: Vec<Allocation>,
}

/// The IPAM store of one network.
pub struct Ipam {
    dir: PathBuf,
}

/// The store, locked: read, change, then `commit`. The lock goes with the value.
pub struct Locked {
    dir: PathBuf,
    _lock: Flock<File>,
    pub state: State,
}

const STATE_FILE: &str = "allocations.json";
const LOCK_FILE: &str = "lock";

impl Ipam {
    pub fn new(data_dir: &Path, network: &str) -> Self {
        Self {
            dir: data_dir.join(network),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store's file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Takes the lock (waiting up to `timeout`) and reads the state. A store that does not
    /// parse is [`IpamError::Corrupt`].
    pub fn lock(&self, timeout: Duration) -> Result<Locked, IpamError> {
        let mut locked = self.lock_unread(timeout)?;
        locked.state = read_state(&self.path()).map_err(|e| match e {
            ReadError::Io(source) => IpamError::Store {
                path: self.dir.clone(),
                source,
            },
            ReadError::Corrupt(reason) => IpamError::Corrupt {
                path: self.path(),
                reason,
            },
        })?;
        Ok(locked)
    }

    /// Takes the lock without reading the store (its state starts empty): for rebuilding a
    /// store that does not parse ([`Locked::replace`]).
    pub fn lock_unread(&self, timeout: Duration) -> Result<Locked, IpamError> {
        let store_err = |source: anyhow::Error| IpamError::Store {
            path: self.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| store_err(e.into()))?;
        let lock_path = self.dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| store_err(e.into()))?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(200);
        let lock = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => break lock,
                Err((f, nix::errno::Errno::EWOULDBLOCK)) | Err((f, nix::errno::Errno::EINTR)) => {
                    if start.elapsed() > timeout {
                        return Err(IpamError::LockTimeout {
                            path: lock_path,
                            waited: timeout,
                        });
                    }
                    file = f;
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(10));
                }
                Err((_, e)) => return Err(store_err(anyhow::anyhow!("flock: {e}"))),
            }
        };
        Ok(Locked {
            dir: self.dir.clone(),
            _lock: lock,
            state: State::default(),
        })
    }
}

/// Every allocation of every network's store under `data_dir` (one directory per network),
/// read without the lock: a snapshot for readers (`weft monitor`, the agent), which never
/// change a store. One unreadable store never hides the others.
pub fn read_all(data_dir: &Path) -> Vec<Allocation> {
    let Ok(dirs) = std::fs::read_dir(data_dir) else {
        return Vec::new();
    };
    dirs.flatten()
        .filter_map(|dir| read_state(&dir.path().join(STATE_FILE)).ok())
        .flat_map(|state| state.allocations)
        .collect()
}

enum ReadError {
    Io(anyhow::Error),
    Corrupt(String),
}

fn read_state(path: &Path) -> Result<State, ReadError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ReadError::Corrupt(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(ReadError::Io(e.into())),
    }
}

impl Locked {
    pub fn find(&self, container_id: &str, ifname: &str) -> Option<&Allocation> {
        self.state
            .allocations
            .iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
    }

    /// The address of (container id, ifname): the existing one, or a new one from `subnet`
    /// avoiding `reserved`. Returns whether it is new. Not persisted until `commit`.
    pub fn allocate(
        &mut self,
        subnet: Ipv4Net,
        reserved: &[Ipv4Addr],
        container_id: &str,
        ifname: &str,
    ) -> Result<(Ipv4Addr, bool), IpamError> {
        if let Some(a) = self.find(container_id, ifname)
            && subnet.contains(&a.ip)
        {
            return Ok((a.ip, false));
        }
        // An allocation from an older subnet of this node is replaced.
        self.state
            .allocations
            .retain(|a| !(a.container_id == container_id && a.ifname == ifname));
        let used: std::collections::HashSet<Ipv4Addr> =
            self.state.allocations.iter().map(|a| a.ip).collect();
        let first = u32::from(subnet.network()).saturating_add(1);
        let last = u32::from(subnet.broadcast()).saturating_sub(1);
        if subnet.prefix_len() >= 31 || first > last {
            return Err(IpamError::Exhausted {
                subnet,
                allocated: used.len(),
            });
        }
        let size = last - first + 1;
        let start = match self.state.last {
            Some(l) if subnet.contains(&l) => u32::from(l).saturating_add(1),
            _ => first,
        };
        for i in 0..size {
            let candidate = first + (start.wrapping_sub(first).wrapping_add(i)) % size;
            let ip = Ipv4Addr::from(candidate);
            if used.contains(&ip) || reserved.contains(&ip) {
                continue;
            }
            self.state.allocations.push(Allocation {
                ip,
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
                pod: None,
                netns: None,
            });
            self.state.last = Some(ip);
            return Ok((ip, true));
        }
        Err(IpamError::Exhausted {
            subnet,
            allocated: used.len(),
        })
    }

    /// Records the pod an allocation belongs to and its network namespace; returns whether
    /// that changed anything.
    pub fn set_pod(
        &mut self,
        container_id: &str,
        ifname: &str,
        pod: Option<String>,
        netns: Option<String>,
    ) -> bool {
        match self
            .state
            .allocations
            .iter_mut()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
        {
            Some(a) if a.pod != pod || a.netns != netns => {
                a.pod = pod;
                a.netns = netns;
                true
            }
            _ => false,
        }
    }

    /// Allocates the requested address `ip` to (container id, ifname) (the runtime asked for it:
    /// `CNI_ARGS` `IP=`, `runtimeConfig.ips`). Returns whether it is new; refused when the
    /// address is outside `subnet`, reserved, or held by another attachment.
    pub fn allocate_requested(
        &mut self,
        subnet: Ipv4Net,
        reserved: &[Ipv4Addr],
        ip: Ipv4Addr,
        container_id: &str,
        ifname: &str,
    ) -> Result<(Ipv4Addr, bool), IpamError> {
        let first = u32::from(subnet.network()).saturating_add(1);
        let last = u32::from(subnet.broadcast()).saturating_sub(1);
        if !(first..=last).contains(&u32::from(ip)) || reserved.contains(&ip) {
            return Err(IpamError::Unavailable {
                ip,
                why: format!("not a pod address of {subnet}"),
            });
        }
        match self.state.allocations.iter().find(|a| a.ip == ip) {
            Some(a) if a.container_id == container_id && a.ifname == ifname => {
                return Ok((ip, false));
            }
            Some(a) => {
                return Err(IpamError::Unavailable {
                    ip,
                    why: format!("held by container {} ({})", a.container_id, a.ifname),
                });
            }
            None => {}
        }
        self.state
            .allocations
            .retain(|a| !(a.container_id == container_id && a.ifname == ifname));
        self.state.allocations.push(Allocation {
            ip,
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
            pod: None,
            netns: None,
        });
        Ok((ip, true))
    }

    /// Removes the allocation of (container id, ifname), returning it.
    pub fn release(&mut self, container_id: &str, ifname: &str) -> Option<Allocation> {
        let pos = self
            .state
            .allocations
            .iter()
            .position(|a| a.container_id == container_id && a.ifname == ifname)?;
        Some(self.state.allocations.remove(pos))
    }

    /// Keeps only the allocations for which `keep` holds; returns the removed ones.
    pub fn retain(&mut self, keep: impl Fn(&Allocation) -> bool) -> Vec<Allocation> {
        let (kept, removed) = std::mem::take(&mut self.state.allocations)
            .into_iter()
            .partition(|a| keep(a));
        self.state.allocations = kept;
        removed
    }

    /// Replaces the store with `state`, keeping the old file beside it
    /// (`allocations.json.corrupt-<unix seconds>`) for a post-mortem. Returns where the old file
    /// went, if there was one.
    pub fn replace(&mut self, state: State) -> Result<Option<PathBuf>, IpamError> {
        let old = self.dir.join(STATE_FILE);
        let kept = if old.exists() {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let backup = self.dir.join(format!("{STATE_FILE}.corrupt-{secs}"));
            std::fs::rename(&old, &backup).map_err(|e| IpamError::Store {
                path: self.dir.clone(),
                source: e.into(),
            })?;
            Some(backup)
        } else {
            None
        };
        self.state = state;
        self.commit()?;
        Ok(kept)
    }

    /// Persists the state atomically.
    pub fn commit(&self) -> Result<(), IpamError> {
        write_atomic(&self.dir, STATE_FILE, &self.state).map_err(|source| IpamError::Store {
            path: self.dir.clone(),
            source,
        })
    }
}

fn write_atomic(dir: &Path, name: &str, state: &State) -> anyhow::Result<()> {
    // Unique per process: a killed writer's leftover never collides with a live one (the lock
    // serialises writers anyway) and is overwritten by the next writer with that pid.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(state)?)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    // The rename itself is durable only once the directory is.
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "weft-ipam-unit-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn allocates_idempotently_round_robin_and_exhausts() {
        let dir = tmpdir();
        let ipam = Ipam::new(&dir, "net");
        let subnet: Ipv4Net = "10.1.0.0/29".parse().unwrap();
        let gw = Ipv4Addr::new(10, 1, 0, 1);
        let mut l = ipam.lock(Duration::from_secs(1)).unwrap();
        let (a, new) = l.allocate(subnet, &[gw], "c1", "eth0").unwrap();
        assert!(new);
        assert_eq!(a, Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(l.allocate(subnet, &[gw], "c1", "eth0").unwrap(), (a, false));
        l.commit().unwrap();
        drop(l);
        let mut l = ipam.lock(Duration::from_secs(1)).unwrap();
        assert_eq!(l.find("c1", "eth0").unwrap().ip, a);
        // .3 .. .6 are free (.7 is the broadcast address).
        let mut got = vec![];
        for i in 0..4 {
            got.push(
                l.allocate(subnet, &[gw], &format!("x{i}"), "eth0")
                    .unwrap()
                    .0,
            );
        }
        assert_eq!(got.last(), Some(&Ipv4Addr::new(10, 1, 0, 6)));
        let err = l.allocate(subnet, &[gw], "y", "eth0").unwrap_err();
        assert!(matches!(err, IpamError::Exhausted { .. }), "{err}");
        // A released address is not handed out first: the cursor moves on (wrapping).
        assert!(l.release("c1", "eth0").is_some());
        assert_eq!(l.allocate(subnet, &[gw], "z", "eth0").unwrap().0, a);
        let removed = l.retain(|a| a.container_id == "z");
        assert_eq!(removed.len(), 4);
        drop(l);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_store_is_named_and_can_be_replaced() {
        let dir = tmpdir();
        let ipam = Ipam::new(&dir, "net");
        std::fs::create_dir_all(ipam.dir()).unwrap();
        std::fs::write(ipam.path(), b"{\"allocations\": [{\"ip\": ").unwrap();
        let err = match ipam.lock(Duration::from_secs(1)) {
            Err(e) => e,
            Ok(_) => panic!("a corrupt store was read"),
        };
        assert!(matches!(err, IpamError::Corrupt { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&ipam.path().display().to_string()) && text.contains("weft ipam rebuild"),
            "{text}"
        );
        let mut l = ipam.lock_unread(Duration::from_secs(1)).unwrap();
        let state = State {
            last: Some(Ipv4Addr::new(10, 1, 0, 9)),
            allocations: vec![Allocation {
                ip: Ipv4Addr::new(10, 1, 0, 9),
                container_id: "c".into(),
                ifname: "eth0".into(),
                pod: None,
                netns: None,
            }],
        };
        let kept = l
            .replace(state.clone())
            .unwrap()
            .expect("the old file kept");
        drop(l);
        assert!(
            std::fs::read_to_string(kept)
                .unwrap()
                .starts_with("{\"allocations\"")
        );
        assert_eq!(ipam.lock(Duration::from_secs(1)).unwrap().state, state);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lock_times_out_while_held() {
        let dir = tmpdir();
        let ipam = Ipam::new(&dir, "net");
        let held = ipam.lock(Duration::from_secs(1)).unwrap();
        let err = match ipam.lock(Duration::from_millis(50)) {
            Err(e) => e,
            Ok(_) => panic!("second lock succeeded"),
        };
        assert!(matches!(err, IpamError::LockTimeout { .. }), "{err}");
        drop(held);
        assert!(ipam.lock(Duration::from_millis(50)).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Running code in another network namespace: a scoped thread that `setns`es only its network
//! namespace (the process's other threads, its mounts and bpffs stay as they are). Processes
//! spawned from that thread start in the namespace.
use std::{fs::File, path::Path};

use anyhow::{Context as _, Result, anyhow};
use nix::sched::{CloneFlags, setns};

/// Moves the calling thread (only its network namespace) into the namespace at `netns`.
pub fn enter(netns: &Path) -> Result<()> {
    let file = File::open(netns)
        .with_context(|| format!("opening the network namespace {}", netns.display()))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering the network namespace {}", netns.display()))
}

/// Runs `f` on a thread inside the network namespace at `netns` and returns its result.
pub fn run_in<T: Send>(netns: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    // Opened here so that a missing namespace fails before a thread exists.
    File::open(netns)
        .with_context(|| format!("opening the network namespace {}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            enter(netns)?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("the thread in {} panicked", netns.display()))?
    })
}

/// Whether `path` is a network namespace (a bind-mounted nsfs file or /proc/*/ns/net).
pub fn is_netns(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e736673;
    nix::sys::statfs::statfs(path)
        .map(|st| st.filesystem_type().0 == NSFS_MAGIC)
        .unwrap_or(false)
}

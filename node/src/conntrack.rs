//! Garbage collection of the datapath's conntrack map (`WEFT_CT`).
//!
//! The datapath treats an expired entry as absent, and an LRU map evicts its least recently
//! used entries when full, so nothing depends on the GC for correctness; it keeps the map from
//! filling with dead flows (which would evict live ones). It walks the map in chunks with a
//! cursor (`BPF_MAP_GET_NEXT_KEY`), a few thousand entries per turn of the agent's loop, and
//! deletes entries whose expiry has passed.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use anyhow::{Context as _, Result};
use weft_common::conntrack::{CtKey, alive};

use crate::datapath::Maps;

/// Entries examined per GC step.
pub const GC_BUDGET: usize = 8192;

/// The clock of `CtEntry::expires_s`: monotonic seconds, as `bpf_ktime_get_coarse_ns`.
pub fn now_s() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u32
}

/// The key after `key` (the first one for `None`), `None` at the end of the map.
///
/// One plain `bpf(BPF_MAP_GET_NEXT_KEY)`: aya's key iterator always starts at the first key,
/// and a walk in chunks must resume where the previous chunk stopped.
fn next_key(fd: BorrowedFd<'_>, key: Option<&CtKey>) -> io::Result<Option<CtKey>> {
    // From the kernel's uapi `linux/bpf.h`.
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let mut next = CtKey::of([0; 4], [0; 2], [0; 4], [0; 2], 0).0;
    // `union bpf_attr`, zeroed (the kernel requires every byte it does not know to be zero);
    // map_elem: { map_fd: u32, pad: u32, key: u64, next_key: u64 }.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    if let Some(k) = key {
        attr[8..16].copy_from_slice(&(k as *const CtKey as u64).to_ne_bytes());
    }
    attr[16..24].copy_from_slice(&(&mut next as *mut CtKey as u64).to_ne_bytes());
    // SAFETY: `attr` is a valid buffer of the size passed; the pointers in it are a live key
    // and a writable key of the map's key size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_GET_NEXT_KEY,
            attr.as_mut_ptr(),
            attr.len(),
        )
    };
    if ret == 0 {
        return Ok(Some(next));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// What one GC step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStep {
    pub scanned: usize,
    pub deleted: usize,
    /// Set when the step finished a pass over the whole map: live entries seen in that pass.
    pub pass_live: Option<u64>,
}

/// The GC's position in the map between steps.
#[derive(Default)]
pub struct Gc {
    /// The next key to examine (`None`: start a new pass).
    pending: Option<CtKey>,
    /// Live entries seen so far in the current pass.
    live: u64,
}

impl Gc {
    /// Examines up to `budget` entries from where the last step stopped and deletes the
    /// expired ones.
    pub fn step(&mut self, maps: &mut Maps, budget: usize, now_s: u32) -> Result<GcStep> {
        let mut out = GcStep::default();
        let mut expired = Vec::new();
        {
            let fd = maps.conntrack_fd()?;
            let mut key = match self.pending.take() {
                Some(k) => Some(k),
                None => {
                    self.live = 0;
                    next_key(fd, None).context("walking the conntrack map")?
                }
            };
            while out.scanned < budget {
                let Some(k) = key else {
                    break;
                };
                // The next key first: deleting `k` before would lose the walk's place.
                key = next_key(fd, Some(&k)).context("walking the conntrack map")?;
                out.scanned += 1;
                match maps.conntrack_entry(&k)? {
                    Some(e) if !alive(&e, now_s) => expired.push(k),
                    Some(_) => self.live += 1,
                    None => {}
                }
            }
            if key.is_none() {
                out.pass_live = Some(self.live);
            }
            self.pending = key;
        }
        for k in &expired {
            maps.remove_conntrack(k)?;
        }
        out.deleted = expired.len();
        Ok(out)
    }
}

//! Per-CPU counters: every drop has a reason, every forwarding path a count.
use weft_common::{DropReason, Stat};

use crate::maps::{WEFT_DROPS, WEFT_STATS};

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(counter) = WEFT_DROPS.get_ptr_mut(reason as u32) {
        // Per-CPU slot: no other writer.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(counter) = WEFT_STATS.get_ptr_mut(stat as u32) {
        unsafe { *counter += 1 };
    }
}

//! Per-CPU counters: every drop has a reason, every forwarding path a count.
use weft_common::{DropReason, Stat, monitor::Hook};

use crate::{
    maps::{WEFT_DROPS, WEFT_STATS},
    monitor::{self, Packet},
};

/// Counts a drop, and reports it to an attached `weft monitor`: the one place every drop
/// passes.
#[inline(always)]
pub fn count_drop<P: Packet>(ctx: &P, hook: Hook, reason: DropReason) {
    if let Some(counter) = WEFT_DROPS.get_ptr_mut(reason as u32) {
        // Per-CPU slot: no other writer.
        unsafe { *counter += 1 };
    }
    monitor::dropped(ctx, hook, reason as u32);
}

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(counter) = WEFT_STATS.get_ptr_mut(stat as u32) {
        unsafe { *counter += 1 };
    }
}

//! Maps shared by every program of a node. They are pinned by name in the
//! node's bpffs directory, so all objects of a node (and a restarted agent)
//! use the same instances.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuHashMap, RingBuf},
};
use ciliate_common::metrics::{MAX_ENTRIES, MetricsKey, MetricsValue};

/// Packets and bytes per (reason, direction). See `ciliate_common::metrics`.
#[map(name = "CILIATE_METRICS")]
pub static CILIATE_METRICS: PerCpuHashMap<MetricsKey, MetricsValue> =
    PerCpuHashMap::pinned(MAX_ENTRIES, 0);

/// Drop and trace events. See `ciliate_common::event`.
#[map(name = "CILIATE_EVENTS")]
pub static CILIATE_EVENTS: RingBuf = RingBuf::pinned(ciliate_common::event::RINGBUF_BYTES, 0);

/// Add one packet of `len` bytes to the (reason, dir) counter.
#[inline(always)]
pub fn count(reason: u8, dir: u8, len: u32) {
    let key = MetricsKey::new(reason, dir);
    match CILIATE_METRICS.get_ptr_mut(key) {
        Some(v) => {
            // SAFETY: per-CPU value, no other writer on this CPU while we run.
            unsafe {
                (*v).packets += 1;
                (*v).bytes += u64::from(len);
            }
        }
        None => {
            let v = MetricsValue {
                packets: 1,
                bytes: u64::from(len),
            };
            // A full map loses this sample; there is nothing better to do.
            let _ = CILIATE_METRICS.insert(key, v, 0);
        }
    }
}

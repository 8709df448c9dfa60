//! Decoding the datapath's ring-buffer events (`ciliate_common::event`).

use ciliate_common::event::{DropNotify, EventHeader, KIND_DROP, KIND_TRACE, TraceNotify};

/// One event as user space sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Drop(DropNotify),
    Trace(TraceNotify),
    /// A kind this build does not know, or a record too short for its kind.
    Unknown {
        kind: u8,
        len: usize,
    },
}

fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>()).then(|| {
        // SAFETY: length checked; T is a repr(C) integer-only struct, so any
        // bytes are a valid value; read_unaligned has no alignment needs.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
    })
}

impl Event {
    pub fn decode(bytes: &[u8]) -> Self {
        let Some(hdr) = read::<EventHeader>(bytes) else {
            return Event::Unknown { kind: 0, len: bytes.len() };
        };
        let decoded = match hdr.kind {
            KIND_DROP => read::<DropNotify>(bytes).map(Event::Drop),
            KIND_TRACE => read::<TraceNotify>(bytes).map(Event::Trace),
            _ => None,
        };
        decoded.unwrap_or(Event::Unknown { kind: hdr.kind, len: bytes.len() })
    }

    /// The packet bytes the datapath captured with the event.
    pub fn captured(&self) -> &[u8] {
        let (data, n): (&[u8], u16) = match self {
            Event::Drop(d) => (&d.data, d.hdr.len_cap),
            Event::Trace(t) => (&t.data, t.hdr.len_cap),
            Event::Unknown { .. } => (&[], 0),
        };
        &data[..usize::from(n).min(data.len())]
    }
}

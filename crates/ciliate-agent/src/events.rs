//! Events have one owner: the agent reads the datapath's ring buffer (the
//! only consumer) and fans every event out to any number of subscribers
//! (`ciliate monitor` through `GET /v1/events`, and the agent's own
//! consumers). A subscriber that falls behind is told how many events it
//! missed; events the datapath had no ring room for are counted by the
//! datapath (`ciliate_events_lost`) and told to every subscriber.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use ciliate_api::models::{
    CaptureEvent, DebugEvent, DropEvent, LostEvents, MonitorEvent, MonitorStatus,
    PolicyVerdictEvent, TraceEvent,
};
use ciliate_common::{ct, drop, event, policy, trace};
use ciliate_datapath::{
    events::{Event, summary},
    maps::{EventRing, EventsLost},
};
use tokio::sync::broadcast;

/// Why events went missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostCause {
    /// The datapath found the ring full.
    RingFull,
    /// This subscriber read too slowly.
    TooSlow,
}

impl LostCause {
    pub fn text(self) -> &'static str {
        match self {
            LostCause::RingFull => "ring buffer full",
            LostCause::TooSlow => "subscriber too slow",
        }
    }
}

/// What subscribers receive, in the order the agent read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Event { time: SystemTime, event: Event },
    Lost { time: SystemTime, count: u64, cause: LostCause },
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    lost_in_datapath: AtomicU64,
    lost_by_subscribers: AtomicU64,
    /// Subscribers inside the agent (the flow observer): not shown as
    /// monitor subscribers.
    internal: AtomicU64,
}

/// The fan-out. Cheap to clone.
#[derive(Clone)]
pub struct EventHub {
    tx: broadcast::Sender<Arc<Record>>,
    counters: Arc<Counters>,
}

/// Events a subscriber may lag behind before it loses some (~1 MiB of
/// events shared by all subscribers: one copy, each reads at its pace).
pub const BACKLOG: usize = 4096;

impl EventHub {
    pub fn new(backlog: usize) -> Self {
        Self { tx: broadcast::channel(backlog.max(1)).0, counters: Arc::default() }
    }

    /// Every record published from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription { rx: self.tx.subscribe(), counters: self.counters.clone(), internal: false }
    }

    /// [`EventHub::subscribe`] for a consumer inside the agent, which
    /// `status` does not count among the monitor's subscribers.
    pub fn subscribe_internal(&self) -> Subscription {
        self.counters.internal.fetch_add(1, Ordering::Relaxed);
        Subscription { rx: self.tx.subscribe(), counters: self.counters.clone(), internal: true }
    }

    pub fn publish(&self, r: Record) {
        match &r {
            Record::Event { .. } => self.counters.events.fetch_add(1, Ordering::Relaxed),
            Record::Lost { count, .. } => {
                self.counters.lost_in_datapath.fetch_add(*count, Ordering::Relaxed)
            }
        };
        // No subscriber: nobody to tell.
        let _ = self.tx.send(Arc::new(r));
    }

    pub fn status(&self) -> MonitorStatus {
        MonitorStatus {
            subscribers: self
                .tx
                .receiver_count()
                .saturating_sub(self.counters.internal.load(Ordering::Relaxed) as usize),
            events: self.counters.events.load(Ordering::Relaxed),
            lost_in_datapath: self.counters.lost_in_datapath.load(Ordering::Relaxed),
            lost_by_subscribers: self.counters.lost_by_subscribers.load(Ordering::Relaxed),
        }
    }
}

/// One subscriber's view of the hub.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Record>>,
    counters: Arc<Counters>,
    internal: bool,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.internal {
            self.counters.internal.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Subscription {
    /// The next record; after falling behind, a `Lost` record saying how
    /// many were missed. `None` once the hub is gone.
    pub async fn next(&mut self) -> Option<Arc<Record>> {
        match self.rx.recv().await {
            Ok(r) => Some(r),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                self.counters.lost_by_subscribers.fetch_add(n, Ordering::Relaxed);
                Some(Arc::new(Record::Lost {
                    time: SystemTime::now(),
                    count: n,
                    cause: LostCause::TooSlow,
                }))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// How long the reader lets events gather after a drain.
const GATHER: Duration = Duration::from_millis(10);

/// Read the ring until `shutdown`: woken by the ring's file descriptor,
/// with a check each second for events the datapath lost.
pub async fn read_ring(
    hub: EventHub,
    ring: EventRing,
    lost: Option<EventsLost>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    // SAFETY: the ring owns its map's file descriptor, keeps it open while
    // it lives and always returns that one.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    };
    let mut ring = match registered {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(subsystem = "events", error = %e, "cannot poll the event ring; no events");
            return;
        }
    };
    // Losses before this agent started were nobody's.
    let mut lost_seen = lost.as_ref().and_then(|l| l.total().ok()).unwrap_or(0);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            g = ring.readable_mut() => match g {
                Ok(mut g) => {
                    // Cleared before draining: an event that arrives during the
                    // drain wakes us again.
                    g.clear_ready();
                    drain(&hub, g.get_inner_mut());
                    // Let events gather before the next wake-up: the kernel
                    // wakes a reader only when it had caught up, so while we
                    // sleep the datapath writes without waking anyone, and
                    // a busy node costs at most 100 wake-ups a second
                    // instead of one per event.
                    tokio::time::sleep(GATHER).await;
                }
                Err(e) => {
                    tracing::error!(subsystem = "events", error = %e, "polling the event ring");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            _ = tick.tick() => {
                drain(&hub, ring.get_mut());
                if let Some(total) = lost.as_ref().and_then(|l| l.total().ok())
                    && total > lost_seen
                {
                    tracing::warn!(subsystem = "events", lost = total - lost_seen, "the datapath lost events (ring buffer full)");
                    hub.publish(Record::Lost { time: SystemTime::now(), count: total - lost_seen, cause: LostCause::RingFull });
                    lost_seen = total;
                }
            }
            _ = crate::api::stopped(&mut shutdown) => return,
        }
    }
}

fn drain(hub: &EventHub, ring: &mut EventRing) {
    for event in ring.drain() {
        hub.publish(Record::Event { time: SystemTime::now(), event });
    }
}

/// ifindex → device name in the agent's namespace, looked up again (at
/// most once a second) when an index is unknown.
#[derive(Default)]
pub struct IfNames {
    known: Mutex<(HashMap<u32, String>, Option<Instant>)>,
}

impl IfNames {
    pub async fn name(self: &Arc<Self>, index: u32) -> String {
        if index == 0 {
            return String::new();
        }
        {
            let k = self.known.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = k.0.get(&index) {
                return n.clone();
            }
            if k.1.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return index.to_string();
            }
        }
        let links = tokio::task::spawn_blocking(|| {
            ciliate_datapath::netlink::Netlink::here().and_then(|nl| nl.links())
        })
        .await;
        let mut k = self.known.lock().unwrap_or_else(|e| e.into_inner());
        k.1 = Some(Instant::now());
        if let Ok(Ok(links)) = links {
            k.0 = links.into_iter().map(|l| (l.index, l.name)).collect();
        }
        k.0.get(&index).cloned().unwrap_or_else(|| index.to_string())
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

fn state_name(s: u8) -> &'static str {
    match s {
        ct::CT_NEW => "new",
        ct::CT_ESTABLISHED => "established",
        ct::CT_REPLY => "reply",
        ct::CT_RELATED => "related",
        _ => "unknown",
    }
}

/// A record as the API shows it (`None` for kinds this build does not
/// know).
pub async fn model(r: &Record, ifnames: &Arc<IfNames>) -> Option<MonitorEvent> {
    let (time, ev) = match r {
        Record::Lost { time, count, cause } => {
            return Some(MonitorEvent::Lost(LostEvents {
                time: rfc3339(*time),
                lost: *count,
                cause: cause.text().into(),
            }));
        }
        Record::Event { time, event } => (rfc3339(*time), event),
    };
    let pkt = summary(ev.captured());
    Some(match ev {
        Event::Trace(t) => {
            let cap = ev.captured();
            let orig = if t.orig_ip[..4] != [0; 4] {
                Ipv4Addr::new(t.orig_ip[0], t.orig_ip[1], t.orig_ip[2], t.orig_ip[3])
            } else if cap.len() >= 30 && cap[12..14] == [8, 0] {
                Ipv4Addr::new(cap[26], cap[27], cap[28], cap[29])
            } else {
                Ipv4Addr::UNSPECIFIED
            };
            MonitorEvent::Trace(TraceEvent {
                time,
                observation_point: trace::point_name(t.hdr.subtype).into(),
                source: t.hdr.source,
                flow: format!("{:#x}", t.hdr.hash),
                src_identity: t.src_identity,
                dst_identity: t.dst_identity,
                dst_endpoint: t.dst_id,
                state: state_name(t.ct_state).into(),
                ifindex: t.ifindex,
                interface: ifnames.name(t.ifindex).await,
                orig_ip: orig,
                tunnel_endpoint: (t.tunnel_endpoint != [0; 4])
                    .then(|| Ipv4Addr::from(t.tunnel_endpoint)),
                length: t.hdr.len_orig,
                summary: pkt,
            })
        }
        Event::Drop(d) => MonitorEvent::Drop(DropEvent {
            time,
            reason: d.hdr.subtype,
            reason_text: drop::reason_name(d.hdr.subtype).into(),
            source: d.hdr.source,
            flow: format!("{:#x}", d.hdr.hash),
            src_identity: d.src_identity,
            dst_identity: d.dst_identity,
            dst_endpoint: d.dst_id,
            ifindex: d.ifindex,
            interface: ifnames.name(d.ifindex).await,
            line: d.line,
            length: d.hdr.len_orig,
            summary: pkt,
        }),
        Event::PolicyVerdict(v) => MonitorEvent::PolicyVerdict(PolicyVerdictEvent {
            time,
            endpoint: v.hdr.source,
            flow: format!("{:#x}", v.hdr.hash),
            remote_identity: v.remote_identity,
            proto: v.proto,
            dport: u16::from_be(v.dport),
            ingress: v.dir == policy::DIR_INGRESS,
            action: if v.verdict == event::VERDICT_ALLOWED { "allow" } else { "deny" }.into(),
            matched: policy::match_name(v.match_type).into(),
            summary: pkt,
        }),
        Event::Debug(d) => MonitorEvent::Debug(DebugEvent {
            time,
            cpu: format!("CPU {:02}", d.cpu),
            source: d.hdr.source,
            flow: format!("{:#x}", d.hdr.hash),
            subtype: d.hdr.subtype,
            message: ciliate_datapath::events::debug_message(d),
        }),
        Event::Capture(c) => MonitorEvent::Capture(CaptureEvent {
            time,
            cpu: format!("CPU {:02}", c.cpu),
            source: c.hdr.source,
            flow: format!("{:#x}", c.hdr.hash),
            subtype: c.hdr.subtype,
            message: ciliate_datapath::events::capture_message(c),
            length: c.hdr.len_orig,
            summary: pkt,
        }),
        Event::Unknown { .. } => return None,
    })
}

/// `GET /v1/events?type=…&related-to=…`: which events a subscriber wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub kind: Option<&'static str>,
    pub related_to: Option<u16>,
}

impl Filter {
    pub fn parse(kind: Option<&str>, related_to: Option<&str>) -> Result<Self, String> {
        let kind = match kind {
            None | Some("") => None,
            Some(k) => Some(
                ["drop", "trace", "policy-verdict", "debug", "capture"]
                    .into_iter()
                    .find(|x| *x == k)
                    .ok_or_else(|| {
                        format!("event type {k:?}: drop, trace, policy-verdict, debug or capture")
                    })?,
            ),
        };
        let related_to = match related_to {
            None | Some("") => None,
            Some(r) => {
                Some(r.parse().map_err(|_| format!("related-to {r:?} is not an endpoint ID"))?)
            }
        };
        Ok(Self { kind, related_to })
    }

    /// Lost-event notices always pass: a subscriber must know.
    pub fn passes(&self, e: &MonitorEvent) -> bool {
        if let MonitorEvent::Lost(_) = e {
            return true;
        }
        self.kind.is_none_or(|k| k == e.kind()) && self.related_to.is_none_or(|id| e.related_to(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciliate_common::event::{DropNotify, EVENT_VERSION, EventHeader, KIND_DROP};

    fn drop_event(reason: u8, source: u16) -> Event {
        Event::Drop(DropNotify {
            hdr: EventHeader {
                kind: KIND_DROP,
                subtype: reason,
                source,
                hash: 0xabc,
                len_orig: 98,
                len_cap: 0,
                version: EVENT_VERSION,
            },
            src_identity: 257,
            dst_identity: 258,
            dst_id: 9,
            ifindex: 0,
            line: 42,
            file: 1,
            ext_error: 0,
            dir: 0,
            _pad: [0; 3],
            data: [0; event::CAPTURE_LEN],
        })
    }

    fn ev(r: &Record) -> &Event {
        match r {
            Record::Event { event, .. } => event,
            r => panic!("expected an event, got {r:?}"),
        }
    }

    #[tokio::test]
    async fn every_subscriber_sees_every_event_in_order() {
        let hub = EventHub::new(16);
        let (mut a, mut b) = (hub.subscribe(), hub.subscribe());
        for i in 0..5 {
            hub.publish(Record::Event { time: SystemTime::now(), event: drop_event(133, i) });
        }
        for s in [&mut a, &mut b] {
            for i in 0..5 {
                assert_eq!(ev(&s.next().await.unwrap()), &drop_event(133, i));
            }
        }
        let st = hub.status();
        assert_eq!((st.subscribers, st.events, st.lost_by_subscribers), (2, 5, 0));
        drop(b);
        assert_eq!(hub.status().subscribers, 1);
        // The flow observer inside the agent is not a monitor subscriber.
        let inside = hub.subscribe_internal();
        assert_eq!(hub.status().subscribers, 1);
        drop(inside);
        drop(a);
        assert_eq!(hub.status().subscribers, 0);
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_told_what_it_missed_and_others_lose_nothing() {
        let hub = EventHub::new(4);
        let mut slow = hub.subscribe();
        let mut fast = hub.subscribe();
        for i in 0..10 {
            hub.publish(Record::Event { time: SystemTime::now(), event: drop_event(133, i) });
            assert_eq!(ev(&fast.next().await.unwrap()), &drop_event(133, i));
        }
        match &*slow.next().await.unwrap() {
            Record::Lost { count: 6, cause: LostCause::TooSlow, .. } => {}
            r => panic!("expected 6 lost, got {r:?}"),
        }
        for i in 6..10 {
            assert_eq!(ev(&slow.next().await.unwrap()), &drop_event(133, i));
        }
        assert_eq!(hub.status().lost_by_subscribers, 6);
    }

    #[tokio::test]
    async fn datapath_losses_reach_every_subscriber_and_the_status() {
        let hub = EventHub::new(8);
        let mut s = hub.subscribe();
        hub.publish(Record::Lost { time: SystemTime::now(), count: 3, cause: LostCause::RingFull });
        let m = model(&s.next().await.unwrap(), &Arc::default()).await.unwrap();
        match m {
            MonitorEvent::Lost(l) => {
                assert_eq!((l.lost, l.cause.as_str()), (3, "ring buffer full"))
            }
            m => panic!("{m:?}"),
        }
        assert_eq!(hub.status().lost_in_datapath, 3);
    }

    #[tokio::test]
    async fn a_drop_reads_as_cilium_names_it_and_filters_pick_events() {
        let r = Record::Event { time: SystemTime::UNIX_EPOCH, event: drop_event(133, 7) };
        let m = model(&r, &Arc::default()).await.unwrap();
        let MonitorEvent::Drop(d) = &m else { panic!("{m:?}") };
        assert_eq!(d.reason_text, "Policy denied");
        assert_eq!((d.src_identity, d.dst_identity, d.dst_endpoint, d.line), (257, 258, 9, 42));
        assert_eq!(d.time, "1970-01-01T00:00:00.000000000Z");
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["type"], "drop");

        let f = |k: Option<&str>, r: Option<&str>| Filter::parse(k, r).unwrap();
        assert!(f(Some("drop"), None).passes(&m));
        assert!(!f(Some("trace"), None).passes(&m));
        assert!(f(None, Some("7")).passes(&m), "the sender");
        assert!(f(None, Some("9")).passes(&m), "the destination");
        assert!(!f(None, Some("8")).passes(&m));
        let e = Filter::parse(Some("drops"), None).unwrap_err();
        assert!(e.contains("\"drops\""), "{e}");
        let e = Filter::parse(None, Some("web")).unwrap_err();
        assert!(e.contains("\"web\""), "{e}");
    }
}

//! The relay (`ciliate-relay`, Hubble Relay's role): one observer API for
//! the whole cluster. It learns the nodes' observers from a node's peer
//! service (`peer.Peer/Notify`) or a static list, keeps a connection to
//! each (trying again every few seconds while one is down), and answers
//! `GetFlows` by asking every connected node and merging their flows in
//! time order, `GetNodes` with each node's state, `ServerStatus` summed
//! over the nodes. A node that is down is reported (a `node_status` message
//! in the flow stream, `unavailable_nodes` in the status); the others go on.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ciliate_hubble::{
    observer::{
        self, GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes,
        observer_client::ObserverClient, observer_server::Observer as ObserverApi,
    },
    peer::{ChangeNotificationType, NotifyRequest, peer_client::PeerClient},
    relay::{NodeState, NodeStatusEvent},
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, transport::Channel};

pub const DEFAULT_PORT: u16 = 4245;

/// How long the merge of followed streams holds a flow for one that is
/// older and later to arrive from another node.
const REORDER: Duration = Duration::from_millis(300);

/// How long a call waits for a node's answer (its first response message
/// for a stream) before the node counts as down.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Open a channel to an observer: `unix:///path` or `host:port`.
pub async fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    ciliate_hubble::client::channel(addr, Some(CALL_TIMEOUT)).await
}

struct Peer {
    address: String,
    client: Option<ObserverClient<Channel>>,
    /// Why it is not connected.
    error: String,
}

type Connected = (String, ObserverClient<Channel>);

/// The nodes the relay knows, by name.
#[derive(Clone, Default)]
pub struct Peers {
    inner: Arc<Mutex<BTreeMap<String, Peer>>>,
    started: Option<Instant>,
}

impl Peers {
    pub fn new() -> Self {
        Self { inner: Arc::default(), started: Some(Instant::now()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Peer>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(&self, name: &str, address: &str) {
        let mut p = self.lock();
        let changed = p.get(name).is_none_or(|x| x.address != address);
        if changed {
            p.insert(
                name.to_owned(),
                Peer { address: address.to_owned(), client: None, error: "connecting".into() },
            );
        }
    }

    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    /// (name, client) of the connected nodes, and (name, why) of the others.
    fn split(&self) -> (Vec<Connected>, Vec<(String, String)>) {
        let p = self.lock();
        let up = p.iter().filter_map(|(n, x)| Some((n.clone(), x.client.clone()?))).collect();
        let down = p
            .iter()
            .filter(|(_, x)| x.client.is_none())
            .map(|(n, x)| (n.clone(), x.error.clone()))
            .collect();
        (up, down)
    }

    fn mark_down(&self, name: &str, error: String) {
        if let Some(p) = self.lock().get_mut(name) {
            p.client = None;
            p.error = error;
        }
    }

    /// Connect the nodes that are down (and check the ones that are up),
    /// every `every`, forever.
    pub async fn keep_connected(self, every: Duration) {
        loop {
            let todo: Vec<(String, String, Option<ObserverClient<Channel>>)> = self
                .lock()
                .iter()
                .map(|(n, p)| (n.clone(), p.address.clone(), p.client.clone()))
                .collect();
            for (name, address, client) in todo {
                let ok = match client {
                    Some(mut c) => c.server_status(observer::ServerStatusRequest {}).await.is_ok(),
                    None => false,
                };
                if ok {
                    continue;
                }
                match channel(&address).await {
                    Ok(ch) => {
                        let mut c = ObserverClient::new(ch);
                        match c.server_status(observer::ServerStatusRequest {}).await {
                            Ok(_) => {
                                if let Some(p) = self.lock().get_mut(&name) {
                                    p.client = Some(c);
                                    p.error.clear();
                                }
                                tracing::info!(subsystem = "relay", node = %name, %address, "connected");
                            }
                            Err(e) => self.mark_down(&name, e.message().to_owned()),
                        }
                    }
                    Err(e) => self.mark_down(&name, e.to_string()),
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Follow a node's peer service: every node it announces joins, every
    /// node it says left goes. Reconnects when the stream breaks.
    pub async fn follow_peer_service(self, address: String) {
        loop {
            let result = async {
                let mut c = PeerClient::new(channel(&address).await.map_err(|e| e.to_string())?);
                let mut s =
                    c.notify(NotifyRequest {}).await.map_err(|e| e.to_string())?.into_inner();
                while let Some(n) = s.message().await.map_err(|e| e.to_string())? {
                    match ChangeNotificationType::try_from(n.r#type) {
                        Ok(ChangeNotificationType::PeerDeleted) => self.remove(&n.name),
                        _ => self.add(&n.name, &n.address),
                    }
                }
                Ok::<_, String>(())
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(subsystem = "relay", peer_service = %address, error = %e, "peer service");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

impl Peers {
    /// Follow the cluster store's node records: each node's observer at its
    /// address and `port` (the store answers what the peer service would,
    /// with no node in between). Watches again after the store fails.
    pub async fn follow_kvstore(self, kv: std::sync::Arc<dyn crate::kvstore::KvStore>, port: u16) {
        loop {
            match crate::hubble::peer_notes(kv.clone(), port).await {
                Ok(mut rx) => {
                    while let Some(n) = rx.recv().await {
                        match ChangeNotificationType::try_from(n.r#type) {
                            Ok(ChangeNotificationType::PeerDeleted) => self.remove(&n.name),
                            _ => self.add(&n.name, &n.address),
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(subsystem = "relay", store = %kv.describe(), error = %e, "watching the nodes");
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

fn key(r: &GetFlowsResponse) -> (i64, i32) {
    r.time.as_ref().map(|t| (t.seconds, t.nanos)).unwrap_or_default()
}

fn node_status(state: NodeState, names: Vec<String>, message: String) -> GetFlowsResponse {
    GetFlowsResponse {
        response_types: Some(ResponseTypes::NodeStatus(NodeStatusEvent {
            state_change: state as i32,
            node_names: names,
            message,
        })),
        ..Default::default()
    }
}

#[derive(Clone)]
pub struct Relay {
    pub peers: Peers,
}

type Flows = Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ObserverApi for Relay {
    type GetFlowsStream = Flows;
    type GetAgentEventsStream = crate::hubble::AgentEventsStream;
    type GetDebugEventsStream = crate::hubble::DebugEventsStream;

    async fn get_flows(&self, req: Request<GetFlowsRequest>) -> Result<Response<Flows>, Status> {
        let r = req.into_inner();
        if r.first && r.follow {
            return Err(Status::invalid_argument("first cannot be combined with follow"));
        }
        // Checked here too, so a bad filter is one error, not one per node.
        ciliate_hubble::filter::FlowFilters::new(&r.whitelist, &r.blacklist)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (up, down) = self.peers.split();
        let (tx, rx) = mpsc::channel::<Result<GetFlowsResponse, Status>>(256);
        let peers = self.peers.clone();
        tokio::spawn(async move {
            if !down.is_empty() {
                let (names, why): (Vec<String>, Vec<String>) = down.into_iter().unzip();
                let _ = tx
                    .send(Ok(node_status(NodeState::NodeUnavailable, names, why.join("; "))))
                    .await;
            }
            // One stream per node, tagged with its name.
            let (ftx, mut frx) = mpsc::channel::<(String, Result<GetFlowsResponse, Status>)>(256);
            let connected: Vec<String> = up.iter().map(|(n, _)| n.clone()).collect();
            for (name, mut c) in up {
                let (ftx, r) = (ftx.clone(), r.clone());
                tokio::spawn(async move {
                    match c.get_flows(r).await {
                        Ok(s) => {
                            let mut s = s.into_inner();
                            while let Some(item) = s.next().await {
                                if ftx.send((name.clone(), item)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = ftx.send((name, Err(e))).await;
                        }
                    }
                });
            }
            drop(ftx);
            if !connected.is_empty() {
                let _ = tx
                    .send(Ok(node_status(NodeState::NodeConnected, connected, String::new())))
                    .await;
            }
            // Hold each flow until REORDER has passed, then release flows
            // oldest first; what is left goes when every node is done.
            // Kept in flow-time order (the arrival number breaks ties).
            let mut held: BTreeMap<((i64, i32), u64), (Instant, GetFlowsResponse)> =
                BTreeMap::new();
            let mut arrivals = 0u64;
            let mut tick = tokio::time::interval(REORDER / 3);
            loop {
                tokio::select! {
                    got = frx.recv() => match got {
                        Some((_, Ok(resp))) => {
                            arrivals += 1;
                            held.insert((key(&resp), arrivals), (Instant::now(), resp));
                        }
                        Some((name, Err(e))) => {
                            peers.mark_down(&name, e.message().to_owned());
                            let msg = node_status(NodeState::NodeUnavailable, vec![name], e.message().to_owned());
                            if tx.send(Ok(msg)).await.is_err() { return; }
                        }
                        None => break,
                    },
                    _ = tick.tick() => {}
                    _ = tx.closed() => return,
                }
                // Release the oldest flows up to the first one still young.
                while let Some(e) = held.first_entry()
                    && e.get().0.elapsed() >= REORDER
                {
                    if tx.send(Ok(e.remove().1)).await.is_err() {
                        return;
                    }
                }
            }
            for (_, resp) in held.into_values() {
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        let mut resp =
            Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as Flows);
        if let Ok(v) = crate::hubble::VERSION.parse() {
            resp.metadata_mut().insert("hubble-relay-version", v);
        }
        Ok(resp)
    }

    async fn get_agent_events(
        &self,
        _: Request<observer::GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        Ok(Response::new(Box::pin(futures::stream::empty())))
    }

    async fn get_debug_events(
        &self,
        _: Request<observer::GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        Ok(Response::new(Box::pin(futures::stream::empty())))
    }

    async fn get_nodes(
        &self,
        _: Request<observer::GetNodesRequest>,
    ) -> Result<Response<observer::GetNodesResponse>, Status> {
        let all: Vec<(String, String, Option<ObserverClient<Channel>>)> = self
            .peers
            .lock()
            .iter()
            .map(|(n, p)| (n.clone(), p.address.clone(), p.client.clone()))
            .collect();
        let mut nodes = Vec::new();
        for (name, address, client) in all {
            let mut node = observer::Node {
                name: name.clone(),
                address,
                state: NodeState::NodeUnavailable as i32,
                ..Default::default()
            };
            if let Some(mut c) = client
                && let Ok(s) = c.server_status(observer::ServerStatusRequest {}).await
            {
                let s = s.into_inner();
                node.state = NodeState::NodeConnected as i32;
                node.version = s.version;
                node.uptime_ns = s.uptime_ns;
                node.num_flows = s.num_flows;
                node.max_flows = s.max_flows;
                node.seen_flows = s.seen_flows;
            }
            nodes.push(node);
        }
        Ok(Response::new(observer::GetNodesResponse { nodes }))
    }

    async fn get_namespaces(
        &self,
        _: Request<observer::GetNamespacesRequest>,
    ) -> Result<Response<observer::GetNamespacesResponse>, Status> {
        let (up, _) = self.peers.split();
        let mut all = std::collections::BTreeSet::new();
        for (_, mut c) in up {
            if let Ok(r) = c.get_namespaces(observer::GetNamespacesRequest {}).await {
                all.extend(r.into_inner().namespaces.into_iter().map(|n| (n.cluster, n.namespace)));
            }
        }
        let namespaces = all
            .into_iter()
            .map(|(cluster, namespace)| observer::Namespace { cluster, namespace })
            .collect();
        Ok(Response::new(observer::GetNamespacesResponse { namespaces }))
    }

    async fn server_status(
        &self,
        _: Request<observer::ServerStatusRequest>,
    ) -> Result<Response<observer::ServerStatusResponse>, Status> {
        let (up, down) = self.peers.split();
        let mut out = observer::ServerStatusResponse {
            version: crate::hubble::VERSION.into(),
            uptime_ns: self.peers.started.map(|s| s.elapsed().as_nanos() as u64).unwrap_or(0),
            ..Default::default()
        };
        let (mut connected, mut unavailable) =
            (0u32, down.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
        for (name, mut c) in up {
            match c.server_status(observer::ServerStatusRequest {}).await {
                Ok(s) => {
                    let s = s.into_inner();
                    connected += 1;
                    out.num_flows += s.num_flows;
                    out.max_flows += s.max_flows;
                    out.seen_flows += s.seen_flows;
                    out.flows_rate += s.flows_rate;
                }
                Err(e) => {
                    self.peers.mark_down(&name, e.message().to_owned());
                    unavailable.push(name);
                }
            }
        }
        out.num_connected_nodes = Some(pbjson_types::UInt32Value { value: connected });
        out.num_unavailable_nodes =
            Some(pbjson_types::UInt32Value { value: unavailable.len() as u32 });
        out.unavailable_nodes = unavailable;
        Ok(Response::new(out))
    }
}

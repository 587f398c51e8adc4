//! The Raft network over gRPC/mTLS: [`Peers`] opens one channel per
//! manager and reuses it; [`PeerClient`] carries openraft's RPCs.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use openraft::{
    BasicNode, RaftNetwork, RaftNetworkFactory,
    error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable},
    network::RPCOption,
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
        InstallSnapshotResponse, VoteRequest, VoteResponse,
    },
};
use proto::{Internal, raft_client::RaftClient};
use serde::{Serialize, de::DeserializeOwned};
use tonic::{Code, transport::Channel};

use crate::{
    ca::tls::{self, Credentials, Trust},
    raft::store::{NodeId, TypeConfig},
};

/// RPC timeout between managers.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// Last successful contact with each peer, as this manager saw it.
pub type Contacts = Arc<Mutex<HashMap<NodeId, Instant>>>;

/// Opens gRPC clients to peers; one channel per address, reused.
#[derive(Clone)]
pub struct Peers {
    trust: Trust,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    pub contacts: Contacts,
}

impl Peers {
    pub fn new(creds: Arc<RwLock<Credentials>>) -> Peers {
        Peers {
            trust: Trust::Node(creds),
            channels: Arc::default(),
            contacts: Arc::default(),
        }
    }

    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::Status> {
        self.channel_with(addr, RPC_TIMEOUT)
    }

    /// A channel whose calls time out after `timeout`.
    pub fn channel_with(&self, addr: &str, timeout: Duration) -> Result<Channel, tonic::Status> {
        let key = format!("{addr}/{}", timeout.as_millis());
        let mut map = self.channels.lock().expect("channels lock");
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let c = tls::channel(addr, self.trust.clone(), timeout)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        map.insert(key, c.clone());
        Ok(c)
    }

    /// Drops cached channels (after a certificate renewal).
    pub fn reset(&self) {
        self.channels.lock().expect("channels lock").clear();
    }
}

impl RaftNetworkFactory<TypeConfig> for Peers {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            peers: self.clone(),
        }
    }
}

/// Raft RPCs to one peer. The channel is looked up on every call, so a
/// renewed certificate (which resets the cache) is used from the next RPC.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    peers: Peers,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl PeerClient {
    async fn call<Req: Serialize, Resp: DeserializeOwned, E>(
        &mut self,
        kind: &'static str,
        req: &Req,
    ) -> Result<Resp, RpcErr<E>>
    where
        E: std::error::Error + DeserializeOwned,
    {
        let channel = self
            .peers
            .channel(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(crate::grpc::MAX_MESSAGE)
            .max_encoding_message_size(crate::grpc::MAX_MESSAGE);
        let body =
            crate::codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = Internal { body };
        let reply = match kind {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|s| {
            if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) {
                RPCError::Unreachable(Unreachable::new(&s))
            } else {
                RPCError::Network(NetworkError::new(&s))
            }
        })?;
        self.peers
            .contacts
            .lock()
            .expect("contacts lock")
            .insert(self.target, Instant::now());
        let r: Result<Resp, RaftError<NodeId, E>> = crate::codec::decode(&reply.into_inner().body)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        self.call("append", &rpc).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call("snapshot", &rpc).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call("vote", &rpc).await
    }
}

//! Where the agents are and which one holds a volume.
//!
//! Discovery is a static `node=host:port` map outside Kubernetes, or the node DaemonSet's pods
//! (by label selector) inside it. Each node's last known info is remembered so that an agent that
//! is down right now can still be ruled in or out by topology.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::Error;
use crate::agent::auth::{AddToken, Token};
use crate::agent::tls::{ClientTls, Transport};
use crate::proto::agent::agent_client::AgentClient;
use crate::proto::agent::{GetNodeInfoRequest, GetVolumeRequest, NodeInfo, Volume};

/// A client for one agent.
pub type Client = AgentClient<InterceptedService<Channel, AddToken>>;

/// How agents are found.
#[derive(Clone)]
pub enum Discovery {
    /// Fixed `node -> host:port`.
    Static(BTreeMap<String, String>),
    /// Pods of the node DaemonSet.
    Kube {
        /// API client.
        client: kube::Client,
        /// Namespace of the DaemonSet.
        namespace: String,
        /// Label selector of its pods.
        selector: String,
        /// Agent port on the pod.
        port: u16,
    },
}

/// The agent directory.
pub struct Directory {
    /// How agents are found.
    discovery: Discovery,
    /// Sent with every call.
    token: Token,
    /// TLS towards the agents, or plaintext when chosen explicitly.
    transport: Transport<ClientTls>,
    /// One lazily connected channel per endpoint.
    channels: Mutex<HashMap<String, Channel>>,
    /// Last successful NodeInfo per node.
    last_info: Mutex<HashMap<String, NodeInfo>>,
    /// Volume id -> node, learned from answers; always verified before use.
    locations: Mutex<HashMap<String, String>>,
    /// Kubernetes discovery result and when it was taken.
    kube_cache: tokio::sync::Mutex<Option<(Instant, BTreeMap<String, String>)>>,
}

/// One node's answer in a fan-out.
pub type NodeResult<T> = (String, Result<T, Error>);

/// A transport failure's message with its causes: tonic says only "transport error", the reason
/// (a refused connection, an agent certificate from another CA) is in the source chain.
fn transport_message(status: &tonic::Status) -> String {
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let cause = e.to_string();
        if !message.contains(&cause) {
            message = format!("{message}: {cause}");
        }
        source = e.source();
    }
    message
}

fn agent_error(node: &str, status: tonic::Status) -> Error {
    match status.code() {
        tonic::Code::Unavailable
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Cancelled
        | tonic::Code::Unknown => Error::AgentUnavailable {
            node: node.to_owned(),
            message: transport_message(&status),
        },
        _ => Error::Agent {
            node: node.to_owned(),
            status,
        },
    }
}

impl Directory {
    /// A directory using `discovery`, authenticating with `token`, over `transport`.
    pub fn new(discovery: Discovery, token: Token, transport: Transport<ClientTls>) -> Self {
        Self {
            discovery,
            token,
            transport,
            channels: Mutex::default(),
            last_info: Mutex::default(),
            locations: Mutex::default(),
            kube_cache: tokio::sync::Mutex::new(None),
        }
    }

    /// `node -> endpoint` for every known agent.
    pub async fn endpoints(&self) -> Result<BTreeMap<String, String>, Error> {
        match &self.discovery {
            Discovery::Static(m) => Ok(m.clone()),
            Discovery::Kube {
                client,
                namespace,
                selector,
                port,
            } => {
                let mut cache = self.kube_cache.lock().await;
                if let Some((at, m)) = cache.as_ref() {
                    if at.elapsed() < Duration::from_secs(5) {
                        return Ok(m.clone());
                    }
                }
                let m = crate::kube::discover_agents(client, namespace, selector, *port)
                    .await
                    .map_err(|e| Error::Discovery {
                        message: e.to_string(),
                    })?;
                *cache = Some((Instant::now(), m.clone()));
                Ok(m)
            }
        }
    }

    /// A client for `endpoint`.
    pub fn client(&self, endpoint: &str) -> Result<Client, Error> {
        let mut channels = self.channels.lock().expect("channel map poisoned");
        let channel = match channels.get(endpoint) {
            Some(c) => c.clone(),
            None => {
                let bad = |e: tonic::transport::Error| Error::Discovery {
                    message: format!("bad agent endpoint {endpoint}: {e}"),
                };
                let ep = match &self.transport {
                    // The certificate is checked against the configured name, not this address.
                    Transport::Tls(tls) => Endpoint::from_shared(format!("https://{endpoint}"))
                        .and_then(|ep| ep.tls_config(tls.config()))
                        .map_err(bad)?,
                    Transport::Insecure => {
                        Endpoint::from_shared(format!("http://{endpoint}")).map_err(bad)?
                    }
                };
                let c = ep
                    .connect_timeout(Duration::from_secs(3))
                    .timeout(Duration::from_secs(50))
                    .connect_lazy();
                channels.insert(endpoint.to_owned(), c.clone());
                c
            }
        };
        Ok(AgentClient::with_interceptor(
            channel,
            AddToken(self.token.clone()),
        ))
    }

    /// A client for the agent of `node`.
    pub async fn client_for(&self, node: &str) -> Result<Client, Error> {
        let eps = self.endpoints().await?;
        let ep = eps.get(node).ok_or_else(|| Error::AgentUnavailable {
            node: node.to_owned(),
            message: "no agent is known for this node".into(),
        })?;
        self.client(ep)
    }

    /// Calls `f` on every agent concurrently.
    pub async fn fan_out<T, F, Fut>(&self, f: F) -> Result<Vec<NodeResult<T>>, Error>
    where
        F: Fn(String, Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let eps = self.endpoints().await?;
        let calls = eps.into_iter().map(|(node, ep)| {
            let client = self.client(&ep);
            let fut = client.map(|c| f(node.clone(), c));
            async move {
                let r = match fut {
                    Ok(fut) => fut.await.map_err(|s| agent_error(&node, s)),
                    Err(e) => Err(e),
                };
                (node, r)
            }
        });
        Ok(join_all(calls).await)
    }

    /// Calls `f` on every agent and keeps the answers of those that gave one; the others are
    /// logged, since `what` is then incomplete.
    pub async fn gather<T, F, Fut>(&self, what: &str, f: F) -> Result<Vec<(String, T)>, Error>
    where
        F: Fn(String, Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut out = Vec::new();
        for (node, r) in self.fan_out(f).await? {
            match r {
                Ok(v) => out.push((node, v)),
                Err(e) => tracing::warn!(error = %e, "{what}: an agent did not answer; its part is missing"),
            }
        }
        Ok(out)
    }

    /// NodeInfo of every agent (errors for those that did not answer).
    pub async fn node_infos(&self) -> Result<Vec<NodeResult<NodeInfo>>, Error> {
        let r = self
            .fan_out(|_, mut c| async move {
                c.get_node_info(GetNodeInfoRequest {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await?;
        let mut last = self.last_info.lock().expect("info map poisoned");
        for (node, info) in &r {
            if let Ok(i) = info {
                last.insert(node.clone(), i.clone());
            }
        }
        Ok(r)
    }

    /// The last NodeInfo an agent gave, if any.
    pub fn last_info(&self, node: &str) -> Option<NodeInfo> {
        self.last_info
            .lock()
            .expect("info map poisoned")
            .get(node)
            .cloned()
    }

    /// Remembers where a volume is.
    pub fn remember(&self, volume_id: &str, node: &str) {
        self.locations
            .lock()
            .expect("location map poisoned")
            .insert(volume_id.to_owned(), node.to_owned());
    }

    /// Forgets a deleted volume.
    pub fn forget(&self, volume_id: &str) {
        self.locations
            .lock()
            .expect("location map poisoned")
            .remove(volume_id);
    }

    /// Finds the node holding `volume_id`. `Ok(None)` only when every agent that might hold it
    /// answered that it does not; `unreachable_ok` says which unreachable nodes may be ignored
    /// (for example, nodes outside the requisite topology of a create).
    pub async fn find_volume(
        &self,
        volume_id: &str,
        unreachable_ok: impl Fn(&str) -> bool,
    ) -> Result<Option<(String, Volume)>, Error> {
        let cached = self
            .locations
            .lock()
            .expect("location map poisoned")
            .get(volume_id)
            .cloned();
        if let Some(node) = cached {
            if let Ok(mut c) = self.client_for(&node).await {
                match c
                    .get_volume(GetVolumeRequest {
                        volume_id: volume_id.to_owned(),
                    })
                    .await
                {
                    Ok(v) => return Ok(Some((node, v.into_inner()))),
                    Err(s) if s.code() == tonic::Code::NotFound => self.forget(volume_id),
                    Err(_) => {}
                }
            }
        }
        let id = volume_id.to_owned();
        let answers = self
            .fan_out(|_, mut c| {
                let id = id.clone();
                async move {
                    c.get_volume(GetVolumeRequest { volume_id: id })
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        let mut unreachable = None;
        for (node, r) in answers {
            match r {
                Ok(v) => {
                    self.remember(volume_id, &node);
                    return Ok(Some((node, v)));
                }
                Err(Error::Agent { status, .. }) if status.code() == tonic::Code::NotFound => {}
                Err(e @ Error::Agent { .. }) => return Err(e),
                Err(e) if !unreachable_ok(&node) => unreachable = Some(e),
                Err(_) => {}
            }
        }
        match unreachable {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }
}

/// Converts an agent call's status for one node into our error.
pub fn from_agent(node: &str, status: tonic::Status) -> Error {
    agent_error(node, status)
}

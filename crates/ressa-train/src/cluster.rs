//! Multi-node data parallelism: N processes (nodes), each with its local peers, whose
//! all-reduces go through burn-collective's global orchestrator (hosted by node 0).
//!
//! burn-collective 0.21.0 cannot run two global all-reduces in one session (its inter-node
//! barrier keeps a stale list of synced nodes and never opens a second time; see
//! `tests/data_parallel/multinode.rs`). So every all-reduce here is a session of its own:
//! register, all-reduce, finish. Between two sessions every node must have finished before
//! any registers again: the orchestrator numbers a registering node by how many are
//! registered, so an early re-registration would take a slow node's number and leave both
//! with wrong node lists (silently wrong sums). The [`Fence`] orders them: after finishing,
//! each node reports to node 0 over one TCP connection and waits for node 0's go. The fence
//! carries one byte per node and round, never data: the sums are burn's.
//!
//! A node that dies is seen at the next fence (its connection closes) and every node stops
//! with an error; a node that dies inside burn's all-reduce leaves the others waiting there
//! (burn-collective has no timeouts).

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use burn::collective::{
    AllReduceStrategy, CollectiveConfig, CollectiveError, PeerId, ReduceOperation, all_reduce,
    finish_collective, register,
};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn_communication::Address;

use crate::error::{Result, TrainError};

/// How long a node tries to reach node 0's fence at the start (node 0 may start later).
const CONNECT_FOR: Duration = Duration::from_secs(120);

/// This process's place in a multi-node run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Processes in the run (each with `TrainConfig::devices` peers).
    pub nodes: usize,
    /// This process's index, `0..nodes`; node 0 hosts the orchestrator and the fence.
    pub node_rank: usize,
    /// `HOST:PORT` of node 0: the orchestrator listens on PORT, the fence on PORT + 1.
    pub coordinator: String,
    /// `HOST:PORT` at which the other nodes reach this one (its data service listens on PORT).
    pub node_address: String,
}

fn host_port(field: &str, s: &str) -> Result<(String, u16)> {
    let bad = || {
        TrainError::config(
            field,
            format!("{field} {s:?}: expected HOST:PORT (for example 10.0.0.1:29500)"),
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

fn ws(host: &str, port: u16) -> Result<Address> {
    Address::from_str(&format!("ws://{host}:{port}")).map_err(|e| {
        TrainError::config(
            "cluster",
            format!("ws://{host}:{port}: not an address ({e:?})"),
        )
    })
}

impl Cluster {
    pub fn validate(&self) -> Result<()> {
        if self.nodes < 2 {
            return Err(TrainError::config(
                "nodes",
                format!("nodes {}: expected at least 2", self.nodes),
            ));
        }
        if self.node_rank >= self.nodes {
            return Err(TrainError::config(
                "node_rank",
                format!(
                    "node_rank {}: expected 0..{} (one rank per node)",
                    self.node_rank, self.nodes
                ),
            ));
        }
        let (_, port) = host_port("coordinator", &self.coordinator)?;
        if port == u16::MAX {
            return Err(TrainError::config(
                "coordinator",
                "coordinator port 65535: the fence needs PORT + 1",
            ));
        }
        host_port("node_address", &self.node_address)?;
        Ok(())
    }

    /// The collective's settings for `local` peers on this node.
    pub(crate) fn collective_config(&self, local: usize) -> Result<CollectiveConfig> {
        let (chost, cport) = host_port("coordinator", &self.coordinator)?;
        let (nhost, nport) = host_port("node_address", &self.node_address)?;
        Ok(CollectiveConfig::default()
            .with_num_devices(local)
            .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2))
            .with_num_nodes(self.nodes as u32)
            .with_global_address(ws(&chost, cport)?)
            .with_node_address(ws(&nhost, nport)?)
            .with_data_service_port(nport)
            .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2)))
    }

    fn fence_address(&self) -> Result<(String, u16)> {
        let (host, port) = host_port("coordinator", &self.coordinator)?;
        Ok((host, port + 1))
    }
}

/// burn-collective's global orchestrator, on its own runtime, for as long as this lives.
pub(crate) struct Orchestrator {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Orchestrator {
    pub(crate) fn start(cluster: &Cluster) -> Result<Self> {
        let (_, port) = host_port("coordinator", &cluster.coordinator)?;
        // Fail early and clearly when the port is taken (the orchestrator would only log it).
        TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
            TrainError::config(
                "coordinator",
                format!("coordinator port {port}: cannot listen ({e})"),
            )
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ressa-orchestrator")
            .enable_all()
            .build()
            .map_err(|e| TrainError::Input(format!("cannot start the orchestrator: {e}")))?;
        runtime.spawn(burn_collective::start_global_orchestrator(port));
        Ok(Self {
            runtime: Some(runtime),
        })
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Node 0's side keeps one connection per other node; theirs, one to node 0.
pub(crate) enum Fence {
    Host(Vec<(usize, TcpStream)>),
    Member(TcpStream),
}

fn fence_error(what: String) -> TrainError {
    TrainError::Input(format!("multi-node fence: {what}"))
}

impl Fence {
    /// Connects the nodes: node 0 accepts `nodes - 1` connections (each announces its rank),
    /// the others connect (retrying for [`CONNECT_FOR`]).
    pub(crate) fn connect(cluster: &Cluster) -> Result<Self> {
        let (host, port) = cluster.fence_address()?;
        if cluster.node_rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
                fence_error(format!(
                    "cannot listen on port {port} (coordinator port + 1): {e}"
                ))
            })?;
            let mut members: Vec<(usize, TcpStream)> = Vec::with_capacity(cluster.nodes - 1);
            listener
                .set_nonblocking(true)
                .map_err(|e| fence_error(format!("port {port}: {e}")))?;
            let start = Instant::now();
            while members.len() + 1 < cluster.nodes {
                let (mut s, from) = match listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if start.elapsed() > CONNECT_FOR {
                            return Err(fence_error(format!(
                                "{} of {} nodes joined within {CONNECT_FOR:?} (are the others started with --coordinator {}?)",
                                members.len() + 1,
                                cluster.nodes,
                                cluster.coordinator
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    Err(e) => return Err(fence_error(format!("accept: {e}"))),
                };
                s.set_nonblocking(false)
                    .map_err(|e| fence_error(format!("{from}: {e}")))?;
                let mut rank = [0u8; 8];
                s.read_exact(&mut rank)
                    .map_err(|e| fence_error(format!("{from}: no rank ({e})")))?;
                let rank = u64::from_le_bytes(rank) as usize;
                if rank == 0 || rank >= cluster.nodes || members.iter().any(|(r, _)| *r == rank) {
                    return Err(fence_error(format!(
                        "{from} says it is node {rank}: expected a unique rank in 1..{}",
                        cluster.nodes
                    )));
                }
                s.set_nodelay(true).ok();
                members.push((rank, s));
            }
            members.sort_by_key(|(r, _)| *r);
            Ok(Fence::Host(members))
        } else {
            let addrs: Vec<SocketAddr> = (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| fence_error(format!("{host}:{port}: {e}")))?
                .collect();
            let start = Instant::now();
            let mut s = loop {
                match TcpStream::connect(&addrs[..]) {
                    Ok(s) => break s,
                    Err(e) if start.elapsed() > CONNECT_FOR => {
                        return Err(fence_error(format!(
                            "cannot reach node 0 at {host}:{port} for {CONNECT_FOR:?}: {e}"
                        )));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            s.set_nodelay(true).ok();
            s.write_all(&(cluster.node_rank as u64).to_le_bytes())
                .map_err(|e| fence_error(format!("{host}:{port}: {e}")))?;
            Ok(Fence::Member(s))
        }
    }

    /// Returns once every node has called it (a barrier across nodes).
    pub(crate) fn round(&mut self) -> Result<()> {
        let mut b = [0u8; 1];
        match self {
            Fence::Host(members) => {
                for (rank, s) in members.iter_mut() {
                    s.read_exact(&mut b)
                        .map_err(|e| fence_error(format!("node {rank} left the run ({e})")))?;
                }
                for (rank, s) in members.iter_mut() {
                    s.write_all(&[1])
                        .map_err(|e| fence_error(format!("node {rank} left the run ({e})")))?;
                }
            }
            Fence::Member(s) => {
                s.write_all(&[1])
                    .and_then(|()| s.read_exact(&mut b))
                    .map_err(|e| fence_error(format!("node 0 left the run ({e})")))?;
            }
        }
        Ok(())
    }
}

/// One collective session of peer `id`: register, all-reduce (Sum) `t`, finish (also after a
/// failed all-reduce); `registered` tells whether the peer is registered at any moment. On
/// error, which step failed.
pub(crate) fn session_all_reduce<B: Backend>(
    id: PeerId,
    device: &B::Device,
    config: &CollectiveConfig,
    t: Tensor<B, 1>,
    registered: &Cell<bool>,
) -> std::result::Result<B::FloatTensorPrimitive, (&'static str, CollectiveError)> {
    register::<B>(id, device.clone(), config.clone()).map_err(|e| ("register", e))?;
    registered.set(true);
    let out = all_reduce::<B>(id, t.into_primitive().tensor(), ReduceOperation::Sum)
        .map_err(|e| ("all-reduce", e));
    let left = finish_collective::<B>(id).map_err(|e| ("finish", e));
    registered.set(false);
    let out = out?;
    left.map(|()| out)
}

/// One peer per node, for exchanges outside training (evaluation's predictions): each
/// exchange is a session of its own and ends at the fence, as in training.
pub struct NodeLink<B: Backend> {
    cluster: Cluster,
    device: B::Device,
    config: CollectiveConfig,
    fence: Fence,
    // Dropped last: node 0's orchestrator outlives the last exchange.
    _orchestrator: Option<Orchestrator>,
}

impl<B: Backend> NodeLink<B> {
    /// Joins the other nodes (node 0 starts the orchestrator first); returns once all have.
    pub fn connect(cluster: &Cluster, device: &B::Device) -> Result<Self> {
        cluster.validate()?;
        let orchestrator = match cluster.node_rank {
            0 => Some(Orchestrator::start(cluster)?),
            _ => None,
        };
        Ok(Self {
            cluster: cluster.clone(),
            device: device.clone(),
            config: cluster.collective_config(1)?,
            fence: Fence::connect(cluster)?,
            _orchestrator: orchestrator,
        })
    }

    /// burn's all-reduce (Sum) of `values` over the nodes, in a session of its own.
    fn sum(&mut self, values: Vec<f32>) -> Result<Vec<f32>> {
        let id = PeerId::from(self.cluster.node_rank);
        let n = values.len();
        let t = Tensor::<B, 1>::from_data(TensorData::new(values, [n]), &self.device);
        let out = session_all_reduce::<B>(id, &self.device, &self.config, t, &Cell::new(false))
            .map_err(|(what, e)| TrainError::Input(format!("multi-node {what} failed: {e:?}")))?;
        self.fence.round()?;
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(out))
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| TrainError::Input(format!("multi-node all-reduce: {e:?}")))
    }

    /// Every node's `bytes`, in node order. Each node sends its bytes in its own slot of a
    /// zero vector (one byte per f32, exact) and burn's all-reduce adds the slots: first the
    /// lengths, then the bytes.
    pub fn gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        const MAX: usize = 1 << 24;
        let (rank, nodes) = (self.cluster.node_rank, self.cluster.nodes);
        if bytes.len() >= MAX {
            return Err(TrainError::Input(format!(
                "multi-node exchange: {} bytes from node {rank}, at most {MAX}",
                bytes.len()
            )));
        }
        let mut lens = vec![0f32; nodes];
        lens[rank] = bytes.len() as f32;
        let lens: Vec<usize> = self.sum(lens)?.into_iter().map(|l| l as usize).collect();
        let offset: usize = lens[..rank].iter().sum();
        let mut all = vec![0f32; lens.iter().sum()];
        for (slot, b) in all[offset..].iter_mut().zip(bytes) {
            *slot = f32::from(*b);
        }
        let all = self.sum(all)?;
        let mut out = Vec::with_capacity(nodes);
        let mut at = 0;
        for l in lens {
            out.push(all[at..at + l].iter().map(|&v| v as u8).collect());
            at += l;
        }
        Ok(out)
    }
}

/// A barrier for this node's peers that the last to arrive may complete with an action (the
/// node's [`Fence`] round), and that a failing peer can break so that no peer waits forever.
pub(crate) struct Gate {
    n: usize,
    state: Mutex<GateState>,
    cv: Condvar,
}

struct GateState {
    arrived: usize,
    generation: u64,
    broken: bool,
}

impl Gate {
    pub(crate) fn new(n: usize) -> Self {
        Self {
            n,
            state: Mutex::new(GateState {
                arrived: 0,
                generation: 0,
                broken: false,
            }),
            cv: Condvar::new(),
        }
    }

    /// Waits for all `n` peers; the last one runs `last` before the others go on. False when
    /// the gate is broken (by [`Gate::break_all`] or a failing `last`).
    pub(crate) fn wait(&self, last: impl FnOnce() -> bool) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.broken {
            return false;
        }
        s.arrived += 1;
        if s.arrived == self.n {
            let ok = last();
            s.arrived = 0;
            s.generation += 1;
            s.broken |= !ok;
            self.cv.notify_all();
            return ok;
        }
        let generation = s.generation;
        while s.generation == generation && !s.broken {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        !s.broken
    }

    pub(crate) fn break_all(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.broken = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn addresses_are_checked() {
        let c = Cluster {
            nodes: 2,
            node_rank: 1,
            coordinator: "127.0.0.1:29500".into(),
            node_address: "127.0.0.1:29510".into(),
        };
        c.validate().unwrap();
        for (bad, field) in [
            (
                Cluster {
                    node_rank: 2,
                    ..c.clone()
                },
                "node_rank 2",
            ),
            (
                Cluster {
                    nodes: 1,
                    ..c.clone()
                },
                "nodes 1",
            ),
            (
                Cluster {
                    coordinator: "127.0.0.1".into(),
                    ..c.clone()
                },
                "coordinator \"127.0.0.1\"",
            ),
            (
                Cluster {
                    node_address: "host:70000".into(),
                    ..c.clone()
                },
                "node_address \"host:70000\"",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn a_gate_runs_its_action_once_per_round_and_breaks() {
        let gate = Arc::new(Gate::new(3));
        let runs = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let (gate, runs) = (gate.clone(), runs.clone());
                std::thread::spawn(move || {
                    (0..5).all(|_| {
                        gate.wait(|| {
                            runs.fetch_add(1, Ordering::SeqCst);
                            true
                        })
                    })
                })
            })
            .collect();
        assert!(handles.into_iter().all(|h| h.join().unwrap()));
        assert_eq!(runs.load(Ordering::SeqCst), 5);
        // One peer waits; another breaks the gate: the waiter is released with false.
        let gate = Arc::new(Gate::new(2));
        let g = gate.clone();
        let waiter = std::thread::spawn(move || g.wait(|| true));
        std::thread::sleep(Duration::from_millis(50));
        gate.break_all();
        assert!(!waiter.join().unwrap());
        assert!(!gate.wait(|| true));
    }

    #[test]
    fn a_fence_holds_every_node_until_all_arrive_and_reports_a_lost_node() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = |rank| Cluster {
            nodes: 3,
            node_rank: rank,
            coordinator: format!("127.0.0.1:{}", port - 1),
            node_address: "127.0.0.1:1".into(),
        };
        let arrived = Arc::new(AtomicUsize::new(0));
        let members: Vec<_> = (1..3)
            .map(|r| {
                let (c, arrived) = (cluster(r), arrived.clone());
                std::thread::spawn(move || {
                    let mut f = Fence::connect(&c).unwrap();
                    for round in 0..3 {
                        arrived.fetch_add(1, Ordering::SeqCst);
                        f.round().unwrap();
                        // Nobody passes round k before all three reached it.
                        assert!(arrived.load(Ordering::SeqCst) >= 3 * (round + 1));
                    }
                    drop(f);
                })
            })
            .collect();
        let mut host = Fence::connect(&cluster(0)).unwrap();
        for round in 0..3 {
            if round == 1 {
                std::thread::sleep(Duration::from_millis(30));
            }
            arrived.fetch_add(1, Ordering::SeqCst);
            host.round().unwrap();
            assert!(arrived.load(Ordering::SeqCst) >= 3 * (round + 1));
        }
        for m in members {
            m.join().unwrap();
        }
        let e = host.round().unwrap_err().to_string();
        assert!(e.contains("node 1 left the run"), "{e}");
    }
}

//! Why `ressa repair` has no multi-node mode yet: burn-collective 0.21.0's multi-process
//! ("global") all-reduce hangs on the second all-reduce of a session.
//!
//! Two processes on 127.0.0.1 (this test binary run again as node 0 and node 1, one peer
//! each), an orchestrator on its own runtime in the parent, and two all-reduces (Sum) of
//! `[1, 2]` and `[10, 20]` per node. The first completes (`[2, 4]` on both), the second never
//! returns: after the all-reduce, `Node::all_reduce` waits in `SyncService::sync`
//! (`burn-collective-0.21.0/src/global/node/sync.rs`), which clears a *copy* of its list of
//! synced nodes (`let mut syncing_peers = self.syncing_peers.lock().unwrap().to_vec(); …
//! syncing_peers.clear()`), so at the next barrier the list holds every node twice and never
//! equals the node list. Every global strategy (Ring, Tree, Centralized) ends in that barrier.
//!
//! Ignored because it fails (by its timeout) until burn ships a fix; run it with
//! `cargo test -p ressa-train --test data_parallel multinode -- --ignored --nocapture`.
//!
//! A session per all-reduce avoids the stale barrier: register, all-reduce, finish, and
//! register again for the next one (`finish` drops the node's client, so the next
//! registration builds a fresh `SyncService`). `two_processes_one_session_per_all_reduce`
//! checks that path (both all-reduces correct on both nodes, 0.1 s on loopback); it is
//! what a multi-node `ressa repair` can build on while the upstream bug stands.
//! (A module of the `data_parallel` test binary rather than a binary of its own: one link
//! less in CI.)

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use burn::backend::Flex;
use burn::collective::{
    AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective,
    register,
};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn_communication::Address;

const TEST: &str = "multinode::two_processes_all_reduce_twice";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One node: register, two all-reduces, finish (or, `per_reduce`, register and finish around
/// each all-reduce); prints each result on stdout.
fn node(rank: u32, orchestrator: u16, port: u16, per_reduce: bool) {
    let device = Default::default();
    let ws = |p: u16| Address::from_str(&format!("ws://127.0.0.1:{p}")).unwrap();
    let cfg = CollectiveConfig::default()
        .with_num_devices(1)
        .with_num_nodes(2)
        .with_global_address(ws(orchestrator))
        .with_node_address(ws(port))
        .with_data_service_port(port)
        .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2));
    let id = PeerId::from(rank);
    if !per_reduce {
        register::<Flex>(id, device, cfg.clone()).expect("register");
        println!("node {rank}: registered");
    }
    for (i, v) in [[1.0f32, 2.0], [10.0, 20.0]].into_iter().enumerate() {
        if per_reduce {
            register::<Flex>(id, device, cfg.clone()).expect("register");
        }
        let t = Tensor::<Flex, 1>::from_floats(v, &device);
        let out = all_reduce::<Flex>(id, t.into_primitive().tensor(), ReduceOperation::Sum)
            .expect("all-reduce");
        let out = Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(out));
        println!(
            "node {rank}: all-reduce {}: {:?}",
            i + 1,
            out.into_data().into_vec::<f32>().unwrap()
        );
        if per_reduce {
            finish_collective::<Flex>(id).expect("finish");
        }
    }
    if !per_reduce {
        finish_collective::<Flex>(id).expect("finish");
    }
    println!("node {rank}: finished");
}

#[test]
#[ignore = "burn-collective 0.21.0 hangs on the 2nd global all-reduce (see the module doc)"]
fn two_processes_all_reduce_twice() {
    two_nodes(TEST, false);
}

const TEST_PER_REDUCE: &str = "multinode::two_processes_one_session_per_all_reduce";

#[test]
fn two_processes_one_session_per_all_reduce() {
    two_nodes(TEST_PER_REDUCE, true);
}

fn two_nodes(test: &str, per_reduce: bool) {
    if let Ok(role) = std::env::var("RESSA_TEST_NODE") {
        let v: Vec<u32> = role.split(',').map(|x| x.parse().unwrap()).collect();
        node(v[0], v[1] as u16, v[2] as u16, per_reduce);
        return;
    }
    let orchestrator = free_port();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.spawn(burn_collective::start_global_orchestrator(orchestrator));
    let mut children: Vec<_> = (0..2u32)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    test,
                    "--include-ignored",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(
                    "RESSA_TEST_NODE",
                    format!("{rank},{orchestrator},{}", free_port()),
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let start = Instant::now();
    let limit = Duration::from_secs(30);
    while start.elapsed() < limit && children.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut report = Vec::new();
    let mut hung = false;
    for c in &mut children {
        if c.try_wait().unwrap().is_none() {
            hung = true;
            c.kill().unwrap();
        }
        let status = c.wait().unwrap();
        let mut out = String::new();
        c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("node ")).collect();
        report.push(format!("{status}: {}", lines.join(" | ")));
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    let report = report.join("\n");
    println!("{report}");
    assert!(!hung, "a node hung (killed after {limit:?}):\n{report}");
    for rank in 0..2 {
        assert!(
            report.contains(&format!("node {rank}: all-reduce 2: [20.0, 40.0]")),
            "{report}"
        );
    }
}

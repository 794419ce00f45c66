//! Several processes (nodes) through burn-collective's global orchestrator.
//!
//! `two_nodes_train_the_adapters_of_two_threads`: two processes on 127.0.0.1 (this test
//! binary run again as node 0 and node 1, one peer each, node 0 hosting the orchestrator)
//! train adapters bit-identical to two threads of one process.
//!
//! Why each all-reduce is a session of its own (`ressa_train::cluster`): burn-collective
//! 0.21.0's multi-process all-reduce hangs on the second all-reduce of a session. After the
//! all-reduce, `Node::all_reduce` waits in `SyncService::sync`
//! (`burn-collective-0.21.0/src/global/node/sync.rs`), which clears a *copy* of its list of
//! synced nodes (`let mut syncing_peers = self.syncing_peers.lock().unwrap().to_vec(); …
//! syncing_peers.clear()`), so at the next barrier the list holds every node twice and never
//! equals the node list. Every global strategy (Ring, Tree, Centralized) ends in that barrier.
//! `two_processes_all_reduce_twice` reproduces it (two all-reduces of `[1, 2]` and `[10, 20]`
//! per node: the first gives `[2, 4]`, the second never returns); ignored because it fails (by
//! its timeout) until burn ships a fix: `cargo test -p ressa-train --test data_parallel
//! multinode -- --ignored --nocapture`. `two_processes_one_session_per_all_reduce` checks the
//! bare workaround (register, all-reduce, finish, register again).
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

const TEST_REPAIR: &str = "multinode::two_nodes_train_the_adapters_of_two_threads";

/// A coordinator port whose successor (the fence) is free too.
fn free_port_pair() -> u16 {
    loop {
        let p = free_port();
        if p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

/// Two processes on 127.0.0.1 (one peer each, node 0 hosting burn's orchestrator) train the
/// same adapters, bit for bit, as two threads of one process: both sum two peers' gradients
/// with one addition (`a + b`), the nodes through burn's global all-reduce.
#[test]
fn two_nodes_train_the_adapters_of_two_threads() {
    let mut cfg = ressa_train::TrainConfig {
        steps: 8,
        batch_size: 4,
        lr: 1e-3,
        warmup_steps: 2,
        augment: true,
        ..Default::default()
    };
    cfg.adamw.epsilon = 1e-5;
    let data = super::data(&super::repo("tests/fixtures/calibration"));
    if let Ok(role) = std::env::var("RESSA_TEST_REPAIR_NODE") {
        let v: Vec<&str> = role.split(',').collect();
        let rank: usize = v[0].parse().unwrap();
        cfg.cluster = Some(ressa_train::Cluster {
            nodes: 2,
            node_rank: rank,
            coordinator: format!("127.0.0.1:{}", v[1]),
            node_address: format!("127.0.0.1:{}", v[2]),
        });
        let (adapters, report) = super::run(&data, &cfg, None, false).unwrap();
        assert_eq!(report.steps, 8);
        let bits: std::collections::BTreeMap<&String, (&Vec<usize>, Vec<u32>)> = adapters
            .iter()
            .map(|(k, (shape, x))| (k, (shape, x.iter().map(|v| v.to_bits()).collect())))
            .collect();
        std::fs::write(v[3], serde_json::to_string(&bits).unwrap()).unwrap();
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let coordinator = free_port_pair();
    let outs: Vec<_> = (0..2)
        .map(|r| tmp.path().join(format!("node{r}.json")))
        .collect();
    let start = Instant::now();
    let mut children: Vec<_> = (0..2usize)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", TEST_REPAIR, "--nocapture", "--test-threads", "1"])
                .env(
                    "RESSA_TEST_REPAIR_NODE",
                    format!(
                        "{rank},{coordinator},{},{}",
                        free_port(),
                        outs[rank].display()
                    ),
                )
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let (threads, _) = super::run(
        &data,
        &ressa_train::TrainConfig {
            devices: 2,
            ..cfg.clone()
        },
        None,
        false,
    )
    .unwrap();
    let limit = Duration::from_secs(180);
    while start.elapsed() < limit && children.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (rank, c) in children.iter_mut().enumerate() {
        let hung = c.try_wait().unwrap().is_none();
        if hung {
            c.kill().unwrap();
        }
        let status = c.wait().unwrap();
        let mut err = String::new();
        c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(!hung, "node {rank} hung (killed after {limit:?}):\n{err}");
        assert!(status.success(), "node {rank}: {status}\n{err}");
    }
    eprintln!("two nodes: {:.1} s", start.elapsed().as_secs_f64());
    let want: std::collections::BTreeMap<String, (Vec<usize>, Vec<u32>)> = threads
        .iter()
        .map(|(k, (shape, x))| {
            (
                k.clone(),
                (shape.clone(), x.iter().map(|v| v.to_bits()).collect()),
            )
        })
        .collect();
    for (rank, out) in outs.iter().enumerate() {
        let got: std::collections::BTreeMap<String, (Vec<usize>, Vec<u32>)> =
            serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
        assert!(
            got == want,
            "node {rank}'s adapters differ from two threads'"
        );
    }
}

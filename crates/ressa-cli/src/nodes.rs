//! `--nodes/--node-rank/--coordinator/--node-address`: one process of a multi-node run
//! (`ressa_train::cluster`), shared by `repair` and `eval`.

use anyhow::{Result, anyhow, bail};
use clap::Args;

#[derive(Args, Debug, Clone, Default)]
pub struct NodeArgs {
    /// Processes (machines) in a multi-node run, each with `--devices` peers; needs
    /// `--node-rank`, `--coordinator` and `--node-address` on every node.
    #[arg(long)]
    pub nodes: Option<usize>,
    /// This node's index, 0..N-1. Node 0 hosts the orchestrator and writes the outputs.
    #[arg(long)]
    pub node_rank: Option<usize>,
    /// HOST:PORT of node 0, the same on every node: burn's orchestrator listens on PORT, the
    /// nodes' fence on PORT + 1.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// HOST:PORT at which the other nodes reach this one (its data service listens on PORT).
    #[arg(long)]
    pub node_address: Option<String>,
}

impl NodeArgs {
    /// The cluster, checked; `None` for a one-node run.
    pub fn cluster(&self) -> Result<Option<ressa_train::Cluster>> {
        match (
            self.nodes,
            self.node_rank,
            self.coordinator.clone(),
            self.node_address.clone(),
        ) {
            (None | Some(1), None, None, None) => Ok(None),
            (Some(nodes), Some(node_rank), Some(coordinator), Some(node_address)) => {
                let c = ressa_train::Cluster {
                    nodes,
                    node_rank,
                    coordinator,
                    node_address,
                };
                c.validate().map_err(|e| {
                    let msg = e.to_string();
                    anyhow!(
                        "--{}",
                        msg.replacen("node_rank", "node-rank", 1).replacen(
                            "node_address",
                            "node-address",
                            1
                        )
                    )
                })?;
                Ok(Some(c))
            }
            _ => bail!(
                "--nodes N (N ≥ 2) needs --node-rank, --coordinator HOST:PORT and --node-address HOST:PORT on every node"
            ),
        }
    }
}

/// burn-collective prints its connection attempts on stdout (`println!`), where `eval` prints
/// its metrics: while this lives, whatever is written to stdout goes to stderr.
pub struct StdoutToStderr {
    saved: i32,
}

impl StdoutToStderr {
    pub fn new() -> Option<Self> {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // SAFETY: plain descriptor calls on the process's own stdout and stderr.
        let saved = unsafe { libc::dup(1) };
        if saved < 0 || unsafe { libc::dup2(2, 1) } < 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for StdoutToStderr {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // SAFETY: `saved` is the descriptor `new` duplicated from stdout.
        unsafe {
            libc::dup2(self.saved, 1);
            libc::close(self.saved);
        }
    }
}

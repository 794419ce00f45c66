//! Data-parallel RESSA on burn's collective ops (`burn::collective`, on the inner backend).
//!
//! N peers, each a thread with its own copy of the model (on Flex the copies share the frozen
//! weight buffers; only the adapters are per peer, and they stay identical after every step).
//! The global batch is `batch_size` rows; every peer walks the same seeded epoch order and
//! takes its contiguous share of each global batch ([`shard`]), decoding only its own images,
//! each augmented as in a one-device run (seeded by its position in the epoch order). The
//! epoch's short last batch is split as evenly as it goes; a peer left without rows joins the
//! step with zero contributions.
//!
//! Every micro-step each peer computes local sums ([`distill_sums`]) and counts, and the peers
//! exchange one status vector `[ok, target tokens, rows, Σce, Σkl]`. With the global counts
//! each peer scales its sums so that the N shards' losses add up to the whole batch's loss,
//! and runs backward. Once per optimizer step the adapter gradients (in name order, plus one
//! presence flag per tensor) are packed into one flat tensor and summed over the peers with
//! one all-reduce, in an order that does not change from run to run (see [`Peer`]). Every peer
//! then applies the same AdamW update to identical gradients.
//!
//! Failures do not hang peers: a peer whose batch, forward or backward fails (or panics), or
//! whose validation or checkpoint fails (rank 0), joins its next status all-reduce with
//! `ok = 0`, and then all peers stop; the run returns that peer's error. Non-finite checks
//! run on reduced values, identically on every peer. Rank 0 alone reports progress, validates
//! and writes checkpoints; the data position counts global rows, so a checkpoint is the same
//! as a one-device run's and `--resume` works with any device count.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Instant;

use burn::collective::{
    AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective,
    register, reset_collective,
};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::backend::AutodiffBackend;
use ressa_data::loader::{Example, Loader, LoaderConfig};
use ressa_models::VisionLanguageModel;
use ressa_models::prunable::prunable_linears;

use crate::adamw::{AdamW, Moments};
use crate::checkpoint::TrainState;
use crate::cluster::{Fence, Gate, Orchestrator, session_all_reduce};
use crate::distill::{LossSums, distill_sums};
use crate::error::{Result, TrainError};
use crate::sparse_lora::for_each_linear_mut;
use crate::trainer::{
    AdapterGrads, TrainBatch, TrainConfig, TrainData, TrainEvent, TrainReport, Validation,
    apply_update, check_finite_adapters, epoch_order, epoch_transform, save_checkpoint,
    start_state, student_and_teacher, total_steps, validate,
};

/// burn's collective keeps one state per process and backend type: one data-parallel run at a
/// time per process (concurrent runs, e.g. tests, wait here).
static SESSION: Mutex<()> = Mutex::new(());

/// Rows `start..end` (offsets in a global batch of `len` rows) that peer `rank` of `world`
/// takes: contiguous, `len / world` each and one more for the first `len % world` peers.
pub fn shard(len: usize, rank: usize, world: usize) -> Range<usize> {
    let (base, extra) = (len / world, len % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Why a peer stopped.
enum PeerError {
    /// Its own failure (returned by the run).
    Own(TrainError),
    /// The collective failed under it (for instance because another peer panicked and the
    /// collective was reset): reported only when no peer has an error of its own.
    Collective(TrainError),
    /// Another peer reported a failure at a status all-reduce.
    Aborted,
}

impl From<TrainError> for PeerError {
    fn from(e: TrainError) -> Self {
        PeerError::Own(e)
    }
}

type PeerResult<T> = std::result::Result<T, PeerError>;

fn collective_error(what: &str, e: burn::collective::CollectiveError) -> PeerError {
    PeerError::Collective(TrainError::Input(format!(
        "data-parallel {what} failed: {e:?}"
    )))
}

/// The collective's settings: `local` peers on this node, pairwise tree all-reduce; with a
/// cluster, the nodes' addresses too.
fn collective_config(local: usize, cfg: &TrainConfig) -> Result<CollectiveConfig> {
    match &cfg.cluster {
        Some(c) => c.collective_config(local),
        None => Ok(CollectiveConfig::default()
            .with_num_devices(local)
            .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2))),
    }
}

/// Multi-node runs: one collective session per all-reduce (see [`crate::cluster`]); the
/// node's peers meet at `gate` after finishing one, and the last of them takes the node
/// through the `fence` with the other nodes.
struct Sessions {
    gate: Gate,
    fence: Mutex<Fence>,
}

impl Sessions {
    /// After a session: every peer of every node has finished it.
    fn between(&self) -> bool {
        self.gate.wait(|| {
            let mut fence = self.fence.lock().unwrap_or_else(|e| e.into_inner());
            match fence.round() {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "multi-node run stopped");
                    false
                }
            }
        })
    }
}

/// A panic's message as this peer's one-line error.
fn panic_error(rank: usize, payload: Box<dyn std::any::Any + Send>) -> TrainError {
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    TrainError::Input(format!(
        "device {rank}: panicked: {}",
        msg.replace('\n', " ")
    ))
}

/// `f()`, with a panic turned into an error naming the peer.
fn guarded<T>(rank: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| Err(panic_error(rank, payload)))
}

/// One peer's link to the collective: registered on creation, finished on drop (every exit);
/// with [`Sessions`], registered and finished around each all-reduce instead.
///
/// Reproducibility: burn sums the peers' tensors in `HashMap` order, which changes from run
/// to run. With two peers that is harmless (`a + b == b + a` bit for bit); with three or more
/// the last bits would depend on it. So with more than two peers every all-reduce here is an
/// all-gather: each peer puts its tensor in its own slot of a `world × n` tensor of zeros, the
/// all-reduce adds exactly one non-zero to zeros per element (exact, in any order), and every
/// peer then adds the slots itself in rank order. The result is a pure function of the peers'
/// inputs, so a resumed run repeats an uninterrupted one bit for bit at any peer count. The
/// price is `world`× the traffic of a plain all-reduce (only the adapters' gradients travel).
struct Peer<'a, B: Backend> {
    id: PeerId,
    /// Global rank: `node_rank × local peers + local rank`.
    rank: usize,
    world: usize,
    device: B::Device,
    config: CollectiveConfig,
    sessions: Option<&'a Sessions>,
    registered: &'a Cell<bool>,
}

impl<'a, B: Backend> Peer<'a, B> {
    fn register(
        run: &'a Run<'a>,
        rank: usize,
        device: &B::Device,
        registered: &'a Cell<bool>,
    ) -> PeerResult<Self> {
        let peer = Self {
            id: PeerId::from(rank),
            rank,
            world: run.world,
            device: device.clone(),
            config: run.config.clone(),
            sessions: run.sessions.as_ref(),
            registered,
        };
        if peer.sessions.is_none() {
            peer.join()?;
        }
        Ok(peer)
    }

    fn join(&self) -> PeerResult<()> {
        register::<B>(self.id, self.device.clone(), self.config.clone())
            .map_err(|e| collective_error("register", e))?;
        self.registered.set(true);
        Ok(())
    }

    fn leave(&self) -> std::result::Result<(), burn::collective::CollectiveError> {
        let out = finish_collective::<B>(self.id);
        self.registered.set(false);
        out
    }

    /// burn's all-reduce (Sum) of `t` over all peers.
    fn all_reduce(&self, t: Tensor<B, 1>) -> PeerResult<Tensor<B, 1>> {
        let Some(sessions) = self.sessions else {
            let out = all_reduce::<B>(self.id, t.into_primitive().tensor(), ReduceOperation::Sum)
                .map_err(|e| collective_error("all-reduce", e))?;
            return Ok(Tensor::from_primitive(TensorPrimitive::Float(out)));
        };
        let out = session_all_reduce::<B>(self.id, &self.device, &self.config, t, self.registered)
            .map_err(|(what, e)| collective_error(what, e));
        match out {
            Ok(out) if sessions.between() => {
                Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
            }
            Ok(_) => Err(PeerError::Collective(TrainError::Input(
                "multi-node run: another node or device stopped".into(),
            ))),
            Err(e) => {
                sessions.gate.break_all();
                Err(e)
            }
        }
    }

    /// Every peer's `t` (same shape everywhere), concatenated in rank order: `world × n`
    /// values, each exactly as its peer sent it.
    fn gather(&self, t: Tensor<B, 1>) -> PeerResult<Tensor<B, 1>> {
        let n = t.dims()[0];
        let mut parts = Vec::with_capacity(3);
        if self.rank > 0 {
            parts.push(Tensor::zeros([self.rank * n], &self.device));
        }
        parts.push(t);
        let after = self.world - self.rank - 1;
        if after > 0 {
            parts.push(Tensor::zeros([after * n], &self.device));
        }
        self.all_reduce(Tensor::cat(parts, 0))
    }

    /// The sum over all peers of `t` (same shape everywhere), the same bits on every run.
    fn sum(&self, t: Tensor<B, 1>) -> PeerResult<Tensor<B, 1>> {
        if self.world <= 2 {
            return self.all_reduce(t);
        }
        let n = t.dims()[0];
        let all = self.gather(t)?;
        let mut acc = all.clone().slice(0..n);
        for r in 1..self.world {
            acc = acc + all.clone().slice(r * n..(r + 1) * n);
        }
        Ok(acc)
    }

    /// Every peer's `values` (f32 on the wire: counts up to 2^24 and f32 sums are exact),
    /// one row per peer in rank order.
    fn gather_host(&self, values: &[f32]) -> PeerResult<Vec<Vec<f32>>> {
        let n = values.len();
        let t = Tensor::<B, 1>::from_data(TensorData::new(values.to_vec(), [n]), &self.device);
        let all = self
            .gather(t)?
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| TrainError::Input(format!("data-parallel gather: {e:?}")))?;
        Ok(all.chunks(n).map(<[f32]>::to_vec).collect())
    }
}

impl<B: Backend> Drop for Peer<'_, B> {
    fn drop(&mut self) {
        if self.registered.get()
            && let Err(e) = self.leave()
        {
            tracing::warn!(peer = %self.id, error = ?e, "finishing the collective failed");
        }
    }
}

/// Adapter tensors (`{linear}.lora_A` / `.lora_B`) and their shapes, in name order.
fn adapter_layout<B: Backend, M: VisionLanguageModel<B>>(model: &M) -> Vec<(String, [usize; 2])> {
    let mut out = BTreeMap::new();
    for (_, linear) in prunable_linears(model) {
        if let Some(a) = &linear.adapter {
            out.insert(format!("{}.lora_A", linear.key), a.lora_a.dims());
            out.insert(format!("{}.lora_B", linear.key), a.lora_b.dims());
        }
    }
    out.into_iter().collect()
}

/// Sums the peers' adapter gradients with one all-reduce: every tensor of `layout` flattened
/// into one vector (zeros where this peer has none), followed by one presence flag per tensor;
/// a tensor no peer has a gradient for stays absent (as on one device).
fn reduce_grads<B: AutodiffBackend>(
    peer: &Peer<'_, B::InnerBackend>,
    layout: &[(String, [usize; 2])],
    mut local: AdapterGrads<B>,
) -> PeerResult<AdapterGrads<B>> {
    let device = &peer.device;
    let mut parts = Vec::with_capacity(layout.len() + 1);
    let mut present = Vec::with_capacity(layout.len());
    for (name, [r, c]) in layout {
        match local.remove(name) {
            Some(g) => {
                parts.push(g.reshape([r * c]));
                present.push(1.0f32);
            }
            None => {
                parts.push(Tensor::zeros([r * c], device));
                present.push(0.0);
            }
        }
    }
    let len: usize = layout.iter().map(|(_, [r, c])| r * c).sum();
    parts.push(Tensor::from_data(
        TensorData::new(present, [layout.len()]),
        device,
    ));
    let flat = peer.sum(Tensor::cat(parts, 0))?;
    let flags = flat
        .clone()
        .slice(len..len + layout.len())
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| TrainError::Input(format!("data-parallel gradient flags: {e:?}")))?;
    let mut out = BTreeMap::new();
    let mut offset = 0;
    for ((name, [r, c]), flag) in layout.iter().zip(flags) {
        let n = r * c;
        if flag > 0.0 {
            out.insert(
                name.clone(),
                flat.clone().slice(offset..offset + n).reshape([*r, *c]),
            );
        }
        offset += n;
    }
    Ok(out)
}

/// One peer's forward on its rows of a micro-batch: the loss sums (with their graph) and the
/// host values of the status vector.
struct Local<B: Backend> {
    sums: LossSums<B>,
    tokens: usize,
    rows: usize,
    ce: f32,
    kl: f32,
}

fn forward_sums<B: AutodiffBackend, M>(
    model: &M,
    batch: &TrainBatch<B>,
    rows: usize,
    cfg: &TrainConfig,
) -> Result<Local<B>>
where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
    M::InnerModule: VisionLanguageModel<B::InnerBackend>,
{
    let (student, teacher) = student_and_teacher(model, batch, cfg)?;
    let sums = distill_sums(
        student.logits,
        teacher,
        student.targets,
        student.mask,
        &cfg.distill,
    );
    Ok(Local {
        ce: sums.ce.clone().into_scalar().elem::<f32>(),
        kl: sums.kl.clone().into_scalar().elem::<f32>(),
        sums,
        tokens: student.tokens,
        rows,
    })
}

/// Backward of this peer's share of the batch loss; adds the adapter gradients to `grads`.
fn backward_into<B: AutodiffBackend, M>(
    model: &mut M,
    local: Local<B>,
    (a, b): (f64, f64),
    grads: &mut AdapterGrads<B>,
) where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
{
    let loss = local.sums.ce.mul_scalar(a) + local.sums.kl.mul_scalar(b);
    let g = loss.backward();
    for_each_linear_mut(model, |name, _, linear| {
        if let Some(ad) = &linear.adapter {
            for (suffix, p) in [("lora_A", &ad.lora_a), ("lora_B", &ad.lora_b)] {
                if let Some(gr) = p.val().grad(&g) {
                    let key = format!("{name}.{suffix}");
                    let sum = match grads.remove(&key) {
                        Some(prev) => prev + gr,
                        None => gr,
                    };
                    grads.insert(key, sum);
                }
            }
        }
    });
}

/// What rank 0 does besides training: events, validation, checkpoints.
struct Lead<'a> {
    on_event: &'a mut dyn FnMut(&TrainEvent),
    checkpoints: Option<&'a Path>,
    validations: Vec<Validation>,
}

/// A peer's end state.
struct PeerEnd<M, O> {
    model: M,
    opt: O,
    state: TrainState,
    first_loss: Option<f64>,
    last_loss: Option<f64>,
    last_saved: u64,
    validations: Vec<Validation>,
}

/// The run every peer shares.
struct Run<'a> {
    data: &'a TrainData,
    cfg: &'a TrainConfig,
    /// Peers on all nodes.
    world: usize,
    total: u64,
    config: CollectiveConfig,
    sessions: Option<Sessions>,
}

#[allow(clippy::too_many_arguments)]
fn peer_loop<'a, B: AutodiffBackend, M>(
    run: &'a Run<'a>,
    rank: usize,
    mut model: M,
    mut opt: AdamW<B::InnerBackend>,
    mut state: TrainState,
    device: &B::Device,
    mut lead: Option<Lead<'_>>,
    registered: &'a Cell<bool>,
) -> PeerResult<PeerEnd<M, AdamW<B::InnerBackend>>>
where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
    M::InnerModule: VisionLanguageModel<B::InnerBackend>,
{
    let Run {
        data,
        cfg,
        world,
        total,
        ..
    } = *run;
    let peer = Peer::<B::InnerBackend>::register(run, rank, device, registered)?;
    // Every peer starts where the others do (on several nodes each read its own checkpoint
    // directory): steps, epochs and positions are exact in f32 below 2^24.
    let here = [state.step as f32, state.epoch as f32, state.position as f32];
    for (r, there) in peer.gather_host(&here)?.iter().enumerate() {
        if there[..] != here[..] {
            return Err(PeerError::Own(TrainError::Input(format!(
                "device {rank} starts at step {} but device {r} at step {} (epoch {}, position {}): every node must resume from the same checkpoint",
                state.step, there[0], there[1], there[2]
            ))));
        }
    }
    let layout = adapter_layout(&model);
    let n = data.train.len();
    let global = cfg.batch_size;
    let per_peer = global / world;
    let mut pending: Option<TrainError> = None;
    let (mut first_loss, mut last_loss) = (None, None);
    let mut grads: AdapterGrads<B> = BTreeMap::new();
    let (mut micro, mut window_loss, mut window_ce, mut window_kl) = (0usize, 0.0, 0.0, 0.0);
    let mut window_start = Instant::now();
    let mut window_examples = 0usize;
    let mut last_saved = state.step;
    while state.step < total {
        let order = epoch_order(n, cfg.seed, state.epoch);
        let first = (state.position as usize).min(n);
        let chunks: Vec<Range<usize>> = (first..n)
            .step_by(global)
            .map(|s| s..(s + global).min(n))
            .collect();
        // This peer's rows of every remaining batch of the epoch, by position in the order.
        let mut mine = Vec::new();
        let mut counts = Vec::with_capacity(chunks.len());
        for c in &chunks {
            let rows = shard(c.len(), rank, world);
            counts.push(rows.len());
            mine.extend(rows.map(|r| c.start + r));
        }
        let mut loader = None;
        if !mine.is_empty() && pending.is_none() {
            let examples: Vec<Example> =
                mine.iter().map(|&p| data.train[order[p]].clone()).collect();
            match Loader::with_global_indices(
                examples,
                mine.clone(),
                epoch_transform(cfg, data, state.epoch),
                data.processor.texts(true),
                LoaderConfig {
                    batch_size: per_peer,
                    threads: data.loader_threads,
                    ..Default::default()
                },
            ) {
                Ok(l) => loader = Some(l),
                Err(e) => pending = Some(e.into()),
            }
        }
        for (k, chunk) in chunks.iter().enumerate() {
            let rows = counts[k];
            let mut local = None;
            if pending.is_none() && rows > 0 {
                let loaded = guarded(rank, || {
                    let batch = match loader.as_mut().and_then(Iterator::next) {
                        Some(b) => b?,
                        None => {
                            return Err(TrainError::Input(format!(
                                "device {rank}: the loader ended before batch {k} of epoch {}",
                                state.epoch
                            )));
                        }
                    };
                    if batch.len() != rows {
                        return Err(TrainError::Input(format!(
                            "device {rank}: a batch of {} rows where {rows} were expected",
                            batch.len()
                        )));
                    }
                    let tb = TrainBatch::<B>::new(&data.processor, &model, &batch, device)?;
                    forward_sums(&model, &tb, rows, cfg)
                });
                match loaded {
                    Ok(l) => local = Some(l),
                    Err(e) => pending = Some(e),
                }
            }
            // Counts are exact in f32 (below 2^24) and the sums are f32 values already.
            let status = match &local {
                Some(l) => [1.0, l.tokens as f32, l.rows as f32, l.ce, l.kl],
                None => [f32::from(u8::from(pending.is_none())), 0.0, 0.0, 0.0, 0.0],
            };
            // Added in rank order on every peer: the same values everywhere, on every run.
            let mut g = [0f64; 5];
            for row in peer.gather_host(&status)? {
                for (acc, v) in g.iter_mut().zip(row) {
                    *acc += f64::from(v);
                }
            }
            if g[0] < world as f64 {
                return Err(pending.map_or(PeerError::Aborted, PeerError::Own));
            }
            let (tokens, rows_global) = (g[1].max(1.0), g[2].max(1.0));
            let (loss, ce, kl) = cfg.distill.combine(g[3], g[4], tokens, rows_global);
            if !loss.is_finite() {
                return Err(TrainError::NonFinite {
                    step: state.step + 1,
                    what: "loss",
                    value: loss,
                }
                .into());
            }
            if let Some(l) = local {
                let (a, b) = cfg.distill.weights(tokens, rows_global);
                let accum = cfg.grad_accum as f64;
                if let Err(e) = guarded(rank, || {
                    backward_into(&mut model, l, (a / accum, b / accum), &mut grads);
                    Ok(())
                }) {
                    pending = Some(e);
                }
            }
            window_loss += loss;
            window_ce += ce;
            window_kl += kl;
            micro += 1;
            window_examples += chunk.len();
            state.position += chunk.len() as u64;
            let epoch_done = k + 1 == chunks.len();
            if micro < cfg.grad_accum && !epoch_done {
                continue;
            }
            // One optimizer step, the same on every peer.
            state.step += 1;
            let lr = cfg.lr_at(state.step, total);
            let mut reduced = reduce_grads::<B>(&peer, &layout, std::mem::take(&mut grads))?;
            guarded(rank, || {
                apply_update(
                    &mut model,
                    &mut reduced,
                    &mut opt,
                    lr,
                    cfg.clip_grad_norm,
                    state.step,
                )
            })?;
            let m = micro as f64;
            let loss = window_loss / m;
            first_loss.get_or_insert(loss);
            last_loss = Some(loss);
            if let Some(lead) = lead.as_mut() {
                let secs = window_start.elapsed().as_secs_f64().max(1e-9);
                (lead.on_event)(&TrainEvent::Step {
                    step: state.step,
                    total_steps: total,
                    loss,
                    ce: window_ce / m,
                    kl: window_kl / m,
                    lr,
                    examples_per_s: window_examples as f64 / secs,
                });
            }
            (micro, window_loss, window_ce, window_kl, window_examples) = (0, 0.0, 0.0, 0.0, 0);
            window_start = Instant::now();
            if let Some(lead) = lead.as_mut()
                && pending.is_none()
                && cfg.val_every > 0
                && state.step.is_multiple_of(cfg.val_every)
                && state.step < total
            {
                match guarded(rank, || validate(&model, data, cfg, state.step, device)) {
                    Ok(v) => {
                        (lead.on_event)(&TrainEvent::Validation(v));
                        lead.validations.push(v);
                    }
                    Err(e) => pending = Some(e),
                }
            }
            if epoch_done {
                state.epoch += 1;
                state.position = 0;
            }
            if cfg.checkpoint_every > 0 && state.step.is_multiple_of(cfg.checkpoint_every) {
                if let Some(lead) = lead.as_mut()
                    && pending.is_none()
                {
                    match guarded(rank, || {
                        save_checkpoint(lead.checkpoints, &model, &opt, &state, cfg)
                    }) {
                        Ok(Some(path)) => (lead.on_event)(&TrainEvent::Checkpoint {
                            step: state.step,
                            path,
                        }),
                        Ok(None) => {}
                        Err(e) => pending = Some(e),
                    }
                }
                last_saved = state.step;
            }
            if state.step >= total {
                break;
            }
        }
        if state.position as usize >= n {
            // An epoch that ended with no batch left (resumed at its very end).
            state.epoch += 1;
            state.position = 0;
        }
    }
    if let Some(e) = pending {
        return Err(PeerError::Own(e));
    }
    drop(peer);
    Ok(PeerEnd {
        model,
        opt,
        state,
        first_loss,
        last_loss,
        last_saved,
        validations: lead.map(|l| l.validations).unwrap_or_default(),
    })
}

/// [`peer_loop`] on this thread, with a panic anywhere in it (outside the [`guarded`] parts
/// too, e.g. in rank 0's event callback) turned into this peer's error without leaving the
/// others blocked in burn's collective, which has no timeouts: a peer that panicked before
/// registering registers now (the others wait for it there), and the collective is reset, which
/// fails the all-reduce the others wait in or call next.
#[allow(clippy::too_many_arguments)]
fn run_peer<'a, B: AutodiffBackend, M>(
    run: &'a Run<'a>,
    rank: usize,
    model: M,
    opt: AdamW<B::InnerBackend>,
    state: TrainState,
    device: &B::Device,
    lead: Option<Lead<'_>>,
) -> PeerResult<PeerEnd<M, AdamW<B::InnerBackend>>>
where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
    M::InnerModule: VisionLanguageModel<B::InnerBackend>,
{
    let registered = Cell::new(false);
    let out = catch_unwind(AssertUnwindSafe(|| {
        peer_loop::<B, M>(run, rank, model, opt, state, device, lead, &registered)
    }));
    out.unwrap_or_else(|payload| {
        let error = panic_error(rank, payload);
        tracing::error!(device = rank, %error, "data-parallel peer failed; stopping the others");
        if let Some(s) = &run.sessions {
            s.gate.break_all();
        }
        if !registered.get() {
            let _ = catch_unwind(AssertUnwindSafe(|| {
                register::<B::InnerBackend>(PeerId::from(rank), device.clone(), run.config.clone())
            }));
        }
        reset_collective::<B::InnerBackend>();
        Err(PeerError::Own(error))
    })
}

/// [`crate::trainer::train_on`] with two or more devices.
pub(crate) fn train_parallel<B: AutodiffBackend, M>(
    mut model: M,
    data: &TrainData,
    cfg: &TrainConfig,
    checkpoints: Option<&Path>,
    resume: bool,
    devices: &[B::Device],
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<(M, TrainReport)>
where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
    M::InnerModule: VisionLanguageModel<B::InnerBackend>,
{
    let local = devices.len();
    let (nodes, node_rank) = match &cfg.cluster {
        Some(c) => {
            c.validate()?;
            (c.nodes, c.node_rank)
        }
        None => (1, 0),
    };
    // Node 0 leads: events, validation, checkpoints.
    let leads = node_rank == 0;
    let world = local * nodes;
    let mut cfg_n = cfg.clone();
    cfg_n.devices = world;
    cfg_n.validate()?;
    if data.train.is_empty() {
        return Err(TrainError::Input("no training examples".into()));
    }
    let start = Instant::now();
    let device = &devices[0];
    let (state, opt, resumed_at) = start_state(&mut model, data, cfg, checkpoints, resume, device)?;
    let total = total_steps(cfg, data.train.len());
    on_event(&TrainEvent::Start {
        total_steps: total,
        resumed_at,
    });
    let mut validations = Vec::new();
    if leads && resumed_at.is_none() && !data.val.is_empty() {
        let v = validate(&model, data, cfg, 0, device)?;
        on_event(&TrainEvent::Validation(v));
        validations.push(v);
    }
    let steps_at_start = state.step;
    // Node 0 hosts the orchestrator (until every node has finished); all nodes meet at the
    // fence before any peer registers.
    let _orchestrator = match &cfg.cluster {
        Some(c) if leads => Some(Orchestrator::start(c)?),
        _ => None,
    };
    let sessions = match &cfg.cluster {
        Some(c) => {
            tracing::info!(nodes, node_rank, coordinator = %c.coordinator, "joining the other nodes");
            Some(Sessions {
                gate: Gate::new(local),
                fence: Mutex::new(Fence::connect(c)?),
            })
        }
        None => None,
    };
    let run = Run {
        data,
        cfg,
        world,
        total,
        config: collective_config(local, cfg)?,
        sessions,
    };
    let base = node_rank * local;
    let session = SESSION.lock().unwrap_or_else(|e| e.into_inner());
    // Clears what a failed earlier session in this process may have left registered. The
    // message is queued before any peer's registration.
    reset_collective::<B::InnerBackend>();
    // The peers compute in the caller's floating-point environment (subnormals flushed or not).
    let flush = ressa_sparse::fpenv::flushes_subnormals();
    let (first, others) = std::thread::scope(|s| {
        // Every thread waits for a go before it registers: if one cannot be started, the others
        // are told to stop instead of waiting for it in the collective's registration.
        let mut handles = Vec::with_capacity(world - 1);
        let mut gos = Vec::with_capacity(world - 1);
        let mut spawn_error = None;
        for (i, d) in devices.iter().enumerate().skip(1) {
            let rank = base + i;
            let d = d.clone();
            // `fork` gives the copy its own autodiff leaves (on Flex the frozen weights still
            // share their buffers), so the peers' backward passes never meet.
            let (m, o) = (model.clone().fork(&d), opt_to(&opt, &d));
            let st = state.clone();
            let run = &run;
            let (go, wait) = mpsc::channel::<bool>();
            let spawned = std::thread::Builder::new()
                .name(format!("ressa-peer-{rank}"))
                .spawn_scoped(s, move || {
                    if flush {
                        ressa_sparse::fpenv::flush_subnormals_on_this_thread();
                    }
                    if wait.recv() != Ok(true) {
                        return Err(PeerError::Aborted);
                    }
                    run_peer::<B, M>(run, rank, m, o, st, &d, None).map(|_| ())
                });
            match spawned {
                Ok(h) => {
                    handles.push(h);
                    gos.push(go);
                }
                Err(e) => {
                    spawn_error = Some(TrainError::Input(format!(
                        "cannot start the thread of device {rank}: {e}"
                    )));
                    break;
                }
            }
        }
        let go = spawn_error.is_none();
        for g in gos {
            let _ = g.send(go);
        }
        let first = match spawn_error {
            Some(e) => Err(PeerError::Own(e)),
            None => {
                let lead = leads.then(|| Lead {
                    on_event: &mut *on_event,
                    checkpoints,
                    validations: Vec::new(),
                });
                run_peer::<B, M>(&run, base, model, opt, state, device, lead)
            }
        };
        let others: Vec<PeerResult<()>> = handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(PeerError::Own(TrainError::Input(format!(
                        "device {}: its thread panicked",
                        base + i + 1
                    ))))
                })
            })
            .collect();
        (first, others)
    });
    drop(session);
    // The failing peer's own error, lowest rank first; else what the collective reported.
    let mut own = None;
    let mut collective = None;
    let end = match first {
        Ok(end) => Some(end),
        Err(PeerError::Own(e)) => {
            own = Some(e);
            None
        }
        Err(PeerError::Collective(e)) => {
            collective = Some(e);
            None
        }
        Err(PeerError::Aborted) => None,
    };
    for r in others {
        match r {
            Err(PeerError::Own(e)) if own.is_none() => own = Some(e),
            Err(PeerError::Collective(e)) if collective.is_none() => collective = Some(e),
            _ => {}
        }
    }
    let end = match (end, own, collective) {
        (_, Some(e), _) | (_, None, Some(e)) => return Err(e),
        (Some(end), None, None) => end,
        (None, None, None) => {
            return Err(TrainError::Input(
                "a data-parallel peer stopped without an error".into(),
            ));
        }
    };
    let PeerEnd {
        model,
        opt,
        state,
        first_loss,
        last_loss,
        last_saved,
        validations: during,
    } = end;
    validations.extend(during);
    if leads
        && last_saved != state.step
        && let Some(path) = save_checkpoint(checkpoints, &model, &opt, &state, cfg)?
    {
        on_event(&TrainEvent::Checkpoint {
            step: state.step,
            path,
        });
    }
    if leads && !data.val.is_empty() {
        let v = validate(&model, data, cfg, state.step, device)?;
        on_event(&TrainEvent::Validation(v));
        validations.push(v);
    }
    check_finite_adapters(&model, state.step)?;
    let seconds = start.elapsed().as_secs_f64();
    let done = state.step - steps_at_start;
    Ok((
        model,
        TrainReport {
            steps: state.step,
            resumed_at,
            first_loss,
            last_loss,
            validations,
            seconds,
            steps_per_s: done as f64 / seconds.max(1e-9),
        },
    ))
}

/// The optimizer with its moments on `device`.
fn opt_to<B: Backend>(opt: &AdamW<B>, device: &B::Device) -> AdamW<B> {
    AdamW {
        config: opt.config,
        steps: opt.steps,
        moments: opt
            .moments
            .iter()
            .map(|(k, m)| {
                (
                    k.clone(),
                    Moments {
                        m: m.m.clone().to_device(device),
                        v: m.v.clone().to_device(device),
                    },
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_a_batch_in_order() {
        for world in 1..=5 {
            for len in 0..=12 {
                let parts: Vec<Range<usize>> = (0..world).map(|r| shard(len, r, world)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[world - 1].end, len);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() <= w[1].len() + 1);
                }
            }
        }
        assert_eq!(shard(8, 1, 4), 2..4);
        assert_eq!(shard(3, 3, 4), 3..3);
    }
}

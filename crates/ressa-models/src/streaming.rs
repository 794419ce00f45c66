//! A model loaded without the weights of its stacks' linears, for layer-streamed pruning: the
//! checkpoint stays memory-mapped in its stored dtype, embeddings, norms, biases and the other
//! parts outside the blocks are read as usual, and each block's linears are read in f32 when
//! calibration reaches the block ([`LinearSource::load_linear`]) and dropped after
//! ([`LinearSource::release_linear`]). Which linears those are comes from the model's own
//! [`crate::prunable::Prunable`] description (its stacks' block linears and its idle
//! linears), so any family streams through the trait.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;

use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::pretrained::{SourceLayout, StreamedOutput};
use crate::vlm::VisionLanguageModel;
use crate::weights::{Loader, WeightStore, deferred_weight};

/// A model whose block linears stay on disk until they are needed (see the module docs).
pub struct Streamed<B: Backend, M: VisionLanguageModel<B>> {
    /// The model; the deferred linears hold a `[0, 0]` weight until loaded.
    pub model: M,
    pub config: M::Config,
    pub layout: SourceLayout,
    pub dir: PathBuf,
    source: LinearSource<B>,
}

/// Where the weights of a [`Streamed`] model's deferred linears are read from (a handle apart
/// from the model, so calibration can hold both).
#[derive(Clone)]
pub struct LinearSource<B: Backend> {
    store: Arc<WeightStore>,
    device: B::Device,
    /// Module key → `[d_in, d_out]` of every linear whose weight stays on disk.
    deferred: Arc<BTreeMap<String, [usize; 2]>>,
}

impl<B: Backend> LinearSource<B> {
    /// `[d_in, d_out]` of a linear whose weight stays on disk, by module key.
    pub fn deferred_dims(&self, key: &str) -> Option<[usize; 2]> {
        self.deferred.get(key).copied()
    }

    /// Every linear whose weight stays on disk: module key → `[d_in, d_out]`.
    pub fn deferred(&self) -> &BTreeMap<String, [usize; 2]> {
        &self.deferred
    }

    /// The memory-mapped checkpoint.
    pub fn store(&self) -> &Arc<WeightStore> {
        &self.store
    }

    /// Reads the weight of `linear` (one of the deferred) from the checkpoint, in f32 and
    /// laid out as loading lays it out.
    pub fn load_linear(&self, linear: &mut Linear<B>) -> Result<()> {
        let [d_in, d_out] = self.deferred_dims(&linear.key).ok_or_else(|| {
            ModelError::Input(format!(
                "{}: not a linear left on disk, cannot be streamed in",
                linear.key
            ))
        })?;
        let weight =
            Loader::new(&self.store, &self.device).linear_weight(&linear.key, d_in, d_out)?;
        linear.set_weight(weight);
        Ok(())
    }

    /// Drops the weight of a deferred `linear` (it is on disk, or was written out).
    pub fn release_linear(&self, linear: &mut Linear<B>) {
        if self.deferred.contains_key(&*linear.key) {
            linear.set_weight(deferred_weight(&self.device));
        }
    }
}

impl<B: Backend, M: VisionLanguageModel<B>> std::fmt::Debug for Streamed<B, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Streamed({}, {} linears on disk)",
            self.dir.display(),
            self.source.deferred.len()
        )
    }
}

impl<B: Backend, M: VisionLanguageModel<B>> Streamed<B, M> {
    /// Opens the HF directory `dir`: every tensor is checked against `config` (as loading
    /// does) and everything but the stacks' and the idle linears' weights is read.
    pub fn open(dir: &Path, config: M::Config, device: &B::Device) -> Result<Self> {
        let store = Arc::new(WeightStore::open_dir(dir)?);
        // The structure first (no data): which linears are the blocks'.
        let keys = {
            let structure = M::load(&config, &Loader::structure(&store, device))?;
            let mut keys = HashSet::new();
            for s in structure.stacks() {
                for b in 0..s.blocks {
                    keys.extend(
                        structure
                            .block_linears(s.id, b)
                            .iter()
                            .map(|l| l.key.to_string()),
                    );
                }
            }
            keys.extend(structure.idle_linears().iter().map(|l| l.key.to_string()));
            keys
        };
        let vb = Loader::deferring(&store, device, keys);
        let model = M::load(&config, &vb)?;
        let deferred = vb.deferred();
        let dtypes = store
            .keys()
            .filter_map(|k| store.info(k).map(|(_, d)| (k.clone(), d)))
            .collect();
        let layout = SourceLayout {
            dtypes,
            shards: store.shard_map().cloned(),
        };
        let streamed = Self {
            model,
            config,
            layout,
            dir: dir.to_path_buf(),
            source: LinearSource {
                store,
                device: device.clone(),
                deferred: Arc::new(deferred),
            },
        };
        tracing::info!(
            dir = %dir.display(),
            on_disk = streamed.source.deferred.len(),
            resident_mib = streamed.resident_bytes() >> 20,
            "opened model (block linears stay on disk until needed)"
        );
        Ok(streamed)
    }

    /// Where the deferred linears' weights are read from.
    pub fn source(&self) -> &LinearSource<B> {
        &self.source
    }

    /// f32 bytes of the weights held in memory: every tensor the model read except the
    /// deferred linears' weights.
    pub fn resident_bytes(&self) -> u64 {
        let deferred: HashSet<String> = self
            .source
            .deferred
            .keys()
            .map(|k| format!("{k}.weight"))
            .collect();
        self.model
            .param_keys()
            .file_keys()
            .filter(|k| !deferred.contains(*k))
            .filter_map(|k| self.source.store.info(k))
            .map(|(shape, _)| shape.iter().product::<usize>() as u64 * 4)
            .sum()
    }

    /// f32 bytes of a block's linear weights.
    pub fn block_bytes(&self, stack: M::Stack, block: usize) -> u64 {
        self.model
            .block_linears(stack, block)
            .iter()
            .filter_map(|l| self.source.deferred_dims(&l.key))
            .map(|[i, o]| (i * o) as u64 * 4)
            .sum()
    }

    /// Starts the output directory `out` in the source's layout (see [`StreamedOutput`]).
    pub fn output(&self, out: &Path) -> Result<StreamedOutput> {
        StreamedOutput::create(
            &self.dir,
            out,
            &self.layout,
            Arc::clone(&self.source.store),
            self.model.param_keys().file_keys(),
        )
    }
}

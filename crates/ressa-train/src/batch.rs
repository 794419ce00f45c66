//! Training batches: a loader batch (pixels, prompt, Q-Former text, target) as model tensors,
//! with the logits positions that predict the target and the target ids there.
//!
//! - T5: the decoder is teacher-forced with `[start] + target[..-1]`; logits position `t`
//!   predicts target token `t`.
//! - Decoder-only (LLaMA): the sequence is `[queries ; prompt ; target]`; logits position
//!   `Q + |prompt| − 1 + t` predicts target token `t`, and only target tokens count in the loss.

use burn::prelude::*;
use ressa_data::loader::Batch;
use ressa_models::nn::ids_tensor;
use ressa_models::{InstructBlip, VlmInputs};

/// One batch as tensors.
#[derive(Debug, Clone)]
pub struct TrainBatch<B: Backend> {
    pub inputs: VlmInputs<B>,
    /// T5 decoder input ids [B, T]; `None` for a decoder-only model.
    pub decoder_input_ids: Option<Tensor<B, 2, Int>>,
    /// Target id at each loss position [B, T] (0 where masked).
    pub targets: Tensor<B, 2, Int>,
    /// 1 at loss positions, 0 elsewhere [B, T].
    pub mask: Tensor<B, 2>,
    /// Decoder-only: where each row's target starts in the logits (`Q + |prompt| − 1`).
    pub target_offsets: Vec<usize>,
    /// Target tokens in the batch.
    pub tokens: usize,
}

/// Token ids of the text fields, how the model wants them.
#[derive(Debug, Clone, Copy)]
pub struct TokenIds {
    pub pad: u32,
    /// T5 `decoder_start_token_id`.
    pub decoder_start: u32,
    /// Decoder-only: a leading id the tokenizer adds to every text (BOS), dropped from targets.
    pub bos: Option<u32>,
    /// Decoder-only: appended to every target (the tokenizer does not add it).
    pub eos: Option<u32>,
}

fn row_len(mask: &[u32]) -> usize {
    mask.iter().filter(|&&m| m != 0).count()
}

/// Converts a loader batch (with `input`, `output` and, for InstructBLIP, `qformer` texts).
pub fn to_tensors<B: Backend>(
    batch: &Batch,
    model: &InstructBlip<B>,
    ids: TokenIds,
    device: &B::Device,
) -> Result<TrainBatch<B>, String> {
    let n = batch.len();
    let (h, w) = batch.image_size;
    let pixel_values = Tensor::from_data(
        TensorData::new(batch.pixel_values.clone(), [n, 3, h, w]),
        device,
    );
    let input = batch
        .input
        .as_ref()
        .ok_or("the batch has no prompt tokens")?;
    let output = batch
        .output
        .as_ref()
        .ok_or("the batch has no target tokens")?;
    let qformer_text = batch.qformer.as_ref().map(|q| {
        (
            ids_tensor::<B>(&q.ids, device),
            mask_tensor::<B>(&q.mask, device),
        )
    });
    let targets: Vec<Vec<u32>> = output
        .ids
        .iter()
        .zip(&output.mask)
        .map(|(r, m)| r[..row_len(m)].to_vec())
        .collect();
    if model.language_model.is_decoder_only() {
        return decoder_only(
            batch,
            model,
            ids,
            pixel_values,
            qformer_text,
            targets,
            device,
        );
    }
    let t = targets.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut dec = vec![vec![ids.pad; t]; n];
    let mut tgt = vec![vec![0u32; t]; n];
    let mut mask = vec![vec![0u32; t]; n];
    for (r, target) in targets.iter().enumerate() {
        dec[r][0] = ids.decoder_start;
        for (i, &id) in target.iter().enumerate() {
            if i + 1 < t {
                dec[r][i + 1] = id;
            }
            tgt[r][i] = id;
            mask[r][i] = 1;
        }
        // Teacher forcing: position i + 1 reads target i only while i + 1 < |target|.
        for slot in dec[r].iter_mut().skip(target.len().max(1)) {
            *slot = ids.pad;
        }
    }
    let tokens = targets.iter().map(Vec::len).sum();
    Ok(TrainBatch {
        inputs: VlmInputs {
            pixel_values,
            qformer_text,
            input_ids: ids_tensor::<B>(&input.ids, device),
            attention_mask: mask_tensor::<B>(&input.mask, device),
        },
        decoder_input_ids: Some(ids_tensor::<B>(&dec, device)),
        targets: ids_tensor::<B>(&tgt, device),
        mask: mask_tensor::<B>(&mask, device),
        target_offsets: Vec::new(),
        tokens,
    })
}

fn mask_tensor<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2> {
    let n = rows.len();
    let l = rows.first().map_or(0, Vec::len);
    let flat: Vec<f32> = rows.iter().flatten().map(|&m| m as f32).collect();
    Tensor::from_data(TensorData::new(flat, [n, l]), device)
}

/// `[prompt ; target]` right-padded as the prompt input; loss positions shifted by one.
fn decoder_only<B: Backend>(
    batch: &Batch,
    model: &InstructBlip<B>,
    ids: TokenIds,
    pixel_values: Tensor<B, 4>,
    qformer_text: Option<(Tensor<B, 2, Int>, Tensor<B, 2>)>,
    targets: Vec<Vec<u32>>,
    device: &B::Device,
) -> Result<TrainBatch<B>, String> {
    let input = batch.input.as_ref().expect("checked");
    let q = model.query_tokens.dims()[1];
    let mut rows = Vec::with_capacity(targets.len());
    let mut spans = Vec::with_capacity(targets.len());
    for ((prompt, m), target) in input.ids.iter().zip(&input.mask).zip(&targets) {
        let prompt = &prompt[..row_len(m)];
        let mut target: Vec<u32> = match (ids.bos, target.first()) {
            (Some(bos), Some(&first)) if first == bos => target[1..].to_vec(),
            _ => target.clone(),
        };
        if let Some(eos) = ids.eos
            && target.last() != Some(&eos)
        {
            target.push(eos);
        }
        let mut row = prompt.to_vec();
        row.extend(&target);
        spans.push((q + prompt.len() - 1, target));
        rows.push(row);
    }
    let l = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut seq_mask = vec![vec![0u32; l]; rows.len()];
    for (r, row) in rows.iter_mut().enumerate() {
        seq_mask[r][..row.len()].fill(1);
        row.resize(l, ids.pad);
    }
    // Loss positions over the logits [B, Q + L].
    let t = q + l;
    let n = rows.len();
    let mut tgt = vec![vec![0u32; t]; n];
    let mut mask = vec![vec![0u32; t]; n];
    for (r, (start, target)) in spans.iter().enumerate() {
        for (i, &id) in target.iter().enumerate() {
            tgt[r][start + i] = id;
            mask[r][start + i] = 1;
        }
    }
    let tokens = spans.iter().map(|(_, t)| t.len()).sum();
    Ok(TrainBatch {
        inputs: VlmInputs {
            pixel_values,
            qformer_text,
            input_ids: ids_tensor::<B>(&rows, device),
            attention_mask: mask_tensor::<B>(&seq_mask, device),
        },
        decoder_input_ids: None,
        targets: ids_tensor::<B>(&tgt, device),
        mask: mask_tensor::<B>(&mask, device),
        target_offsets: spans.iter().map(|(s, _)| *s).collect(),
        tokens,
    })
}

/// Logits [B, T, V] aligned with `batch.targets`.
pub fn logits<B: Backend>(model: &InstructBlip<B>, batch: &TrainBatch<B>) -> Tensor<B, 3> {
    match &batch.decoder_input_ids {
        Some(dec) => model.forward(&batch.inputs, dec.clone()),
        None => model
            .decoder_only_logits(&batch.inputs)
            .expect("a decoder-only batch for a decoder-only model"),
    }
}

//! Greedy and beam-search decoding with a KV cache, for the T5 decoder and for a decoder-only
//! (LLaMA) language model, step for step the algorithm of `transformers` 5.x `generate`
//! (`_sample` without sampling, and the vectorized `_beam_search` with its early-stop
//! heuristic), so the returned tokens match it exactly.
//!
//! T5 rows start with the decoder start token. Decoder-only rows start, as `transformers`
//! returns them, with the whole input: `image_token_index` once per query, then the (left
//! padded) prompt, then the generated tokens; generation positions are `cumsum(mask) − 1`.
//! [`Generated::input_len`] says where the generated part of a row starts and [`answer_tokens`] cuts the
//! answer out of a row (up to the first eos).

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::error::{ModelError, Result};
use crate::lm::LanguageModel;
pub use crate::lm::SpecialTokens;
use crate::vlm::{VisionLanguageModel, VlmInputs};

/// Decoding settings (HF `GenerationConfig` names).
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub num_beams: usize,
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// Hypothesis score = sum of log-probs / (generated length ^ length_penalty).
    pub length_penalty: f32,
    /// HF `early_stopping=True`: stop a batch item once `num_beams` hypotheses are finished.
    pub early_stopping: bool,
    /// CTRL repetition penalty (HF `repetition_penalty`; LAVIS generates with 1.5): every token
    /// already in the sequence has its score divided by it when positive, multiplied when
    /// negative. 1.0 disables it. A decoder-only row's left padding is not part of the sequence
    /// here (transformers ≥ 5.25, see [`penalty_start`]).
    pub repetition_penalty: f32,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            num_beams: 1,
            max_new_tokens: 20,
            min_new_tokens: 0,
            length_penalty: 1.0,
            early_stopping: false,
            repetition_penalty: 1.0,
        }
    }
}

impl GenerationConfig {
    /// Checks the settings: at least one beam and one new token, no more minimum than maximum
    /// tokens, a positive finite repetition penalty, a finite length penalty.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Input(m));
        if self.num_beams == 0 || self.max_new_tokens == 0 {
            return bad("num_beams and max_new_tokens must be at least 1".into());
        }
        if self.min_new_tokens > self.max_new_tokens {
            return bad(format!(
                "min_new_tokens {} exceeds max_new_tokens {}",
                self.min_new_tokens, self.max_new_tokens
            ));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty {}: expected a positive finite number",
                self.repetition_penalty
            ));
        }
        if !self.length_penalty.is_finite() {
            return bad(format!(
                "length_penalty {}: expected a finite number",
                self.length_penalty
            ));
        }
        Ok(())
    }
}

/// What [`generate`] returns: one row per batch item, as `transformers` returns them, and how
/// many leading tokens of every row are input rather than generated (T5: the decoder start
/// token; a decoder-only model: its image placeholders and the padded prompt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub rows: Vec<Vec<u32>>,
    pub input_len: usize,
    pub tokens: SpecialTokens,
}

impl Generated {
    /// The answer of row `i`: what follows the input, up to the first eos, padding dropped.
    pub fn answer(&self, i: usize) -> Vec<u32> {
        answer_tokens(&self.rows[i], self.input_len, self.tokens)
    }
}

const NEG: f32 = -1.0e9;

/// The answer in a row returned by [`generate`]: the tokens after its first `input_len`
/// (see [`input_len`]), up to the first eos, padding dropped.
pub fn answer_tokens(seq: &[u32], input_len: usize, tokens: SpecialTokens) -> Vec<u32> {
    seq.iter()
        .skip(input_len)
        .take_while(|&&t| t != tokens.eos)
        .copied()
        .filter(|&t| t != tokens.pad)
        .collect()
}

/// Where the tokens the repetition penalty sees start in each row, as transformers 5.25's
/// `generate` sets `RepetitionPenaltyLogitsProcessor(prompt_ignore_length=…)`: for a decoder-only
/// model, the first position its attention mask attends (`(mask != 0).argmax(1)`; 0 for a row
/// that attends nothing), so left padding is not penalized; an encoder-decoder model's rows are
/// decoder tokens and it passes no decoder mask (0). Positions that attend after a padded one
/// stay in: InstructBLIP's rows start with the query placeholders, so nothing is left out there.
pub fn penalty_start(host_mask: &[Vec<u32>], encoder_decoder: bool) -> Vec<usize> {
    host_mask
        .iter()
        .map(|row| {
            if encoder_decoder {
                0
            } else {
                row.iter().position(|&m| m != 0).unwrap_or(0)
            }
        })
        .collect()
}

/// HF `RepetitionPenaltyLogitsProcessor` on one row of scores.
fn penalize_repeats(row: &mut [f32], seq: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = seq.to_vec();
    seen.sort_unstable();
    seen.dedup();
    for t in seen {
        if let Some(v) = row.get_mut(t as usize) {
            *v = if *v < 0.0 { *v * penalty } else { *v / penalty };
        }
    }
}

/// Generates token ids for every batch item (greedy or beam search), after checking the
/// settings and the inputs.
pub fn generate<B: Backend, M: VisionLanguageModel<B>>(
    model: &M,
    inputs: &VlmInputs<B>,
    cfg: &GenerationConfig,
) -> Result<Generated> {
    cfg.validate()?;
    let lm = model.language_model();
    let tokens = lm.special_tokens();
    let input = model.lm_input(inputs)?;
    if let Some(window) = lm.context_window() {
        let l = input.embeds.dims()[1];
        if l + cfg.max_new_tokens > window {
            return Err(ModelError::Input(format!(
                "the input has {l} positions and max_new_tokens is {}: more than the language model's context window of {window}",
                cfg.max_new_tokens
            )));
        }
    }
    let skip = penalty_start(&input.host_mask, lm.is_encoder_decoder());
    let expand = cfg.num_beams.max(1);
    let start = lm.start(input, expand)?;
    let input_len = start.input_len;
    let rows = if cfg.num_beams <= 1 {
        greedy(lm, start.state, start.rows, cfg, tokens, &skip)
    } else {
        beam_search(lm, start.state, start.rows, cfg, tokens, &skip)
    };
    Ok(Generated {
        rows,
        input_len,
        tokens,
    })
}

/// One step on the last tokens [rows] → log-probs or logits [rows, vocab] on the host.
fn step<B: Backend, L: LanguageModel<B>>(
    lm: &L,
    state: &mut L::Decoding,
    last: &[u32],
    log_probs: bool,
) -> (Vec<f32>, usize) {
    let logits = lm.step(state, last);
    let vocab = logits.dims()[1];
    let out = if log_probs {
        log_softmax(logits, 1)
    } else {
        logits
    };
    (
        out.into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 logits"),
        vocab,
    )
}

fn greedy<B: Backend, L: LanguageModel<B>>(
    lm: &L,
    mut session: L::Decoding,
    mut seqs: Vec<Vec<u32>>,
    cfg: &GenerationConfig,
    tokens: SpecialTokens,
    skip: &[usize],
) -> Vec<Vec<u32>> {
    let batch = seqs.len();
    let mut unfinished = vec![true; batch];
    for new in 0..cfg.max_new_tokens {
        let last: Vec<u32> = seqs.iter().map(|s| *s.last().unwrap()).collect();
        let (mut logits, vocab) = step(lm, &mut session, &last, false);
        for b in 0..batch {
            let row = &mut logits[b * vocab..(b + 1) * vocab];
            let from = skip.get(b).copied().unwrap_or(0).min(seqs[b].len());
            penalize_repeats(row, &seqs[b][from..], cfg.repetition_penalty);
            if new < cfg.min_new_tokens
                && let Some(v) = row.get_mut(tokens.eos as usize)
            {
                *v = f32::NEG_INFINITY;
            }
            // First maximum, as torch.argmax.
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            let next = if unfinished[b] {
                best as u32
            } else {
                tokens.pad
            };
            seqs[b].push(next);
            if next == tokens.eos {
                unfinished[b] = false;
            }
        }
        if unfinished.iter().all(|u| !u) {
            break;
        }
    }
    seqs
}

/// Per batch item state of the vectorized beam search.
struct BeamState {
    running: Vec<Vec<u32>>,
    running_scores: Vec<f32>,
    finished: Vec<Vec<u32>>,
    finished_scores: Vec<f32>,
    finished_len: Vec<usize>,
    is_finished: Vec<bool>,
    improvable: bool,
}

/// Indices of the `k` largest values, in descending order (ties: lower index first).
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| {
        values[b]
            .partial_cmp(&values[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

fn beam_search<B: Backend, L: LanguageModel<B>>(
    lm: &L,
    mut session: L::Decoding,
    starts: Vec<Vec<u32>>,
    cfg: &GenerationConfig,
    tokens: SpecialTokens,
    skip: &[usize],
) -> Vec<Vec<u32>> {
    let beams = cfg.num_beams;
    // Each batch row repeated `beams` times (HF `_expand_inputs_for_generation`).
    let batch = starts.len() / beams;

    let prompt_len = starts[0].len();
    let max_length = prompt_len + cfg.max_new_tokens;
    let keep = 2 * beams; // max(2, 1 + #eos) * beams with one eos token
    let mut states: Vec<BeamState> = (0..batch)
        .map(|b| BeamState {
            running: vec![starts[b * beams].clone(); beams],
            running_scores: (0..beams).map(|i| if i == 0 { 0.0 } else { NEG }).collect(),
            finished: vec![starts[b * beams].clone(); beams],
            finished_scores: vec![NEG; beams],
            finished_len: vec![0; beams],
            is_finished: vec![false; beams],
            improvable: true,
        })
        .collect();
    let mut cur_len = prompt_len;
    loop {
        let last: Vec<u32> = states
            .iter()
            .flat_map(|s| s.running.iter().map(|r| *r.last().unwrap()))
            .collect();
        let (mut log_probs, vocab) = step(lm, &mut session, &last, true);
        for (r, seq) in states.iter().flat_map(|s| s.running.iter()).enumerate() {
            let from = skip.get(r / beams).copied().unwrap_or(0).min(seq.len());
            penalize_repeats(
                &mut log_probs[r * vocab..(r + 1) * vocab],
                &seq[from..],
                cfg.repetition_penalty,
            );
        }
        if cur_len - prompt_len < cfg.min_new_tokens && (tokens.eos as usize) < vocab {
            for r in 0..batch * beams {
                log_probs[r * vocab + tokens.eos as usize] = f32::NEG_INFINITY;
            }
        }
        let mut reorder: Vec<usize> = Vec::with_capacity(batch * beams);
        let mut all_hit = true;
        for (b, s) in states.iter_mut().enumerate() {
            // Accumulated scores over (beam, token), flattened as beam * vocab + token.
            let mut acc = vec![0f32; beams * vocab];
            for beam in 0..beams {
                let base = (b * beams + beam) * vocab;
                for t in 0..vocab {
                    acc[beam * vocab + t] = log_probs[base + t] + s.running_scores[beam];
                }
            }
            let top = top_k(&acc, keep);
            let cand_scores: Vec<f32> = top.iter().map(|&i| acc[i]).collect();
            let cand_beam: Vec<usize> = top.iter().map(|&i| i / vocab).collect();
            let cand_seq: Vec<Vec<u32>> = top
                .iter()
                .map(|&i| {
                    let mut seq = s.running[i / vocab].clone();
                    seq.push((i % vocab) as u32);
                    seq
                })
                .collect();
            let hits: Vec<bool> = cand_seq
                .iter()
                .map(|q| *q.last().unwrap() == tokens.eos || cur_len + 1 >= max_length)
                .collect();
            all_hit &= hits.iter().all(|&h| h);

            // Running beams for the next step: best candidates that did not stop.
            let running_vals: Vec<f32> = cand_scores
                .iter()
                .zip(&hits)
                .map(|(&v, &h)| if h { v + NEG } else { v })
                .collect();
            let next = top_k(&running_vals, beams);

            // Finished hypotheses: merge the current ones with top-`beams` candidates that stopped.
            let denom = ((cur_len + 1 - prompt_len) as f64).powf(cfg.length_penalty as f64) as f32;
            let full = cfg.early_stopping && s.is_finished.iter().all(|&f| f);
            let mut merged_scores = s.finished_scores.clone();
            for (k, &v) in cand_scores.iter().enumerate() {
                let just_finished = hits[k] && k < beams;
                let mut score = v / denom;
                if full {
                    score += NEG;
                }
                if !s.improvable {
                    score += NEG;
                }
                if !just_finished {
                    score += NEG;
                }
                merged_scores.push(score);
            }
            let chosen = top_k(&merged_scores, beams);
            let mut finished = Vec::with_capacity(beams);
            let mut finished_scores = Vec::with_capacity(beams);
            let mut finished_len = Vec::with_capacity(beams);
            let mut is_finished = Vec::with_capacity(beams);
            for &m in &chosen {
                if m < beams {
                    finished.push(s.finished[m].clone());
                    finished_len.push(s.finished_len[m]);
                    is_finished.push(s.is_finished[m]);
                } else {
                    let k = m - beams;
                    finished.push(cand_seq[k].clone());
                    finished_len.push(cur_len + 1 - prompt_len);
                    is_finished.push(hits[k] && k < beams);
                }
                finished_scores.push(merged_scores[m]);
            }
            s.finished = finished;
            s.finished_scores = finished_scores;
            s.finished_len = finished_len;
            s.is_finished = is_finished;

            s.running = next.iter().map(|&k| cand_seq[k].clone()).collect();
            s.running_scores = next.iter().map(|&k| running_vals[k]).collect();
            reorder.extend(next.iter().map(|&k| b * beams + cand_beam[k]));
        }
        lm.reorder(&mut session, &reorder);
        cur_len += 1;

        // Early-stop heuristic (early_stopping=False): can a running beam still beat the worst
        // finished one, judged at the current length?
        for s in &mut states {
            let best = s.running_scores[0]
                / ((cur_len - prompt_len) as f64).powf(cfg.length_penalty as f64) as f32;
            let worst = s
                .finished_scores
                .iter()
                .cloned()
                .fold(f32::INFINITY, f32::min);
            let any = s
                .is_finished
                .iter()
                .any(|&f| best > if f { worst } else { NEG });
            s.improvable &= any;
        }
        let improvement_possible = states.iter().any(|s| s.improvable);
        let open_beam =
            !(cfg.early_stopping && states.iter().all(|s| s.is_finished.iter().all(|&f| f)));
        if !(improvement_possible && open_beam && !all_hit) {
            break;
        }
    }
    let generated = states.iter().map(|s| s.finished_len[0]).max().unwrap_or(0);
    // transformers fills with `pad_token_id or eos_token_id`: a pad id of 0 is falsy there, so
    // T5's beam outputs are filled with eos.
    let fill = if tokens.pad != 0 {
        tokens.pad
    } else {
        tokens.eos
    };
    states
        .into_iter()
        .map(|s| {
            let mut seq = s.finished.into_iter().next().unwrap();
            seq.truncate(prompt_len + s.finished_len[0]);
            seq.resize(prompt_len + generated, fill);
            seq
        })
        .collect()
}

/// Drops the decoder start token and everything from the first eos on (T5 rows; see
/// [`answer_tokens`] for any model).
pub fn strip_special(seq: &[u32], tokens: SpecialTokens) -> Vec<u32> {
    answer_tokens(seq, 1, tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_start_after_the_input_and_end_at_eos() {
        let tokens = SpecialTokens {
            decoder_start: 1,
            eos: 2,
            pad: 0,
        };
        // [image x4 ; padded prompt (5) ; generated]: the answer is what follows the 9 input
        // tokens, up to eos.
        let row = [59, 59, 59, 59, 0, 0, 1, 32, 20, 33, 0, 20, 2, 0];
        assert_eq!(answer_tokens(&row, 9, tokens), vec![33, 20]);
        assert_eq!(strip_special(&[1, 7, 8, 2, 9], tokens), vec![7, 8]);
        assert!(answer_tokens(&row, row.len(), tokens).is_empty());
    }

    #[test]
    fn the_penalty_skips_left_padding_of_decoder_only_rows() {
        // LLaVA: padding first; InstructBLIP-LLaMA: queries, then padding; no mask at all.
        let masks = vec![
            vec![0, 0, 1, 1, 1],
            vec![1, 1, 0, 1, 1],
            vec![1, 1, 1, 1, 1],
            vec![0, 0, 0, 0, 0],
        ];
        assert_eq!(penalty_start(&masks, false), vec![2, 0, 0, 0]);
        assert_eq!(penalty_start(&masks, true), vec![0; 4]);
        // Token 0 (the pad) in the padding is not penalized, token 5 after it is.
        let mut row = vec![1.0f32; 6];
        let seq = [0, 0, 5, 5, 3];
        penalize_repeats(&mut row, &seq[2..], 2.0);
        assert_eq!(row, vec![1.0, 1.0, 1.0, 0.5, 1.0, 0.5]);
    }
}

//! Evaluation metrics for RESSA, reproducing the official Python scripts.
//!
//! | Task | Metric | Reference implementation | Module |
//! |---|---|---|---|
//! | VQAv2, OK-VQA | VQA accuracy | `GT-Vision-Lab/VQA` `vqaEval.py` (py3) = LAVIS `vqa_eval.py` | [`vqa`] |
//! | GQA | exact match | LAVIS `GQATask` | [`vqa`] |
//! | COCO caption, NoCaps | CIDEr-D, BLEU-1..4 | `pycocoevalcap` 1.2 (`cider_scorer.py`, `bleu_scorer.py`) | [`cider`], [`bleu`] |
//! | (captions) | PTB tokenisation | Stanford CoreNLP 3.4.1 `PTBTokenizer` as driven by `ptbtokenizer.py` | [`ptb`] |
//!
//! [`score_files`] reads the official file formats ([`formats`]) and returns the
//! metrics by name (`accuracy`, `Bleu_1`..`Bleu_4`, `CIDEr`). The lower-level
//! functions expose per-item scores.
//!
//! Parity: `tests/` compare per-item and corpus scores with golden values
//! produced by the Python tools (`scripts/make_metric_fixtures.py`) to 1e-6, and
//! the tokenizer output with the Java tokenizer's exactly.
//!
//! Not implemented: METEOR, ROUGE-L and SPICE (pycocoevalcap computes them
//! too; SPICE and METEOR need Java), and OK-VQA's spaCy lemmatisation (a hook,
//! see [`vqa::AnswerHook`]).

pub mod bleu;
pub mod cider;
pub mod error;
pub mod formats;
mod java_lower;
pub mod ptb;
pub mod pystr;
pub mod task;
pub mod vqa;

pub use error::EvalError;
pub use formats::Id;
pub use task::{
    CaptionReport, GqaReport, ImageScores, ParseTaskError, Task, VqaReport, evaluate_captions,
    evaluate_gqa, evaluate_vqa, score_files,
};

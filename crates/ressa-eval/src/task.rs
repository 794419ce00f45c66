//! Task-level evaluation: read the official files, check that predictions and
//! ground truth correspond, and compute the metrics the way the reference
//! pipelines (official VQA script, LAVIS, pycocoevalcap) do.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use crate::{
    bleu, cider,
    error::EvalError,
    formats::{
        self, CaptionPrediction, CocoCaptions, GqaAnnotation, Id, VqaAnnotation, VqaPrediction,
    },
    ptb,
    vqa::{self, AnswerHook, VqaCorpus},
};

/// An evaluation task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// VQAv2 (`coco_vqa`): VQA accuracy.
    Vqav2,
    /// OK-VQA: VQA accuracy (predictions are *not* lemmatised here, see [`crate::vqa`]).
    Okvqa,
    /// GQA `testdev_balanced`: exact match.
    Gqa,
    /// COCO captions (Karpathy split): BLEU-1..4 and CIDEr-D.
    CocoCaption,
    /// NoCaps: BLEU-1..4 and CIDEr-D.
    Nocaps,
}

impl Task {
    /// All tasks.
    pub const ALL: [Task; 5] = [
        Task::Vqav2,
        Task::Okvqa,
        Task::Gqa,
        Task::CocoCaption,
        Task::Nocaps,
    ];

    /// The canonical name (what [`FromStr`] accepts and [`fmt::Display`] prints).
    pub fn name(self) -> &'static str {
        match self {
            Task::Vqav2 => "vqav2",
            Task::Okvqa => "okvqa",
            Task::Gqa => "gqa",
            Task::CocoCaption => "coco-caption",
            Task::Nocaps => "nocaps",
        }
    }

    /// Whether the task is scored with captioning metrics.
    pub fn is_captioning(self) -> bool {
        matches!(self, Task::CocoCaption | Task::Nocaps)
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error of [`Task::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task `{0}`; expected one of: vqav2, okvqa, gqa, coco-caption, nocaps")]
pub struct ParseTaskError(String);

impl FromStr for Task {
    type Err = ParseTaskError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        Ok(match norm.as_str() {
            "vqav2" | "vqa-v2" | "coco-vqa" => Task::Vqav2,
            "okvqa" | "ok-vqa" => Task::Okvqa,
            "gqa" => Task::Gqa,
            "coco-caption" | "coco" | "coco-captions" => Task::CocoCaption,
            "nocaps" => Task::Nocaps,
            _ => return Err(ParseTaskError(s.to_string())),
        })
    }
}

/// Score a predictions file against the official annotation file(s).
///
/// * VQAv2 / OK-VQA: `annotations` holds the official annotation file and,
///   optionally, the official question file (recognised by their top-level
///   `annotations` / `questions` keys, in any order). Returns `accuracy`
///   (×100, unrounded), `accuracy_rounded` (what the official script reports:
///   `round(·, 2)`) and `accuracy_<answer type>` (unrounded).
/// * GQA: the LAVIS ground-truth list. Returns `accuracy` (×100).
/// * COCO caption / NoCaps: the COCO-format ground truth. Returns `Bleu_1` ..
///   `Bleu_4` and `CIDEr`, as pycocoevalcap names them (fractions, not ×100).
pub fn score_files(
    task: Task,
    predictions: &Path,
    annotations: &[PathBuf],
) -> Result<BTreeMap<String, f64>, EvalError> {
    match task {
        Task::Vqav2 | Task::Okvqa => {
            let (ann_path, anns) = load_vqa_annotations(annotations)?;
            let preds = formats::read_vqa_predictions(predictions)?;
            let report = evaluate_vqa(&anns, &preds, None, predictions, &ann_path)?;
            Ok(report.metrics())
        }
        Task::Gqa => {
            let [ann_path] = annotations else {
                return Err(EvalError::Usage(format!(
                    "gqa takes one ground-truth file, got {}",
                    annotations.len()
                )));
            };
            let gt = formats::read_gqa_annotations(ann_path)?;
            let preds = formats::read_vqa_predictions(predictions)?;
            let report = evaluate_gqa(&gt, &preds, predictions, ann_path)?;
            Ok(BTreeMap::from([("accuracy".to_string(), report.accuracy)]))
        }
        Task::CocoCaption | Task::Nocaps => {
            let [ann_path] = annotations else {
                return Err(EvalError::Usage(format!(
                    "{task} takes one COCO-format ground-truth file, got {}",
                    annotations.len()
                )));
            };
            let gt = formats::read_coco_captions(ann_path)?;
            let preds = formats::read_caption_predictions(predictions)?;
            let report = evaluate_captions(&gt, &preds, predictions, ann_path)?;
            Ok(report.metrics())
        }
    }
}

/// Read the VQA annotation file (and check the optional question file).
fn load_vqa_annotations(paths: &[PathBuf]) -> Result<(PathBuf, Vec<VqaAnnotation>), EvalError> {
    let mut annotations: Option<(PathBuf, Vec<VqaAnnotation>)> = None;
    let mut questions: Option<(PathBuf, Vec<formats::VqaQuestion>)> = None;
    for p in paths {
        let file = formats::read_vqa_file(p)?;
        match (file.annotations, file.questions) {
            (Some(a), _) if annotations.is_none() => annotations = Some((p.clone(), a)),
            (None, Some(q)) if questions.is_none() => questions = Some((p.clone(), q)),
            (None, None) => {
                return Err(EvalError::invalid(
                    p,
                    "neither an `annotations` nor a `questions` list: not an official VQA file",
                ));
            }
            _ => {
                return Err(EvalError::invalid(
                    p,
                    "a second VQA annotation or question file was given",
                ));
            }
        }
    }
    let Some((ann_path, anns)) = annotations else {
        return Err(EvalError::Usage(
            "VQA scoring needs the official annotation file (`annotations` list)".to_string(),
        ));
    };
    if let Some((q_path, qs)) = questions {
        let known: HashSet<&Id> = qs.iter().map(|q| &q.question_id).collect();
        let missing: Vec<&Id> = anns
            .iter()
            .map(|a| &a.question_id)
            .filter(|id| !known.contains(id))
            .collect();
        if let Some(first) = missing.first() {
            return Err(EvalError::invalid(
                &q_path,
                format!(
                    "{} question ids of {} are not in this question file (e.g. {first}); \
                     the files belong to different splits",
                    missing.len(),
                    ann_path.display()
                ),
            ));
        }
    }
    Ok((ann_path, anns))
}

/// Check that the prediction ids are exactly the ground-truth ids.
/// Every prediction id once: a repeated question would be scored twice (GQA) or silently by
/// its last answer (`VQA.loadRes`); both hide a broken predictions file.
fn check_unique_predictions<'a>(
    ids: impl Iterator<Item = &'a Id>,
    what: &str,
    pred_path: &Path,
) -> Result<(), EvalError> {
    let mut count: HashMap<&Id, usize> = HashMap::new();
    let mut first_dup = None;
    for id in ids {
        let c = count.entry(id).or_default();
        *c += 1;
        if *c == 2 && first_dup.is_none() {
            first_dup = Some(id);
        }
    }
    match first_dup {
        Some(id) => Err(EvalError::invalid(
            pred_path,
            format!(
                "{what} id {id} has {} predictions; each {what} takes exactly one",
                count[id]
            ),
        )),
        None => Ok(()),
    }
}

fn check_same_ids<'a>(
    gt_ids: impl Iterator<Item = &'a Id>,
    pred_ids: impl Iterator<Item = &'a Id>,
    what: &str,
    pred_path: &Path,
    gt_path: &Path,
) -> Result<(), EvalError> {
    let mut gt_order: Vec<&Id> = Vec::new();
    let mut gt_set: HashSet<&Id> = HashSet::new();
    for id in gt_ids {
        if gt_set.insert(id) {
            gt_order.push(id);
        }
    }
    let mut pred_order: Vec<&Id> = Vec::new();
    let mut pred_set: HashSet<&Id> = HashSet::new();
    for id in pred_ids {
        if pred_set.insert(id) {
            pred_order.push(id);
        }
    }
    let missing: Vec<&&Id> = gt_order
        .iter()
        .filter(|id| !pred_set.contains(**id))
        .collect();
    if let Some(first) = missing.first() {
        return Err(EvalError::invalid(
            pred_path,
            format!(
                "predictions are missing {} of the {} {what} ids in {} (e.g. {first})",
                missing.len(),
                gt_order.len(),
                gt_path.display()
            ),
        ));
    }
    let extra: Vec<&&Id> = pred_order
        .iter()
        .filter(|id| !gt_set.contains(**id))
        .collect();
    if let Some(first) = extra.first() {
        return Err(EvalError::invalid(
            pred_path,
            format!(
                "predictions have {} {what} {} not in {} (e.g. {first})",
                extra.len(),
                if extra.len() == 1 {
                    "id that is"
                } else {
                    "ids that are"
                },
                gt_path.display()
            ),
        ));
    }
    Ok(())
}

/// Result of [`evaluate_vqa`].
#[derive(Debug, Clone, PartialEq)]
pub struct VqaReport {
    /// Question ids in evaluation order (annotation file order).
    pub question_ids: Vec<Id>,
    /// Overall accuracy; `per_question` is in `[0, 1]`.
    pub corpus: VqaCorpus,
    /// `100 * mean` per `answer_type` (unrounded), when the annotations have one.
    pub per_answer_type: BTreeMap<String, f64>,
}

impl VqaReport {
    /// The metrics [`score_files`] returns.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::from([
            ("accuracy".to_string(), self.corpus.accuracy),
            ("accuracy_rounded".to_string(), self.corpus.accuracy_rounded),
        ]);
        for (t, v) in &self.per_answer_type {
            m.insert(format!("accuracy_{t}"), *v);
        }
        m
    }
}

/// VQA accuracy over an official annotation list, as `VQAEval.evaluate()` with
/// `VQA.loadRes` does it: the question ids are the annotation ids in file
/// order, the prediction ids must be exactly the same set (`loadRes` asserts
/// it), and a repeated annotation id uses its last entry. A question predicted
/// twice is an error (`loadRes` would keep the last answer silently). (One difference
/// for malformed input only: the Python code would run `processPunctuation` a
/// second time on the answers of an annotation id listed twice, because it
/// edits them in place; here every evaluation starts from the file's answers.)
///
/// `hook` rewrites each raw prediction first (e.g. an OK-VQA lemmatiser).
/// `pred_path` / `gt_path` only label error messages.
pub fn evaluate_vqa(
    annotations: &[VqaAnnotation],
    predictions: &[VqaPrediction],
    hook: Option<AnswerHook<'_>>,
    pred_path: &Path,
    gt_path: &Path,
) -> Result<VqaReport, EvalError> {
    if annotations.is_empty() {
        return Err(EvalError::invalid(gt_path, "no annotations"));
    }
    check_unique_predictions(
        predictions.iter().map(|p| &p.question_id),
        "question",
        pred_path,
    )?;
    check_same_ids(
        annotations.iter().map(|a| &a.question_id),
        predictions.iter().map(|p| &p.question_id),
        "question",
        pred_path,
        gt_path,
    )?;
    let qa: HashMap<&Id, &VqaAnnotation> =
        annotations.iter().map(|a| (&a.question_id, a)).collect();
    let res: HashMap<&Id, &VqaPrediction> =
        predictions.iter().map(|p| (&p.question_id, p)).collect();
    let mut per_question = Vec::with_capacity(annotations.len());
    let mut by_type: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut ids = Vec::with_capacity(annotations.len());
    for a in annotations {
        let id = &a.question_id;
        let gt = qa[id];
        let raw = &res[id].answer;
        let answer = match hook {
            Some(h) => h(raw),
            None => raw.clone(),
        };
        let acc = vqa::vqa_question_accuracy(&answer, &gt.answers)
            .ok_or_else(|| EvalError::invalid(gt_path, format!("question {id} has no answers")))?;
        per_question.push(acc);
        ids.push(id.clone());
        if let Some(t) = &gt.answer_type {
            let e = by_type.entry(t.clone()).or_insert((0.0, 0));
            e.0 += acc;
            e.1 += 1;
        }
    }
    let per_answer_type = by_type
        .into_iter()
        .map(|(t, (sum, n))| (t, 100.0 * sum / n as f64))
        .collect();
    Ok(VqaReport {
        question_ids: ids,
        corpus: VqaCorpus::from_per_question(per_question),
        per_answer_type,
    })
}

/// Result of [`evaluate_gqa`].
#[derive(Debug, Clone, PartialEq)]
pub struct GqaReport {
    /// Question ids in prediction order.
    pub question_ids: Vec<Id>,
    /// 1 or 0 per prediction.
    pub per_question: Vec<f64>,
    /// `100 * mean`, unrounded (LAVIS reports it unrounded).
    pub accuracy: f64,
}

/// GQA exact match as LAVIS `GQATask._report_metrics` computes it (in
/// prediction order). Every ground-truth question must be predicted, once (LAVIS would count a
/// repeated prediction twice).
pub fn evaluate_gqa(
    gt: &[GqaAnnotation],
    predictions: &[VqaPrediction],
    pred_path: &Path,
    gt_path: &Path,
) -> Result<GqaReport, EvalError> {
    if predictions.is_empty() {
        return Err(EvalError::invalid(pred_path, "no predictions"));
    }
    check_unique_predictions(
        predictions.iter().map(|p| &p.question_id),
        "question",
        pred_path,
    )?;
    check_same_ids(
        gt.iter().map(|a| &a.question_id),
        predictions.iter().map(|p| &p.question_id),
        "question",
        pred_path,
        gt_path,
    )?;
    let by_id: HashMap<&Id, &GqaAnnotation> = gt.iter().map(|a| (&a.question_id, a)).collect();
    let per_question: Vec<f64> = predictions
        .iter()
        .map(|p| vqa::gqa_question_accuracy(&p.answer, &by_id[&p.question_id].answer))
        .collect();
    // sum(acc) / len(acc) * 100
    let accuracy = per_question.iter().sum::<f64>() / per_question.len() as f64 * 100.0;
    Ok(GqaReport {
        question_ids: predictions.iter().map(|p| p.question_id.clone()).collect(),
        per_question,
        accuracy,
    })
}

/// Scores of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScores {
    /// The image.
    pub image_id: Id,
    /// PTB-tokenised references.
    pub references: Vec<String>,
    /// PTB-tokenised prediction.
    pub prediction: String,
    /// CIDEr-D of this image.
    pub cider: f64,
    /// `[Bleu_1, .., Bleu_4]` of this image.
    pub bleu: [f64; 4],
}

/// Result of [`evaluate_captions`].
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionReport {
    /// Per image, in ground-truth `images` order.
    pub per_image: Vec<ImageScores>,
    /// Corpus `CIDEr`.
    pub cider: f64,
    /// Corpus `Bleu_1`..`Bleu_4`.
    pub bleu: [f64; 4],
}

impl CaptionReport {
    /// The metrics [`score_files`] returns, named as pycocoevalcap names them.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::from([("CIDEr".to_string(), self.cider)]);
        for (k, v) in self.bleu.iter().enumerate() {
            m.insert(format!("Bleu_{}", k + 1), *v);
        }
        m
    }
}

/// Captioning metrics as `COCOEvalCap.evaluate()` computes them (BLEU and
/// CIDEr-D; METEOR, ROUGE-L and SPICE are not implemented): all images of the
/// ground truth's `images` list are scored, each needs exactly one prediction
/// and at least one reference; references and predictions are PTB-tokenised
/// as two batches in image order, as pycocoevalcap does.
pub fn evaluate_captions(
    gt: &CocoCaptions,
    predictions: &[CaptionPrediction],
    pred_path: &Path,
    gt_path: &Path,
) -> Result<CaptionReport, EvalError> {
    if predictions.is_empty() {
        return Err(EvalError::invalid(pred_path, "no predictions"));
    }
    // coco.getImgIds(): dict keys, first-occurrence order.
    let mut images: Vec<&Id> = Vec::new();
    let mut seen = HashSet::new();
    for img in &gt.images {
        if seen.insert(&img.id) {
            images.push(&img.id);
        }
    }
    if images.is_empty() {
        return Err(EvalError::invalid(gt_path, "no images"));
    }
    check_same_ids(
        images.iter().copied(),
        predictions.iter().map(|p| &p.image_id),
        "image",
        pred_path,
        gt_path,
    )?;
    let mut refs: HashMap<&Id, Vec<&str>> = HashMap::new();
    for a in &gt.annotations {
        refs.entry(&a.image_id).or_default().push(&a.caption);
    }
    let mut res: HashMap<&Id, Vec<&str>> = HashMap::new();
    for p in predictions {
        res.entry(&p.image_id).or_default().push(&p.caption);
    }
    let mut ref_batch: Vec<&str> = Vec::new();
    let mut ref_counts = Vec::with_capacity(images.len());
    let mut res_batch: Vec<&str> = Vec::with_capacity(images.len());
    for id in &images {
        let r = refs.get(id).map(Vec::as_slice).unwrap_or_default();
        if r.is_empty() {
            return Err(EvalError::invalid(
                gt_path,
                format!("image {id} has no reference captions"),
            ));
        }
        ref_batch.extend_from_slice(r);
        ref_counts.push(r.len());
        let p = &res[id];
        if p.len() != 1 {
            return Err(EvalError::invalid(
                pred_path,
                format!(
                    "image {id} has {} predictions; pycocoevalcap needs exactly one",
                    p.len()
                ),
            ));
        }
        res_batch.push(p[0]);
    }
    let ref_tok = ptb::tokenize_captions(&ref_batch);
    let res_tok = ptb::tokenize_captions(&res_batch);
    let mut items: Vec<(String, Vec<String>)> = Vec::with_capacity(images.len());
    let mut offset = 0;
    for (k, n) in ref_counts.iter().enumerate() {
        items.push((res_tok[k].clone(), ref_tok[offset..offset + n].to_vec()));
        offset += n;
    }
    let b = bleu::bleu(&items);
    let c = cider::cider(&items);
    let per_image = images
        .iter()
        .zip(items)
        .enumerate()
        .map(|(k, (id, (prediction, references)))| ImageScores {
            image_id: (*id).clone(),
            references,
            prediction,
            cider: c.per_image[k],
            bleu: b.per_image[k],
        })
        .collect();
    Ok(CaptionReport {
        per_image,
        cider: c.corpus,
        bleu: b.corpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_hook_rewrites_predictions() {
        let ann: Vec<VqaAnnotation> = serde_json::from_str(
            r#"[{"question_id": 1, "answers": [{"answer": "dog", "answer_id": 1},
                {"answer": "dog", "answer_id": 2}, {"answer": "dog", "answer_id": 3},
                {"answer": "dog", "answer_id": 4}]}]"#,
        )
        .unwrap();
        let pred: Vec<VqaPrediction> =
            serde_json::from_str(r#"[{"question_id": 1, "answer": "dogs"}]"#).unwrap();
        let p = Path::new("p.json");
        let plain = evaluate_vqa(&ann, &pred, None, p, p).unwrap();
        assert_eq!(plain.corpus.accuracy, 0.0);
        let lemma = |s: &str| s.trim_end_matches('s').to_string();
        let hooked = evaluate_vqa(&ann, &pred, Some(&lemma), p, p).unwrap();
        assert_eq!(hooked.corpus.accuracy, 100.0);
    }

    #[test]
    fn task_names_round_trip() {
        for t in Task::ALL {
            assert_eq!(t.to_string().parse::<Task>(), Ok(t));
        }
        assert_eq!("OK_VQA".parse::<Task>(), Ok(Task::Okvqa));
        let e = "vqa3".parse::<Task>().unwrap_err().to_string();
        assert!(e.contains("vqa3") && e.contains("coco-caption"), "{e}");
    }
}

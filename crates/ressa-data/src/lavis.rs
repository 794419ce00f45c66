//! Readers for the LAVIS annotation formats (see the reference notes, §10). Errors name the
//! file and, for malformed JSON or a missing or mistyped field, the line and column.
//!
//! | Dataset | Reader | Item |
//! |---|---|---|
//! | CC3M prefix / instruct lists | [`read_caption_list`] | `{"image", "caption": str}` |
//! | COCO caption Karpathy train | [`read_coco_caption_train`] | `{"image", "caption": str, "image_id": "coco_N"}` |
//! | COCO caption Karpathy val / test | [`read_coco_caption_eval`] | `{"image", "caption": [refs]}`; id from the file name |
//! | NoCaps val | [`read_nocaps_eval`] | `{"image", "img_id": int}` |
//! | VQAv2 / OK-VQA train | [`read_vqa_train`] | `{"question_id", "question", "answer": [..], "image", "dataset"}` |
//! | VQAv2 / OK-VQA eval | [`read_vqa_eval`], [`read_answer_list`] | `{"question_id", "question", "image"}`; `[str]` |
//! | GQA | [`read_gqa`] | `{"image", "question", "question_id", "answer": str}` |
//!
//! Unknown fields are ignored. Every reader refuses an empty list. Images are resolved with
//! [`image_path`] against an image root, as LAVIS' `vis_root`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// A question or image id: a JSON integer (VQA, COCO) or string (GQA). As in Python, `5` and
/// `"5"` are different ids; results are written back with the type read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Id {
    Int(i64),
    Str(String),
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Int(i) => write!(f, "{i}"),
            Id::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// One `{"image": <relative path>, "caption": str}` item (CC3M prefix / instruct lists, COCO
/// Karpathy train), the format of calibration and RESSA training data.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CaptionItem {
    pub image: String,
    pub caption: String,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|error| DataError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    crate::error::parse_json(&text, path)
}

fn read_list<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let items: Vec<T> = read_json(path)?;
    if items.is_empty() {
        return Err(DataError::Field {
            path: path.to_path_buf(),
            field: "[]".into(),
            message: "the annotation list is empty".into(),
        });
    }
    Ok(items)
}

/// Reads a caption list; an empty list is an error (nothing to calibrate or train on).
pub fn read_caption_list(path: &Path) -> Result<Vec<CaptionItem>> {
    read_list(path)
}

/// One COCO caption Karpathy **train** item: one caption per item, several items per image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CocoCaptionTrainItem {
    pub image: String,
    pub caption: String,
    /// `"coco_<n>"`, LAVIS' key for grouping captions of one image.
    pub image_id: String,
}

/// Reads `coco_karpathy_train.json`.
pub fn read_coco_caption_train(path: &Path) -> Result<Vec<CocoCaptionTrainItem>> {
    read_list(path)
}

/// An image to caption at evaluation (COCO Karpathy val/test, NoCaps val).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionEvalItem {
    /// Path relative to the image root.
    pub image: String,
    /// The id the result file and the COCO-format ground truth use.
    pub image_id: i64,
    /// Reference captions (required in the Karpathy lists, optional in NoCaps'); scoring reads
    /// the COCO-format ground truth instead.
    pub references: Vec<String>,
}

#[derive(Deserialize)]
struct RawCocoEval {
    image: String,
    caption: Vec<String>,
}

/// LAVIS' image id of a COCO file name: `ann["image"].split("/")[-1].strip(".jpg").split("_")[-1]`
/// as an integer (`strip` removes the *characters* `.jpg` from both ends, a quirk kept here).
pub fn coco_image_id(image: &str) -> Option<i64> {
    let name = image.rsplit('/').next().unwrap_or(image);
    let stem = name.trim_matches(|c| matches!(c, '.' | 'j' | 'p' | 'g'));
    let digits = stem.rsplit('_').next().unwrap_or(stem);
    digits.trim().parse().ok()
}

/// Reads `coco_karpathy_{val,test}.json`; the image id comes from the file name as in LAVIS'
/// `COCOCapEvalDataset`.
pub fn read_coco_caption_eval(path: &Path) -> Result<Vec<CaptionEvalItem>> {
    let raw: Vec<RawCocoEval> = read_list(path)?;
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let image_id = coco_image_id(&r.image).ok_or_else(|| DataError::Field {
                path: path.to_path_buf(),
                field: format!("[{i}].image"),
                message: format!(
                    "`{}` has no numeric COCO image id (expected e.g. val2014/COCO_val2014_000000391895.jpg)",
                    r.image
                ),
            })?;
            Ok(CaptionEvalItem {
                image: r.image,
                image_id,
                references: r.caption,
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct RawNocaps {
    image: String,
    img_id: i64,
    #[serde(default)]
    caption: Vec<String>,
}

/// Reads `nocaps_val.json` (`image_id = img_id`, as LAVIS' `NoCapsEvalDataset`).
pub fn read_nocaps_eval(path: &Path) -> Result<Vec<CaptionEvalItem>> {
    let raw: Vec<RawNocaps> = read_list(path)?;
    Ok(raw
        .into_iter()
        .map(|r| CaptionEvalItem {
            image: r.image,
            image_id: r.img_id,
            references: r.caption,
        })
        .collect())
}

/// One VQAv2 / OK-VQA **train** item.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VqaTrainItem {
    pub question_id: Id,
    pub question: String,
    /// The human answers (10 for VQAv2 and OK-VQA).
    pub answer: Vec<String>,
    pub image: String,
    #[serde(default)]
    pub dataset: Option<String>,
}

impl VqaTrainItem {
    /// Distinct answers in first-occurrence order with weight `count / len(answer)`, summed
    /// one `1 / len` at a time as LAVIS' `VQADataset` does (so 3 × 0.1 is
    /// 0.30000000000000004, as in Python).
    pub fn answer_weights(&self) -> Vec<(String, f64)> {
        let n = self.answer.len() as f64;
        let mut out: Vec<(String, f64)> = Vec::new();
        for a in &self.answer {
            match out.iter_mut().find(|(k, _)| k == a) {
                Some((_, w)) => *w += 1.0 / n,
                None => out.push((a.clone(), 1.0 / n)),
            }
        }
        out
    }
}

/// Reads `vqa_train.json` / `okvqa_train.json`; every item needs at least one answer.
pub fn read_vqa_train(path: &Path) -> Result<Vec<VqaTrainItem>> {
    let items: Vec<VqaTrainItem> = read_list(path)?;
    if let Some(i) = items.iter().position(|it| it.answer.is_empty()) {
        return Err(DataError::Field {
            path: path.to_path_buf(),
            field: format!("[{i}].answer"),
            message: format!("question {} has no answers", items[i].question_id),
        });
    }
    Ok(items)
}

/// One VQAv2 / OK-VQA **evaluation** question (answers live in the official files).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VqaEvalItem {
    pub question_id: Id,
    pub question: String,
    pub image: String,
}

/// Reads `vqa_val_eval.json` / `okvqa_val_eval.json`.
pub fn read_vqa_eval(path: &Path) -> Result<Vec<VqaEvalItem>> {
    read_list(path)
}

/// Reads `answer_list.json` (the candidate answers of rank-based VQA inference).
pub fn read_answer_list(path: &Path) -> Result<Vec<String>> {
    read_list(path)
}

/// One GQA question (LAVIS format; `balanced_testdev` carries the answer).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GqaItem {
    pub image: String,
    pub question: String,
    pub question_id: Id,
    pub answer: String,
}

/// Reads a LAVIS GQA list, e.g. `testdev_balanced_questions.json`.
pub fn read_gqa(path: &Path) -> Result<Vec<GqaItem>> {
    read_list(path)
}

/// `root/relative`, refusing absolute or parent-escaping paths in annotations.
pub fn image_path(root: &Path, relative: &str, annotations: &Path) -> Result<PathBuf> {
    let rel = Path::new(relative);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(DataError::Field {
            path: annotations.to_path_buf(),
            field: "image".into(),
            message: format!("`{relative}` must be a path relative to the image directory"),
        });
    }
    Ok(root.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_lists_parse_and_errors_name_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.json");
        std::fs::write(&ok, r#"[{"image": "a/1.png", "caption": "a red circle"}]"#).unwrap();
        assert_eq!(read_caption_list(&ok).unwrap()[0].caption, "a red circle");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "[\n {\"image\": \"x.png\"}\n]").unwrap();
        let err = read_caption_list(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.json") && err.contains("caption") && err.contains("line 2"),
            "{err}"
        );
        let empty = dir.path().join("empty.json");
        std::fs::write(&empty, "[]").unwrap();
        assert!(
            read_caption_list(&empty)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        assert!(image_path(dir.path(), "../etc/passwd", &ok).is_err());
    }
}

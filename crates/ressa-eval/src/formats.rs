//! Readers for the official evaluation file formats.
//!
//! | File | Shape |
//! |---|---|
//! | caption predictions | `[{"image_id": id, "caption": str}, ...]` |
//! | COCO-format caption ground truth | `{"images": [{"id": id, ...}], "annotations": [{"image_id": id, "caption": str, ...}]}` |
//! | VQA predictions | `[{"question_id": id, "answer": str}, ...]` (LAVIS' `pred_ans` is accepted for `answer`) |
//! | official VQA questions | `{"questions": [{"question_id", "question", "image_id"}], ...}` |
//! | official VQA annotations | `{"annotations": [{"question_id", "answers": [{"answer": str, ...}], "question_type", "answer_type", ...}], ...}` |
//! | GQA ground truth (LAVIS) | `[{"question_id": id, "answer": str, ...}, ...]` |
//!
//! Ids may be JSON integers or strings (GQA uses strings); as in Python, `5`
//! and `"5"` are different ids. Unknown fields are ignored. Errors name the
//! file and, for malformed JSON or a missing/mistyped field, serde_json's line
//! and column.

use std::{cell::RefCell, collections::HashSet, fmt, fs, path::Path, sync::Arc};

use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Map, Value};

use crate::{
    error::EvalError,
    vqa::{GtAnswer, canonical_fields},
};

/// A question or image id: a JSON integer or string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(untagged)]
pub enum Id {
    /// An integer id (COCO, VQA).
    Int(i64),
    /// A string id (GQA).
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

/// One caption prediction.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CaptionPrediction {
    /// The image.
    pub image_id: Id,
    /// The generated caption.
    pub caption: String,
}

/// An image entry of a COCO-format file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CocoImage {
    /// The image id.
    pub id: Id,
}

/// A caption annotation of a COCO-format file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CocoCaption {
    /// The image the caption describes.
    pub image_id: Id,
    /// The reference caption.
    pub caption: String,
}

/// A COCO-format caption ground-truth file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CocoCaptions {
    /// The images to evaluate, in file order.
    pub images: Vec<CocoImage>,
    /// The reference captions, in file order.
    pub annotations: Vec<CocoCaption>,
}

/// One VQA prediction.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VqaPrediction {
    /// The question.
    pub question_id: Id,
    /// The predicted answer.
    #[serde(alias = "pred_ans")]
    pub answer: String,
}

/// A question of an official VQA question file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VqaQuestion {
    /// The question id.
    pub question_id: Id,
    /// The image id.
    #[serde(default)]
    pub image_id: Option<Id>,
    /// The question text.
    #[serde(default)]
    pub question: Option<String>,
}

#[derive(Deserialize)]
struct RawAnswer {
    answer: String,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// An annotation of an official VQA annotation file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VqaAnnotation {
    /// The question id.
    pub question_id: Id,
    /// The ten (for VQAv2) human answers, with all their fields.
    #[serde(deserialize_with = "de_answers")]
    pub answers: Vec<GtAnswer>,
    /// `question_type`, e.g. `"what is"`.
    #[serde(default)]
    pub question_type: Option<String>,
    /// `answer_type`: `"yes/no"`, `"number"` or `"other"`.
    #[serde(default)]
    pub answer_type: Option<String>,
    /// The most common answer (not used by the metric).
    #[serde(default)]
    pub multiple_choice_answer: Option<String>,
    /// The image id.
    #[serde(default)]
    pub image_id: Option<Id>,
}

thread_local! {
    /// Canonical answer fields seen while reading one file, shared between the
    /// answers (VQAv2 has only ~30 distinct `answer_id`/`answer_confidence` pairs).
    static FIELDS: RefCell<HashSet<Arc<str>>> = RefCell::new(HashSet::new());
}

fn de_answers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<GtAnswer>, D::Error> {
    let raw: Vec<RawAnswer> = Vec::deserialize(d)?;
    Ok(FIELDS.with(|fields| {
        let mut fields = fields.borrow_mut();
        raw.into_iter()
            .map(|a| {
                let canon = canonical_fields(&a.rest);
                let rest = match fields.get(canon.as_str()) {
                    Some(shared) => Arc::clone(shared),
                    None => {
                        let new: Arc<str> = Arc::from(canon);
                        fields.insert(Arc::clone(&new));
                        new
                    }
                };
                GtAnswer {
                    answer: a.answer,
                    rest,
                }
            })
            .collect()
    }))
}

/// An official VQA question or annotation file (either list may be absent).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct VqaFile {
    /// `questions`, present in question files.
    #[serde(default)]
    pub questions: Option<Vec<VqaQuestion>>,
    /// `annotations`, present in annotation files.
    #[serde(default)]
    pub annotations: Option<Vec<VqaAnnotation>>,
}

/// One GQA ground-truth entry (LAVIS format).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GqaAnnotation {
    /// The question id.
    pub question_id: Id,
    /// The ground-truth answer, compared as is.
    pub answer: String,
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, EvalError> {
    let bytes = fs::read(path).map_err(|error| EvalError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    // A type error names the field it is in (`[3].answer`).
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let error = e.into_inner();
        if field.is_empty() || field == "." || error.is_syntax() || error.is_eof() {
            EvalError::Json {
                path: path.to_path_buf(),
                error,
            }
        } else {
            EvalError::invalid(path, format!("field `{field}`: {error}"))
        }
    })
}

/// Read caption predictions.
pub fn read_caption_predictions(path: &Path) -> Result<Vec<CaptionPrediction>, EvalError> {
    read_json(path)
}

/// Read a COCO-format caption ground-truth file.
pub fn read_coco_captions(path: &Path) -> Result<CocoCaptions, EvalError> {
    read_json(path)
}

/// Read VQA predictions.
pub fn read_vqa_predictions(path: &Path) -> Result<Vec<VqaPrediction>, EvalError> {
    read_json(path)
}

/// Read an official VQA question or annotation file.
pub fn read_vqa_file(path: &Path) -> Result<VqaFile, EvalError> {
    FIELDS.with(|f| f.borrow_mut().clear());
    let file = read_json(path);
    FIELDS.with(|f| f.borrow_mut().clear());
    file
}

/// Read an official VQA annotation file; it must have an `annotations` list.
pub fn read_vqa_annotations(path: &Path) -> Result<Vec<VqaAnnotation>, EvalError> {
    read_vqa_file(path)?
        .annotations
        .ok_or_else(|| EvalError::invalid(path, "no `annotations` list: not a VQA annotation file"))
}

/// Read an official VQA question file; it must have a `questions` list.
pub fn read_vqa_questions(path: &Path) -> Result<Vec<VqaQuestion>, EvalError> {
    read_vqa_file(path)?
        .questions
        .ok_or_else(|| EvalError::invalid(path, "no `questions` list: not a VQA question file"))
}

/// Read LAVIS GQA ground truth.
pub fn read_gqa_annotations(path: &Path) -> Result<Vec<GqaAnnotation>, EvalError> {
    read_json(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp(content: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content.as_bytes()).unwrap();
        f
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let f = temp("[{\"question_id\": 1, \"answer\": \"yes\"},\n {\"question_id\": 2}]");
        let e = read_vqa_predictions(f.path()).unwrap_err().to_string();
        assert!(e.starts_with(&f.path().display().to_string()), "{e}");
        assert!(
            e.contains("missing field `answer`") && e.contains("line 2"),
            "{e}"
        );
        assert!(!e.contains('\n'));

        let f = temp("{\"images\": [}");
        let e = read_coco_captions(f.path()).unwrap_err().to_string();
        assert!(e.contains("line 1 column 13"), "{e}");

        let e = read_coco_captions(Path::new("/nonexistent/x.json"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/x.json: cannot read"), "{e}");
    }

    #[test]
    fn ids_and_answers() {
        let f = temp(
            r#"{"annotations": [{"question_id": 7, "image_id": "x", "answer_type": "other",
                "answers": [{"answer": "a", "answer_id": 1, "answer_confidence": "yes"}]}]}"#,
        );
        let a = read_vqa_annotations(f.path()).unwrap();
        assert_eq!(a[0].question_id, Id::Int(7));
        assert_eq!(a[0].answers[0].answer, "a");
        assert_eq!(
            &*a[0].answers[0].rest,
            r#"{"answer_confidence":"yes","answer_id":1}"#
        );
        assert!(read_vqa_questions(f.path()).is_err());
        let f = temp(r#"[{"question_id": "7", "pred_ans": "b"}]"#);
        let p = read_vqa_predictions(f.path()).unwrap();
        assert_eq!(p[0].question_id, Id::Str("7".into()));
        assert_eq!(p[0].answer, "b");
    }
}

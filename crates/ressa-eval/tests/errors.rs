//! Error reporting of `score_files`: one line, names the file, never panics.

mod common;

use std::{io::Write, path::PathBuf};

use common::fixture;
use ressa_eval::{EvalError, Task, score_files};

fn temp(content: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(content.as_bytes()).unwrap();
    f
}

fn err(task: Task, preds: &std::path::Path, anns: &[PathBuf]) -> String {
    let e: EvalError = score_files(task, preds, anns).unwrap_err();
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "multi-line error: {msg}");
    msg
}

fn vqa_preds() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(fixture("vqa_predictions.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn missing_predictions_are_counted_with_an_example() {
    let mut preds = vqa_preds();
    let total = preds.len();
    let dropped: Vec<_> = preds.drain(..3).collect();
    let f = temp(&serde_json::to_string(&preds).unwrap());
    let msg = err(Task::Vqav2, f.path(), &[fixture("vqa_annotations.json")]);
    assert!(msg.starts_with(&f.path().display().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("missing 3 of the {total} question ids")),
        "{msg}"
    );
    let example_ok = dropped
        .iter()
        .any(|p| msg.contains(&format!("(e.g. {})", p["question_id"])));
    assert!(example_ok, "{msg}");
}

#[test]
fn unknown_prediction_ids_are_rejected() {
    let mut preds = vqa_preds();
    preds.push(serde_json::json!({"question_id": 7, "answer": "yes"}));
    let f = temp(&serde_json::to_string(&preds).unwrap());
    let msg = err(Task::Vqav2, f.path(), &[fixture("vqa_annotations.json")]);
    assert!(
        msg.contains("predictions have 1 question id that is not in") && msg.contains("(e.g. 7)"),
        "{msg}"
    );
}

#[test]
fn malformed_json_reports_line_and_column() {
    let f = temp(
        "[\n  {\"question_id\": 1, \"answer\": \"yes\"},\n  {\"question_id\": 2, \"answer\": 3}\n]",
    );
    let msg = err(Task::Vqav2, f.path(), &[fixture("vqa_annotations.json")]);
    assert!(
        msg.contains("invalid type") && msg.contains("line 3"),
        "{msg}"
    );
    let f = temp("[{\"image_id\": 1, \"caption\": \"a\"");
    let msg = err(Task::CocoCaption, f.path(), &[fixture("caption_gt.json")]);
    assert!(msg.contains("EOF") && msg.contains("line 1"), "{msg}");
}

#[test]
fn wrong_files_for_the_task() {
    let preds = fixture("vqa_predictions.json");
    // a GQA list is not an official VQA file
    let msg = err(Task::Vqav2, &preds, &[fixture("gqa_annotations.json")]);
    assert!(msg.contains("gqa_annotations.json"), "{msg}");
    // questions only
    let msg = err(Task::Vqav2, &preds, &[fixture("vqa_questions.json")]);
    assert!(msg.contains("annotation file"), "{msg}");
    // two ground-truth files for GQA
    let msg = err(
        Task::Gqa,
        &fixture("gqa_predictions.json"),
        &[
            fixture("gqa_annotations.json"),
            fixture("gqa_annotations.json"),
        ],
    );
    assert!(msg.contains("one ground-truth file"), "{msg}");
    // a question file from another split
    let q = temp(r#"{"questions": [{"question_id": 1, "question": "?", "image_id": 1}]}"#);
    let msg = err(
        Task::Okvqa,
        &preds,
        &[fixture("vqa_annotations.json"), q.path().to_path_buf()],
    );
    assert!(msg.contains("are not in this question file"), "{msg}");
}

#[test]
fn caption_prediction_problems() {
    let gt = fixture("caption_gt.json");
    let text = std::fs::read_to_string(fixture("caption_predictions.json")).unwrap();
    let mut preds: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    // duplicate prediction for one image
    let mut dup = preds.clone();
    dup.push(dup[0].clone());
    let f = temp(&serde_json::to_string(&dup).unwrap());
    let msg = err(Task::Nocaps, f.path(), std::slice::from_ref(&gt));
    assert!(msg.contains("has 2 predictions"), "{msg}");
    // missing images
    preds.truncate(10);
    let f = temp(&serde_json::to_string(&preds).unwrap());
    let msg = err(Task::CocoCaption, f.path(), std::slice::from_ref(&gt));
    assert!(msg.contains("missing 140 of the 150 image ids"), "{msg}");
    // empty predictions
    let f = temp("[]");
    let msg = err(Task::CocoCaption, f.path(), &[gt]);
    assert!(msg.contains("no predictions"), "{msg}");
}

#[test]
fn images_without_references_are_rejected() {
    let gt = temp(
        r#"{"images": [{"id": 1}, {"id": 2}], "annotations": [{"image_id": 1, "caption": "a dog"}]}"#,
    );
    let preds =
        temp(r#"[{"image_id": 1, "caption": "a dog"}, {"image_id": 2, "caption": "a cat"}]"#);
    let msg = err(Task::CocoCaption, preds.path(), &[gt.path().to_path_buf()]);
    assert!(msg.contains("image 2 has no reference captions"), "{msg}");
}

#[test]
fn vqa_question_without_answers_is_an_error() {
    let anns = temp(r#"{"annotations": [{"question_id": 1, "answers": []}]}"#);
    let preds = temp(r#"[{"question_id": 1, "answer": "yes"}]"#);
    let msg = err(Task::Vqav2, preds.path(), &[anns.path().to_path_buf()]);
    assert!(msg.contains("question 1 has no answers"), "{msg}");
}

/// A question predicted twice is refused with its id (GQA would count it twice: 120 right +
/// 100 duplicate wrong answers scored 46.4 instead of 85.0; VQA kept the last one silently).
#[test]
fn duplicate_question_predictions_are_refused() {
    use ressa_eval::formats::{GqaAnnotation, VqaAnnotation, VqaPrediction};
    use ressa_eval::{Id, evaluate_gqa, evaluate_vqa};
    let p = std::path::Path::new("preds.json");
    let g = std::path::Path::new("gt.json");
    let gqa: Vec<GqaAnnotation> = serde_json::from_value(serde_json::json!([
        {"question_id": "q1", "answer": "yes"}, {"question_id": "q2", "answer": "no"}
    ]))
    .unwrap();
    let pred = |id: &str, a: &str| VqaPrediction {
        question_id: Id::Str(id.into()),
        answer: a.into(),
    };
    let preds = vec![pred("q1", "yes"), pred("q2", "no"), pred("q2", "yes")];
    let msg = evaluate_gqa(&gqa, &preds, p, g).unwrap_err().to_string();
    assert!(
        msg.contains("preds.json") && msg.contains("question id \"q2\" has 2 predictions"),
        "{msg}"
    );
    assert_eq!(
        evaluate_gqa(&gqa, &preds[..2], p, g).unwrap().accuracy,
        100.0
    );
    let vqa: Vec<VqaAnnotation> = serde_json::from_value(serde_json::json!([
        {"question_id": 1, "answers": [{"answer": "yes", "answer_id": 1}]},
    ]))
    .unwrap();
    let preds = vec![
        VqaPrediction {
            question_id: Id::Int(1),
            answer: "no".into(),
        },
        VqaPrediction {
            question_id: Id::Int(1),
            answer: "yes".into(),
        },
    ];
    let msg = evaluate_vqa(&vqa, &preds, None, p, g)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("question id 1 has 2 predictions"), "{msg}");
}

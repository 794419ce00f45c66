//! VQA accuracy and GQA exact match against the Python port of the official
//! `vqaEval.py` and LAVIS `GQATask` (fixtures from `scripts/make_metric_fixtures.py`).

mod common;

use std::collections::HashMap;

use common::{close, f, fixture, load, s};
use ressa_eval::{
    Id, Task, evaluate_vqa, formats, score_files,
    vqa::{
        normalize_gqa_prediction, normalize_vqa_prediction, per_question_rounded,
        process_digit_article, process_punctuation,
    },
};

fn id(v: &serde_json::Value) -> Id {
    serde_json::from_value(v.clone()).expect("id")
}

#[test]
fn normalization_matches_python_exactly() {
    let cases = load("vqa_normalize.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() > 200);
    for c in cases {
        let input = s(&c["input"]);
        assert_eq!(
            process_punctuation(input),
            s(&c["process_punctuation"]),
            "processPunctuation({input:?})"
        );
        assert_eq!(
            process_digit_article(input),
            s(&c["process_digit_article"]),
            "processDigitArticle({input:?})"
        );
        assert_eq!(
            normalize_vqa_prediction(input),
            s(&c["normalize_prediction"]),
            "prediction {input:?}"
        );
        assert_eq!(
            normalize_gqa_prediction(input),
            s(&c["normalize_gqa"]),
            "gqa {input:?}"
        );
    }
}

#[test]
fn vqa_per_question_and_corpus() {
    let expected = load("vqa_expected.json");
    let ann_path = fixture("vqa_annotations.json");
    let pred_path = fixture("vqa_predictions.json");
    let anns = formats::read_vqa_annotations(&ann_path).unwrap();
    let preds = formats::read_vqa_predictions(&pred_path).unwrap();
    let report = evaluate_vqa(&anns, &preds, None, &pred_path, &ann_path).unwrap();

    let per_q = expected["per_question"].as_array().unwrap();
    assert_eq!(per_q.len(), report.corpus.per_question.len());
    let pred_by_id: HashMap<Id, &str> = preds
        .iter()
        .map(|p| (p.question_id.clone(), p.answer.as_str()))
        .collect();
    let ann_by_id: HashMap<Id, &formats::VqaAnnotation> =
        anns.iter().map(|a| (a.question_id.clone(), a)).collect();
    for (k, e) in per_q.iter().enumerate() {
        let qid = id(&e["question_id"]);
        assert_eq!(report.question_ids[k], qid, "evaluation order");
        // normalised prediction (resAns) and processed ground truth
        assert_eq!(
            normalize_vqa_prediction(pred_by_id[&qid]),
            s(&e["normalized_prediction"]),
            "{qid}"
        );
        let gt = &ann_by_id[&qid].answers;
        let distinct: std::collections::HashSet<&str> =
            gt.iter().map(|a| a.answer.as_str()).collect();
        let processed: Vec<String> = gt
            .iter()
            .map(|a| {
                if distinct.len() > 1 {
                    process_punctuation(&a.answer)
                } else {
                    a.answer.clone()
                }
            })
            .collect();
        let want: Vec<String> = common::strs(&e["processed_gt_answers"]);
        assert_eq!(processed, want, "processed answers of {qid}");
        let acc = report.corpus.per_question[k];
        close(acc, f(&e["accuracy"]), &format!("accuracy of {qid}"));
        assert_eq!(
            per_question_rounded(acc),
            f(&e["accuracy_rounded"]),
            "evalQA of {qid}"
        );
    }
    close(report.corpus.accuracy, f(&expected["accuracy"]), "overall");
    assert_eq!(
        report.corpus.accuracy_rounded,
        f(&expected["accuracy_rounded"]),
        "overall rounded"
    );
    let types = expected["per_answer_type"].as_object().unwrap();
    assert_eq!(types.len(), report.per_answer_type.len());
    for (t, v) in types {
        close(report.per_answer_type[t], f(v), t);
    }
}

#[test]
fn vqa_score_files_with_and_without_questions() {
    let expected = load("vqa_expected.json");
    let preds = fixture("vqa_predictions.json");
    for files in [
        vec![fixture("vqa_annotations.json")],
        vec![
            fixture("vqa_questions.json"),
            fixture("vqa_annotations.json"),
        ],
    ] {
        for task in [Task::Vqav2, Task::Okvqa] {
            let m = score_files(task, &preds, &files).unwrap();
            close(m["accuracy"], f(&expected["accuracy"]), "accuracy");
            assert_eq!(m["accuracy_rounded"], f(&expected["accuracy_rounded"]));
            for (t, v) in expected["per_answer_type"].as_object().unwrap() {
                close(m[&format!("accuracy_{t}")], f(v), t);
            }
        }
    }
}

#[test]
fn gqa_per_question_and_corpus() {
    let expected = load("gqa_expected.json");
    let gt_path = fixture("gqa_annotations.json");
    let pred_path = fixture("gqa_predictions.json");
    let gt = formats::read_gqa_annotations(&gt_path).unwrap();
    let preds = formats::read_vqa_predictions(&pred_path).unwrap();
    let report = ressa_eval::evaluate_gqa(&gt, &preds, &pred_path, &gt_path).unwrap();
    let per_q = expected["per_question"].as_array().unwrap();
    assert_eq!(per_q.len(), report.per_question.len());
    for (k, e) in per_q.iter().enumerate() {
        assert_eq!(report.question_ids[k], id(&e["question_id"]));
        assert_eq!(
            normalize_gqa_prediction(&preds[k].answer),
            s(&e["normalized_prediction"])
        );
        close(report.per_question[k], f(&e["accuracy"]), "gqa item");
    }
    close(report.accuracy, f(&expected["accuracy"]), "gqa accuracy");
    let m = score_files(Task::Gqa, &pred_path, &[gt_path]).unwrap();
    close(m["accuracy"], f(&expected["accuracy"]), "gqa score_files");
}

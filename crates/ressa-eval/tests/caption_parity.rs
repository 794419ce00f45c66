//! CIDEr-D and BLEU against pycocoevalcap 1.2, on its own PTB-tokenised
//! strings (scorers alone) and end to end from the COCO-format files (Rust
//! tokenizer + scorers).

mod common;

use common::{close, f, fixture, load, s, strs};
use ressa_eval::{Task, bleu, cider, evaluate_captions, formats, score_files};

/// (prediction, references) as pycocoevalcap tokenised them.
fn java_tokenized() -> (Vec<(String, Vec<String>)>, serde_json::Value) {
    let expected = load("caption_expected.json");
    let items = expected["per_image"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                s(&e["prediction_tokenized"]).to_string(),
                strs(&e["references_tokenized"]),
            )
        })
        .collect();
    (items, expected)
}

#[test]
fn scorers_match_on_java_tokens() {
    let (items, expected) = java_tokenized();
    assert!(items.len() >= 100);
    let c = cider::cider(&items);
    let b = bleu::bleu(&items);
    for (k, e) in expected["per_image"].as_array().unwrap().iter().enumerate() {
        close(
            c.per_image[k],
            f(&e["CIDEr"]),
            &format!("CIDEr of image {}", e["image_id"]),
        );
        for n in 0..4 {
            close(
                b.per_image[k][n],
                f(&e["Bleu"][n]),
                &format!("Bleu_{} of image {}", n + 1, e["image_id"]),
            );
        }
    }
    close(c.corpus, f(&expected["corpus"]["CIDEr"]), "corpus CIDEr");
    for n in 0..4 {
        close(
            b.corpus[n],
            f(&expected["corpus"][format!("Bleu_{}", n + 1)]),
            "corpus BLEU",
        );
    }
}

#[test]
fn end_to_end_matches_pycocoevalcap() {
    let (_, expected) = java_tokenized();
    let gt_path = fixture("caption_gt.json");
    let pred_path = fixture("caption_predictions.json");
    let gt = formats::read_coco_captions(&gt_path).unwrap();
    let preds = formats::read_caption_predictions(&pred_path).unwrap();
    let report = evaluate_captions(&gt, &preds, &pred_path, &gt_path).unwrap();
    let per_image = expected["per_image"].as_array().unwrap();
    assert_eq!(per_image.len(), report.per_image.len());
    for (got, e) in report.per_image.iter().zip(per_image) {
        assert_eq!(
            got.image_id,
            serde_json::from_value(e["image_id"].clone()).unwrap()
        );
        assert_eq!(
            got.references,
            strs(&e["references_tokenized"]),
            "references of {}",
            got.image_id
        );
        assert_eq!(
            got.prediction,
            s(&e["prediction_tokenized"]),
            "prediction of {}",
            got.image_id
        );
        close(got.cider, f(&e["CIDEr"]), "CIDEr");
        for n in 0..4 {
            close(got.bleu[n], f(&e["Bleu"][n]), "BLEU");
        }
    }
    for task in [Task::CocoCaption, Task::Nocaps] {
        let m = score_files(task, &pred_path, std::slice::from_ref(&gt_path)).unwrap();
        assert_eq!(m.len(), 5);
        for (name, v) in expected["corpus"].as_object().unwrap() {
            close(m[name], f(v), name);
        }
    }
}

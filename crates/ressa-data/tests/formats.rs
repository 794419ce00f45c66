//! The LAVIS readers on the committed fixture set (`tests/fixtures/data/`), their errors on
//! broken files, and a check that the committed set is what the generator writes.

mod support;

use std::path::Path;

use ressa_data::lavis::{self, Id};
use support::fixture_dir;

fn ann(rel: &str) -> std::path::PathBuf {
    fixture_dir().join("annotations").join(rel)
}

#[test]
fn coco_caption_karpathy_train_and_eval() {
    let train = lavis::read_coco_caption_train(&ann("coco_karpathy_train.json")).unwrap();
    assert_eq!(train.len(), 3);
    assert_eq!(train[0].image_id, "coco_9");
    assert_eq!(train[2].caption, "A red ball on a gradient background.");
    // The caption list reader reads the same file (image + caption).
    assert_eq!(
        lavis::read_caption_list(&ann("coco_karpathy_train.json"))
            .unwrap()
            .len(),
        3
    );

    let test = lavis::read_coco_caption_eval(&ann("coco_karpathy_test.json")).unwrap();
    assert_eq!(
        test.iter().map(|t| t.image_id).collect::<Vec<_>>(),
        vec![42, 73, 74]
    );
    assert!(test.iter().all(|t| t.references.len() == 5));
    let root = fixture_dir().join("images/coco");
    for t in &test {
        let p = lavis::image_path(&root, &t.image, &ann("coco_karpathy_test.json")).unwrap();
        assert!(p.is_file(), "{}", p.display());
    }
}

#[test]
fn coco_image_ids_follow_lavis_parsing() {
    assert_eq!(
        lavis::coco_image_id("val2014/COCO_val2014_000000391895.jpg"),
        Some(391895)
    );
    assert_eq!(
        lavis::coco_image_id("COCO_test2015_000000000001.jpg"),
        Some(1)
    );
    // `strip(".jpg")` strips characters: a trailing `g` of the stem goes too.
    assert_eq!(lavis::coco_image_id("x/123.png"), None);
    assert_eq!(lavis::coco_image_id("x/no_digits.jpg"), None);
}

#[test]
fn nocaps_uses_img_id() {
    let items = lavis::read_nocaps_eval(&ann("nocaps/nocaps_val.json")).unwrap();
    assert_eq!(
        items.iter().map(|t| t.image_id).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert_eq!(items[0].image, "val/0013ea2087020901.jpg");
    assert_eq!(items[1].references.len(), 3);
}

#[test]
fn vqa_train_eval_and_answer_weights() {
    let train = lavis::read_vqa_train(&ann("vqa_train.json")).unwrap();
    assert_eq!(train[0].question_id, Id::Int(90001));
    assert_eq!(train[0].dataset.as_deref(), Some("vqa"));
    let w = train[0].answer_weights();
    assert_eq!(w[0].0, "orange");
    assert_eq!(w[1].0, "yellow");
    // 0.1 summed three times, as Python does it.
    assert_eq!(w[0].1, 0.1 + 0.1 + 0.1);
    assert!((w[1].1 - 0.7).abs() < 1e-12);
    assert!((w.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);

    let eval = lavis::read_vqa_eval(&ann("vqa_val_eval.json")).unwrap();
    assert_eq!(eval.len(), 4);
    assert_eq!(eval[2].question, "How many balls are there?");
    let answers = lavis::read_answer_list(&ann("answer_list.json")).unwrap();
    assert!(answers.contains(&"circle".to_string()));

    let ok = lavis::read_vqa_train(&ann("okvqa/okvqa_train.json")).unwrap();
    assert_eq!(ok[0].answer.len(), 10);
    let ok_eval = lavis::read_vqa_eval(&ann("okvqa/okvqa_val_eval.json")).unwrap();
    assert_eq!(ok_eval[1].question_id, Id::Int(740));
}

#[test]
fn gqa_ids_are_strings() {
    let items = lavis::read_gqa(&ann("gqa/testdev_balanced_questions.json")).unwrap();
    assert_eq!(items[0].question_id, Id::Str("20968379".into()));
    assert_eq!(items[1].answer, "yes");
    assert_eq!(items[0].question_id.to_string(), "\"20968379\"");
    // Ids are written back with the type read.
    assert_eq!(
        serde_json::to_string(&items[0].question_id).unwrap(),
        "\"20968379\""
    );
    assert_eq!(serde_json::to_string(&Id::Int(7)).unwrap(), "7");
}

fn one_line(e: impl std::fmt::Display) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n'), "{s}");
    s
}

#[test]
fn broken_annotations_are_one_line_errors_with_line_and_column() {
    let bad = fixture_dir().join("bad");
    let e = one_line(lavis::read_vqa_eval(&bad.join("malformed.json")).unwrap_err());
    assert!(
        e.contains("malformed.json") && e.contains("line 3 column"),
        "{e}"
    );
    let e = one_line(lavis::read_vqa_eval(&bad.join("missing_field.json")).unwrap_err());
    assert!(
        e.contains("missing_field.json")
            && e.contains("`question`")
            && e.contains("line 5 column 3"),
        "{e}"
    );
    let e = one_line(lavis::read_gqa(&bad.join("does_not_exist.json")).unwrap_err());
    assert!(e.contains("does_not_exist.json"), "{e}");
    // A VQA eval list is not a caption list.
    let e = one_line(lavis::read_coco_caption_eval(&ann("vqa_val_eval.json")).unwrap_err());
    assert!(e.contains("missing field `caption`"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    let e = one_line(lavis::read_nocaps_eval(&empty).unwrap_err());
    assert!(e.contains("empty"), "{e}");
    let no_answers = dir.path().join("train.json");
    std::fs::write(
        &no_answers,
        r#"[{"question_id": 1, "question": "q", "answer": [], "image": "a.jpg"}]"#,
    )
    .unwrap();
    let e = one_line(lavis::read_vqa_train(&no_answers).unwrap_err());
    assert!(e.contains("[0].answer") && e.contains("no answers"), "{e}");
    let bad_name = dir.path().join("coco.json");
    std::fs::write(
        &bad_name,
        r#"[{"image": "val2014/cat.jpg", "caption": ["a"]}]"#,
    )
    .unwrap();
    let e = one_line(lavis::read_coco_caption_eval(&bad_name).unwrap_err());
    assert!(e.contains("[0].image") && e.contains("cat.jpg"), "{e}");
}

fn decoded(p: &Path) -> image::RgbImage {
    image::open(p).unwrap().to_rgb8()
}

#[test]
fn fixtures_are_up_to_date() {
    let fresh = tempfile::tempdir().unwrap();
    support::write_fixtures(fresh.path());
    let committed = fixture_dir();
    let mut files = Vec::new();
    let mut stack = vec![fresh.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 30, "{}", files.len());
    let mut total = 0;
    for f in files {
        let rel = f.strip_prefix(fresh.path()).unwrap();
        let old = committed.join(rel);
        assert!(
            old.is_file(),
            "{} is not committed; run `cargo run -p ressa-data --example make_data_fixtures`",
            rel.display()
        );
        total += std::fs::metadata(&old).unwrap().len();
        let is_image = matches!(f.extension().and_then(|e| e.to_str()), Some("jpg" | "png"));
        if is_image && !rel.to_string_lossy().contains("000000000666") {
            // Images: same pixels up to encoder differences between `image` versions.
            let (a, b) = (decoded(&f), decoded(&old));
            assert_eq!(a.dimensions(), b.dimensions(), "{}", rel.display());
            let diff: f64 = a
                .as_raw()
                .iter()
                .zip(b.as_raw())
                .map(|(&x, &y)| (x as f64 - y as f64).abs())
                .sum::<f64>()
                / a.as_raw().len() as f64;
            assert!(diff < 2.0, "{}: mean abs diff {diff}", rel.display());
        } else if !is_image {
            assert_eq!(
                std::fs::read_to_string(&f).unwrap(),
                std::fs::read_to_string(&old).unwrap(),
                "{} differs from the generator; run `cargo run -p ressa-data --example make_data_fixtures`",
                rel.display()
            );
        }
    }
    assert!(total < 1_000_000, "fixtures take {total} bytes");
}

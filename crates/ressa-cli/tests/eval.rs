//! `ressa eval` end to end on the committed tiny checkpoint (random weights: the answers are
//! nonsense) and the committed data fixtures (`tests/fixtures/data/`, LAVIS formats).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

#[path = "support/nodes.rs"]
mod nodes;
use nodes::{coordinator_port, free_port, node_flags};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model() -> PathBuf {
    root().join("models/instructblip-t5-a")
}

fn data(rel: &str) -> PathBuf {
    root().join("data").join(rel)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ressa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ressa"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ressa")
}

fn ok(out: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "one JSON object on stdout: {stdout}"
    );
    serde_json::from_str(&stdout).unwrap()
}

/// A failing run: non-zero exit, one `error:` line naming `needle`, no panic.
fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains(needle), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// Only the predictions file in `dir`: no temporary file left behind.
fn assert_only(dir: &Path, names: &[&str]) {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    assert_eq!(found, names);
}

fn vqa_args<'a>(out: &'a Path, extra: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "eval",
        "--model",
        s(&model()),
        "--task",
        "vqav2",
        "--annotations",
        s(&data("annotations/vqa_val_eval.json")),
        "--images",
        s(&data("images/coco")),
        "--out",
        s(out),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

fn run(args: &[String]) -> Output {
    ressa(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn vqa_predictions_are_official_format_and_scored() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pred.json");
    let ann = data("annotations/v2_mscoco_val2014_annotations.json");
    let qs = data("annotations/v2_OpenEnded_mscoco_val2014_questions.json");
    let metrics = ok(&run(&vqa_args(
        &out,
        &["--batch-size", "3", "--ground-truth", s(&ann), s(&qs)],
    )));
    assert_only(tmp.path(), &["pred.json"]);
    let preds = read_json(&out);
    let preds = preds.as_array().unwrap();
    assert_eq!(preds.len(), 4);
    let ids: Vec<i64> = preds
        .iter()
        .map(|p| p["question_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![42000, 42001, 73000, 74000]);
    for p in preds {
        assert_eq!(p.as_object().unwrap().len(), 2, "{p}");
        assert!(p["answer"].is_string());
    }
    for k in [
        "accuracy",
        "accuracy_rounded",
        "accuracy_yes/no",
        "accuracy_number",
        "accuracy_other",
    ] {
        let v = metrics[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} in {metrics}"));
        assert!((0.0..=100.0).contains(&v));
    }
    assert_eq!(metrics["num_predictions"], json!(4.0));
    assert_eq!(metrics["num_skipped"], json!(0.0));

    // The predictions file scores the same through `ressa score`.
    let scored = ok(&ressa(&[
        "score",
        "--task",
        "vqav2",
        "--predictions",
        s(&out),
        "--annotations",
        s(&ann),
        s(&qs),
    ]));
    assert_eq!(scored["accuracy"], metrics["accuracy"]);

    // Batching (padding + masks) does not change the answers.
    let one = tmp.path().join("one.json");
    ok(&run(&vqa_args(&one, &["--batch-size", "1"])));
    assert_eq!(read_json(&one), read_json(&out));

    // Neither do two data-parallel copies of the model (the batches of one device, answered
    // by whichever copy is free, gathered in the questions' order), and the score is the same.
    let two = tmp.path().join("two.json");
    let parallel = ok(&run(&vqa_args(
        &two,
        &[
            "--batch-size",
            "1",
            "--devices",
            "2",
            "--ground-truth",
            s(&ann),
            s(&qs),
        ],
    )));
    assert_eq!(std::fs::read(&two).unwrap(), std::fs::read(&one).unwrap());
    assert_eq!(parallel["accuracy"], metrics["accuracy"]);
}

/// `--nodes 2` as two processes on 127.0.0.1: node 0 writes the file one process writes
/// (node 1's share gathered through burn's all-reduce) and the same scores; node 1 writes
/// nothing and prints nothing.
#[test]
fn two_nodes_on_loopback_write_the_predictions_of_one() {
    let tmp = tempfile::tempdir().unwrap();
    let ann = data("annotations/v2_mscoco_val2014_annotations.json");
    let qs = data("annotations/v2_OpenEnded_mscoco_val2014_questions.json");
    let one = tmp.path().join("one.json");
    let gt = ["--ground-truth", s(&ann), s(&qs)];
    let metrics = ok(&run(&vqa_args(&one, &gt)));
    let coordinator = format!("127.0.0.1:{}", coordinator_port());
    let outs = [tmp.path().join("node0.json"), tmp.path().join("node1.json")];
    let children: Vec<_> = (0..2)
        .map(|rank| {
            let address = format!("127.0.0.1:{}", free_port());
            let flags = node_flags(2, rank, &coordinator, &address);
            let mut extra: Vec<&str> = flags.iter().map(String::as_str).collect();
            extra.extend(gt);
            Command::new(env!("CARGO_BIN_EXE_ressa"))
                .args(vqa_args(&outs[rank], &extra))
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    assert_eq!(ok(&outputs[0]), metrics);
    assert!(
        outputs[1].status.success() && outputs[1].stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&outputs[1].stderr)
    );
    assert_eq!(
        std::fs::read(&outs[0]).unwrap(),
        std::fs::read(&one).unwrap()
    );
    assert!(!outs[1].exists(), "node 1 wrote an output");
}

#[test]
fn scoring_is_wired_to_the_predictions() {
    // Ground truth built from the model's own answers, normalised as the official script
    // normalises predictions (it leaves 10 identical ground-truth answers as they are), scores
    // 100.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pred.json");
    ok(&run(&vqa_args(&out, &["--beams", "2"])));
    let preds = read_json(&out);
    let annotations: Vec<Value> = preds
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let answer = ressa_eval::vqa::normalize_vqa_prediction(p["answer"].as_str().unwrap());
            let answers: Vec<Value> = (1..=10)
                .map(|i| json!({"answer": answer, "answer_confidence": "yes", "answer_id": i}))
                .collect();
            json!({"question_id": p["question_id"], "answer_type": "other", "answers": answers})
        })
        .collect();
    let gt = tmp.path().join("gt.json");
    std::fs::write(&gt, json!({"annotations": annotations}).to_string()).unwrap();
    let metrics = ok(&run(&vqa_args(
        &out,
        &["--beams", "2", "--ground-truth", s(&gt)],
    )));
    assert_eq!(metrics["accuracy"], json!(100.0));

    // --limit scores the first N against the matching ground truth only.
    let metrics = ok(&run(&vqa_args(
        &out,
        &["--beams", "2", "--limit", "2", "--ground-truth", s(&gt)],
    )));
    assert_eq!(metrics["num_predictions"], json!(2.0));
    assert_eq!(metrics["accuracy"], json!(100.0));
    assert_eq!(read_json(&out).as_array().unwrap().len(), 2);
}

#[test]
fn captions_are_official_format_and_scored() {
    let tmp = tempfile::tempdir().unwrap();
    for (task, ann, images, gt, ids) in [
        (
            "coco-caption",
            "annotations/coco_karpathy_test.json",
            "images/coco",
            "annotations/coco_karpathy_test_gt.json",
            vec![42, 73, 74],
        ),
        (
            "nocaps",
            "annotations/nocaps/nocaps_val.json",
            "images/nocaps",
            "annotations/nocaps/nocaps_val_gt.json",
            vec![0, 1],
        ),
    ] {
        let out = tmp.path().join(format!("{task}.json"));
        let metrics = ok(&ressa(&[
            "eval",
            "--model",
            s(&model()),
            "--task",
            task,
            "--annotations",
            s(&data(ann)),
            "--images",
            s(&data(images)),
            "--out",
            s(&out),
            "--batch-size",
            "2",
            "--ground-truth",
            s(&data(gt)),
        ]));
        let preds = read_json(&out);
        let preds = preds.as_array().unwrap();
        let got: Vec<i64> = preds
            .iter()
            .map(|p| p["image_id"].as_i64().unwrap())
            .collect();
        assert_eq!(got, ids, "{task}");
        for p in preds {
            assert_eq!(p.as_object().unwrap().len(), 2, "{p}");
            assert!(!p["caption"].as_str().unwrap().is_empty(), "{p}");
        }
        for k in ["CIDEr", "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"] {
            assert!(metrics[k].as_f64().is_some(), "{task}: {k} in {metrics}");
        }

        // References equal to the predictions: BLEU-4 is 1.
        let gt_images: Vec<Value> = ids.iter().map(|i| json!({"id": i})).collect();
        let anns: Vec<Value> = preds
            .iter()
            .enumerate()
            .map(|(k, p)| json!({"image_id": p["image_id"], "caption": p["caption"], "id": k}))
            .collect();
        let self_gt = tmp.path().join(format!("{task}_self_gt.json"));
        std::fs::write(
            &self_gt,
            json!({"images": gt_images, "annotations": anns}).to_string(),
        )
        .unwrap();
        let metrics = ok(&ressa(&[
            "eval",
            "--model",
            s(&model()),
            "--task",
            task,
            "--annotations",
            s(&data(ann)),
            "--images",
            s(&data(images)),
            "--out",
            s(&out),
            "--ground-truth",
            s(&self_gt),
        ]));
        let bleu4 = metrics["Bleu_4"].as_f64().unwrap();
        assert!(bleu4 > 0.99, "{task}: {metrics}");
    }
}

#[test]
fn gqa_scores_against_its_own_list_and_keeps_string_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gqa.json");
    let metrics = ok(&ressa(&[
        "eval",
        "--model",
        s(&model()),
        "--task",
        "gqa",
        "--annotations",
        s(&data("annotations/gqa/testdev_balanced_questions.json")),
        "--images",
        s(&data("images/gqa")),
        "--out",
        s(&out),
    ]));
    assert!(metrics["accuracy"].as_f64().is_some(), "{metrics}");
    let preds = read_json(&out);
    assert_eq!(preds[0]["question_id"], json!("20968379"));
    assert_eq!(preds.as_array().unwrap().len(), 3);
}

#[test]
fn okvqa_and_no_ground_truth() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ok.json");
    let metrics = ok(&ressa(&[
        "eval",
        "--model",
        s(&model()),
        "--task",
        "okvqa",
        "--annotations",
        s(&data("annotations/okvqa/okvqa_val_eval.json")),
        "--images",
        s(&data("images/coco")),
        "--out",
        s(&out),
    ]));
    // Without ground truth only the counts are printed.
    assert_eq!(metrics, json!({"num_predictions": 2.0, "num_skipped": 0.0}));
    let with_gt = ok(&ressa(&[
        "eval",
        "--model",
        s(&model()),
        "--task",
        "okvqa",
        "--annotations",
        s(&data("annotations/okvqa/okvqa_val_eval.json")),
        "--images",
        s(&data("images/coco")),
        "--out",
        s(&out),
        "--ground-truth",
        s(&data("annotations/okvqa/mscoco_val2014_annotations.json")),
        s(&data(
            "annotations/okvqa/OpenEnded_mscoco_val2014_questions.json",
        )),
    ]));
    assert!(with_gt["accuracy"].as_f64().is_some(), "{with_gt}");
}

#[test]
fn bad_inputs_fail_with_one_line_and_leave_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pred.json");
    let with_ann = |ann: &Path, extra: &[&str]| {
        let mut args = vqa_args(&out, extra);
        let i = args.iter().position(|a| a == "--annotations").unwrap();
        args[i + 1] = s(ann).to_string();
        run(&args)
    };
    assert_clean_error(
        &with_ann(&data("bad/missing_image.json"), &[]),
        "COCO_val2014_000000099999.jpg",
    );
    assert_clean_error(
        &with_ann(&data("bad/corrupt_image.json"), &[]),
        "COCO_val2014_000000000666.jpg: cannot decode image",
    );
    assert_clean_error(
        &with_ann(&data("bad/malformed.json"), &[]),
        "malformed.json: invalid JSON: expected `,` or `}` at line 3 column 24",
    );
    assert_clean_error(
        &with_ann(&data("bad/missing_field.json"), &[]),
        "missing field `question` at line 5 column 3",
    );
    assert_clean_error(
        &run(&vqa_args(
            &out,
            &[
                "--ground-truth",
                s(&data("annotations/coco_karpathy_test_gt.json")),
            ],
        )),
        "coco_karpathy_test_gt.json",
    );
    assert_clean_error(&run(&vqa_args(&out, &["--prompt", "no hole"])), "--prompt");
    assert_clean_error(&run(&vqa_args(&out, &["--limit", "0"])), "--limit");
    assert_clean_error(&run(&vqa_args(&out, &["--devices", "0"])), "--devices 0");
    // A bad image met by one of two data-parallel copies stops the run with its error.
    assert_clean_error(
        &with_ann(
            &data("bad/corrupt_image.json"),
            &["--devices", "2", "--batch-size", "1"],
        ),
        "COCO_val2014_000000000666.jpg: cannot decode image",
    );
    assert_clean_error(
        &run(&vqa_args(&tmp.path().join("no/such/dir/p.json"), &[])),
        "--out",
    );
    // Wrong task for the file: a VQA list read as captions.
    assert_clean_error(
        &ressa(&[
            "eval",
            "--model",
            s(&model()),
            "--task",
            "coco-caption",
            "--annotations",
            s(&data("annotations/vqa_val_eval.json")),
            "--images",
            s(&data("images/coco")),
            "--out",
            s(&out),
        ]),
        "missing field `caption`",
    );
    assert_only(tmp.path(), &[]);
}

#[test]
fn bad_images_can_be_skipped_and_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pred.json");
    for bad in ["bad/missing_image.json", "bad/corrupt_image.json"] {
        let mut args = vqa_args(
            &out,
            &[
                "--skip-bad-images",
                "--ground-truth",
                s(&data("annotations/v2_mscoco_val2014_annotations.json")),
            ],
        );
        let i = args.iter().position(|a| a == "--annotations").unwrap();
        args[i + 1] = s(&data(bad)).to_string();
        let output = run(&args);
        let metrics = ok(&output);
        assert_eq!(metrics["num_skipped"], json!(1.0), "{bad}");
        assert_eq!(metrics["num_predictions"], json!(1.0), "{bad}");
        assert!(metrics["accuracy"].as_f64().is_some());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("skipped 1 of 2"), "{stderr}");
        let preds = read_json(&out);
        assert_eq!(
            preds,
            json!([{"question_id": 42000, "answer": preds[0]["answer"]}])
        );
    }
}

/// A decoder-only (LLaMA) model evaluates end to end: the prompts of a batch are padded on the
/// left, so every answer equals `ressa generate` on that item alone, and beam search answers
/// do not depend on the batch size; captions are scored.
#[test]
fn decoder_only_model_evaluates_with_left_padding() {
    let llama = root().join("models/instructblip-llama-gqa");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pred.json");
    let template = "{} short answer:";
    let with_llama = |out: &Path, extra: &[&str]| {
        let mut args = vqa_args(out, &["--prompt", template]);
        let i = args.iter().position(|a| a == "--model").unwrap();
        args[i + 1] = s(&llama).to_string();
        args.extend(extra.iter().map(|x| x.to_string()));
        run(&args)
    };
    let ann = data("annotations/v2_mscoco_val2014_annotations.json");
    let qs = data("annotations/v2_OpenEnded_mscoco_val2014_questions.json");
    let greedy = [
        "--beams",
        "1",
        "--max-new-tokens",
        "6",
        "--repetition-penalty",
        "1.0",
    ];
    let mut extra = greedy.to_vec();
    extra.extend(["--batch-size", "3", "--ground-truth", s(&ann), s(&qs)]);
    let metrics = ok(&with_llama(&out, &extra));
    assert_eq!(metrics["num_predictions"], json!(4.0));
    assert!((0.0..=100.0).contains(&metrics["accuracy"].as_f64().unwrap()));
    let preds = read_json(&out);
    let questions = read_json(&data("annotations/vqa_val_eval.json"));
    let mut nonempty = 0;
    for (p, q) in preds
        .as_array()
        .unwrap()
        .iter()
        .zip(questions.as_array().unwrap())
    {
        assert_eq!(p["question_id"], q["question_id"]);
        let prompt = ressa_data::prompts::fill(
            template,
            &ressa_data::prompts::pre_question(
                q["question"].as_str().unwrap(),
                ressa_data::prompts::MAX_WORDS,
            ),
        );
        let image = data("images/coco").join(q["image"].as_str().unwrap());
        let mut args = vec![
            "generate",
            "--model",
            s(&llama),
            "--image",
            s(&image),
            "--prompt",
            &prompt,
            "--min-new-tokens",
            "1",
        ];
        args.extend(greedy);
        let single = ressa(&args);
        assert!(
            single.status.success(),
            "{}",
            String::from_utf8_lossy(&single.stderr)
        );
        let text = String::from_utf8(single.stdout).unwrap();
        assert_eq!(p["answer"].as_str().unwrap(), text.trim(), "{prompt}");
        nonempty += usize::from(!text.trim().is_empty());
    }
    assert!(nonempty > 0, "{preds}");

    // Beam search with the LAVIS defaults: batches of 3 and of 1 agree.
    let three = tmp.path().join("three.json");
    let one = tmp.path().join("one.json");
    ok(&with_llama(&three, &["--beams", "3", "--batch-size", "3"]));
    ok(&with_llama(&one, &["--beams", "3", "--batch-size", "1"]));
    assert_eq!(read_json(&three), read_json(&one));

    let captions = tmp.path().join("captions.json");
    let metrics = ok(&ressa(&[
        "eval",
        "--model",
        s(&llama),
        "--task",
        "coco-caption",
        "--annotations",
        s(&data("annotations/coco_karpathy_test.json")),
        "--images",
        s(&data("images/coco")),
        "--out",
        s(&captions),
        "--batch-size",
        "2",
        "--beams",
        "2",
        "--max-new-tokens",
        "10",
        "--ground-truth",
        s(&data("annotations/coco_karpathy_test_gt.json")),
    ]));
    assert!(metrics["CIDEr"].as_f64().is_some(), "{metrics}");
    let preds = read_json(&captions);
    assert_eq!(preds.as_array().unwrap().len(), 3);
    assert!(
        preds
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["caption"].is_string()),
        "{preds}"
    );
}

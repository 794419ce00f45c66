//! The generator of `tests/fixtures/data/`: a few small synthetic images (JPEG, one PNG) and
//! annotation files in the real LAVIS / official formats (reference §10), plus broken inputs.
//! `cargo run -p ressa-data --example make_data_fixtures` rewrites the committed set; the test
//! `fixtures_are_up_to_date` checks the committed annotations against this code.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// `tests/fixtures/data` at the repository root.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data")
}

/// A synthetic picture: a colour gradient with a filled disc and a bar, varied by `seed`.
pub fn picture(w: u32, h: u32, seed: u32) -> image::RgbImage {
    let (cx, cy) = (
        (w as f32) * (0.3 + 0.1 * (seed % 4) as f32),
        (h as f32) * (0.4 + 0.05 * (seed % 3) as f32),
    );
    let r = (w.min(h) as f32) * 0.25;
    let disc = [
        [220, 40, 40],
        [40, 160, 60],
        [40, 70, 210],
        [230, 200, 40],
        [150, 60, 170],
    ][(seed % 5) as usize];
    image::RgbImage::from_fn(w, h, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        if (xf - cx).powi(2) + (yf - cy).powi(2) <= r * r {
            image::Rgb(disc)
        } else if y > h * 3 / 4 && x > w / 5 && x < w * 4 / 5 {
            image::Rgb([30, 30, 30])
        } else {
            image::Rgb([
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((seed * 53) % 256) as u8,
            ])
        }
    })
}

fn save_jpeg(path: &Path, img: &image::RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut out = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85);
    enc.encode_image(img).unwrap();
    std::fs::write(path, out).unwrap();
}

fn save_png(path: &Path, img: &image::RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

/// Relative image paths and their content seeds.
pub const COCO_VAL: [(&str, u32); 3] = [
    ("val2014/COCO_val2014_000000000042.jpg", 1),
    ("val2014/COCO_val2014_000000000073.jpg", 2),
    ("val2014/COCO_val2014_000000000074.jpg", 3),
];
pub const COCO_TRAIN: (&str, u32) = ("train2014/COCO_train2014_000000000009.jpg", 4);
pub const NOCAPS: [(&str, u32); 2] = [
    ("val/0013ea2087020901.jpg", 5),
    ("val/00223fe4d3f2bd03.jpg", 6),
];
pub const GQA: [(&str, u32); 2] = [("n161313.jpg", 7), ("n235859.jpg", 8)];
pub const CC3M: [(&str, u32); 3] = [
    ("00000/000000000.jpg", 9),
    ("00000/000000001.png", 10),
    ("00000/000000002.jpg", 11),
];

fn vqa_answers(answers: &[&str]) -> Value {
    Value::Array(
        answers
            .iter()
            .enumerate()
            .map(|(i, a)| json!({"answer": a, "answer_confidence": "yes", "answer_id": i + 1}))
            .collect(),
    )
}

/// Annotation files: (path relative to the fixture directory, JSON).
pub fn annotations() -> Vec<(&'static str, Value)> {
    let coco_ids = [42, 73, 74];
    let coco_refs = [
        [
            "A red ball on a gradient background.",
            "a red circle above a black bar",
            "A red disc and a dark stripe.",
            "a red ball in front of a colourful wall",
            "An abstract picture with a red circle.",
        ],
        [
            "A green circle on a colourful background.",
            "a green ball above a black bar",
            "green disc, dark stripe",
            "An abstract image with a green ball.",
            "a green circle near the middle",
        ],
        [
            "A blue circle and a black bar.",
            "a blue ball on a gradient",
            "A blue disc above a dark stripe.",
            "an abstract image of a blue ball",
            "a blue circle on the left",
        ],
    ];
    let mut files = Vec::new();

    // COCO caption, Karpathy split (LAVIS) and the COCO-format ground truth.
    files.push((
        "annotations/coco_karpathy_train.json",
        json!([
            {"image": COCO_TRAIN.0, "caption": "A yellow ball above a black bar.", "image_id": "coco_9"},
            {"image": COCO_TRAIN.0, "caption": "a yellow circle on a gradient", "image_id": "coco_9"},
            {"image": COCO_VAL[0].0, "caption": "A red ball on a gradient background.", "image_id": "coco_42"},
        ]),
    ));
    files.push((
        "annotations/coco_karpathy_test.json",
        Value::Array(
            COCO_VAL
                .iter()
                .zip(&coco_refs)
                .map(|((img, _), refs)| json!({"image": img, "caption": refs}))
                .collect(),
        ),
    ));
    let mut ann_id = 0;
    let mut gt_anns = Vec::new();
    for (id, refs) in coco_ids.iter().zip(&coco_refs) {
        for r in refs {
            ann_id += 1;
            gt_anns.push(json!({"image_id": id, "caption": r, "id": ann_id}));
        }
    }
    files.push((
        "annotations/coco_karpathy_test_gt.json",
        json!({
            "info": {}, "licenses": [], "type": "captions",
            "images": COCO_VAL.iter().zip(coco_ids).map(|((img, _), id)| {
                json!({"id": id, "file_name": img.rsplit('/').next().unwrap()})
            }).collect::<Vec<_>>(),
            "annotations": gt_anns,
        }),
    ));

    // VQAv2: LAVIS train and eval lists, answer list, official question/annotation files.
    let ten = |a: &str, b: &str, nb: usize| -> Vec<String> {
        (0..10)
            .map(|i| if i < nb { b.to_string() } else { a.to_string() })
            .collect()
    };
    files.push((
        "annotations/vqa_train.json",
        json!([
            {"question_id": 90001, "question": "What color is the ball?", "answer": ten("yellow", "orange", 3),
             "image": COCO_TRAIN.0, "dataset": "vqa"},
            {"question_id": 90002, "question": "Is there a bar?", "answer": ten("yes", "no", 1),
             "image": COCO_TRAIN.0, "dataset": "vqa"},
        ]),
    ));
    let vqa = [
        (
            42000,
            42,
            "What color is the ball?",
            ["red"; 10].to_vec(),
            "other",
        ),
        (
            42001,
            42,
            "Is there a circle in the picture?",
            [
                "yes", "yes", "yes", "yes", "yes", "yes", "yes", "yes", "no", "yes",
            ]
            .to_vec(),
            "yes/no",
        ),
        (
            73000,
            73,
            "How many balls are there?",
            ["1", "1", "one", "1", "1", "2", "1", "1", "1", "1"].to_vec(),
            "number",
        ),
        (
            74000,
            74,
            "What shape is the blue object?",
            [
                "circle", "circle", "round", "circle", "disc", "circle", "circle", "circle",
                "ball", "circle",
            ]
            .to_vec(),
            "other",
        ),
    ];
    let image_of = |id: i64| COCO_VAL[coco_ids.iter().position(|&c| c == id).unwrap()].0;
    files.push((
        "annotations/vqa_val_eval.json",
        Value::Array(
            vqa.iter()
                .map(|(qid, img, q, _, _)| {
                    json!({"image": image_of(*img), "question": q, "question_id": qid, "instance_id": qid.to_string()})
                })
                .collect(),
        ),
    ));
    files.push((
        "annotations/answer_list.json",
        json!(["red", "yes", "no", "1", "2", "circle", "yellow"]),
    ));
    files.push((
        "annotations/v2_OpenEnded_mscoco_val2014_questions.json",
        json!({
            "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
            "data_subtype": "val2014",
            "questions": vqa.iter().map(|(qid, img, q, _, _)| {
                json!({"image_id": img, "question": q, "question_id": qid})
            }).collect::<Vec<_>>(),
        }),
    ));
    files.push((
        "annotations/v2_mscoco_val2014_annotations.json",
        json!({
            "info": {}, "license": {}, "data_subtype": "val2014", "data_type": "mscoco",
            "annotations": vqa.iter().map(|(qid, img, q, answers, atype)| {
                json!({
                    "question_id": qid, "image_id": img,
                    "question_type": q.split(' ').take(2).collect::<Vec<_>>().join(" ").to_lowercase(),
                    "answer_type": atype, "multiple_choice_answer": answers[0],
                    "answers": vqa_answers(answers),
                })
            }).collect::<Vec<_>>(),
        }),
    ));

    // OK-VQA: same LAVIS shapes; the official files carry `raw_answer` too.
    files.push((
        "annotations/okvqa/okvqa_train.json",
        json!([
            {"question_id": 95, "question": "What sport uses this ball?", "answer": ten("tennis", "golf", 4),
             "image": COCO_TRAIN.0, "dataset": "okvqa"},
        ]),
    ));
    files.push((
        "annotations/okvqa/okvqa_val_eval.json",
        json!([
            {"image": COCO_VAL[0].0, "question": "What game could you play with this?", "question_id": 420},
            {"image": COCO_VAL[2].0, "question": "What is the colour of the sky like this?", "question_id": 740},
        ]),
    ));
    files.push((
        "annotations/okvqa/OpenEnded_mscoco_val2014_questions.json",
        json!({
            "license": {}, "data_subtype": "val2014", "task_type": "Open-Ended", "data_type": "mscoco",
            "info": {},
            "questions": [
                {"image_id": 42, "question": "What game could you play with this?", "question_id": 420},
                {"image_id": 74, "question": "What is the colour of the sky like this?", "question_id": 740},
            ],
        }),
    ));
    let ok_answers = |answers: &[&str]| -> Value {
        Value::Array(
            answers
                .iter()
                .enumerate()
                .map(|(i, a)| json!({"answer_id": i + 1, "raw_answer": a, "answer_confidence": "yes", "answer": a}))
                .collect(),
        )
    };
    files.push((
        "annotations/okvqa/mscoco_val2014_annotations.json",
        json!({
            "license": {}, "data_subtype": "val2014", "info": {}, "data_type": "mscoco",
            "annotations": [
                {"image_id": 42, "answer_type": "other", "question_type": "eight", "question_id": 420,
                 "confidence": 3, "answers": ok_answers(&["catch", "catch", "catch", "catch", "dodgeball",
                 "dodgeball", "ball", "ball", "soccer", "soccer"])},
                {"image_id": 74, "answer_type": "other", "question_type": "one", "question_id": 740,
                 "confidence": 3, "answers": ok_answers(&["blue"; 10])},
            ],
        }),
    ));

    // GQA testdev balanced (LAVIS format, string ids).
    files.push((
        "annotations/gqa/testdev_balanced_questions.json",
        json!([
            {"image": GQA[0].0, "question": "What color is the ball?", "question_id": "20968379", "answer": "purple",
             "fullAnswer": "The ball is purple."},
            {"image": GQA[1].0, "question": "Is the bar black?", "question_id": "20968380", "answer": "yes",
             "fullAnswer": "Yes, the bar is black."},
            {"image": GQA[1].0, "question": "Which side is the circle on?", "question_id": "20968381", "answer": "left",
             "fullAnswer": "The circle is on the left of the image."},
        ]),
    ));

    // NoCaps val (LAVIS list and COCO-format ground truth).
    let nocaps_refs = [
        [
            "A yellow circle on a blue and pink background.",
            "a yellow ball",
            "yellow disc above a black bar",
        ],
        [
            "A purple circle on a gradient.",
            "a purple ball over a dark stripe",
            "an abstract purple disc",
        ],
    ];
    files.push((
        "annotations/nocaps/nocaps_val.json",
        Value::Array(
            NOCAPS
                .iter()
                .enumerate()
                .map(|(i, (img, _))| json!({"image": img, "img_id": i, "caption": nocaps_refs[i]}))
                .collect(),
        ),
    ));
    let mut nocaps_anns = Vec::new();
    for (i, refs) in nocaps_refs.iter().enumerate() {
        for (j, r) in refs.iter().enumerate() {
            nocaps_anns.push(json!({"image_id": i, "caption": r, "id": i * 10 + j}));
        }
    }
    files.push((
        "annotations/nocaps/nocaps_val_gt.json",
        json!({
            "info": {}, "licenses": [],
            "images": NOCAPS.iter().enumerate().map(|(i, (img, _))| json!({
                "id": i, "file_name": img.rsplit('/').next().unwrap(), "domain": "in-domain",
                "open_images_id": img.rsplit('/').next().unwrap().trim_end_matches(".jpg"),
            })).collect::<Vec<_>>(),
            "annotations": nocaps_anns,
        }),
    ));

    // CC3M caption list (calibration / RESSA training).
    files.push((
        "annotations/cc3m.json",
        json!([
            {"image": CC3M[0].0, "caption": "actor attends the premiere of the film"},
            {"image": CC3M[1].0, "caption": "a green ball rolls on the grass"},
            {"image": CC3M[2].0, "caption": "person, the author of the book, at home"},
        ]),
    ));

    // Broken inputs.
    files.push((
        "bad/missing_image.json",
        json!([
            {"image": COCO_VAL[0].0, "question": "What color is the ball?", "question_id": 42000},
            {"image": "val2014/COCO_val2014_000000099999.jpg", "question": "Is it there?", "question_id": 99999},
        ]),
    ));
    files.push((
        "bad/corrupt_image.json",
        json!([
            {"image": COCO_VAL[0].0, "question": "What color is the ball?", "question_id": 42000},
            {"image": "val2014/COCO_val2014_000000000666.jpg", "question": "Is it broken?", "question_id": 66600},
        ]),
    ));
    files.push((
        "bad/missing_field.json",
        json!([
            {"image": COCO_VAL[0].0, "question_id": 42000},
        ]),
    ));
    files
}

/// A JSON file as written: pretty, two-space indents, trailing newline (readable diffs).
pub fn json_text(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap();
    s.push('\n');
    s
}

/// Malformed JSON (a missing comma on line 3).
pub const MALFORMED: &str = "[\n  {\"image\": \"val2014/COCO_val2014_000000000042.jpg\", \"question_id\": 1,\n   \"question\": \"What?\" \"oops\": 2}\n]\n";

/// A JPEG cut short after its header.
pub fn corrupt_jpeg() -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85);
    enc.encode_image(&picture(64, 48, 0)).unwrap();
    out.truncate(out.len() / 3);
    out
}

/// Writes the whole fixture set under `dir`.
pub fn write_fixtures(dir: &Path) {
    let images = dir.join("images");
    for (rel, seed) in COCO_VAL.iter().chain([&COCO_TRAIN]) {
        save_jpeg(&images.join("coco").join(rel), &picture(96, 72, *seed));
    }
    for (rel, seed) in NOCAPS {
        save_jpeg(&images.join("nocaps").join(rel), &picture(80, 80, seed));
    }
    for (rel, seed) in GQA {
        save_jpeg(&images.join("gqa").join(rel), &picture(72, 96, seed));
    }
    for (rel, seed) in CC3M {
        let p = images.join("cc3m").join(rel);
        if rel.ends_with(".png") {
            save_png(&p, &picture(64, 48, seed));
        } else {
            save_jpeg(&p, &picture(100, 64, seed));
        }
    }
    let corrupt = images.join("coco/val2014/COCO_val2014_000000000666.jpg");
    std::fs::write(corrupt, corrupt_jpeg()).unwrap();
    for (rel, v) in annotations() {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, json_text(&v)).unwrap();
    }
    std::fs::write(dir.join("bad/malformed.json"), MALFORMED).unwrap();
}

//! Property tests: the annotation readers take any bytes. The committed LAVIS annotation
//! files (caption lists, COCO Karpathy train/test, NoCaps, VQA train/eval, the answer list,
//! GQA, CC3M) are mutated at random (bits flipped, bytes overwritten, garbage inserted, ranges
//! deleted, truncation; JSON values replaced by hostile ones, removed, keys renamed) and read
//! with every `ressa_data::lavis` reader; what reads is taken further (image paths, answer
//! weights, calibration sampling and the caption prefix split). The preprocessor config and
//! the images get the same treatment through `ImageProcessorConfig` and `load_rgb`. Each call
//! returns `Ok` or `Err`, never panics.
//!
//! The process's address space is capped (16 GiB, through `prlimit` where it exists), and the
//! input being read is written to `$CARGO_TARGET_TMPDIR/mutated_inputs/<test>.last` first, so
//! an abort still names it.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use ressa_data::calibration::{Sampler, prefix_examples};
use ressa_data::image::{ImageProcessorConfig, load_rgb};
use ressa_data::lavis;

#[path = "../../../tests/support/mutation.rs"]
mod mutation;
use mutation::json::*;
use mutation::*;

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
}

// --- The readers. --------------------------------------------------------------------------

const ANNOTATIONS: &[&str] = &[
    "tests/fixtures/calibration/captions.json",
    "tests/fixtures/data/annotations/cc3m.json",
    "tests/fixtures/data/annotations/coco_karpathy_train.json",
    "tests/fixtures/data/annotations/coco_karpathy_test.json",
    "tests/fixtures/data/annotations/nocaps/nocaps_val.json",
    "tests/fixtures/data/annotations/vqa_train.json",
    "tests/fixtures/data/annotations/okvqa/okvqa_train.json",
    "tests/fixtures/data/annotations/vqa_val_eval.json",
    "tests/fixtures/data/annotations/answer_list.json",
    "tests/fixtures/data/annotations/gqa/testdev_balanced_questions.json",
];

/// Every reader on `path`, and what the commands do next with what reads.
fn read_all(path: &Path, root: &Path) {
    if let Ok(items) = lavis::read_caption_list(path) {
        for it in &items {
            let _ = lavis::image_path(root, &it.image, path);
        }
        for sampler in [
            Sampler::First(items.len().min(4)),
            Sampler::Random {
                n: items.len().min(3),
                seed: 7,
            },
            Sampler::First(items.len() + 1),
        ] {
            if let Ok(indices) = sampler.indices(items.len()) {
                let _ = prefix_examples(&items, &indices, root, path, 0);
            }
        }
    }
    if let Ok(items) = lavis::read_coco_caption_train(path) {
        for it in &items {
            let _ = lavis::image_path(root, &it.image, path);
        }
    }
    for items in [
        lavis::read_coco_caption_eval(path),
        lavis::read_nocaps_eval(path),
    ]
    .into_iter()
    .flatten()
    {
        for it in &items {
            let _ = lavis::image_path(root, &it.image, path);
            let _ = lavis::coco_image_id(&it.image);
        }
    }
    if let Ok(items) = lavis::read_vqa_train(path) {
        for it in &items {
            let _ = it.answer_weights();
            let _ = lavis::image_path(root, &it.image, path);
        }
    }
    if let Ok(items) = lavis::read_vqa_eval(path) {
        for it in &items {
            let _ = lavis::image_path(root, &it.image, path);
            let _ = it.question_id.to_string();
        }
    }
    let _ = lavis::read_answer_list(path);
    if let Ok(items) = lavis::read_gqa(path) {
        for it in &items {
            let _ = lavis::image_path(root, &it.image, path);
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// Any annotation file, mutated, through every reader.
    #[test]
    fn mutated_annotations_never_panic(
        file in prop::sample::select(ANNOTATIONS.to_vec()),
        m in json_file_mutation(),
    ) {
        thread_local! {
            static TMP: tempfile::TempDir = tempfile::tempdir().unwrap();
        }
        let original = std::fs::read(repo(file)).unwrap();
        let (bytes, done) = mutate(&original, &m);
        record("mutated_annotations_never_panic", &(file, &done));
        TMP.with(|tmp| {
            let path = tmp.path().join("annotations.json");
            std::fs::write(&path, &bytes).unwrap();
            no_panic(&format!("the readers on {file} after [{done}]"), || {
                read_all(&path, tmp.path())
            })
        })?;
    }

    /// `preprocessor_config.json`, mutated; a config that reads for the model's image size
    /// preprocesses an image.
    #[test]
    fn mutated_preprocessor_config_never_panics(m in json_file_mutation()) {
        thread_local! {
            static TMP: tempfile::TempDir = tempfile::tempdir().unwrap();
            static IMAGE: image::RgbImage = load_rgb(&repo(
                "tests/fixtures/models/instructblip-t5-a/image0.png",
            ))
            .unwrap();
        }
        let original = std::fs::read(repo(
            "tests/fixtures/models/instructblip-t5-a/preprocessor_config.json",
        ))
        .unwrap();
        let (bytes, done) = mutate(&original, &m);
        record("mutated_preprocessor_config_never_panics", &done);
        TMP.with(|tmp| {
            let path = tmp.path().join("preprocessor_config.json");
            std::fs::write(&path, &bytes).unwrap();
            no_panic(&format!("ImageProcessorConfig after [{done}]"), || {
                let _ = ImageProcessorConfig::from_file(&path);
                if let Ok(cfg) = ImageProcessorConfig::from_file_for(&path, 32) {
                    IMAGE.with(|img| {
                        let _ = cfg.preprocess(img);
                    });
                }
            })
        })?;
    }

    /// PNG and JPEG files with bytes changed, decoded (and, when they decode to a small
    /// image, preprocessed).
    #[test]
    fn mutated_images_never_panic(
        file in prop::sample::select(vec![
            "tests/fixtures/calibration/images/a.png",
            "tests/fixtures/data/images/coco/val2014/COCO_val2014_000000000042.jpg",
            "tests/fixtures/data/images/cc3m/00000/000000000.jpg",
        ]),
        edits in prop::collection::vec(byte_edit(), 1..4),
        early in prop::bool::weighted(0.5),
    ) {
        thread_local! {
            static TMP: tempfile::TempDir = tempfile::tempdir().unwrap();
            static CFG: ImageProcessorConfig = ImageProcessorConfig::from_file(&repo(
                "tests/fixtures/models/instructblip-t5-a/preprocessor_config.json",
            ))
            .unwrap();
        }
        let mut bytes = std::fs::read(repo(file)).unwrap();
        let mut done = Vec::new();
        for e in &edits {
            // Half the cases change the first 64 bytes, where the headers are.
            let region = if early { 64 } else { bytes.len() };
            done.push(apply_bytes(&mut bytes, region, e));
        }
        let done = done.join("; ");
        record("mutated_images_never_panic", &(file, &done));
        let ext = if file.ends_with(".png") { "png" } else { "jpg" };
        TMP.with(|tmp| {
            let path = tmp.path().join(format!("image.{ext}"));
            std::fs::write(&path, &bytes).unwrap();
            no_panic(&format!("load_rgb of {file} after [{done}]"), || {
                if let Ok(img) = load_rgb(&path)
                    && (img.width() as u64) * (img.height() as u64) <= 1 << 22
                {
                    CFG.with(|cfg| {
                        let _ = cfg.preprocess(&img);
                    });
                }
            })
        })?;
    }
}

/// The unmutated annotation files read with their own readers.
#[test]
fn the_fixtures_read() {
    let p = |f: &str| repo(f);
    assert!(lavis::read_caption_list(&p(ANNOTATIONS[0])).is_ok());
    assert!(lavis::read_coco_caption_train(&p(ANNOTATIONS[2])).is_ok());
    assert!(lavis::read_coco_caption_eval(&p(ANNOTATIONS[3])).is_ok());
    assert!(lavis::read_nocaps_eval(&p(ANNOTATIONS[4])).is_ok());
    assert!(lavis::read_vqa_train(&p(ANNOTATIONS[5])).is_ok());
    assert!(lavis::read_vqa_eval(&p(ANNOTATIONS[7])).is_ok());
    assert!(lavis::read_answer_list(&p(ANNOTATIONS[8])).is_ok());
    assert!(lavis::read_gqa(&p(ANNOTATIONS[9])).is_ok());
}

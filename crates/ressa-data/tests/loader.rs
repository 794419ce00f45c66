//! The loader on the committed fixture set with the tiny checkpoint's tokenizers: VQA prompts
//! through T5 and Q-Former tokenizers with padding and masks, bad images failing or skipped,
//! and the CC3M prefix calibration set through the training transform.

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use ressa_data::augment::TrainTransform;
use ressa_data::calibration::{Sampler, prefix_examples};
use ressa_data::image::{ImageProcessorConfig, load_rgb};
use ressa_data::lavis;
use ressa_data::loader::{
    BadImages, Example, ImageTransform, Loader, LoaderConfig, TextEncoder, Texts,
};
use ressa_data::prompts::vqa_prompt;
use ressa_data::text::TextTokenizer;
use support::fixture_dir;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/instructblip-t5-a")
}

fn encoders() -> (TextEncoder, TextEncoder) {
    let t5 = TextTokenizer::from_file(&model_dir().join("tokenizer.json")).unwrap();
    let q = TextTokenizer::from_file(&model_dir().join("qformer_tokenizer/tokenizer.json"))
        .unwrap()
        .with_truncation(12, true)
        .unwrap();
    let (p5, pq) = (t5.pad_id().unwrap(), q.pad_id().unwrap());
    (
        TextEncoder {
            tokenizer: Arc::new(t5),
            pad: p5,
        },
        TextEncoder {
            tokenizer: Arc::new(q),
            pad: pq,
        },
    )
}

fn vqa_examples(annotations: &str) -> Vec<Example> {
    let path = fixture_dir().join(annotations);
    let root = fixture_dir().join("images/coco");
    lavis::read_vqa_eval(&path)
        .unwrap()
        .iter()
        .map(|q| Example {
            image: lavis::image_path(&root, &q.image, &path).unwrap(),
            text_input: vqa_prompt(&q.question),
            text_output: None,
        })
        .collect()
}

fn processor() -> ImageProcessorConfig {
    ImageProcessorConfig::from_file(&model_dir().join("preprocessor_config.json")).unwrap()
}

#[test]
fn vqa_batches_have_padded_texts_and_masks() {
    let examples = vqa_examples("annotations/vqa_val_eval.json");
    assert_eq!(
        examples[0].text_input,
        "Question: what color is the ball? Short answer:"
    );
    let (t5, qf) = encoders();
    assert_eq!(t5.pad, 0);
    let loader = Loader::new(
        examples.clone(),
        ImageTransform::Eval(processor()),
        Texts {
            input: Some(t5.clone()),
            qformer: Some(qf.clone()),
            output: None,
        },
        LoaderConfig {
            batch_size: 3,
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let batches: Vec<_> = loader.map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 2);
    for b in &batches {
        let input = b.input.as_ref().unwrap();
        let q = b.qformer.as_ref().unwrap();
        assert_eq!(input.ids.len(), b.len());
        for (row, &i) in b.indices.iter().enumerate() {
            let ids = t5.tokenizer.encode(&examples[i].text_input).unwrap();
            let n = ids.len();
            assert_eq!(&input.ids[row][..n], &ids[..]);
            assert!(input.ids[row][n..].iter().all(|&t| t == t5.pad));
            assert_eq!(input.mask[row].iter().sum::<u32>() as usize, n);
            // Q-Former: truncated to 12 ids, from the left, special tokens kept.
            let qn = q.mask[row].iter().sum::<u32>() as usize;
            assert!(qn <= 12);
            assert_eq!(q.ids[row].len(), q.ids[0].len());
        }
        // Pixels are the processor's.
        let per = 3 * 32 * 32;
        let first = processor().preprocess(&load_rgb(&examples[b.indices[0]].image).unwrap());
        assert_eq!(&b.pixel_values[..per], &first[..]);
    }
}

#[test]
fn missing_and_corrupt_images_fail_or_are_counted() {
    for (file, needle) in [
        ("bad/missing_image.json", "COCO_val2014_000000099999.jpg"),
        ("bad/corrupt_image.json", "COCO_val2014_000000000666.jpg"),
    ] {
        let examples = vqa_examples(file);
        let run = |bad| {
            Loader::new(
                examples.clone(),
                ImageTransform::Eval(processor()),
                Texts::default(),
                LoaderConfig {
                    batch_size: 4,
                    bad_images: bad,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let results: Vec<_> = run(BadImages::Fail).collect();
        let err = results
            .iter()
            .find_map(|r| r.as_ref().err())
            .expect("an error")
            .to_string();
        assert!(err.contains(needle) && !err.contains('\n'), "{err}");

        let mut skipping = run(BadImages::Skip);
        let rows: Vec<usize> = skipping.by_ref().flat_map(|b| b.unwrap().indices).collect();
        assert_eq!(rows, vec![0]);
        assert_eq!(skipping.skipped(), 1);
        assert!(skipping.skipped_items()[0].reason.contains(needle));
    }
}

#[test]
fn cc3m_prefix_calibration_through_the_train_transform() {
    let path = fixture_dir().join("annotations/cc3m.json");
    let items = lavis::read_caption_list(&path).unwrap();
    let indices = Sampler::First(3).indices(items.len()).unwrap();
    let set = prefix_examples(
        &items,
        &indices,
        &fixture_dir().join("images/cc3m"),
        &path,
        0,
    )
    .unwrap();
    assert_eq!(set.examples.len(), 3);
    assert!(set.skipped.is_empty());
    for (ex, item) in set.examples.iter().zip(&items) {
        let out = ex.text_output.as_deref().unwrap();
        let whole = format!("{}{}", ex.text_input, out);
        assert_eq!(whole, ressa_data::prompts::pre_caption(&item.caption, 50));
        let n = ex.text_input.chars().count();
        assert!(n >= 1 && n <= whole.chars().count() / 2);
    }
    let (t5, qf) = encoders();
    let transform = TrainTransform::from_processor(&processor());
    let run = || {
        Loader::new(
            set.examples.clone(),
            ImageTransform::Train {
                transform: transform.clone(),
                seed: 0,
                epoch: 0,
            },
            Texts {
                input: Some(t5.clone()),
                qformer: Some(qf.clone()),
                output: Some(t5.clone()),
            },
            LoaderConfig {
                batch_size: 2,
                ..Default::default()
            },
        )
        .unwrap()
        .map(|b| b.unwrap())
        .collect::<Vec<_>>()
    };
    let a = run();
    assert_eq!(a.len(), 2);
    assert!(
        a.iter()
            .all(|b| b.output.is_some() && b.image_size == (32, 32))
    );
    let b = run();
    assert_eq!(a[0].pixel_values, b[0].pixel_values);
    assert_eq!(a[1].output, b[1].output);
}

#[test]
fn truncation_keeps_special_tokens_and_drops_from_the_chosen_side() {
    let path = model_dir().join("qformer_tokenizer/tokenizer.json");
    let full = TextTokenizer::from_file(&path).unwrap();
    let text = "question what is the color of the circle short answer";
    let ids = full.encode(text).unwrap();
    assert!(ids.len() > 8, "{ids:?}");
    let (first, last) = (ids[0], *ids.last().unwrap());
    let left = TextTokenizer::from_file(&path)
        .unwrap()
        .with_truncation(6, true)
        .unwrap()
        .encode(text)
        .unwrap();
    // [CLS] + the last 4 content tokens + [SEP].
    assert_eq!(left.len(), 6);
    assert_eq!((left[0], left[5]), (first, last));
    assert_eq!(&left[1..5], &ids[ids.len() - 5..ids.len() - 1]);
    let right = TextTokenizer::from_file(&path)
        .unwrap()
        .with_truncation(6, false)
        .unwrap()
        .encode(text)
        .unwrap();
    assert_eq!(&right[..5], &ids[..5]);
    assert_eq!(right[5], last);
    assert_eq!(full.pad_id(), Some(0));
    let err = TextTokenizer::from_file(&path)
        .unwrap()
        .with_truncation(2, true)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no room"), "{err}");
}

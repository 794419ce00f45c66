//! The `shapes` generator end to end: byte-identical output for a seed at any thread count,
//! every file through our LAVIS readers and the `ressa-eval` scorers, the tokenizers and the
//! preprocessor config through `text.rs`, `image.rs` and the loader as the model fixtures'
//! files are used, disjoint splits, and output-directory errors.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ressa_data::image::{ImageProcessorConfig, load_rgb};
use ressa_data::lavis;
use ressa_data::loader::{Example, ImageTransform, Loader, LoaderConfig, TextEncoder, Texts};
use ressa_data::prompts;
use ressa_data::shapes::{self, COLORS, ShapesConfig, ShapesSummary};
use ressa_data::text::TextTokenizer;
use ressa_eval::{Task, score_files};
use serde_json::{Value, json};

fn small() -> ShapesConfig {
    ShapesConfig {
        seed: 7,
        train: 40,
        val: 12,
        test: 12,
        ..Default::default()
    }
}

fn generate(cfg: &ShapesConfig) -> (tempfile::TempDir, PathBuf, ShapesSummary) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shapes");
    let summary = shapes::generate(cfg, &out).unwrap();
    (dir, out, summary)
}

fn read(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Relative path → bytes of every file under `root`.
fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

#[test]
fn same_seed_gives_identical_bytes_at_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    pool(1).install(|| shapes::generate(&cfg, &a)).unwrap();
    pool(3).install(|| shapes::generate(&cfg, &b)).unwrap();
    let (fa, fb) = (files(&a), files(&b));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (k, v) in &fa {
        assert!(fb[k] == *v, "{} differs", k.display());
    }
    assert_eq!(
        fa.keys()
            .filter(|k| k.extension().unwrap() == "png")
            .count(),
        64
    );
    // Another seed gives other images; no temporary directory is left behind.
    shapes::generate(&ShapesConfig { seed: 8, ..cfg }, &c).unwrap();
    let fc = files(&c);
    let p = Path::new("images/train/000000.png");
    assert_ne!(fa[p], fc[p]);
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
}

#[test]
fn files_round_trip_through_the_readers_and_scorers() {
    let (_dir, out, summary) = generate(&small());
    let ann = out.join("annotations");
    let images = out.join("images");
    let written: ShapesSummary = serde_json::from_value(read(&out.join("shapes.json"))).unwrap();
    assert_eq!(
        written,
        ShapesSummary {
            out_dir: PathBuf::new(),
            ..summary.clone()
        }
    );
    assert_eq!(summary.splits.len(), 3);
    let answers: HashSet<String> = lavis::read_answer_list(&ann.join("answer_list.json"))
        .unwrap()
        .into_iter()
        .collect();
    for split in &summary.splits {
        let name = &split.name;
        let f = |kind: &str| ann.join(format!("{kind}.json"));

        // Captions: LAVIS caption list / COCO Karpathy train, and the NoCaps-style eval list.
        let list = lavis::read_caption_list(&f(&format!("caption_{name}"))).unwrap();
        let train = lavis::read_coco_caption_train(&f(&format!("caption_{name}"))).unwrap();
        assert_eq!((list.len(), train.len()), (split.captions, split.captions));
        let eval = lavis::read_nocaps_eval(&f(&format!("caption_{name}_eval"))).unwrap();
        assert_eq!(eval.len(), split.images);
        assert_eq!(
            eval.iter().map(|e| e.references.len()).sum::<usize>(),
            split.captions
        );
        for e in &eval {
            let path = lavis::image_path(&images, &e.image, &ann).unwrap();
            let img = load_rgb(&path).unwrap();
            assert_eq!(img.dimensions(), (64, 64));
            assert!(!e.references.is_empty());
        }
        // Perfect caption predictions score BLEU 1 through the COCO-format ground truth.
        let preds: Vec<Value> = eval
            .iter()
            .map(|e| json!({"image_id": e.image_id, "caption": e.references[0]}))
            .collect();
        let pred_path = ann.join(format!("pred_caption_{name}.json"));
        std::fs::write(&pred_path, serde_json::to_vec(&preds).unwrap()).unwrap();
        let m = score_files(
            Task::Nocaps,
            &pred_path,
            &[f(&format!("caption_{name}_gt"))],
        )
        .unwrap();
        assert!(m["Bleu_4"] > 0.999 && m["CIDEr"] > 0.5, "{m:?}");

        // VQA: the LAVIS train and eval lists and the official files agree.
        let vqa = lavis::read_vqa_train(&f(&format!("vqa_{name}"))).unwrap();
        let vqa_eval = lavis::read_vqa_eval(&f(&format!("vqa_{name}_eval"))).unwrap();
        assert_eq!(
            (vqa.len(), vqa_eval.len()),
            (split.questions, split.questions)
        );
        for (t, e) in vqa.iter().zip(&vqa_eval) {
            assert_eq!((&t.question_id, &t.question), (&e.question_id, &e.question));
            assert_eq!(t.answer.len(), 10);
            assert!(t.answer.iter().all(|a| a == &t.answer[0]));
            assert!(answers.contains(&t.answer[0]), "{}", t.answer[0]);
            assert!(
                lavis::image_path(&images, &e.image, &ann)
                    .unwrap()
                    .is_file()
            );
        }
        let ids: HashSet<_> = vqa.iter().map(|q| q.question_id.clone()).collect();
        assert_eq!(ids.len(), vqa.len());
        let official = [
            f(&format!("vqa_{name}_annotations")),
            f(&format!("vqa_{name}_questions")),
        ];
        let qs = ressa_eval::formats::read_vqa_questions(&official[1]).unwrap();
        assert_eq!(qs.len(), vqa.len());
        let by_id: HashMap<String, &str> = vqa
            .iter()
            .map(|q| (q.question_id.to_string(), q.answer[0].as_str()))
            .collect();
        let score = |answer: &dyn Fn(&str) -> String| {
            let preds: Vec<Value> = vqa_eval
                .iter()
                .map(|q| {
                    let truth = by_id[&q.question_id.to_string()];
                    json!({"question_id": q.question_id, "answer": answer(truth)})
                })
                .collect();
            let p = ann.join(format!("pred_vqa_{name}.json"));
            std::fs::write(&p, serde_json::to_vec(&preds).unwrap()).unwrap();
            score_files(Task::Vqav2, &p, &official).unwrap()
        };
        let perfect = score(&|a| a.to_string());
        assert_eq!(perfect["accuracy"], 100.0, "{perfect:?}");
        for t in ["yes/no", "number", "other"] {
            assert_eq!(perfect.get(&format!("accuracy_{t}")), Some(&100.0), "{t}");
        }
        let always_yes = score(&|_| "yes".to_string());
        assert!(
            always_yes["accuracy"] < 40.0 && always_yes["accuracy_yes/no"] < 80.0,
            "{always_yes:?}"
        );
    }
}

#[test]
fn answers_match_the_pixels_and_splits_are_disjoint() {
    let cfg = ShapesConfig {
        train: 300,
        val: 60,
        test: 60,
        ..small()
    };
    let (_dir, out, _) = generate(&cfg);
    let ann = out.join("annotations");
    let mut signatures: Vec<HashSet<String>> = Vec::new();
    for name in ["train", "val", "test"] {
        let scenes = read(&ann.join(format!("scenes_{name}.json")));
        let mut by_image: HashMap<String, &Value> = HashMap::new();
        let mut sigs = HashSet::new();
        for s in scenes.as_array().unwrap() {
            let image = s["image"].as_str().unwrap();
            assert!(image.starts_with(&format!("{name}/")));
            let img = load_rgb(&out.join("images").join(image)).unwrap();
            let mut sig: Vec<String> = Vec::new();
            for sh in s["shapes"].as_array().unwrap() {
                // The centre pixel is nearest to the named colour.
                let (x, y) = (sh["x"].as_f64().unwrap(), sh["y"].as_f64().unwrap());
                let p = img.get_pixel(x as u32, y as u32).0;
                let nearest = COLORS
                    .iter()
                    .min_by_key(|(_, c)| {
                        (0..3)
                            .map(|i| (i32::from(p[i]) - i32::from(c[i])).pow(2))
                            .sum::<i32>()
                    })
                    .unwrap()
                    .0;
                assert_eq!(nearest, sh["color"].as_str().unwrap(), "{image}");
                sig.push(format!(
                    "{} {} {} {}",
                    sh["cell"], sh["shape"], sh["color"], sh["size"]
                ));
            }
            sig.sort();
            sigs.insert(sig.join(","));
            by_image.insert(image.to_string(), s);
        }
        let vqa = lavis::read_vqa_train(&ann.join(format!("vqa_{name}.json"))).unwrap();
        let mut kinds = HashSet::new();
        for q in &vqa {
            let shapes = by_image[&q.image]["shapes"].as_array().unwrap();
            let words: Vec<&str> = q.question.trim_end_matches('?').split(' ').collect();
            kinds.insert(words[..2].join(" "));
            match words.as_slice() {
                ["how", "many", "shapes", "are", "there"] => {
                    assert_eq!(q.answer[0], shapes.len().to_string())
                }
                ["what", "color", "is", "the", kind] => {
                    let hit: Vec<_> = shapes.iter().filter(|s| s["shape"] == *kind).collect();
                    assert_eq!(hit.len(), 1, "{}", q.question);
                    assert_eq!(hit[0]["color"], q.answer[0].as_str());
                }
                ["where", "is", "the", color, kind] => {
                    let hit: Vec<_> = shapes
                        .iter()
                        .filter(|s| s["shape"] == *kind && s["color"] == *color)
                        .collect();
                    assert_eq!(hit.len(), 1, "{}", q.question);
                    assert_eq!(hit[0]["cell"], q.answer[0].as_str());
                }
                _ => {}
            }
        }
        assert_eq!(kinds.len(), 7, "{kinds:?}");
        signatures.push(sigs);
    }
    assert!(signatures[0].is_disjoint(&signatures[1]));
    assert!(signatures[0].is_disjoint(&signatures[2]));
    assert!(signatures[1].is_disjoint(&signatures[2]));
}

/// Checks the fixture tokenizers and ours the same way: pad id, `</s>` appended, Q-Former
/// `[CLS] … [SEP]` with left truncation.
fn check_tokenizers(dir: &Path, texts: &[&str]) -> (TextTokenizer, TextTokenizer) {
    let t5 = TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let q = TextTokenizer::from_file(&dir.join("qformer_tokenizer/tokenizer.json"))
        .unwrap()
        .with_truncation(128, true)
        .unwrap();
    assert_eq!((t5.pad_id(), q.pad_id()), (Some(0), Some(0)));
    let b = t5.encode_batch(texts, 0).unwrap();
    for (ids, mask) in b.ids.iter().zip(&b.mask) {
        let n = mask.iter().sum::<u32>() as usize;
        assert_eq!(ids[n - 1], 1, "{ids:?}");
        assert!(ids[n..].iter().all(|&i| i == 0));
    }
    let b = q.encode_batch(texts, 0).unwrap();
    for (ids, mask) in b.ids.iter().zip(&b.mask) {
        let n = mask.iter().sum::<u32>() as usize;
        assert_eq!((ids[0], ids[n - 1]), (2, 3), "{ids:?}");
    }
    (t5, q)
}

#[test]
fn tokenizers_cover_every_text_and_encode_like_the_fixtures() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/instructblip-t5-a");
    let prompt = prompts::vqa_prompt("what is the color of the circle");
    check_tokenizers(&fixture, &[&prompt, "a red circle"]);

    let (_dir, out, summary) = generate(&small());
    let ann = out.join("annotations");
    let mut texts: Vec<String> = vec![
        prompts::CAPTION_PROMPT.to_string(),
        prompts::fill(prompts::NOCAPS_PROMPT, ""),
    ];
    let mut answers = Vec::new();
    for name in ["train", "val", "test"] {
        for c in lavis::read_caption_list(&ann.join(format!("caption_{name}.json"))).unwrap() {
            texts.push(prompts::pre_caption(&c.caption, prompts::MAX_WORDS));
            texts.push(c.caption);
        }
        for q in lavis::read_vqa_train(&ann.join(format!("vqa_{name}.json"))).unwrap() {
            texts.push(prompts::vqa_prompt(&q.question));
            texts.push(q.question);
            answers.push(q.answer[0].clone());
        }
    }
    texts.extend(lavis::read_answer_list(&ann.join("answer_list.json")).unwrap());
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (t5, q) = check_tokenizers(&out, &refs);
    let (unk5, unkq) = (2, 1);
    for t in &texts {
        let ids = t5.encode(t).unwrap();
        assert!(!ids.contains(&unk5), "unknown word in `{t}`: {ids:?}");
        assert!(ids.iter().all(|&i| (i as usize) < summary.vocab_size));
        let qids = q.encode(t).unwrap();
        assert!(!qids.contains(&unkq), "unknown word in `{t}`: {qids:?}");
        assert!(
            qids.iter()
                .all(|&i| (i as usize) < summary.qformer_vocab_size)
        );
        assert_eq!(ids.len() + 1, qids.len(), "{t}");
    }
    // Answers, captions and questions decode back to themselves (generation output).
    for t in answers.iter().chain(&texts[2..40]) {
        if !t.contains(':') {
            assert_eq!(&t5.decode(&t5.encode(t).unwrap()).unwrap(), t);
        }
    }
    assert_eq!(
        t5.encode("What COLOR is the circle?").unwrap(),
        t5.encode("what color is the circle ?").unwrap()
    );
    // Special ids: T5 <pad> </s> <unk> … <image>, BERT [PAD] [UNK] [CLS] [SEP] [MASK].
    let tok = read(&out.join("tokenizer.json"));
    let vocab = &tok["model"]["vocab"];
    assert_eq!(
        [&vocab["<pad>"], &vocab["</s>"], &vocab["<unk>"]],
        [&json!(0), &json!(1), &json!(2)]
    );
    assert_eq!(vocab["<image>"], json!(summary.image_token_id));
    assert_eq!(summary.image_token_id as usize, summary.vocab_size - 1);
    let qtok = read(&out.join("qformer_tokenizer/tokenizer.json"));
    for (i, t) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .enumerate()
    {
        assert_eq!(qtok["model"]["vocab"][t], json!(i), "{t}");
    }
    // Left truncation keeps the end of a long prompt and the [SEP].
    let long = "what color is the circle ".repeat(40);
    let q8 = TextTokenizer::from_file(&out.join("qformer_tokenizer/tokenizer.json"))
        .unwrap()
        .with_truncation(8, true)
        .unwrap();
    let ids = q8.encode(&long).unwrap();
    assert_eq!(ids.len(), 8);
    assert_eq!((ids[0], ids[7]), (2, 3));
}

#[test]
fn preprocessor_and_loader_feed_the_model_size() {
    let cfg = ShapesConfig {
        model_image_size: Some(32),
        ..small()
    };
    let (_dir, out, _) = generate(&cfg);
    let processor = ImageProcessorConfig::from_file(&out.join("preprocessor_config.json")).unwrap();
    assert_eq!(processor.output_size(), (32, 32));
    let ann = out.join("annotations/vqa_val.json");
    let t5 = Arc::new(TextTokenizer::from_file(&out.join("tokenizer.json")).unwrap());
    let q = TextTokenizer::from_file(&out.join("qformer_tokenizer/tokenizer.json"))
        .unwrap()
        .with_truncation(128, true)
        .unwrap();
    let items = lavis::read_vqa_train(&ann).unwrap();
    let examples: Vec<Example> = items
        .iter()
        .map(|it| Example {
            image: lavis::image_path(&out.join("images"), &it.image, &ann).unwrap(),
            text_input: prompts::vqa_prompt(&it.question),
            text_output: Some(it.answer[0].clone()),
        })
        .collect();
    let texts = Texts {
        input: Some(TextEncoder {
            tokenizer: Arc::clone(&t5),
            pad: 0,
        }),
        qformer: Some(TextEncoder {
            tokenizer: Arc::new(q),
            pad: 0,
        }),
        output: Some(TextEncoder {
            tokenizer: Arc::clone(&t5),
            pad: 0,
        }),
    };
    let loader = Loader::new(
        examples,
        ImageTransform::Eval(processor),
        texts,
        LoaderConfig {
            batch_size: 16,
            ..Default::default()
        },
    )
    .unwrap();
    let mut seen = 0;
    for batch in loader {
        let batch = batch.unwrap();
        assert_eq!(batch.image_size, (32, 32));
        assert_eq!(batch.pixel_values.len(), batch.len() * 3 * 32 * 32);
        let output = batch.output.as_ref().unwrap();
        for (row, &i) in output.ids.iter().zip(&batch.indices) {
            let text = t5.decode(row).unwrap();
            assert_eq!(text, items[i].answer[0]);
        }
        seen += batch.len();
    }
    assert_eq!(seen, items.len());
}

#[test]
fn output_directory_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShapesConfig {
        train: 3,
        val: 0,
        test: 0,
        ..small()
    };
    // An empty directory is replaced; a non-empty one or a file is refused.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let s = shapes::generate(&cfg, &empty).unwrap();
    assert_eq!(s.splits.len(), 1);
    assert!(!empty.join("annotations/vqa_val.json").exists());
    let e = shapes::generate(&cfg, &empty).unwrap_err().to_string();
    assert!(
        e.starts_with(&empty.display().to_string()) && e.contains("not empty"),
        "{e}"
    );
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let e = shapes::generate(&cfg, &file).unwrap_err().to_string();
    assert!(e.contains("file") && !e.contains('\n'), "{e}");
    let e = shapes::generate(
        &ShapesConfig {
            noise: 200,
            ..cfg.clone()
        },
        &dir.path().join("new"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`noise` is 200"), "{e}");
    assert!(!dir.path().join("new").exists());
}

/// `cargo test --release -p ressa-data --test shapes -- --ignored --nocapture`
#[test]
#[ignore]
fn default_sizes_time() {
    let dir = tempfile::tempdir().unwrap();
    let start = std::time::Instant::now();
    let s = shapes::generate(&ShapesConfig::default(), &dir.path().join("shapes")).unwrap();
    eprintln!(
        "default shapes dataset in {:.2} s: {}",
        start.elapsed().as_secs_f64(),
        serde_json::to_string(&s).unwrap()
    );
}

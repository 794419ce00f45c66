//! `shapes`: a procedural dataset for training a tiny InstructBLIP from scratch on a CPU.
//!
//! Each image (default 64×64 RGB PNG) shows one to three shapes (circle, square, triangle,
//! diamond) in six colours and two sizes, one per cell of a 3×3 grid (with jitter inside the
//! cell, so shapes never overlap), on a near-plain light background, drawn by the 2×2
//! supersampling rasteriser below. Every image gets templated captions (all shapes and one
//! spatial relation) and VQA items (colour, shape, size, count, position, relation,
//! existence) that the image answers unambiguously.
//!
//! [`generate`] writes, in the LAVIS / official formats our readers and scorers read:
//!
//! ```text
//! OUT/
//!   shapes.json                       ShapesSummary (config, counts, vocabulary sizes)
//!   tokenizer.json                    T5-style word-level tokenizer (<pad>=0 </s>=1 <unk>=2)
//!   tokenizer_config.json
//!   qformer_tokenizer/tokenizer.json  BERT-style ([PAD]=0 [UNK] [CLS] [SEP] [MASK])
//!   qformer_tokenizer/tokenizer_config.json
//!   preprocessor_config.json          BlipImageProcessor, size = model_image_size
//!   images/{train,val,test}/NNNNNN.png
//!   annotations/
//!     caption_{split}.json            [{"image", "caption", "image_id": "shapes_<id>"}]
//!     caption_{split}_eval.json       [{"image", "img_id", "caption": [refs]}] (NoCaps-style)
//!     caption_{split}_gt.json         COCO-format ground truth
//!     vqa_{split}.json                [{"question_id", "question", "answer": [10×], "image", "dataset"}]
//!     vqa_{split}_eval.json           [{"question_id", "question", "image", "instance_id"}]
//!     vqa_{split}_questions.json      official VQAv2 question file
//!     vqa_{split}_annotations.json    official VQAv2 annotation file (10 equal answers)
//!     scenes_{split}.json             what was drawn (shape, colour, size, cell, centre, radius)
//!     answer_list.json                every possible answer
//! ```
//!
//! Image ids are `split·1_000_000 + index` (train 1, val 2, test 3), question ids
//! `image_id·10 + k`. Captions are scored with `ressa score --task nocaps` (the COCO task takes
//! image ids from `.jpg` file names). Randomness comes from per-item streams of
//! [`crate::rng::item_rng`], so the output is byte-identical for a seed and config at any
//! thread count. Splits are disjoint by construction: a scene (shapes, colours, sizes, cells)
//! belongs to the split its seeded hash selects, and each split redraws scenes until one is
//! its own.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ::image::{ImageEncoder, RgbImage};
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{DataError, Result};
use crate::prompts;
use crate::rng::item_rng;

/// Shape names (index = kind).
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "diamond"];
const PLURALS: [&str; 4] = ["circles", "squares", "triangles", "diamonds"];
/// Colour names and base RGB (each shape is jittered by ±12 per channel).
pub const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [215, 40, 40]),
    ("green", [40, 160, 60]),
    ("blue", [40, 80, 215]),
    ("yellow", [230, 200, 30]),
    ("purple", [135, 55, 185]),
    ("orange", [240, 130, 25]),
];
/// Size names: radius 0.08 and 0.14 of the image side.
pub const SIZES: [&str; 2] = ["small", "large"];
/// Answers to "where is the …?", by cell (row-major 3×3 grid).
pub const CELLS: [&str; 9] = [
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
];
/// Caption phrases for a cell.
const CELL_PHRASES: [&str; 9] = [
    "in the top left corner",
    "at the top",
    "in the top right corner",
    "on the left",
    "in the center",
    "on the right",
    "in the bottom left corner",
    "at the bottom",
    "in the bottom right corner",
];
/// Words of the templates (the lists above add theirs).
const TEMPLATE_WORDS: &[&str] = &[
    "a", "an", "the", "of", "and", "is", "are", "there", "what", "how", "many", "where", "to",
    "in", "at", "on", "above", "below", "left", "right", "top", "bottom", "center", "corner",
    "color", "shape", "shapes", "size", "object", "yes", "no",
];
/// Words of generic instructions, so trainers can prompt without unknown tokens.
const INSTRUCTION_WORDS: &[&str] = &[
    "describe",
    "image",
    "picture",
    "photo",
    "short",
    "caption",
    "description",
    "write",
    "briefly",
    "this",
    "answer",
    "question",
    "with",
    "word",
    "one",
    "two",
    "three",
];
const PUNCTUATION: &[&str] = &[".", ",", "?", "!", ":", ";", "'", "\"", "(", ")", "-"];

const SPLITS: [(&str, u64); 3] = [("train", 1), ("val", 2), ("test", 3)];
const ID_BASE: i64 = 1_000_000;
const ANSWERS_PER_QUESTION: usize = 10;
/// Random streams (distinct from [`crate::rng::stream`]); the split code is added.
const STREAM_SCENE: u64 = 0x5348_4150_4553_0000;
const STREAM_TEXT: u64 = 0x5348_4150_4553_0100;
const MAX_DRAWS: usize = 100_000;
const T5_SPECIALS: [&str; 3] = ["<pad>", "</s>", "<unk>"];
const IMAGE_TOKEN: &str = "<image>";
const QFORMER_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
/// OpenAI CLIP mean/std, as InstructBLIP's processor.
const MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Generator settings. Unknown JSON fields are refused; missing ones take the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShapesConfig {
    pub seed: u64,
    /// Images per split (at most 999 999 each; 0 leaves the split out).
    pub train: usize,
    pub val: usize,
    pub test: usize,
    /// Side of the generated square images, 32 to 1024.
    pub image_size: u32,
    /// `preprocessor_config.json` size (the vision model's `image_size`); default `image_size`.
    pub model_image_size: Option<u32>,
    /// Shapes per image, drawn uniformly from `min_shapes..=max_shapes` (1 to 9).
    pub min_shapes: usize,
    pub max_shapes: usize,
    /// Uniform per-channel pixel noise amplitude (0 = none, at most 64).
    pub noise: u8,
    /// Distinct captions per image (fewer when the image has fewer), 1 to 10.
    pub captions_per_image: usize,
    /// VQA items per image, 1 to 10.
    pub questions_per_image: usize,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            train: 2000,
            val: 200,
            test: 200,
            image_size: 64,
            model_image_size: None,
            min_shapes: 1,
            max_shapes: 3,
            noise: 0,
            captions_per_image: 3,
            questions_per_image: 6,
        }
    }
}

impl ShapesConfig {
    /// Checks every field; the error names the field and what was expected.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, value: String, expected: &str| {
            Err(DataError::Input(format!(
                "shapes config: `{field}` is {value}, expected {expected}"
            )))
        };
        if !(32..=1024).contains(&self.image_size) {
            return bad("image_size", self.image_size.to_string(), "32 to 1024");
        }
        if let Some(m) = self.model_image_size
            && !(16..=2048).contains(&m)
        {
            return bad("model_image_size", m.to_string(), "16 to 2048");
        }
        for (field, n) in [
            ("train", self.train),
            ("val", self.val),
            ("test", self.test),
        ] {
            if n >= ID_BASE as usize {
                return bad(field, n.to_string(), "at most 999999 images");
            }
        }
        if self.train + self.val + self.test == 0 {
            return bad("train", "0".into(), "at least one image in some split");
        }
        if !(1..=9).contains(&self.min_shapes) {
            return bad("min_shapes", self.min_shapes.to_string(), "1 to 9");
        }
        if !(self.min_shapes..=9).contains(&self.max_shapes) {
            return bad(
                "max_shapes",
                self.max_shapes.to_string(),
                &format!("min_shapes ({}) to 9", self.min_shapes),
            );
        }
        if self.noise > 64 {
            return bad("noise", self.noise.to_string(), "0 to 64");
        }
        if !(1..=10).contains(&self.captions_per_image) {
            return bad(
                "captions_per_image",
                self.captions_per_image.to_string(),
                "1 to 10",
            );
        }
        if !(1..=10).contains(&self.questions_per_image) {
            return bad(
                "questions_per_image",
                self.questions_per_image.to_string(),
                "1 to 10",
            );
        }
        Ok(())
    }

    fn model_size(&self) -> u32 {
        self.model_image_size.unwrap_or(self.image_size)
    }
}

/// What [`generate`] wrote (also `shapes.json`, without `out_dir`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapesSummary {
    #[serde(skip)]
    pub out_dir: PathBuf,
    pub version: u32,
    pub config: ShapesConfig,
    pub splits: Vec<SplitSummary>,
    /// T5 tokenizer vocabulary, special tokens and `<image>` included.
    pub vocab_size: usize,
    pub qformer_vocab_size: usize,
    /// Id of `<image>` (the last id), for `image_token_index`.
    pub image_token_id: u32,
    /// Entries of `answer_list.json`.
    pub answers: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitSummary {
    pub name: String,
    pub images: usize,
    pub captions: usize,
    pub questions: usize,
}

/// The words of the tokenizers after their special tokens, in id order: templates, colours,
/// shapes, sizes, digits, prompt and instruction words, punctuation.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut push = |w: &str| {
        let w = w.to_lowercase();
        if !w.is_empty() && !words.contains(&w) {
            words.push(w);
        }
    };
    TEMPLATE_WORDS.iter().for_each(|w| push(w));
    COLORS.iter().for_each(|(c, _)| push(c));
    SHAPES.iter().chain(&PLURALS).for_each(|w| push(w));
    SIZES.iter().for_each(|w| push(w));
    CELLS
        .iter()
        .chain(&CELL_PHRASES)
        .flat_map(|p| p.split(' '))
        .for_each(&mut push);
    (0..10).for_each(|d| push(&d.to_string()));
    // Punctuation of the prompts is in PUNCTUATION.
    [prompts::VQA_PROMPT, prompts::CAPTION_PROMPT]
        .iter()
        .flat_map(|p| p.split(|c: char| !c.is_alphanumeric()))
        .for_each(&mut push);
    INSTRUCTION_WORDS.iter().for_each(|w| push(w));
    PUNCTUATION.iter().for_each(|w| push(w));
    words
}

/// One drawn shape.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Shape {
    kind: usize,
    color: usize,
    large: bool,
    cell: usize,
    x: f32,
    y: f32,
    r: f32,
    rgb: [u8; 3],
}

impl Shape {
    fn row(&self) -> usize {
        self.cell / 3
    }
    fn col(&self) -> usize {
        self.cell % 3
    }
    fn phrase(&self) -> String {
        format!(
            "a {} {} {}",
            SIZES[usize::from(self.large)],
            COLORS[self.color].0,
            SHAPES[self.kind]
        )
    }
}

/// (cell, kind, colour, large) per shape, sorted by cell.
type Layout = Vec<(usize, usize, usize, bool)>;

fn sample_layout(cfg: &ShapesConfig, rng: &mut StdRng) -> Layout {
    let n = rng.random_range(cfg.min_shapes..=cfg.max_shapes);
    let cells = rand::seq::index::sample(rng, 9, n).into_vec();
    // Distinct (kind, colour) pairs, so "the red circle" always names one shape.
    let pairs = rand::seq::index::sample(rng, SHAPES.len() * COLORS.len(), n).into_vec();
    let mut layout: Layout = cells
        .into_iter()
        .zip(pairs)
        .map(|(cell, p)| (cell, p / COLORS.len(), p % COLORS.len(), false))
        .collect();
    for s in &mut layout {
        s.3 = rng.random_bool(0.5);
    }
    layout.sort_unstable();
    layout
}

/// The split (0 train, 1 val, 2 test) a layout belongs to: 80/10/10 by a seeded FNV-1a hash.
fn layout_split(seed: u64, layout: &Layout) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    seed.to_le_bytes().into_iter().for_each(&mut eat);
    for &(cell, kind, color, large) in layout {
        [cell as u8, kind as u8, color as u8, u8::from(large)]
            .into_iter()
            .for_each(&mut eat);
    }
    // splitmix64 finaliser: FNV's low bits are weak.
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    match h % 10 {
        0..=7 => 0,
        8 => 1,
        _ => 2,
    }
}

struct Scene {
    background: [u8; 3],
    shapes: Vec<Shape>,
}

fn jitter(base: u8, amount: i16, rng: &mut StdRng) -> u8 {
    (i16::from(base) + rng.random_range(-amount..=amount)).clamp(0, 255) as u8
}

fn place(cfg: &ShapesConfig, layout: &Layout, rng: &mut StdRng) -> Scene {
    let size = cfg.image_size as f32;
    let cell = size / 3.0;
    let shapes = layout
        .iter()
        .map(|&(c, kind, color, large)| {
            let r = size * if large { 0.14 } else { 0.08 };
            // Every shape fits in a disc of radius r; a 1 px margin keeps cells apart.
            let j = (cell / 2.0 - r - 1.0).max(0.0);
            let mut offset = || {
                if j > 0.0 {
                    rng.random_range(-j..=j)
                } else {
                    0.0
                }
            };
            let x = ((c % 3) as f32 + 0.5) * cell + offset();
            let y = ((c / 3) as f32 + 0.5) * cell + offset();
            let rgb = COLORS[color].1.map(|v| jitter(v, 12, rng));
            Shape {
                kind,
                color,
                large,
                cell: c,
                x,
                y,
                r,
                rgb,
            }
        })
        .collect();
    let grey = rng.random_range(200u8..=235);
    let background = [0; 3].map(|_: u8| jitter(grey, 5, rng));
    Scene { background, shapes }
}

/// Whether offset (dx, dy) from the centre is inside a shape of "radius" r.
fn inside(kind: usize, dx: f32, dy: f32, r: f32) -> bool {
    match kind {
        0 => dx * dx + dy * dy <= r * r,
        1 => dx.abs() <= 0.85 * r && dy.abs() <= 0.85 * r,
        2 => {
            // Apex up at -0.9 r, base at 0.8 r, half-width 0.95 r at the base.
            (-0.9 * r..=0.8 * r).contains(&dy) && dx.abs() <= 0.95 * r * (dy + 0.9 * r) / (1.7 * r)
        }
        _ => dx.abs() + dy.abs() <= r,
    }
}

/// Background, shapes with 2×2 supersampled coverage, then pixel noise.
fn render(scene: &Scene, side: u32, noise: u8, rng: &mut StdRng) -> RgbImage {
    let n = side as usize;
    let mut px = scene.background.repeat(n * n);
    for s in &scene.shapes {
        let lo = |c: f32| (c - s.r - 1.0).floor().max(0.0) as usize;
        let hi = |c: f32| ((c + s.r + 1.0).ceil().max(0.0) as usize).min(n);
        for py in lo(s.y)..hi(s.y) {
            for qx in lo(s.x)..hi(s.x) {
                let mut cover = 0u16;
                for (sx, sy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                    let dx = qx as f32 + sx - s.x;
                    let dy = py as f32 + sy - s.y;
                    cover += u16::from(inside(s.kind, dx, dy, s.r));
                }
                if cover > 0 {
                    let p = &mut px[(py * n + qx) * 3..][..3];
                    for (v, &fg) in p.iter_mut().zip(&s.rgb) {
                        let mix = u16::from(*v) * (4 - cover) + u16::from(fg) * cover;
                        *v = ((mix + 2) / 4) as u8;
                    }
                }
            }
        }
    }
    if noise > 0 {
        let a = i16::from(noise);
        for v in &mut px {
            *v = jitter(*v, a, rng);
        }
    }
    RgbImage::from_raw(side, side, px).expect("buffer is side × side × 3")
}

/// A caption: every shape and one relation between two of them.
fn caption(shapes: &[Shape], rng: &mut StdRng) -> String {
    let mut order: Vec<usize> = (0..shapes.len()).collect();
    order.shuffle(rng);
    let first = &shapes[order[0]];
    if shapes.len() == 1 {
        return format!("{} {}", first.phrase(), CELL_PHRASES[first.cell]);
    }
    let second = &shapes[order[1]];
    let mut relations = Vec::new();
    if first.row() != second.row() {
        relations.push(if first.row() < second.row() {
            "above"
        } else {
            "below"
        });
    }
    if first.col() != second.col() {
        relations.push(if first.col() < second.col() {
            "to the left of"
        } else {
            "to the right of"
        });
    }
    let relation = relations.choose(rng).expect("different cells");
    let mut text = format!("{} {relation} {}", first.phrase(), second.phrase());
    for &i in &order[2..] {
        text.push_str(&format!(
            " and {} {}",
            shapes[i].phrase(),
            CELL_PHRASES[shapes[i].cell]
        ));
    }
    text
}

/// One VQA item.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Qa {
    question: String,
    answer: String,
    question_type: &'static str,
    answer_type: &'static str,
}

fn count(shapes: &[Shape], f: impl Fn(&Shape) -> bool) -> usize {
    shapes.iter().filter(|s| f(s)).count()
}

/// Names shape i without its colour ("circle", "large circle") when that is unique.
fn name_without_color(shapes: &[Shape], i: usize) -> Option<String> {
    let t = shapes[i];
    if count(shapes, |s| s.kind == t.kind) == 1 {
        Some(SHAPES[t.kind].to_string())
    } else if count(shapes, |s| s.kind == t.kind && s.large == t.large) == 1 {
        Some(format!(
            "{} {}",
            SIZES[usize::from(t.large)],
            SHAPES[t.kind]
        ))
    } else {
        None
    }
}

/// Names shape i without its size: "circle" or "red circle" ((kind, colour) is unique).
fn name(shapes: &[Shape], i: usize) -> String {
    let t = shapes[i];
    if count(shapes, |s| s.kind == t.kind) == 1 {
        SHAPES[t.kind].to_string()
    } else {
        format!("{} {}", COLORS[t.color].0, SHAPES[t.kind])
    }
}

/// Colour, shape, size, count, position, relation, existence, colour yes/no.
const QUESTION_KINDS: usize = 8;

fn qa(
    question: String,
    answer: impl Into<String>,
    question_type: &'static str,
    answer_type: &'static str,
) -> Qa {
    Qa {
        question,
        answer: answer.into(),
        question_type,
        answer_type,
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// A question of kind `k` about the scene, if the scene allows one.
fn question(shapes: &[Shape], k: usize, rng: &mut StdRng) -> Option<Qa> {
    let n = shapes.len();
    let any = rng.random_range(0..n);
    match k {
        0 => {
            let named: Vec<(usize, String)> = (0..n)
                .filter_map(|i| name_without_color(shapes, i).map(|r| (i, r)))
                .collect();
            let (i, r) = named.choose(rng)?;
            Some(qa(
                format!("what color is the {r}?"),
                COLORS[shapes[*i].color].0,
                "what color is the",
                "other",
            ))
        }
        1 => {
            let unique: Vec<&Shape> = shapes
                .iter()
                .filter(|t| count(shapes, |s| s.color == t.color) == 1)
                .collect();
            let t = unique.choose(rng)?;
            Some(qa(
                format!("what shape is the {} object?", COLORS[t.color].0),
                SHAPES[t.kind],
                "what shape is the",
                "other",
            ))
        }
        2 => Some(qa(
            format!("what size is the {}?", name(shapes, any)),
            SIZES[usize::from(shapes[any].large)],
            "what size is the",
            "other",
        )),
        3 => {
            // Half the colour / shape counts ask about something present, so 0 is no default.
            let present = rng.random_bool(0.5);
            match rng.random_range(0..3) {
                0 => Some(qa(
                    "how many shapes are there?".into(),
                    n.to_string(),
                    "how many",
                    "number",
                )),
                1 => {
                    let c = if present {
                        shapes[any].color
                    } else {
                        rng.random_range(0..COLORS.len())
                    };
                    Some(qa(
                        format!("how many {} shapes are there?", COLORS[c].0),
                        count(shapes, |s| s.color == c).to_string(),
                        "how many",
                        "number",
                    ))
                }
                _ => {
                    let k = if present {
                        shapes[any].kind
                    } else {
                        rng.random_range(0..SHAPES.len())
                    };
                    Some(qa(
                        format!("how many {} are there?", PLURALS[k]),
                        count(shapes, |s| s.kind == k).to_string(),
                        "how many",
                        "number",
                    ))
                }
            }
        }
        4 => Some(qa(
            format!("where is the {}?", name(shapes, any)),
            CELLS[shapes[any].cell],
            "where is the",
            "other",
        )),
        5 => {
            if n < 2 {
                return None;
            }
            let pair = rand::seq::index::sample(rng, n, 2).into_vec();
            let (a, b) = (&shapes[pair[0]], &shapes[pair[1]]);
            // Only along an axis where the cells differ: never ambiguous.
            let mut options = Vec::new();
            if a.row() != b.row() {
                options.push(("above", a.row() < b.row()));
                options.push(("below", a.row() > b.row()));
            }
            if a.col() != b.col() {
                options.push(("left of", a.col() < b.col()));
                options.push(("right of", a.col() > b.col()));
            }
            let (relation, truth) = options.choose(rng).expect("different cells");
            Some(qa(
                format!(
                    "is the {} {relation} the {}?",
                    name(shapes, pair[0]),
                    name(shapes, pair[1])
                ),
                yes_no(*truth),
                "is the",
                "yes/no",
            ))
        }
        6 => {
            let (kind, color) = if rng.random_bool(0.5) {
                (shapes[any].kind, shapes[any].color)
            } else {
                let absent: Vec<(usize, usize)> = (0..SHAPES.len())
                    .flat_map(|k| (0..COLORS.len()).map(move |c| (k, c)))
                    .filter(|&(k, c)| count(shapes, |s| s.kind == k && s.color == c) == 0)
                    .collect();
                *absent.choose(rng)?
            };
            let present = count(shapes, |s| s.kind == kind && s.color == color) > 0;
            Some(qa(
                format!(
                    "is there {} {} {}?",
                    if COLORS[color].0.starts_with('o') {
                        "an"
                    } else {
                        "a"
                    },
                    COLORS[color].0,
                    SHAPES[kind]
                ),
                yes_no(present),
                "is there",
                "yes/no",
            ))
        }
        _ => {
            let named: Vec<(usize, String)> = (0..n)
                .filter_map(|i| name_without_color(shapes, i).map(|r| (i, r)))
                .collect();
            let (i, r) = named.choose(rng)?;
            let actual = shapes[*i].color;
            let asked = if rng.random_bool(0.5) {
                actual
            } else {
                (actual + rng.random_range(1..COLORS.len())) % COLORS.len()
            };
            Some(qa(
                format!("is the {r} {}?", COLORS[asked].0),
                yes_no(asked == actual),
                "is the",
                "yes/no",
            ))
        }
    }
}

/// Distinct questions of randomly chosen kinds.
fn questions(shapes: &[Shape], want: usize, rng: &mut StdRng) -> Vec<Qa> {
    let mut out: Vec<Qa> = Vec::with_capacity(want);
    for _ in 0..want * 50 {
        if out.len() == want {
            break;
        }
        let k = rng.random_range(0..QUESTION_KINDS);
        if let Some(q) = question(shapes, k, rng)
            && !out.iter().any(|o| o.question == q.question)
        {
            out.push(q);
        }
    }
    out
}

/// Distinct captions, at most `want`.
fn captions(shapes: &[Shape], want: usize, rng: &mut StdRng) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(want);
    for _ in 0..want * 10 {
        if out.len() == want {
            break;
        }
        let c = caption(shapes, rng);
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// Every possible answer.
fn answer_list(cfg: &ShapesConfig) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    a.extend(COLORS.iter().map(|(c, _)| c.to_string()));
    a.extend(SHAPES.iter().map(|s| s.to_string()));
    a.extend(SIZES.iter().map(|s| s.to_string()));
    a.extend((0..=cfg.max_shapes).map(|n| n.to_string()));
    a.extend(CELLS.iter().map(|s| s.to_string()));
    a.extend(["yes".to_string(), "no".to_string()]);
    a
}

/// One generated image and its texts.
struct Item {
    image: String,
    image_id: i64,
    scene: Scene,
    captions: Vec<String>,
    qas: Vec<Qa>,
}

fn io_err(path: &Path, error: std::io::Error) -> DataError {
    DataError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn make_item(cfg: &ShapesConfig, split: usize, index: usize, images_dir: &Path) -> Result<Item> {
    let (name, code) = SPLITS[split];
    let mut rng = item_rng(cfg.seed, STREAM_SCENE + code, index as u64);
    let layout = (0..MAX_DRAWS)
        .map(|_| sample_layout(cfg, &mut rng))
        .find(|l| layout_split(cfg.seed, l) == split)
        .ok_or_else(|| {
            DataError::Input(format!(
                "shapes: no {name} scene found for image {index} in {MAX_DRAWS} draws"
            ))
        })?;
    let scene = place(cfg, &layout, &mut rng);
    let img = render(&scene, cfg.image_size, cfg.noise, &mut rng);
    let file = format!("{index:06}.png");
    let path = images_dir.join(&file);
    let mut png = Vec::new();
    ::image::codecs::png::PngEncoder::new(&mut png)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ::image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| io_err(&path, std::io::Error::other(e.to_string())))?;
    std::fs::write(&path, png).map_err(|e| io_err(&path, e))?;
    let mut text_rng = item_rng(cfg.seed, STREAM_TEXT + code, index as u64);
    let captions = captions(&scene.shapes, cfg.captions_per_image, &mut text_rng);
    let qas = questions(&scene.shapes, cfg.questions_per_image, &mut text_rng);
    Ok(Item {
        image: format!("{name}/{file}"),
        image_id: code as i64 * ID_BASE + index as i64,
        scene,
        captions,
        qas,
    })
}

fn write_json(path: &Path, value: &impl Serialize, pretty: bool) -> Result<()> {
    let mut bytes = if pretty {
        serde_json::to_vec_pretty(value)
    } else {
        serde_json::to_vec(value)
    }
    .map_err(|e| DataError::Json {
        path: path.to_path_buf(),
        error: e,
    })?;
    if pretty {
        bytes.push(b'\n');
    }
    std::fs::write(path, bytes).map_err(|e| io_err(path, e))
}

fn round2(v: f32) -> f64 {
    (f64::from(v) * 100.0).round() / 100.0
}

/// The annotation files of one split.
fn write_split(dir: &Path, name: &str, items: &[Item]) -> Result<SplitSummary> {
    let file = |kind: &str| dir.join(format!("{kind}.json"));
    let mut caption_list = Vec::new();
    let mut caption_eval = Vec::new();
    let mut coco_images = Vec::new();
    let mut coco_anns = Vec::new();
    let mut vqa_train = Vec::new();
    let mut vqa_eval = Vec::new();
    let mut questions = Vec::new();
    let mut annotations = Vec::new();
    let mut scenes = Vec::new();
    for it in items {
        for c in &it.captions {
            caption_list.push(json!({
                "caption": c, "image": it.image, "image_id": format!("shapes_{}", it.image_id)
            }));
            coco_anns.push(json!({
                "caption": c, "id": coco_anns.len() + 1, "image_id": it.image_id
            }));
        }
        caption_eval
            .push(json!({"caption": it.captions, "image": it.image, "img_id": it.image_id}));
        coco_images.push(json!({"file_name": it.image, "id": it.image_id}));
        for (k, q) in it.qas.iter().enumerate() {
            let qid = it.image_id * 10 + k as i64;
            vqa_train.push(json!({
                "answer": vec![&q.answer; ANSWERS_PER_QUESTION],
                "dataset": "shapes",
                "image": it.image,
                "question": q.question,
                "question_id": qid,
            }));
            vqa_eval.push(json!({
                "image": it.image,
                "instance_id": qid.to_string(),
                "question": q.question,
                "question_id": qid,
            }));
            questions
                .push(json!({"image_id": it.image_id, "question": q.question, "question_id": qid}));
            let answers: Vec<Value> = (1..=ANSWERS_PER_QUESTION)
                .map(|id| json!({"answer": q.answer, "answer_confidence": "yes", "answer_id": id}))
                .collect();
            annotations.push(json!({
                "answer_type": q.answer_type,
                "answers": answers,
                "image_id": it.image_id,
                "multiple_choice_answer": q.answer,
                "question_id": qid,
                "question_type": q.question_type,
            }));
        }
        let shapes: Vec<Value> = it
            .scene
            .shapes
            .iter()
            .map(|s| {
                json!({
                    "cell": CELLS[s.cell],
                    "color": COLORS[s.color].0,
                    "radius": round2(s.r),
                    "rgb": s.rgb,
                    "shape": SHAPES[s.kind],
                    "size": SIZES[usize::from(s.large)],
                    "x": round2(s.x),
                    "y": round2(s.y),
                })
            })
            .collect();
        scenes.push(json!({
            "background": it.scene.background,
            "image": it.image,
            "image_id": it.image_id,
            "shapes": shapes,
        }));
    }
    let summary = SplitSummary {
        name: name.to_string(),
        images: items.len(),
        captions: caption_list.len(),
        questions: vqa_train.len(),
    };
    write_json(&file(&format!("caption_{name}")), &caption_list, false)?;
    write_json(&file(&format!("caption_{name}_eval")), &caption_eval, false)?;
    let gt = json!({
        "annotations": coco_anns,
        "images": coco_images,
        "info": {"description": format!("shapes {name}")},
        "licenses": [],
        "type": "captions",
    });
    write_json(&file(&format!("caption_{name}_gt")), &gt, false)?;
    write_json(&file(&format!("vqa_{name}")), &vqa_train, false)?;
    write_json(&file(&format!("vqa_{name}_eval")), &vqa_eval, false)?;
    let header = |key: &str, list: Vec<Value>| {
        json!({
            "data_subtype": name,
            "data_type": "shapes",
            "info": {},
            "license": {},
            key: list,
        })
    };
    let mut qfile = header("questions", questions);
    qfile["task_type"] = json!("Open-Ended");
    write_json(&file(&format!("vqa_{name}_questions")), &qfile, false)?;
    write_json(
        &file(&format!("vqa_{name}_annotations")),
        &header("annotations", annotations),
        false,
    )?;
    write_json(&file(&format!("scenes_{name}")), &scenes, false)?;
    Ok(summary)
}

fn added_token(id: usize, content: &str) -> Value {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true,
    })
}

fn template(pieces: &[(&str, bool, u32)]) -> Value {
    Value::Array(
        pieces
            .iter()
            .map(|&(id, special, type_id)| {
                let key = if special { "SpecialToken" } else { "Sequence" };
                json!({ key: {"id": id, "type_id": type_id} })
            })
            .collect(),
    )
}

/// A word-level `tokenizer.json`, validated and written as `tokenizers` serialises it.
fn tokenizer_json(
    specials: &[&str],
    trailing_special: Option<&str>,
    normalizer: Value,
    post_processor: Value,
    unk: &str,
    path: &Path,
) -> Result<(String, usize)> {
    let words = vocabulary();
    let mut tokens: Vec<&str> = specials.to_vec();
    tokens.extend(words.iter().map(String::as_str));
    tokens.extend(trailing_special);
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, t)| *i < specials.len() || Some(**t) == trailing_special)
        .map(|(i, t)| added_token(i, t))
        .collect();
    let value = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": post_processor,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": unk},
    });
    let err = |e: Box<dyn std::error::Error + Send + Sync>| DataError::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string().replace('\n', " "),
    };
    let tok: tokenizers::Tokenizer = value.to_string().parse().map_err(err)?;
    Ok((tok.to_string(true).map_err(err)?, tokens.len()))
}

/// `tokenizer.json` (T5 style) and `qformer_tokenizer/` (BERT style); returns vocab sizes.
fn write_tokenizers(root: &Path) -> Result<(usize, usize)> {
    let special = |id: &str, ids: Vec<usize>| json!({"id": id, "ids": ids, "tokens": [id]});
    let t5_path = root.join("tokenizer.json");
    let (t5, t5_size) = tokenizer_json(
        &T5_SPECIALS,
        Some(IMAGE_TOKEN),
        json!({"type": "Lowercase"}),
        json!({
            "type": "TemplateProcessing",
            "single": template(&[("A", false, 0), ("</s>", true, 0)]),
            "pair": template(&[("A", false, 0), ("</s>", true, 0), ("B", false, 0), ("</s>", true, 0)]),
            "special_tokens": {"</s>": special("</s>", vec![1])},
        }),
        "<unk>",
        &t5_path,
    )?;
    std::fs::write(&t5_path, t5 + "\n").map_err(|e| io_err(&t5_path, e))?;
    write_json(
        &root.join("tokenizer_config.json"),
        &json!({
            "eos_token": "</s>",
            "model_max_length": 512,
            "pad_token": "<pad>",
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": "<unk>",
        }),
        true,
    )?;
    let qdir = root.join("qformer_tokenizer");
    std::fs::create_dir(&qdir).map_err(|e| io_err(&qdir, e))?;
    let q_path = qdir.join("tokenizer.json");
    let (q, q_size) = tokenizer_json(
        &QFORMER_SPECIALS,
        None,
        json!({
            "type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true,
        }),
        json!({
            "type": "TemplateProcessing",
            "single": template(&[("[CLS]", true, 0), ("A", false, 0), ("[SEP]", true, 0)]),
            "pair": template(&[
                ("[CLS]", true, 0), ("A", false, 0), ("[SEP]", true, 0),
                ("B", false, 1), ("[SEP]", true, 1),
            ]),
            "special_tokens": {
                "[CLS]": special("[CLS]", vec![2]),
                "[SEP]": special("[SEP]", vec![3]),
            },
        }),
        "[UNK]",
        &q_path,
    )?;
    std::fs::write(&q_path, q + "\n").map_err(|e| io_err(&q_path, e))?;
    write_json(
        &qdir.join("tokenizer_config.json"),
        &json!({
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
            "model_max_length": 512,
            "pad_token": "[PAD]",
            "sep_token": "[SEP]",
            "tokenizer_class": "PreTrainedTokenizerFast",
            "truncation_side": "left",
            "unk_token": "[UNK]",
        }),
        true,
    )?;
    Ok((t5_size, q_size))
}

fn write_all(cfg: &ShapesConfig, root: &Path) -> Result<ShapesSummary> {
    let (vocab_size, qformer_vocab_size) = write_tokenizers(root)?;
    let side = cfg.model_size();
    write_json(
        &root.join("preprocessor_config.json"),
        &json!({
            "do_convert_rgb": true,
            "do_normalize": true,
            "do_rescale": true,
            "do_resize": true,
            "image_mean": MEAN,
            "image_processor_type": "BlipImageProcessor",
            "image_std": STD,
            "resample": 3,
            "rescale_factor": 1.0 / 255.0,
            "size": {"height": side, "width": side},
        }),
        true,
    )?;
    let ann_dir = root.join("annotations");
    std::fs::create_dir(&ann_dir).map_err(|e| io_err(&ann_dir, e))?;
    let mut splits = Vec::new();
    for (split, n) in [cfg.train, cfg.val, cfg.test].into_iter().enumerate() {
        if n == 0 {
            continue;
        }
        let name = SPLITS[split].0;
        let images_dir = root.join("images").join(name);
        std::fs::create_dir_all(&images_dir).map_err(|e| io_err(&images_dir, e))?;
        let items: Vec<Item> = (0..n)
            .into_par_iter()
            .map(|i| make_item(cfg, split, i, &images_dir))
            .collect::<Result<_>>()?;
        splits.push(write_split(&ann_dir, name, &items)?);
    }
    let answers = answer_list(cfg);
    write_json(&ann_dir.join("answer_list.json"), &answers, true)?;
    let summary = ShapesSummary {
        out_dir: PathBuf::new(),
        version: 1,
        config: cfg.clone(),
        splits,
        vocab_size,
        qformer_vocab_size,
        image_token_id: (vocab_size - 1) as u32,
        answers: answers.len(),
    };
    write_json(&root.join("shapes.json"), &summary, true)?;
    Ok(summary)
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Generates the dataset into `out_dir`, which must not exist (or be an empty directory).
/// Everything is written to a temporary sibling directory first and renamed at the end.
pub fn generate(config: &ShapesConfig, out_dir: &Path) -> Result<ShapesSummary> {
    config.validate()?;
    let exists = |msg: &str| {
        Err(io_err(
            out_dir,
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, msg),
        ))
    };
    let mut replace_empty = false;
    if out_dir.is_dir() {
        let mut entries = std::fs::read_dir(out_dir).map_err(|e| io_err(out_dir, e))?;
        if entries.next().is_some() {
            return exists("already exists and is not empty; choose a new output directory");
        }
        replace_empty = true;
    } else if out_dir.exists() {
        return exists("exists and is not a directory");
    }
    let name = out_dir
        .file_name()
        .ok_or_else(|| io_err(out_dir, std::io::Error::other("not a directory name")))?;
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| io_err(&parent, e))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
    let result = write_all(config, &tmp).and_then(|summary| {
        if replace_empty {
            std::fs::remove_dir(out_dir).map_err(|e| io_err(out_dir, e))?;
        }
        std::fs::rename(&tmp, out_dir).map_err(|e| io_err(out_dir, e))?;
        Ok(summary)
    });
    match result {
        Ok(mut summary) => {
            summary.out_dir = out_dir.to_path_buf();
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn scene(shapes: &[(usize, usize, usize, bool)]) -> Vec<Shape> {
        let cfg = ShapesConfig::default();
        let mut rng = item_rng(0, 0, 0);
        place(&cfg, &shapes.to_vec(), &mut rng).shapes
    }

    #[test]
    fn answers_follow_the_scene() {
        // red large circle top left, blue small circle bottom right, green square center.
        let s = scene(&[(0, 0, 0, true), (4, 1, 1, false), (8, 0, 2, false)]);
        let mut rng = item_rng(1, 0, 0);
        let mut checked = HashSet::new();
        for _ in 0..500 {
            for k in 0..QUESTION_KINDS {
                let Some(q) = question(&s, k, &mut rng) else {
                    continue;
                };
                let expect = match q.question.as_str() {
                    "what color is the square?" => "green",
                    "what color is the large circle?" => "red",
                    "what color is the small circle?" => "blue",
                    "what shape is the red object?" | "what shape is the blue object?" => "circle",
                    "how many shapes are there?" => "3",
                    "how many circles are there?" => "2",
                    "how many red shapes are there?" => "1",
                    "where is the square?" => "center",
                    "where is the red circle?" => "top left",
                    "is the red circle above the blue circle?" => "yes",
                    "is the square left of the red circle?" => "no",
                    "is the blue circle right of the square?" => "yes",
                    "is there a green square?" => "yes",
                    "is there a green circle?" | "is there an orange circle?" => "no",
                    "is the square green?" => "yes",
                    "is the square red?" => "no",
                    "what size is the red circle?" => "large",
                    _ => continue,
                };
                assert_eq!(q.answer, expect, "{}", q.question);
                checked.insert(q.question);
            }
        }
        assert!(checked.len() >= 15, "{checked:?}");
        // No question names a circle by kind alone, nor asks left/right of a same-column pair.
        for _ in 0..500 {
            for k in 0..QUESTION_KINDS {
                if let Some(q) = question(&s, k, &mut rng) {
                    assert!(!q.question.contains("the circle"), "{}", q.question);
                }
            }
        }
    }

    #[test]
    fn shapes_stay_in_their_cells_and_render() {
        let cfg = ShapesConfig::default();
        for i in 0..200 {
            let mut rng = item_rng(3, 9, i);
            let layout = sample_layout(&cfg, &mut rng);
            let sc = place(&cfg, &layout, &mut rng);
            let cell = cfg.image_size as f32 / 3.0;
            for s in &sc.shapes {
                let (cx, cy) = (s.col() as f32 * cell, s.row() as f32 * cell);
                assert!(s.x - s.r >= cx + 0.99 && s.x + s.r <= cx + cell - 0.99);
                assert!(s.y - s.r >= cy + 0.99 && s.y + s.r <= cy + cell - 0.99);
            }
            let img = render(&sc, cfg.image_size, 0, &mut rng);
            for s in &sc.shapes {
                assert_eq!(img.get_pixel(s.x as u32, s.y as u32).0, s.rgb);
            }
            assert_eq!(img.get_pixel(0, 0).0, sc.background);
        }
    }

    #[test]
    fn captions_name_every_shape() {
        let s = scene(&[(0, 0, 0, true), (5, 2, 3, false), (7, 3, 4, false)]);
        let mut rng = item_rng(0, 1, 2);
        let caps = captions(&s, 10, &mut rng);
        assert!(caps.len() > 1);
        for c in &caps {
            for p in [
                "a large red circle",
                "a small yellow triangle",
                "a small purple diamond",
            ] {
                assert!(c.contains(p), "{c}");
            }
        }
        let one = scene(&[(2, 1, 5, false)]);
        assert_eq!(
            captions(&one, 3, &mut rng),
            ["a small orange square in the top right corner"]
        );
    }

    #[test]
    fn vocabulary_is_distinct_and_covers_the_prompts() {
        let v = vocabulary();
        let set: HashSet<&str> = v.iter().map(String::as_str).collect();
        assert_eq!(set.len(), v.len());
        for w in ["question", "short", "answer", "photo", "of", "a", ":", "?"] {
            assert!(set.contains(w), "{w}");
        }
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (
                ShapesConfig {
                    image_size: 8,
                    ..Default::default()
                },
                "`image_size` is 8",
            ),
            (
                ShapesConfig {
                    min_shapes: 3,
                    max_shapes: 2,
                    ..Default::default()
                },
                "`max_shapes` is 2",
            ),
            (
                ShapesConfig {
                    train: 0,
                    val: 0,
                    test: 0,
                    ..Default::default()
                },
                "`train`",
            ),
            (
                ShapesConfig {
                    questions_per_image: 11,
                    ..Default::default()
                },
                "`questions_per_image`",
            ),
        ];
        for (cfg, want) in cases {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{e}");
        }
        let e = serde_json::from_str::<ShapesConfig>(r#"{"img_size": 64}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("img_size"), "{e}");
    }
}

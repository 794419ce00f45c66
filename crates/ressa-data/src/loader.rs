//! A batching loader: images are decoded and preprocessed on a background thread (with a
//! small pool of workers) while the caller runs the model, and texts are tokenized, padded and
//! masked there too. Batches come out in example order, at most `prefetch` of them ahead.
//!
//! Bad images (missing files, corrupt JPEG/PNG) either stop the loader with a one-line error
//! ([`BadImages::Fail`], the default) or are left out and counted ([`BadImages::Skip`]); the
//! caller reads [`Loader::skipped`] / [`Loader::skipped_items`] at the end and reports them.
//! With skipping, batches are refilled from the following examples, so every batch but the
//! last still has `batch_size` items.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rayon::prelude::*;

use crate::augment::TrainTransform;
use crate::error::{DataError, Result};
use crate::image::{ImageProcessorConfig, load_rgb};
use crate::rng::{item_rng, stream};
use crate::text::{Batch as TokenBatch, TextTokenizer};

/// One item: an image and its texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub image: PathBuf,
    /// The prompt / instruction / caption prefix (T5 encoder input, and the Q-Former's).
    pub text_input: String,
    /// The target text (calibration and training), when there is one.
    pub text_output: Option<String>,
}

/// How images become pixel values.
#[derive(Debug, Clone)]
pub enum ImageTransform {
    /// Resize + rescale + normalise, as the HF processor (evaluation).
    Eval(ImageProcessorConfig),
    /// Random resized crop + flip, seeded per example index (and epoch) (training and the
    /// reference's calibration).
    Train {
        transform: TrainTransform,
        seed: u64,
        epoch: u64,
    },
}

impl ImageTransform {
    /// Pixel values [3, H, W] and (H, W) of example `index`.
    pub fn apply(&self, img: &image::RgbImage, index: usize) -> (Vec<f32>, (usize, usize)) {
        match self {
            ImageTransform::Eval(p) => {
                let v = p.preprocess(img);
                let size = if p.do_resize {
                    p.output_size()
                } else {
                    (img.height() as usize, img.width() as usize)
                };
                (v, size)
            }
            ImageTransform::Train {
                transform,
                seed,
                epoch,
            } => {
                let mut rng = item_rng(
                    seed.wrapping_add(epoch.wrapping_mul(0x1000_0000_01B3)),
                    stream::AUGMENT,
                    index as u64,
                );
                (transform.apply(img, &mut rng), transform.size)
            }
        }
    }
}

/// A tokenizer and its padding id.
#[derive(Clone)]
pub struct TextEncoder {
    pub tokenizer: Arc<TextTokenizer>,
    pub pad: u32,
}

/// Which texts to tokenize: `input` (T5), `qformer` (the same text through the Q-Former
/// tokenizer, InstructBLIP), `output` (targets). `None` skips that field.
#[derive(Clone, Default)]
pub struct Texts {
    pub input: Option<TextEncoder>,
    pub qformer: Option<TextEncoder>,
    pub output: Option<TextEncoder>,
}

/// What to do with an image that cannot be read or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadImages {
    /// Stop with the error.
    #[default]
    Fail,
    /// Leave the example out and count it.
    Skip,
}

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// Decoding threads (0 = the number of CPUs).
    pub threads: usize,
    pub bad_images: BadImages,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            prefetch: 2,
            threads: 0,
            bad_images: BadImages::Fail,
        }
    }
}

/// A batch: pixel values [B, 3, H, W] row-major and the padded texts.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Example index of each row.
    pub indices: Vec<usize>,
    pub pixel_values: Vec<f32>,
    /// (H, W) of every image.
    pub image_size: (usize, usize),
    pub input: Option<TokenBatch>,
    pub qformer: Option<TokenBatch>,
    pub output: Option<TokenBatch>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// An example left out by [`BadImages::Skip`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedItem {
    pub index: usize,
    pub image: PathBuf,
    /// The one-line error.
    pub reason: String,
}

/// The background loader; iterate it for batches.
pub struct Loader {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    skipped: Arc<Mutex<Vec<SkippedItem>>>,
    len: usize,
    batch_size: usize,
}

impl Loader {
    /// Starts the background thread over `examples`.
    pub fn new(
        examples: Vec<Example>,
        transform: ImageTransform,
        texts: Texts,
        cfg: LoaderConfig,
    ) -> Result<Self> {
        Self::starting_at(examples, transform, texts, cfg, 0)
    }

    /// Like [`Loader::new`], but the first batch starts at example `first` (a resumed run):
    /// earlier examples are not decoded, and the later ones get the same augmentation as in
    /// a full pass (it is seeded by the example's index in `examples`).
    pub fn starting_at(
        examples: Vec<Example>,
        transform: ImageTransform,
        texts: Texts,
        cfg: LoaderConfig,
        first: usize,
    ) -> Result<Self> {
        Self::start(examples, None, transform, texts, cfg, first)
    }

    /// A loader over part of a larger list (a data-parallel peer's rows): example `k` is item
    /// `global[k]` of that list, and its augmentation is seeded by `global[k]`, so every image
    /// gets the pixels a loader over the whole list gives it. [`Batch::indices`] stay indices
    /// into `examples`.
    pub fn with_global_indices(
        examples: Vec<Example>,
        global: Vec<usize>,
        transform: ImageTransform,
        texts: Texts,
        cfg: LoaderConfig,
    ) -> Result<Self> {
        if global.len() != examples.len() {
            return Err(DataError::Input(format!(
                "{} global indices for {} examples",
                global.len(),
                examples.len()
            )));
        }
        Self::start(examples, Some(global), transform, texts, cfg, 0)
    }

    fn start(
        examples: Vec<Example>,
        global: Option<Vec<usize>>,
        transform: ImageTransform,
        texts: Texts,
        cfg: LoaderConfig,
        first: usize,
    ) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(DataError::Input("batch size must be at least 1".into()));
        }
        if texts.output.is_some()
            && let Some(i) = examples.iter().position(|e| e.text_output.is_none())
        {
            return Err(DataError::Input(format!(
                "example {i} ({}) has no target text but the loader tokenizes targets",
                examples[i].image.display()
            )));
        }
        let threads = if cfg.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            cfg.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ressa-loader-{i}"))
            .build()
            .map_err(|e| DataError::Input(format!("cannot start loader threads: {e}")))?;
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let skipped = Arc::new(Mutex::new(Vec::new()));
        let len = examples.len();
        let batch_size = cfg.batch_size;
        let worker = Worker {
            first: first.min(len),
            examples,
            global,
            transform,
            texts,
            cfg,
            stop: Arc::clone(&stop),
            skipped: Arc::clone(&skipped),
        };
        let handle = std::thread::Builder::new()
            .name("ressa-loader".into())
            .spawn(move || pool.install(|| worker.run(&tx)))
            .map_err(|e| DataError::Input(format!("cannot start the loader thread: {e}")))?;
        Ok(Self {
            rx: Some(rx),
            handle: Some(handle),
            stop,
            skipped,
            len,
            batch_size,
        })
    }

    /// Number of examples given.
    pub fn num_examples(&self) -> usize {
        self.len
    }

    /// Upper bound on the number of batches (exact when nothing is skipped).
    pub fn num_batches(&self) -> usize {
        self.len.div_ceil(self.batch_size)
    }

    /// Examples skipped so far.
    pub fn skipped(&self) -> usize {
        self.skipped.lock().map_or(0, |s| s.len())
    }

    /// The skipped examples so far, in the order met.
    pub fn skipped_items(&self) -> Vec<SkippedItem> {
        self.skipped.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.rx.as_ref()?.recv().ok();
        if item.is_none() {
            // The worker finished; surface a panic in it as an error rather than silence.
            if let Some(h) = self.handle.take()
                && h.join().is_err()
            {
                self.rx = None;
                return Some(Err(DataError::Input("the loader thread panicked".into())));
            }
        }
        item
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a worker waiting to send.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct Worker {
    first: usize,
    examples: Vec<Example>,
    /// Seeding index of each example (default: its index in `examples`).
    global: Option<Vec<usize>>,
    transform: ImageTransform,
    texts: Texts,
    cfg: LoaderConfig,
    stop: Arc<AtomicBool>,
    skipped: Arc<Mutex<Vec<SkippedItem>>>,
}

/// Pixel values [3, H, W] and (H, W) of one image.
type Pixels = (Vec<f32>, (usize, usize));
/// An example index with its pixels.
type Decoded = (usize, Vec<f32>, (usize, usize));

impl Worker {
    fn run(&self, tx: &SyncSender<Result<Batch>>) {
        let bs = self.cfg.batch_size;
        let mut pending: Vec<Decoded> = Vec::with_capacity(2 * bs);
        let mut next = self.first;
        while next < self.examples.len() || !pending.is_empty() {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            // Decode the next `bs - pending` examples (in parallel) and refill the batch.
            if pending.len() < bs && next < self.examples.len() {
                let end = (next + bs - pending.len()).min(self.examples.len());
                let decoded: Vec<(usize, Result<Pixels>)> = (next..end)
                    .into_par_iter()
                    .map(|i| (i, self.decode(i)))
                    .collect();
                next = end;
                for (i, r) in decoded {
                    match r {
                        Ok((v, size)) => pending.push((i, v, size)),
                        Err(e) => match self.cfg.bad_images {
                            BadImages::Fail => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                            BadImages::Skip => {
                                if let Ok(mut s) = self.skipped.lock() {
                                    s.push(SkippedItem {
                                        index: i,
                                        image: self.examples[i].image.clone(),
                                        reason: e.to_string().replace(['\n', '\r'], " "),
                                    });
                                }
                            }
                        },
                    }
                }
                if pending.len() < bs && next < self.examples.len() {
                    continue;
                }
            }
            if pending.is_empty() {
                continue;
            }
            let take = pending.len().min(bs);
            let rows: Vec<Decoded> = pending.drain(..take).collect();
            let batch = self.assemble(rows);
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
                return;
            }
        }
    }

    fn decode(&self, i: usize) -> Result<Pixels> {
        let img = load_rgb(&self.examples[i].image)?;
        let seed_index = self.global.as_ref().map_or(i, |g| g[i]);
        Ok(self.transform.apply(&img, seed_index))
    }

    fn assemble(&self, rows: Vec<Decoded>) -> Result<Batch> {
        let size = rows[0].2;
        let mut pixel_values = Vec::with_capacity(rows.len() * rows[0].1.len());
        let mut indices = Vec::with_capacity(rows.len());
        for (i, v, s) in rows {
            if s != size {
                return Err(DataError::Input(format!(
                    "{}: image is {}x{} after preprocessing but others in its batch are {}x{}; \
                     enable resizing (do_resize) to batch images of different sizes",
                    self.examples[i].image.display(),
                    s.1,
                    s.0,
                    size.1,
                    size.0
                )));
            }
            pixel_values.extend_from_slice(&v);
            indices.push(i);
        }
        let encode = |enc: &Option<TextEncoder>, field: fn(&Example) -> &str| {
            enc.as_ref()
                .map(|e| {
                    let texts: Vec<&str> =
                        indices.iter().map(|&i| field(&self.examples[i])).collect();
                    e.tokenizer.encode_batch(&texts, e.pad)
                })
                .transpose()
        };
        Ok(Batch {
            input: encode(&self.texts.input, |e| &e.text_input)?,
            qformer: encode(&self.texts.qformer, |e| &e.text_input)?,
            output: encode(&self.texts.output, |e| {
                e.text_output.as_deref().unwrap_or_default()
            })?,
            indices,
            pixel_values,
            image_size: size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(dir: &std::path::Path, name: &str, w: u32, h: u32, seed: u8) -> PathBuf {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([x as u8 ^ seed, y as u8, seed.wrapping_mul(3)])
        });
        let p = dir.join(name);
        img.save(&p).unwrap();
        p
    }

    fn small_processor() -> ImageProcessorConfig {
        let mut p = ImageProcessorConfig::default();
        p.size.height = 8;
        p.size.width = 8;
        p
    }

    fn example(image: PathBuf) -> Example {
        Example {
            image,
            text_input: String::new(),
            text_output: None,
        }
    }

    #[test]
    fn batches_in_order_with_matching_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let examples: Vec<Example> = (0..7)
            .map(|i| {
                example(write_png(
                    dir.path(),
                    &format!("{i}.png"),
                    20 + i,
                    15,
                    i as u8,
                ))
            })
            .collect();
        let p = small_processor();
        let cfg = LoaderConfig {
            batch_size: 3,
            prefetch: 1,
            threads: 2,
            ..Default::default()
        };
        let loader = Loader::new(
            examples.clone(),
            ImageTransform::Eval(p.clone()),
            Texts::default(),
            cfg,
        )
        .unwrap();
        assert_eq!(loader.num_batches(), 3);
        let batches: Vec<Batch> = loader.map(|b| b.unwrap()).collect();
        assert_eq!(
            batches
                .iter()
                .map(|b| b.indices.clone())
                .collect::<Vec<_>>(),
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]
        );
        let per = 3 * 8 * 8;
        for b in &batches {
            assert_eq!(b.image_size, (8, 8));
            assert_eq!(b.pixel_values.len(), b.len() * per);
            for (row, &i) in b.indices.iter().enumerate() {
                let expected = p.preprocess(&load_rgb(&examples[i].image).unwrap());
                assert_eq!(&b.pixel_values[row * per..(row + 1) * per], &expected[..]);
            }
        }
    }

    #[test]
    fn bad_images_fail_or_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut examples: Vec<Example> = (0..5)
            .map(|i| example(write_png(dir.path(), &format!("{i}.png"), 10, 10, i as u8)))
            .collect();
        let corrupt = dir.path().join("corrupt.jpg");
        std::fs::write(&corrupt, b"\xff\xd8\xff\xe0 truncated").unwrap();
        examples.insert(1, example(dir.path().join("missing.jpg")));
        examples.insert(3, example(corrupt));
        let run = |bad: BadImages| {
            Loader::new(
                examples.clone(),
                ImageTransform::Eval(small_processor()),
                Texts::default(),
                LoaderConfig {
                    batch_size: 2,
                    bad_images: bad,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let mut failing = run(BadImages::Fail);
        let err = failing.next().unwrap().unwrap_err().to_string();
        assert!(err.contains("missing.jpg") && !err.contains('\n'), "{err}");
        assert!(failing.next().is_none());

        let mut skipping = run(BadImages::Skip);
        let batches: Vec<Vec<usize>> = skipping.by_ref().map(|b| b.unwrap().indices).collect();
        // Batches are refilled past the bad items: still two per batch.
        assert_eq!(batches, vec![vec![0, 2], vec![4, 5], vec![6]]);
        assert_eq!(skipping.skipped(), 2);
        let items = skipping.skipped_items();
        assert_eq!(items[0].index, 1);
        assert_eq!(items[1].index, 3);
        assert!(
            items[1].reason.contains("corrupt.jpg"),
            "{}",
            items[1].reason
        );
    }

    #[test]
    fn train_transform_is_seeded_per_index_and_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let examples: Vec<Example> = (0..4)
            .map(|i| example(write_png(dir.path(), &format!("{i}.png"), 40, 30, 7)))
            .collect();
        let train = |epoch, threads, batch_size| {
            let t = ImageTransform::Train {
                transform: TrainTransform::from_processor(&small_processor()),
                seed: 11,
                epoch,
            };
            let cfg = LoaderConfig {
                batch_size,
                threads,
                ..Default::default()
            };
            Loader::new(examples.clone(), t, Texts::default(), cfg)
                .unwrap()
                .flat_map(|b| b.unwrap().pixel_values)
                .collect::<Vec<f32>>()
        };
        let a = train(0, 1, 4);
        assert_eq!(a, train(0, 2, 3), "independent of threads and batching");
        assert_ne!(a, train(1, 1, 4), "a new epoch draws new crops");
        // Identical images, different indices: different crops.
        let per = 3 * 8 * 8;
        assert_ne!(a[..per], a[per..2 * per]);
    }

    #[test]
    fn a_subset_with_global_indices_gets_the_full_lists_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let examples: Vec<Example> = (0..6)
            .map(|i| example(write_png(dir.path(), &format!("{i}.png"), 40, 30, i as u8)))
            .collect();
        let t = ImageTransform::Train {
            transform: TrainTransform::from_processor(&small_processor()),
            seed: 5,
            epoch: 2,
        };
        let cfg = |batch_size| LoaderConfig {
            batch_size,
            ..Default::default()
        };
        let full: Vec<f32> = Loader::new(examples.clone(), t.clone(), Texts::default(), cfg(6))
            .unwrap()
            .flat_map(|b| b.unwrap().pixel_values)
            .collect();
        let per = 3 * 8 * 8;
        let rows = vec![1, 4, 5];
        let subset: Vec<Example> = rows.iter().map(|&i| examples[i].clone()).collect();
        let batches: Vec<Batch> = Loader::with_global_indices(
            subset.clone(),
            rows.clone(),
            t.clone(),
            Texts::default(),
            cfg(2),
        )
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
        assert_eq!(
            batches
                .iter()
                .map(|b| b.indices.clone())
                .collect::<Vec<_>>(),
            vec![vec![0, 1], vec![2]]
        );
        let got: Vec<f32> = batches.into_iter().flat_map(|b| b.pixel_values).collect();
        for (k, &i) in rows.iter().enumerate() {
            assert_eq!(
                got[k * per..(k + 1) * per],
                full[i * per..(i + 1) * per],
                "row {i}"
            );
        }
        assert!(Loader::with_global_indices(subset, vec![0], t, Texts::default(), cfg(2)).is_err());
    }

    #[test]
    fn dropping_a_loader_early_stops_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let examples: Vec<Example> = (0..40)
            .map(|i| example(write_png(dir.path(), &format!("{i}.png"), 12, 12, i as u8)))
            .collect();
        let mut loader = Loader::new(
            examples,
            ImageTransform::Eval(small_processor()),
            Texts::default(),
            LoaderConfig {
                batch_size: 1,
                prefetch: 1,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(loader.next().unwrap().is_ok());
        drop(loader); // must not hang
    }
}

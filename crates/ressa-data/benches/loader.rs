//! Loader throughput: images decoded and preprocessed per second (224 px output, the
//! InstructBLIP eval transform, from ~500 × 375 JPEGs written by the bench).
//!
//! `cargo bench -p ressa-data --bench loader` — criterion reports `elem/s` = images/s.
//! Groups: the eval transform on one thread (decode only, preprocess only, both), the loader
//! with 1 and 2 decoding threads (batch 8), and the training transform through the loader.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ressa_data::augment::TrainTransform;
use ressa_data::image::{ImageProcessorConfig, load_rgb};
use ressa_data::loader::{Example, ImageTransform, Loader, LoaderConfig, Texts};

const N: usize = 32;

/// A photo-like 500 × 375 image: smooth gradients, shapes and pixel noise (so the JPEG is not
/// trivially compressible), quality 90.
fn write_images(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..N)
        .map(|i| {
            let (w, h) = if i % 4 == 3 { (375, 500) } else { (500, 375) };
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let noise = (state % 24) as i32 - 12;
                let dx = x as i32 - (w as i32 / 2 + i as i32 * 3);
                let dy = y as i32 - h as i32 / 2;
                let disc = dx * dx + dy * dy < 90 * 90;
                let base = if disc {
                    [200, 60 + i as i32 * 4, 40]
                } else {
                    [
                        (x * 255 / w) as i32,
                        (y * 255 / h) as i32,
                        ((x + y) % 256) as i32,
                    ]
                };
                image::Rgb(base.map(|c| (c + noise).clamp(0, 255) as u8))
            });
            let p = dir.join(format!("img{i:03}.jpg"));
            let mut bytes = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
                .encode_image(&img)
                .unwrap();
            std::fs::write(&p, bytes).unwrap();
            p
        })
        .collect()
}

fn processor() -> ImageProcessorConfig {
    let mut p = ImageProcessorConfig::default();
    p.size.height = 224;
    p.size.width = 224;
    p
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_images(dir.path());
    let proc = processor();

    let mut g = c.benchmark_group("eval_transform_1_thread");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(6));
    g.bench_function("decode", |b| {
        b.iter(|| {
            for p in &paths {
                black_box(load_rgb(p).unwrap());
            }
        })
    });
    let decoded: Vec<_> = paths.iter().map(|p| load_rgb(p).unwrap()).collect();
    g.bench_function("preprocess_224", |b| {
        b.iter(|| {
            for img in &decoded {
                black_box(proc.preprocess(img));
            }
        })
    });
    g.bench_function("decode_and_preprocess_224", |b| {
        b.iter(|| {
            for p in &paths {
                black_box(proc.preprocess(&load_rgb(p).unwrap()));
            }
        })
    });
    g.finish();

    let examples: Vec<Example> = paths
        .iter()
        .map(|p| Example {
            image: p.clone(),
            text_input: String::new(),
            text_output: None,
        })
        .collect();
    let mut g = c.benchmark_group("loader_batch8");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(6));
    let transforms = [
        ("eval", ImageTransform::Eval(proc.clone())),
        (
            "train",
            ImageTransform::Train {
                transform: TrainTransform::from_processor(&proc),
                seed: 0,
                epoch: 0,
            },
        ),
    ];
    for (name, transform) in &transforms {
        for threads in [1, 2] {
            if *name == "train" && threads == 1 {
                continue;
            }
            g.bench_function(format!("{name}_{threads}_threads"), |b| {
                b.iter(|| {
                    let loader = Loader::new(
                        examples.clone(),
                        transform.clone(),
                        Texts::default(),
                        LoaderConfig {
                            batch_size: 8,
                            prefetch: 2,
                            threads,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                    for batch in loader {
                        black_box(batch.unwrap());
                    }
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! PIL bicubic when upscaling and at non-integer ratios: ressa's resize and preprocessing
//! against `tests/fixtures/resize/` (`scripts/make_resize_fixtures.py`: Pillow's
//! `Image.resize((W, H), Image.BICUBIC)` and transformers' `BlipImageProcessorPil`).
//! `image_parity.rs` covers only the fixture images' downscales.

use std::path::PathBuf;

use ressa_data::image::{ImageProcessorConfig, ImageSize, load_rgb, resize_bicubic};
use safetensors::{Dtype, SafeTensors};

/// Resized bytes must equal PIL's exactly; pixel values may differ by float rounding only.
const PIXEL_TOL: f32 = 1e-6;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/resize")
}

struct Case {
    src: String,
    input: (usize, usize),
    output: (usize, usize),
}

fn cases() -> Vec<Case> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("cases.json")).unwrap()).unwrap();
    let wh = |v: &serde_json::Value| {
        (
            v[0].as_u64().unwrap() as usize,
            v[1].as_u64().unwrap() as usize,
        )
    };
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            src: c["src"].as_str().unwrap().to_string(),
            input: wh(&c["in"]),
            output: wh(&c["out"]),
        })
        .collect()
}

#[test]
fn upscaling_and_non_integer_ratios_match_pil() {
    let bytes = std::fs::read(dir().join("resize.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let cases = cases();
    assert_eq!(cases.len(), 10);
    // Pillow ≥ 13 resizes these vertically first (the height shrinks by more than twice the width).
    let vertical_first = cases
        .iter()
        .filter(|c| {
            let dh = c.input.1 as i64 - c.output.1 as i64;
            dh > 0 && dh > 2 * (c.input.0 as i64 - c.output.0 as i64)
        })
        .count();
    assert_eq!(vertical_first, 3);
    let mut upscales = 0;
    for (i, c) in cases.iter().enumerate() {
        let (ow, oh) = c.output;
        let img = load_rgb(&dir().join(&c.src)).unwrap();
        assert_eq!(
            (img.width() as usize, img.height() as usize),
            c.input,
            "{}",
            c.src
        );
        if ow > c.input.0 || oh > c.input.1 {
            upscales += 1;
        }

        // The 8-bit resize, byte for byte.
        let pil = st.tensor(&format!("pil{i}")).unwrap();
        assert_eq!(pil.dtype(), Dtype::U8);
        assert_eq!(pil.shape(), [oh, ow, 3]);
        let ours = resize_bicubic(&img, ow, oh);
        let max_byte_diff = ours
            .as_raw()
            .iter()
            .zip(pil.data())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        let differing = ours
            .as_raw()
            .iter()
            .zip(pil.data())
            .filter(|(a, b)| a != b)
            .count();
        eprintln!(
            "{} {:?} -> {:?}: resize max byte diff {max_byte_diff} ({differing} bytes differ)",
            c.src, c.input, c.output
        );
        assert_eq!(
            differing, 0,
            "{}: {differing} bytes differ from PIL, max {max_byte_diff}",
            c.src
        );

        // The processor's pixel values [3, H, W].
        let cfg = ImageProcessorConfig {
            size: ImageSize {
                height: oh,
                width: ow,
            },
            ..Default::default()
        };
        let pv = st.tensor(&format!("pixel_values{i}")).unwrap();
        assert_eq!(pv.dtype(), Dtype::F32);
        assert_eq!(pv.shape(), [3, oh, ow]);
        let reference: Vec<f32> = pv
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let ours = cfg.preprocess(&img);
        assert_eq!(ours.len(), reference.len());
        let diff = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{}: pixel values max abs diff {diff:.2e}", c.src);
        assert!(
            diff <= PIXEL_TOL,
            "{}: pixel values differ by {diff}",
            c.src
        );
    }
    assert!(upscales >= 4, "fixture covers upscaling");
}

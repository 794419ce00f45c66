//! Pixel values equal to `transformers`' `BlipImageProcessor` (PIL backend) on the committed
//! fixture images (bicubic resize from 69/74/61 px down to 32/28 px).

use std::path::PathBuf;

use ressa_data::image::{ImageProcessorConfig, load_rgb};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

#[test]
fn pixel_values_match_blip_image_processor() {
    for (name, images) in [
        ("instructblip-t5-a", 2),
        ("instructblip-t5-b", 1),
        ("blip2-t5", 2),
    ] {
        let dir = fixture(name);
        let cfg = ImageProcessorConfig::from_file(&dir.join("preprocessor_config.json")).unwrap();
        let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("pixel_values").unwrap();
        let reference: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let per_image = reference.len() / images;
        for i in 0..images {
            let img = load_rgb(&dir.join(format!("image{i}.png"))).unwrap();
            let ours = cfg.preprocess(&img);
            assert_eq!(ours.len(), per_image);
            let diff = ours
                .iter()
                .zip(&reference[i * per_image..(i + 1) * per_image])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff <= 1e-6, "{name} image{i}: max abs diff {diff}");
        }
    }
}

#[test]
fn corrupt_image_is_a_one_line_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.png");
    std::fs::write(&path, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let err = load_rgb(&path).unwrap_err().to_string();
    assert!(err.contains("broken.png") && !err.contains('\n'), "{err}");
}

//! Image preprocessing as `transformers`' `BlipImageProcessor` and `CLIPImageProcessor` (PIL
//! backends) do it: convert to RGB, resize with PIL's bicubic filter (to `size.{height, width}`,
//! or the shortest edge to `size.shortest_edge` keeping the aspect ratio), center-crop to
//! `crop_size` when `do_center_crop`, rescale by 1/255, normalize with the config's mean and std,
//! channels first.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{DataError, Result};

/// `preprocessor_config.json` fields that matter for BLIP-style processors (HF defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    /// `{height, width}`; a `{shortest_edge: n}` file reads as n × n here and sets
    /// [`ImageProcessorConfig::shortest_edge`].
    pub size: ImageSize,
    /// CLIP: `size.shortest_edge`, the length the shorter side is resized to.
    #[serde(skip)]
    pub shortest_edge: Option<usize>,
    /// CLIP: crop the center `crop_size` after resizing.
    pub do_center_crop: bool,
    pub crop_size: Option<ImageSize>,
    /// PIL resampling filter id; 3 = bicubic (the only one implemented).
    pub resample: u32,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: Vec<f32>,
    pub image_std: Vec<f32>,
    pub do_convert_rgb: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawSize")]
pub struct ImageSize {
    pub height: usize,
    pub width: usize,
}

/// `size` as files spell it: `{height, width}` or `{shortest_edge}`.
#[derive(Deserialize)]
struct RawSize {
    height: Option<usize>,
    width: Option<usize>,
    shortest_edge: Option<usize>,
}

/// A `size` with neither `{height, width}` nor `{shortest_edge}`.
#[derive(Debug, thiserror::Error)]
#[error("expected `height` and `width`, or `shortest_edge`")]
pub struct SizeError;

impl TryFrom<RawSize> for ImageSize {
    type Error = SizeError;

    fn try_from(r: RawSize) -> std::result::Result<Self, SizeError> {
        match (r.height, r.width, r.shortest_edge) {
            (Some(height), Some(width), _) => Ok(Self { height, width }),
            (None, None, Some(s)) => Ok(Self {
                height: s,
                width: s,
            }),
            _ => Err(SizeError),
        }
    }
}

impl Default for ImageProcessorConfig {
    // OpenAI CLIP mean/std exactly as `transformers` spells them.
    #[allow(clippy::excessive_precision)]
    fn default() -> Self {
        Self {
            do_resize: true,
            size: ImageSize {
                height: 384,
                width: 384,
            },
            shortest_edge: None,
            do_center_crop: false,
            crop_size: None,
            resample: 3,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: vec![0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: vec![0.268_629_54, 0.261_302_6, 0.275_777_1],
            do_convert_rgb: true,
        }
    }
}

impl ImageProcessorConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| DataError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        // One parse: the typed config from the value, which also says whether `size` was
        // CLIP's `{shortest_edge}`.
        let raw: serde_json::Value = crate::error::parse_json(&text, path)?;
        let mut cfg: Self = crate::error::from_value(raw.clone(), path)?;
        cfg.shortest_edge = raw
            .get("size")
            .and_then(|s| s.get("shortest_edge"))
            .and_then(|s| s.as_u64())
            .filter(|_| raw["size"].get("height").is_none())
            .map(|s| s as usize);
        let field = |field: &str, message: String| DataError::Field {
            path: path.to_path_buf(),
            field: field.into(),
            message,
        };
        if cfg.do_resize && cfg.resample != 3 {
            return Err(field(
                "resample",
                format!(
                    "filter {} is not supported, expected 3 (bicubic)",
                    cfg.resample
                ),
            ));
        }
        if cfg.image_mean.len() != 3 || cfg.image_std.len() != 3 {
            return Err(field(
                "image_mean",
                "mean and std need 3 values (RGB)".into(),
            ));
        }
        if cfg.image_std.contains(&0.0) {
            return Err(field("image_std", "contains 0".into()));
        }
        if cfg.size.height == 0 || cfg.size.width == 0 {
            return Err(field("size", "height and width must be positive".into()));
        }
        let crop = cfg.crop_size.as_ref().filter(|_| cfg.do_center_crop);
        if let Some(c) = crop
            && (c.height == 0 || c.width == 0)
        {
            return Err(field(
                "crop_size",
                "height and width must be positive".into(),
            ));
        }
        if cfg.do_center_crop && cfg.crop_size.is_none() {
            return Err(field(
                "crop_size",
                "do_center_crop is set but crop_size is missing".into(),
            ));
        }
        if cfg.do_resize && cfg.shortest_edge.is_some() && crop.is_none() {
            return Err(field(
                "size",
                "shortest_edge without a center crop gives every image its own size; only \
                 shortest_edge + do_center_crop is supported"
                    .into(),
            ));
        }
        // The crop must fit inside every resized image (HF pads otherwise; not implemented).
        if let Some(c) = crop
            && cfg.do_resize
            && (c.height > cfg.size.height || c.width > cfg.size.width)
        {
            return Err(field(
                "crop_size",
                format!(
                    "{}×{} is larger than the resized image ({}×{} or its shortest edge)",
                    c.height, c.width, cfg.size.height, cfg.size.width
                ),
            ));
        }
        Ok(cfg)
    }

    /// Pixel values [3, H, W] (channels first) for one RGB image.
    pub fn preprocess(&self, img: &image::RgbImage) -> Vec<f32> {
        let resized;
        let img = if self.do_resize {
            let (w, h) = match self.shortest_edge {
                Some(s) => shortest_edge_size(img.width() as usize, img.height() as usize, s),
                None => (self.size.width, self.size.height),
            };
            resized = resize_bicubic(img, w, h);
            &resized
        } else {
            img
        };
        let cropped;
        let img = match self.crop_size.as_ref().filter(|_| self.do_center_crop) {
            Some(c) => {
                cropped = center_crop(img, c.width, c.height);
                &cropped
            }
            None => img,
        };
        let (w, h) = img.dimensions();
        let (w, h) = (w as usize, h as usize);
        let mut out = vec![0f32; 3 * h * w];
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                // numpy: float64 multiply, cast to float32; then float32 (x - mean) / std.
                let mut v = if self.do_rescale {
                    (p.0[c] as f64 * self.rescale_factor) as f32
                } else {
                    p.0[c] as f32
                };
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                out[c * h * w + y as usize * w + x as usize] = v;
            }
        }
        out
    }

    /// Output size (height, width): the crop when center-cropping, else `size`.
    pub fn output_size(&self) -> (usize, usize) {
        match self.crop_size.as_ref().filter(|_| self.do_center_crop) {
            Some(c) => (c.height, c.width),
            None => (self.size.height, self.size.width),
        }
    }

    /// [`ImageProcessorConfig::from_file`] for a vision model that takes `image_size` ×
    /// `image_size` pixels: a `size` that differs is an error naming the file and both sizes.
    pub fn from_file_for(path: &Path, image_size: usize) -> Result<Self> {
        let cfg = Self::from_file(path)?;
        if cfg.output_size() != (image_size, image_size) {
            return Err(DataError::Field {
                path: path.to_path_buf(),
                field: "size".into(),
                message: format!(
                    "{}×{} does not match the vision model's image_size {image_size}",
                    cfg.output_size().0,
                    cfg.output_size().1
                ),
            });
        }
        Ok(cfg)
    }
}

/// Decodes an image file (PNG, JPEG) to RGB; alpha is dropped as PIL's `convert("RGB")` does.
pub fn load_rgb(path: &Path) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).map_err(|error| DataError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let img = image::load_from_memory(&bytes).map_err(|e| DataError::Image {
        path: PathBuf::from(path),
        // Decoder messages may end in (or contain) newlines; errors stay on one line.
        message: e.to_string().replace(['\n', '\r'], " ").trim().to_string(),
    })?;
    Ok(img.to_rgb8())
}

/// (width, height) after resizing the shorter side of a `w` × `h` image to `s`, the longer to
/// `int(s · long / short)` (`transformers`' `get_resize_output_image_size`, not square).
pub fn shortest_edge_size(w: usize, h: usize, s: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = ((s * long) as f64 / short.max(1) as f64) as usize;
    if w <= h { (s, new_long) } else { (new_long, s) }
}

/// The center `cw` × `ch` of `img` (`transformers`' `center_crop`: top = (h − ch) // 2,
/// left = (w − cw) // 2); `cw`, `ch` at most the image's size.
pub fn center_crop(img: &image::RgbImage, cw: usize, ch: usize) -> image::RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (cw, ch) = (cw.min(w), ch.min(h));
    let (left, top) = ((w - cw) / 2, (h - ch) / 2);
    image::imageops::crop_imm(img, left as u32, top as u32, cw as u32, ch as u32).to_image()
}

/// Pillow's bicubic kernel (a = -0.5, support 2).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index and fixed-point weights (Pillow `precompute_coeffs` +
/// `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut k: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) / filterscale))
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|w| *w /= ww);
            }
            let one = (1u64 << PRECISION_BITS) as f64;
            let fixed = k
                .iter()
                .map(|&w| {
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One output pixel: Σ k_i · px_i over `taps` RGB pixels `stride` bytes apart, for the three
/// channels at once. Pillow accumulates in `int` too; |Σ| ≤ 255 · Σ|k| < 2^31 for the bicubic
/// kernel (Σ|k| ≤ 1.25 · 2^22), so i32 is exact.
#[inline(always)]
fn convolve3(src: &[u8], stride: usize, k: &[i32]) -> [u8; 3] {
    let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
    for (i, &w) in k.iter().enumerate() {
        let p = &src[i * stride..i * stride + 3];
        acc[0] += p[0] as i32 * w;
        acc[1] += p[1] as i32 * w;
        acc[2] += p[2] as i32 * w;
    }
    acc.map(clip8)
}

/// PIL-exact `Image.resize((w, h), BICUBIC)` for 8-bit RGB (Pillow 13): two passes with
/// fixed-point weights, clipped to 8 bits in between — horizontal then vertical, except when the
/// height shrinks by more than twice what the width shrinks, where Pillow ≥ 13 runs the vertical
/// pass first (`ImagingResampleInner`; Pillow ≤ 12 always went horizontal first).
pub fn resize_bicubic(img: &image::RgbImage, out_w: usize, out_h: usize) -> image::RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (shrink_w, shrink_h) = (in_w as i64 - out_w as i64, in_h as i64 - out_h as i64);
    let vertical_first = shrink_h > 0 && shrink_h > 2 * shrink_w;
    let src = img.as_raw().clone();
    let out = if vertical_first {
        let tmp = resize_vertical(src, in_w, in_h, out_h);
        resize_horizontal(tmp, in_w, out_h, out_w)
    } else {
        let tmp = resize_horizontal(src, in_w, in_h, out_w);
        resize_vertical(tmp, out_w, in_h, out_h)
    };
    image::RgbImage::from_raw(out_w as u32, out_h as u32, out).expect("buffer size")
}

/// Pillow's horizontal pass: `w` × `h` RGB bytes → `out_w` × `h` (none when the width stays).
fn resize_horizontal(src: Vec<u8>, w: usize, h: usize, out_w: usize) -> Vec<u8> {
    if out_w == w {
        return src;
    }
    let coeffs = coefficients(w, out_w);
    let mut out = vec![0u8; h * out_w * 3];
    for (row, out_row) in src.chunks_exact(w * 3).zip(out.chunks_exact_mut(out_w * 3)) {
        for ((xmin, k), px) in coeffs.iter().zip(out_row.chunks_exact_mut(3)) {
            px.copy_from_slice(&convolve3(&row[xmin * 3..], 3, k));
        }
    }
    out
}

/// Pillow's vertical pass: `w` × `h` RGB bytes → `w` × `out_h` (none when the height stays).
fn resize_vertical(src: Vec<u8>, w: usize, h: usize, out_h: usize) -> Vec<u8> {
    if out_h == h {
        return src;
    }
    let coeffs = coefficients(h, out_h);
    let stride = w * 3;
    let mut out = vec![0u8; out_h * stride];
    for ((ymin, k), out_row) in coeffs.iter().zip(out.chunks_exact_mut(stride)) {
        let column = &src[ymin * stride..];
        for (x, px) in out_row.chunks_exact_mut(3).enumerate() {
            px.copy_from_slice(&convolve3(&column[x * 3..], stride, k));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_keeps_the_aspect_ratio_and_the_crop_is_centered() {
        assert_eq!(shortest_edge_size(56, 37, 28), (42, 28));
        assert_eq!(shortest_edge_size(40, 61, 28), (28, 42));
        assert_eq!(shortest_edge_size(336, 336, 336), (336, 336));
        let img = image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let c = center_crop(&img, 2, 2);
        assert_eq!(c.dimensions(), (2, 2));
        assert_eq!(c.get_pixel(0, 0).0, [1, 1, 0]);
    }

    #[test]
    fn clip_configs_need_a_center_crop_with_shortest_edge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("preprocessor_config.json");
        std::fs::write(
            &path,
            r#"{"size": {"shortest_edge": 336}, "do_center_crop": true,
                "crop_size": {"height": 336, "width": 336}}"#,
        )
        .unwrap();
        let cfg = ImageProcessorConfig::from_file_for(&path, 336).unwrap();
        assert_eq!(
            (cfg.shortest_edge, cfg.output_size()),
            (Some(336), (336, 336))
        );
        std::fs::write(&path, r#"{"size": {"shortest_edge": 336}}"#).unwrap();
        let err = ImageProcessorConfig::from_file(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("size") && err.contains("center crop"), "{err}");
        std::fs::write(
            &path,
            r#"{"size": {"shortest_edge": 224}, "do_center_crop": true,
                "crop_size": {"height": 336, "width": 336}}"#,
        )
        .unwrap();
        let err = ImageProcessorConfig::from_file(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("crop_size"), "{err}");
    }

    #[test]
    fn identity_size_keeps_pixels() {
        let img =
            image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 50, 7]));
        assert_eq!(resize_bicubic(&img, 5, 4), img);
    }

    /// The straightforward per-channel i64 form of Pillow's two passes.
    fn reference_resize(img: &image::RgbImage, out_w: usize, out_h: usize) -> image::RgbImage {
        let (in_w, in_h) = (img.width() as usize, img.height() as usize);
        let src = img.as_raw();
        let clip = |acc: i64| (acc >> PRECISION_BITS).clamp(0, 255) as u8;
        let mut tmp = vec![0u8; in_h * out_w * 3];
        for y in 0..in_h {
            for (xx, (xmin, k)) in coefficients(in_w, out_w).iter().enumerate() {
                for c in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        acc += src[(y * in_w + xmin + i) * 3 + c] as i64 * w as i64;
                    }
                    tmp[(y * out_w + xx) * 3 + c] = clip(acc);
                }
            }
        }
        let mut out = vec![0u8; out_h * out_w * 3];
        for (yy, (ymin, k)) in coefficients(in_h, out_h).iter().enumerate() {
            for x in 0..out_w {
                for c in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        acc += tmp[((ymin + i) * out_w + x) * 3 + c] as i64 * w as i64;
                    }
                    out[(yy * out_w + x) * 3 + c] = clip(acc);
                }
            }
        }
        image::RgbImage::from_raw(out_w as u32, out_h as u32, out).unwrap()
    }

    #[test]
    fn fast_passes_equal_the_reference_form() {
        let mut state = 12345u32;
        for (w, h, ow, oh) in [
            (97, 61, 32, 32),
            (500, 375, 224, 224),
            (20, 30, 57, 41),
            (9, 9, 3, 17),
        ] {
            let img = image::RgbImage::from_fn(w, h, |_, _| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let b = state.to_le_bytes();
                // Extremes (0/255 edges) exercise the clipping.
                image::Rgb([
                    (b[3] & 0xf0) | ((b[3] >> 7) * 15),
                    b[2],
                    if b[1] > 128 { 255 } else { 0 },
                ])
            });
            assert_eq!(
                resize_bicubic(&img, ow as usize, oh as usize),
                reference_resize(&img, ow as usize, oh as usize),
                "{w}x{h} -> {ow}x{oh}"
            );
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = image::RgbImage::from_pixel(37, 23, image::Rgb([200, 13, 99]));
        let out = resize_bicubic(&img, 16, 11);
        assert!(out.pixels().all(|p| p.0 == [200, 13, 99]));
    }
}

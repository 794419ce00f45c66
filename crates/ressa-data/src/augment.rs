//! The training image transform of LAVIS' `blip2_image_train` (reference §6): torchvision
//! `RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3), interpolation=BICUBIC)`, then
//! `RandomHorizontalFlip()`, then `ToTensor` + `Normalize` with the processor's mean and std.
//!
//! The crop box follows torchvision's `RandomResizedCrop.get_params` step for step (ten
//! attempts with a log-uniform aspect ratio, Python's round-half-even, the centre-crop
//! fallback); the crop is resized with the PIL-exact bicubic of [`crate::image`], as
//! torchvision does on PIL images (`img.crop(box).resize(size, BICUBIC)`). Randomness comes
//! from a per-item seeded stream ([`crate::rng::item_rng`]); torch's generator is not
//! reproduced, so the boxes differ from a Python run's while having the same distribution.

use image::RgbImage;
use rand::Rng;

use crate::image::{ImageProcessorConfig, resize_bicubic};

/// A crop box in pixels: left `x`, top `y`, width, height.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// Random resized crop + horizontal flip + normalisation.
#[derive(Debug, Clone)]
pub struct TrainTransform {
    /// Output (height, width).
    pub size: (usize, usize),
    /// Fraction of the image area the crop covers, drawn uniformly.
    pub scale: (f64, f64),
    /// Aspect ratio (width / height) range, drawn log-uniformly.
    pub ratio: (f64, f64),
    /// Probability of a horizontal flip.
    pub flip_p: f64,
    /// Rescale and normalisation (its resize settings are not used).
    pub processor: ImageProcessorConfig,
}

impl TrainTransform {
    /// LAVIS' `blip2_image_train` at the processor's output size: scale (0.5, 1.0), ratio
    /// (3/4, 4/3), flip with probability 0.5, the processor's mean and std.
    pub fn from_processor(processor: &ImageProcessorConfig) -> Self {
        let mut p = processor.clone();
        p.do_resize = false;
        Self {
            size: processor.output_size(),
            scale: (0.5, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
            processor: p,
        }
    }

    /// torchvision's `RandomResizedCrop.get_params` for an image of `width` × `height`.
    pub fn crop_box<R: Rng + ?Sized>(&self, width: u32, height: u32, rng: &mut R) -> CropBox {
        let (wf, hf) = (width as f64, height as f64);
        let area = wf * hf;
        let (log_lo, log_hi) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * uniform(rng, self.scale.0, self.scale.1);
            let aspect = uniform(rng, log_lo, log_hi).exp();
            let w = (target_area * aspect).sqrt().round_ties_even();
            let h = (target_area / aspect).sqrt().round_ties_even();
            if w > 0.0 && w <= wf && h > 0.0 && h <= hf {
                let (w, h) = (w as u32, h as u32);
                // torch.randint(0, height - h + 1): upper bound exclusive.
                let y = rng.random_range(0..=height - h);
                let x = rng.random_range(0..=width - w);
                return CropBox {
                    x,
                    y,
                    width: w,
                    height: h,
                };
            }
        }
        // Fallback: the central crop with the aspect ratio clamped to the range.
        let in_ratio = wf / hf;
        let (w, h) = if in_ratio < self.ratio.0 {
            (width, ((wf / self.ratio.0).round_ties_even() as u32).max(1))
        } else if in_ratio > self.ratio.1 {
            (
                ((hf * self.ratio.1).round_ties_even() as u32).max(1),
                height,
            )
        } else {
            (width, height)
        };
        let (w, h) = (w.min(width), h.min(height));
        CropBox {
            x: (width - w) / 2,
            y: (height - h) / 2,
            width: w,
            height: h,
        }
    }

    /// Crops, resizes and flips `img` with `rng`; returns the RGB image before normalisation.
    pub fn augment<R: Rng + ?Sized>(&self, img: &RgbImage, rng: &mut R) -> RgbImage {
        let b = self.crop_box(img.width(), img.height(), rng);
        let cropped = image::imageops::crop_imm(img, b.x, b.y, b.width, b.height).to_image();
        let (h, w) = self.size;
        let resized = resize_bicubic(&cropped, w, h);
        // RandomHorizontalFlip: `torch.rand(1) < p`.
        if uniform(rng, 0.0, 1.0) < self.flip_p {
            image::imageops::flip_horizontal(&resized)
        } else {
            resized
        }
    }

    /// Pixel values [3, H, W] of one augmented image.
    pub fn apply<R: Rng + ?Sized>(&self, img: &RgbImage, rng: &mut R) -> Vec<f32> {
        self.processor.preprocess(&self.augment(img, rng))
    }
}

fn uniform<R: Rng + ?Sized>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{item_rng, stream};

    fn transform(size: usize) -> TrainTransform {
        let mut p = ImageProcessorConfig::default();
        p.size.height = size;
        p.size.width = size;
        TrainTransform::from_processor(&p)
    }

    #[test]
    fn crop_boxes_respect_scale_ratio_and_bounds() {
        let t = transform(16);
        let (w, h) = (500u32, 375u32);
        let mut flipped_sizes = 0;
        for i in 0..500 {
            let mut rng = item_rng(3, stream::AUGMENT, i);
            let b = t.crop_box(w, h, &mut rng);
            assert!(b.x + b.width <= w && b.y + b.height <= h, "{b:?}");
            let frac = (b.width * b.height) as f64 / (w * h) as f64;
            // Rounding of w and h moves the area slightly off [0.5, 1].
            assert!((0.48..=1.02).contains(&frac), "{b:?} {frac}");
            let ratio = b.width as f64 / b.height as f64;
            assert!((0.74..=1.34).contains(&ratio), "{b:?} {ratio}");
            if b.width != b.height {
                flipped_sizes += 1;
            }
        }
        assert!(flipped_sizes > 0);
    }

    #[test]
    fn fallback_is_the_clamped_centre_crop() {
        let t = transform(8);
        // A 1000 × 10 strip: no attempt fits (h would exceed 10), so the fallback is taken.
        let mut rng = item_rng(0, stream::AUGMENT, 0);
        let b = t.crop_box(1000, 10, &mut rng);
        assert_eq!(
            b,
            CropBox {
                x: (1000 - 13) / 2,
                y: 0,
                width: 13,
                height: 10
            }
        );
    }

    #[test]
    fn augment_is_seeded_and_flips() {
        let t = transform(24);
        let img = RgbImage::from_fn(60, 40, |x, y| image::Rgb([x as u8 * 4, y as u8 * 6, 9]));
        let a = t.apply(&img, &mut item_rng(9, stream::AUGMENT, 1));
        let b = t.apply(&img, &mut item_rng(9, stream::AUGMENT, 1));
        assert_eq!(a, b);
        assert_eq!(a.len(), 3 * 24 * 24);
        // With the full image as the crop, a flip mirrors the red (x) gradient.
        let full = TrainTransform {
            scale: (1.0, 1.0),
            ratio: (1.5, 1.5),
            flip_p: 1.0,
            ..t.clone()
        };
        let out = full.augment(&img, &mut item_rng(0, 0, 0));
        let plain = resize_bicubic(&img, 24, 24);
        assert_eq!(out, image::imageops::flip_horizontal(&plain));
    }
}

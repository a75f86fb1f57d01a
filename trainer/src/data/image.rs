//! Decoding, seeded augmentation and ImageNet normalisation of one image.

use std::path::Path;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::imageops;
use image::RgbImage;
use medmerge_crds::AugmentSpec;
use rand::rngs::StdRng;
use rand::Rng;

use super::DataError;

/// ImageNet channel means (RGB, pixels in [0, 1]) that every network's input is centred by.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations that every network's input is scaled by.
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Augmentation to apply while decoding, with the seed of this particular draw.
#[derive(Clone, Debug)]
pub struct Augment {
    /// What to randomise.
    pub spec: AugmentSpec,
    /// Seed for this image in this epoch.
    pub seed: u64,
}

/// Decodes `path`, optionally augments it, resizes it to `size`x`size` and returns normalised
/// CHW f32 values.
pub fn decode_image(path: &Path, size: u32, augment: Option<&Augment>) -> Result<Vec<f32>, DataError> {
    Ok(normalise(&load_pixels(path, size, augment)?))
}

/// `path` as the network sees it before normalisation: `size`x`size` RGB, augmented when asked.
/// The decoded, resized image comes from the process's decoded-image store (decoded on first
/// use); random crops take their pixels from a larger stored copy.
pub fn load_pixels(path: &Path, size: u32, augment: Option<&Augment>) -> Result<RgbImage, DataError> {
    let side = stored_side(size, augment);
    let img = super::store::resized(path, side, || Ok(resize(&decode_rgb(path)?, side)))?;
    Ok(match augment {
        None => img,
        Some(a) => augmented(img, size, a),
    })
}

/// The stored image's side: `size`, or for random crops down to `min_scale` of the image, large
/// enough that the smallest crop still has `size` pixels across.
fn stored_side(size: u32, augment: Option<&Augment>) -> u32 {
    match augment {
        Some(a) if a.spec.min_scale < 1.0 => (size as f32 / a.spec.min_scale.max(0.01)).ceil() as u32,
        _ => size,
    }
}

/// Reads and decodes `path` to RGB, refusing truncated JPEGs. The decoder's default limits
/// refuse images whose pixels would not fit in 512 MiB (an error, not an abort).
fn decode_rgb(path: &Path) -> Result<RgbImage, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Read { path: path.into(), source })?;
    decode_rgb_bytes(&bytes, path)
}

/// Decodes an image file's `bytes` (named `name` in errors) to RGB, refusing truncated JPEGs.
fn decode_rgb_bytes(bytes: &[u8], name: &Path) -> Result<RgbImage, DataError> {
    if is_truncated_jpeg(bytes) {
        return Err(DataError::Truncated { path: name.into() });
    }
    Ok(image::load_from_memory(bytes).map_err(|source| DataError::Decode { path: name.into(), source })?.to_rgb8())
}

/// [`decode_image`] of an image file held in memory (`name` says which in errors), without
/// augmentation: what a served model does with an uploaded image.
pub fn decode_image_bytes(bytes: &[u8], name: &str, size: u32) -> Result<Vec<f32>, DataError> {
    Ok(normalise(&resize(&decode_rgb_bytes(bytes, Path::new(name))?, size)))
}

/// A JPEG (starts with SOI) without its EOI marker near the end: the decoder would fill the
/// missing rows with grey and say nothing. Some writers pad after EOI, so the tail is searched.
fn is_truncated_jpeg(bytes: &[u8]) -> bool {
    const TAIL: usize = 1024;
    bytes.starts_with(&[0xFF, 0xD8]) && !bytes[bytes.len().saturating_sub(TAIL)..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// `img` resized to `size`x`size` with a bilinear (triangle) filter whose support widens when
/// shrinking, like Pillow's; SIMD, with one resizer per thread.
pub fn resize(img: &RgbImage, size: u32) -> RgbImage {
    thread_local! {
        static RESIZER: std::cell::RefCell<Resizer> = std::cell::RefCell::new(Resizer::new());
    }
    let (w, h) = img.dimensions();
    if (w, h) == (size, size) {
        return img.clone();
    }
    let src = ImageRef::new(w, h, img.as_raw(), PixelType::U8x3).expect("an RgbImage holds w*h*3 bytes");
    let mut dst = Image::new(size, size, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(fast_image_resize::FilterType::Bilinear));
    RESIZER.with(|r| r.borrow_mut().resize(&src, &mut dst, &options)).expect("same pixel type, non-empty images");
    RgbImage::from_raw(size, size, dst.into_vec()).expect("size*size*3 bytes")
}

/// Decodes `path` and resizes it to `size`x`size` without augmentation or normalisation (what
/// the network sees, as pixels; Grad-CAM overlays are drawn on it).
pub fn load_resized(path: &Path, size: u32) -> Result<RgbImage, DataError> {
    load_pixels(path, size, None)
}

fn augmented(img: RgbImage, size: u32, a: &Augment) -> RgbImage {
    use rand::SeedableRng;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let s = &a.spec;
    let mut img = if s.min_scale < 1.0 {
        let (w, h) = img.dimensions();
        let scale = rng.random_range(s.min_scale..=1.0);
        let (cw, ch) = (((w as f32) * scale).max(1.0) as u32, ((h as f32) * scale).max(1.0) as u32);
        let (x, y) = (rng.random_range(0..=w - cw), rng.random_range(0..=h - ch));
        resize(&imageops::crop_imm(&img, x, y, cw, ch).to_image(), size)
    } else {
        resize(&img, size)
    };
    if s.flip {
        if rng.random_bool(0.5) {
            imageops::flip_horizontal_in_place(&mut img);
        }
        if rng.random_bool(0.5) {
            imageops::flip_vertical_in_place(&mut img);
        }
    }
    if s.rotation_degrees > 0.0 {
        img = rotate(&img, rng.random_range(-s.rotation_degrees..=s.rotation_degrees).to_radians());
    }
    if s.color_jitter > 0.0 {
        let j = s.color_jitter;
        let (b, c, sat) = (rng.random_range(1.0 - j..=1.0 + j), rng.random_range(1.0 - j..=1.0 + j), rng.random_range(1.0 - j..=1.0 + j));
        jitter(&mut img, b, c, sat);
    }
    img
}

/// Rotation about the centre, nearest neighbour, black outside (like a fundus border).
fn rotate(img: &RgbImage, angle: f32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let (sin, cos) = angle.sin_cos();
    RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        let (sx, sy) = (cos * dx + sin * dy + cx, -sin * dx + cos * dy + cy);
        if sx >= 0.0 && sy >= 0.0 && (sx as u32) < w && (sy as u32) < h {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

fn jitter(img: &mut RgbImage, brightness: f32, contrast: f32, saturation: f32) {
    let n = (img.width() * img.height()) as f32;
    let mean_grey = img.pixels().map(|p| 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32).sum::<f32>() / n;
    for p in img.pixels_mut() {
        let grey = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
        for c in 0..3 {
            let v = p[c] as f32 * brightness;
            let v = (v - mean_grey) * contrast + mean_grey;
            let v = (v - grey) * saturation + grey;
            p[c] = v.clamp(0.0, 255.0) as u8;
        }
    }
}

/// ImageNet-normalised CHW f32 values of `img`.
pub fn normalise(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (p[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resizing_averages_like_a_bilinear_filter() {
        // Halving alternating black and coloured columns gives their average away from the
        // edges (the filter spans two source pixels each side when shrinking by 2).
        let img = RgbImage::from_fn(8, 8, |x, _| if x % 2 == 0 { image::Rgb([0, 0, 0]) } else { image::Rgb([200, 100, 50]) });
        let small = resize(&img, 4);
        assert_eq!(small.dimensions(), (4, 4));
        for x in 1..3 {
            let p = small.get_pixel(x, 2);
            assert!((p[0] as i32 - 100).abs() <= 2 && (p[1] as i32 - 50).abs() <= 2, "{p:?}");
        }
        let flat = RgbImage::from_pixel(10, 6, image::Rgb([7, 8, 9]));
        assert!(resize(&flat, 3).pixels().all(|p| p.0 == [7, 8, 9]), "a flat image stays flat");
    }

    #[test]
    fn a_corrupt_image_is_named_in_the_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("broken.jpg");
        std::fs::write(&p, b"\xff\xd8\xff not really a jpeg").unwrap();
        let e = decode_image(&p, 8, None).unwrap_err().to_string();
        assert!(e.contains("broken.jpg"), "{e}");
    }

    #[test]
    fn decoding_normalises_with_imagenet_statistics() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("white.png");
        RgbImage::from_pixel(4, 4, image::Rgb([255, 255, 255])).save(&p).unwrap();
        let v = decode_image(&p, 2, None).unwrap();
        assert_eq!(v.len(), 3 * 2 * 2);
        assert!((v[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
        assert!((v[11] - (1.0 - 0.406) / 0.225).abs() < 1e-5);
    }

    #[test]
    fn augmentation_is_reproducible_from_its_seed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("grad.png");
        RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 16) as u8, (y * 16) as u8, 7])).save(&p).unwrap();
        let spec = AugmentSpec { flip: true, rotation_degrees: 20.0, color_jitter: 0.3, min_scale: 0.6 };
        let a = |seed| decode_image(&p, 8, Some(&Augment { spec: spec.clone(), seed })).unwrap();
        assert_eq!(a(1), a(1));
        assert_ne!(a(1), a(2));
    }
}

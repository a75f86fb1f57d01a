//! Where the subject of a medical image is: the pixels that stand out from its plain background
//! (the black border around a fundus disc, the black field around an MRI slice or a radiograph).
//! The share of a heatmap's mass there says whether a model looked at the patient or at the frame.

use image::RgbImage;

/// A pixel whose every channel is within this of the background colour is background.
const TOLERANCE: u8 = 20;
/// Share of corner pixels that must match the background colour for the image to have one.
const PLAIN_CORNERS: f64 = 0.9;

/// The background colour: the per-channel median of the four corner squares (1/16 of the side),
/// when at least [`PLAIN_CORNERS`] of their pixels are within [`TOLERANCE`] of it.
fn background(img: &RgbImage) -> Option<[u8; 3]> {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return None;
    }
    let side = (w.min(h) / 16).max(1);
    let corners: Vec<[u8; 3]> = [(0, 0), (w - side, 0), (0, h - side), (w - side, h - side)]
        .iter()
        .flat_map(|&(x0, y0)| (y0..y0 + side).flat_map(move |y| (x0..x0 + side).map(move |x| (x, y))))
        .map(|(x, y)| img.get_pixel(x, y).0)
        .collect();
    let colour: [u8; 3] = std::array::from_fn(|c| {
        let mut v: Vec<u8> = corners.iter().map(|p| p[c]).collect();
        v.sort_unstable();
        v[v.len() / 2]
    });
    let plain = corners.iter().filter(|p| close(p, &colour)).count() as f64 / corners.len() as f64;
    (plain >= PLAIN_CORNERS).then_some(colour)
}

fn close(a: &[u8; 3], b: &[u8; 3]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.abs_diff(*y) <= TOLERANCE)
}

/// The image's foreground, row-major: pixels that differ from its plain background. `None` when
/// the corners show no plain background (a photograph filled edge to edge) or nothing stands
/// out from it: then there is no foreground to measure against.
pub fn foreground_mask(img: &RgbImage) -> Option<Vec<bool>> {
    let colour = background(img)?;
    let mask: Vec<bool> = img.pixels().map(|p| !close(&p.0, &colour)).collect();
    mask.iter().any(|&m| m).then_some(mask)
}

/// Share of `cam`'s mass on pixels where `mask` holds; `None` when either is empty.
pub fn mass_inside(cam: &[f32], mask: &[bool]) -> Option<f64> {
    let total: f64 = cam.iter().map(|&v| f64::from(v)).sum();
    if total <= 0.0 || !mask.iter().any(|&m| m) {
        return None;
    }
    Some(cam.iter().zip(mask).filter(|(_, &m)| m).map(|(&v, _)| f64::from(v)).sum::<f64>() / total)
}

/// Share of `cam`'s mass inside `img`'s foreground, when it has one.
pub fn foreground_fraction(img: &RgbImage, cam: &[f32]) -> Option<f64> {
    mass_inside(cam, &foreground_mask(img)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn mass_inside_counts_only_masked_pixels() {
        assert_eq!(mass_inside(&[1.0, 3.0, 0.0, 4.0], &[true, false, true, true]), Some(5.0 / 8.0));
        assert_eq!(mass_inside(&[0.0, 0.0], &[true, true]), None);
        assert_eq!(mass_inside(&[1.0, 1.0], &[false, false]), None);
    }

    /// A 32x32 image of `background` with a 16x16 square of `subject` in the middle.
    fn framed(background: [u8; 3], subject: [u8; 3]) -> RgbImage {
        RgbImage::from_fn(32, 32, |x, y| if (8..24).contains(&x) && (8..24).contains(&y) { Rgb(subject) } else { Rgb(background) })
    }

    #[test]
    fn the_foreground_is_what_stands_out_from_a_plain_background_of_any_colour() {
        // A fundus disc on black, with a dim pixel on the border that is still border.
        let mut fundus = framed([0, 0, 0], [150, 60, 20]);
        fundus.put_pixel(2, 2, Rgb([12, 15, 9]));
        let mask = foreground_mask(&fundus).unwrap();
        assert_eq!(mask.iter().filter(|&&m| m).count(), 256);
        assert!(mask[16 * 32 + 16] && !mask[2 * 32 + 2]);
        // A dark lesion on a white field: the background need not be black.
        let lesion = foreground_mask(&framed([240, 240, 240], [60, 40, 30])).unwrap();
        assert_eq!(lesion.iter().filter(|&&m| m).count(), 256);
        let cam: Vec<f32> = (0..32 * 32).map(|i| if lesion[i] { 3.0 } else { 1.0 }).collect();
        assert_eq!(foreground_fraction(&framed([240, 240, 240], [60, 40, 30]), &cam), Some(768.0 / (768.0 + 768.0)));
    }

    #[test]
    fn an_image_without_a_plain_background_has_no_foreground() {
        // Texture to the edges: the corners disagree with each other.
        let texture = RgbImage::from_fn(32, 32, |x, y| Rgb([(x * 8) as u8, (y * 8) as u8, 90]));
        assert_eq!(foreground_mask(&texture), None);
        // Nothing stands out from a plain field.
        assert_eq!(foreground_mask(&RgbImage::from_pixel(32, 32, Rgb([0, 0, 0]))), None);
        assert_eq!(foreground_fraction(&texture, &[1.0; 32 * 32]), None);
    }
}

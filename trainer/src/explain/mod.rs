//! Grad-CAM (Selvaraju et al., 2017): where in an image a network looked when it scored a class.
//!
//! The heatmap of a layer is the ReLU of its activation maps weighted by the spatially averaged
//! gradient of the class score with respect to them, upsampled to the input and scaled to [0, 1].
//! Overlays are written as PNG. Two measures say whether a map means anything: the share of its
//! mass inside the image's foreground ([`foreground`]) and how fast the model's confidence falls
//! as the hottest pixels are deleted, or rises as they are revealed ([`faithfulness`]).

pub mod faithfulness;
pub mod foreground;

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::{load_resized, normalise, DataError};
use crate::model::{tensor_to_vec, Network, Tap};
use crate::report::HeatMeasures;

pub use faithfulness::Curves;
pub use foreground::{foreground_fraction, foreground_mask, mass_inside};

/// Images per forward/backward pass.
const BATCH: usize = 8;

/// Errors explaining predictions.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The requested layer is not one the architecture can tap.
    #[error("layer {layer:?} is not a convolutional layer of {arch}; choose one of: {available}")]
    UnknownLayer { layer: String, arch: &'static str, available: String },
    /// The requested class is not one of the model's classes.
    #[error("class {class:?} is not one of the model's classes: {available}")]
    UnknownClass { class: String, available: String },
    /// An image could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// An overlay could not be written.
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// What to explain and how.
#[derive(Clone, Debug, Default)]
pub struct ExplainOptions {
    /// Layer to take activations from (default: the last convolutional block).
    pub layer: Option<String>,
    /// Class to explain (default: each image's predicted class).
    pub class: Option<String>,
}

/// One image's Grad-CAM.
#[derive(Clone, Debug)]
pub struct Heatmap {
    /// Predicted class index.
    pub predicted: usize,
    /// Probability of the predicted class.
    pub probability: f32,
    /// The class the heatmap explains.
    pub explained: usize,
    /// Heatmap values in [0, 1], row-major, `size` x `size`.
    pub cam: Vec<f32>,
}

/// One explained image as written to disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExplainedImage {
    /// The input image.
    pub image: PathBuf,
    /// The overlay PNG written for it.
    pub overlay: PathBuf,
    /// Its true class, when known.
    pub label: Option<String>,
    /// The predicted class.
    pub predicted: String,
    /// Probability of the predicted class.
    pub probability: f32,
    /// The class the heatmap explains.
    pub explained: String,
    /// Heat inside the foreground, deletion and insertion areas of its map.
    #[serde(flatten)]
    pub heat: HeatMeasures,
}

/// The layer Grad-CAM will use: `wanted` if the network has it, else the last conv block.
pub fn resolve_layer(net: &Network, wanted: Option<&str>) -> Result<String, ExplainError> {
    let names = net.tap_names();
    match wanted {
        None => Ok(names.last().cloned().unwrap_or_default()),
        Some(w) if names.iter().any(|n| n == w) => Ok(w.to_string()),
        Some(w) => Err(ExplainError::UnknownLayer { layer: w.into(), arch: net.arch.as_str(), available: names.join(", ") }),
    }
}

/// The index of class `name` in the network's classes.
pub fn resolve_class(net: &Network, name: &str) -> Result<usize, ExplainError> {
    net.classes.iter().position(|c| c == name).ok_or_else(|| ExplainError::UnknownClass { class: name.into(), available: net.classes.join(", ") })
}

/// Grad-CAM of `layer` for a batch of resized images; `class` fixes the explained class.
pub fn grad_cam(net: &Network, images: &[RgbImage], layer: &str, class: Option<usize>, device: Device) -> Result<Vec<Heatmap>, ExplainError> {
    let pixels: Vec<f32> = images.iter().flat_map(normalise).collect();
    grad_cam_normalised(net, &pixels, images.len(), layer, class, device)
}

/// [`grad_cam`] of `n` images already normalised (CHW, ImageNet statistics, concatenated).
pub fn grad_cam_normalised(net: &Network, pixels: &[f32], n: usize, layer: &str, class: Option<usize>, device: Device) -> Result<Vec<Heatmap>, ExplainError> {
    let size = i64::from(net.image_size);
    let n = n as i64;
    let x = Tensor::from_slice(pixels).view([n, 3, size, size]).to_device(device);
    let mut tap = Tap::at(layer);
    let logits = net.forward_tapped(&x, false, &mut tap);
    let features = tap.take().ok_or_else(|| ExplainError::UnknownLayer { layer: layer.into(), arch: net.arch.as_str(), available: net.tap_names().join(", ") })?;
    let probs = net.probabilities(&logits);
    let predicted = probs.argmax(-1, false);
    let target = match class {
        Some(c) => Tensor::full([n], c as i64, (Kind::Int64, device)),
        None => predicted.shallow_clone(),
    };
    let score = logits.gather(1, &target.unsqueeze(1), false).sum(Kind::Float);
    let grads = Tensor::f_run_backward(&[&score], &[&features], false, false)?;
    let cam = tch::no_grad(|| {
        let weights = grads[0].mean_dim([2i64, 3].as_slice(), true, Kind::Float);
        let cam = (&features * weights).sum_dim_intlist([1i64].as_slice(), true, Kind::Float).relu();
        let cam = cam.upsample_bilinear2d([size, size], false, None, None).view([n, size * size]);
        let max = cam.amax([1i64].as_slice(), true).clamp_min(1e-12);
        cam / max
    });
    let cam = tensor_to_vec(&cam)?;
    let predicted: Vec<i64> = Vec::<i64>::try_from(predicted.to_device(Device::Cpu))?;
    let target: Vec<i64> = Vec::<i64>::try_from(target.to_device(Device::Cpu))?;
    let top = tensor_to_vec(&probs.detach())?;
    let k = net.classes.len();
    Ok((0..n as usize)
        .map(|i| Heatmap {
            predicted: predicted[i] as usize,
            probability: top[i * k + predicted[i] as usize],
            explained: target[i] as usize,
            cam: cam[i * (size * size) as usize..(i + 1) * (size * size) as usize].to_vec(),
        })
        .collect())
}

/// The jet colour map at `v` in [0, 1].
fn jet(v: f32) -> [f32; 3] {
    let c = |x: f32| (1.5 - (4.0 * v - x).abs()).clamp(0.0, 1.0);
    [c(3.0), c(2.0), c(1.0)]
}

/// `img` with `cam` laid over it in the jet colour map, weighted by the heat itself so cold
/// regions keep the photograph visible.
pub fn overlay(img: &RgbImage, cam: &[f32]) -> RgbImage {
    let mut out = img.clone();
    for (p, &v) in out.pixels_mut().zip(cam) {
        let colour = jet(v);
        let alpha = 0.25 + 0.5 * v;
        *p = Rgb(std::array::from_fn(|c| ((1.0 - alpha) * f32::from(p[c]) + alpha * 255.0 * colour[c]).round() as u8));
    }
    out
}

/// Runs Grad-CAM over `images` (paths with their true class, if known) in batches and hands
/// each image, as the network saw it, with its heatmap to `visit` (in order).
pub fn for_each_heatmap(
    net: &Network,
    images: &[(PathBuf, Option<usize>)],
    opts: &ExplainOptions,
    device: Device,
    mut visit: impl FnMut(usize, &RgbImage, Heatmap) -> Result<(), ExplainError>,
) -> Result<(), ExplainError> {
    let layer = resolve_layer(net, opts.layer.as_deref())?;
    let class = opts.class.as_deref().map(|c| resolve_class(net, c)).transpose()?;
    let mut index = 0;
    for chunk in images.chunks(BATCH) {
        let pictures: Vec<RgbImage> = chunk.iter().map(|(p, _)| load_resized(p, net.image_size)).collect::<Result<_, _>>()?;
        for (picture, map) in pictures.iter().zip(grad_cam(net, &pictures, &layer, class, device)?) {
            visit(index, picture, map)?;
            index += 1;
        }
    }
    Ok(())
}

/// The deletion and insertion curves of `map` over `picture`, scored by `net` in eval mode.
pub fn faithfulness(net: &Network, picture: &RgbImage, map: &Heatmap, device: Device) -> Result<Curves, ExplainError> {
    let class = map.explained as i64;
    let probability = |batch: &Tensor| {
        tch::no_grad(|| {
            let logits = net.forward_t(&batch.to_device(device), false);
            let probs = net.probabilities(&logits);
            probs.f_select(1, class)
        })
    };
    Ok(faithfulness::curves(picture, &map.cam, probability)?)
}

/// Writes `picture` with `map` laid over it to `file` and describes it, with its `curves`.
pub fn write_overlay(net: &Network, (image, label): &(PathBuf, Option<usize>), picture: &RgbImage, map: &Heatmap, curves: &Curves, file: PathBuf) -> Result<ExplainedImage, ExplainError> {
    overlay(picture, &map.cam).save(&file).map_err(|e| ExplainError::Write { path: file.clone(), message: e.to_string() })?;
    Ok(ExplainedImage {
        image: image.clone(),
        overlay: file,
        label: label.map(|l| net.classes[l].clone()),
        predicted: net.classes[map.predicted].clone(),
        probability: map.probability,
        explained: net.classes[map.explained].clone(),
        heat: HeatMeasures {
            foreground_fraction: foreground_fraction(picture, &map.cam),
            deletion_auc: Some(curves.deletion_auc()),
            insertion_auc: Some(curves.insertion_auc()),
            deletion_gain: Some(curves.deletion_gain()),
        },
    })
}

/// Explains `images` (paths with their true class, if known) and writes one overlay PNG per
/// image into `out_dir`, named after the image.
pub fn explain_images(net: &Network, images: &[(PathBuf, Option<usize>)], out_dir: &Path, opts: &ExplainOptions, device: Device) -> Result<Vec<ExplainedImage>, ExplainError> {
    std::fs::create_dir_all(out_dir).map_err(|e| ExplainError::Write { path: out_dir.into(), message: e.to_string() })?;
    let mut out = Vec::with_capacity(images.len());
    for_each_heatmap(net, images, opts, device, |i, picture, map| {
        let curves = faithfulness(net, picture, &map, device)?;
        out.push(write_overlay(net, &images[i], picture, &map, &curves, out_dir.join(overlay_name(&images[i].0, i)))?);
        Ok(())
    })?;
    Ok(out)
}

/// `<index>-<stem>.gradcam.png`: the index keeps names unique across class folders.
fn overlay_name(image: &Path, index: usize) -> String {
    let stem = image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    format!("{index:04}-{stem}.gradcam.png")
}

/// The mean of `values`; `None` when there are none.
pub fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.into_iter().fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use medmerge_crds::Architecture;

    #[test]
    fn the_overlay_is_hot_where_the_map_is_high() {
        let img = RgbImage::from_pixel(2, 1, Rgb([128, 128, 128]));
        let out = overlay(&img, &[0.0, 1.0]);
        assert!(out.get_pixel(0, 0)[2] > out.get_pixel(0, 0)[0], "cold = blue");
        assert!(out.get_pixel(1, 0)[0] > out.get_pixel(1, 0)[2], "hot = red");
    }

    #[test]
    fn unknown_layers_and_classes_are_refused_naming_the_choices() {
        let classes = vec!["a".to_string(), "b".to_string()];
        let net = Network::new(Architecture::Resnet18, &classes, 32, Device::Cpu, 0);
        assert_eq!(resolve_layer(&net, None).unwrap(), "layer4");
        assert_eq!(resolve_layer(&net, Some("layer2")).unwrap(), "layer2");
        let e = resolve_layer(&net, Some("layer9")).unwrap_err().to_string();
        assert!(e.contains("\"layer9\"") && e.contains("resnet18") && e.contains("layer1, layer2, layer3, layer4"), "{e}");
        let e = resolve_class(&net, "c").unwrap_err().to_string();
        assert!(e.contains("\"c\"") && e.contains("a, b"), "{e}");
    }

    /// ResNet's last block ends in a ReLU and feeds the head through average pooling, so with
    /// an all-ones head every class's map is the (non-negative) sum of the activations: non-zero
    /// whatever the random init (which tests running alongside reseed).
    fn resnet_with_all_ones_head(classes: &[String], size: u32) -> Network {
        let net = Network::new(Architecture::Resnet18, classes, size, Device::Cpu, 1);
        let mut head = net.vs.variables()["fc.weight"].shallow_clone();
        let _ = tch::no_grad(|| head.fill_(1.0));
        net
    }

    #[test]
    fn grad_cam_maps_are_input_sized_scaled_to_one_and_explain_the_requested_class() {
        let classes = vec!["left".to_string(), "other".to_string()];
        for arch in [Architecture::Resnet18, Architecture::EfficientnetLite0, Architecture::MobilenetV2] {
            let net = if arch == Architecture::Resnet18 { resnet_with_all_ones_head(&classes, 64) } else { Network::new(arch, &classes, 64, Device::Cpu, 1) };
            let mut img = RgbImage::from_pixel(64, 64, Rgb([0, 0, 0]));
            for y in 16..48 {
                for x in 4..28 {
                    img.put_pixel(x, y, Rgb([255, 200, 120]));
                }
            }
            let maps = grad_cam(&net, &[img.clone(), img], &resolve_layer(&net, None).unwrap(), Some(0), Device::Cpu).unwrap();
            assert_eq!(maps.len(), 2);
            let m = &maps[0];
            assert_eq!(m.cam.len(), 64 * 64);
            assert!(m.cam.iter().all(|v| (0.0..=1.0 + 1e-6).contains(v)), "{arch:?}: values in [0, 1]");
            assert_eq!(m.explained, 0);
            // A map is scaled to a maximum of 1, or all zero when nothing speaks for the class.
            let max = m.cam.iter().copied().fold(0f32, f32::max);
            assert!(max > 0.99 || (max == 0.0 && arch != Architecture::Resnet18), "{arch:?}: maximum {max}");
        }
    }

    #[test]
    fn explain_images_writes_one_overlay_per_image_with_its_prediction() {
        let d = tempfile::tempdir().unwrap();
        let classes = vec!["a".to_string(), "b".to_string()];
        let net = resnet_with_all_ones_head(&classes, 32);
        let mut inputs = Vec::new();
        for i in 0..10u8 {
            let p = d.path().join(format!("img{i}.png"));
            RgbImage::from_fn(40, 40, |x, y| if (x as i32 - 20).pow(2) + (y as i32 - 20).pow(2) < 300 { Rgb([200, 90 + i, 40]) } else { Rgb([0, 0, 0]) }).save(&p).unwrap();
            inputs.push((p, Some(usize::from(i % 2))));
        }
        let out = d.path().join("out");
        let done = explain_images(&net, &inputs, &out, &ExplainOptions::default(), Device::Cpu).unwrap();
        assert_eq!(done.len(), 10, "two batches");
        for e in &done {
            assert!(e.overlay.exists());
            assert_eq!(image::open(&e.overlay).unwrap().width(), 32);
            assert_eq!(e.explained, e.predicted);
            let h = &e.heat;
            assert!(h.foreground_fraction.is_some_and(|f| (0.0..=1.0).contains(&f)));
            assert!([h.deletion_auc, h.insertion_auc].iter().all(|a| a.is_some_and(|a| (0.0..=1.0).contains(&a))));
            assert!(h.deletion_gain.is_some_and(|g| (-1.0..=1.0).contains(&g)));
        }
        assert_eq!(done[1].label.as_deref(), Some("b"));
        let e = explain_images(&net, &inputs, &out, &ExplainOptions { layer: Some("nope".into()), class: None }, Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("\"nope\""));
    }
}

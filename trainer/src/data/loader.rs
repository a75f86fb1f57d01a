//! Batches decoded in parallel (rayon) on a producer thread, a few batches ahead of training:
//! uint8 pixels from the decoded-image store (augmented on the CPU), sent to the device as bytes
//! and normalised there.

use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use rayon::prelude::*;
use tch::{Device, Tensor};

use super::{load_pixels, Augment, DataError, Dataset, MEAN, STD};
use crate::model::layout;
use medmerge_crds::AugmentSpec;

/// A decoded batch.
pub struct Batch {
    /// `[N, 3, size, size]` normalised images.
    pub images: Tensor,
    /// `[N]` class indices (i64).
    pub labels: Tensor,
    /// `[N, classes]` multi-hot targets (f32), for multi-label data.
    pub targets: Option<Tensor>,
    /// Indices into the dataset's samples.
    pub indices: Vec<usize>,
}

/// Iterator over batches of a dataset in a given order, decoded ahead of time.
pub struct BatchLoader {
    rx: Receiver<Result<Decoded, DataError>>,
    worker: Option<JoinHandle<()>>,
    size: i64,
    device: Device,
}

const PREFETCH: usize = 3;

/// HWC uint8 pixels, labels, multi-hot targets (empty for single-label data) and sample indices of
/// a batch.
type Decoded = (Vec<u8>, Vec<i64>, Vec<f32>, Vec<usize>);

impl BatchLoader {
    /// Starts decoding `order` (indices into `data.samples`) in batches of `batch_size`.
    /// With `augment`, each image gets its own seed derived from `seed` and its index.
    pub fn new(data: &Dataset, order: Vec<usize>, batch_size: usize, size: u32, augment: Option<AugmentSpec>, seed: u64, device: Device) -> Self {
        let (tx, rx) = bounded(PREFETCH);
        let samples = data.samples.clone();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(decode_threads(device)).thread_name(|i| format!("decode-{i}")).build();
        let worker = std::thread::spawn(move || {
            let decode = |chunk: &[usize]| -> Result<Vec<Vec<u8>>, DataError> {
                chunk
                    .par_iter()
                    .map(|&i| {
                        let aug = augment.as_ref().map(|spec| Augment { spec: spec.clone(), seed: seed.wrapping_mul(1_000_003).wrapping_add(i as u64) });
                        load_pixels(&samples[i].path, size, aug.as_ref()).map(|img| img.into_raw())
                    })
                    .collect()
            };
            for chunk in order.chunks(batch_size.max(1)) {
                let decoded = match &pool {
                    Ok(pool) => pool.install(|| decode(chunk)),
                    Err(_) => decode(chunk),
                };
                let msg = decoded.map(|imgs| {
                    let labels = chunk.iter().map(|&i| samples[i].label as i64).collect();
                    let targets = chunk.iter().flat_map(|&i| samples[i].targets.iter().map(|&t| t as f32)).collect();
                    (imgs.concat(), labels, targets, chunk.to_vec())
                });
                let failed = msg.is_err();
                if tx.send(msg).is_err() || failed {
                    return;
                }
            }
        });
        BatchLoader { rx, worker: Some(worker), size: size as i64, device }
    }
}

impl Iterator for BatchLoader {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let msg = self.rx.recv().ok()?;
        Some(msg.map(|(pixels, labels, targets, indices)| {
            let n = labels.len() as i64;
            Batch {
                images: normalised(&to_device(Tensor::from_slice(&pixels).view([n, self.size, self.size, 3]), self.device)),
                labels: to_device(Tensor::from_slice(&labels), self.device),
                targets: (!targets.is_empty()).then(|| to_device(Tensor::from_slice(&targets).view([n, -1]), self.device)),
                indices,
            }
        }))
    }
}

/// `t` on `device`; to a GPU through pinned memory, without waiting for the copy, so that the
/// next batch is assembled while this one travels.
fn to_device(t: Tensor, device: Device) -> Tensor {
    if device.is_cuda() {
        t.pin_memory(device).to_device_(device, t.kind(), true, false)
    } else {
        t
    }
}

/// `[N, H, W, 3]` uint8 pixels as the networks' `[N, 3, H, W]` ImageNet-normalised float input,
/// computed on the pixels' device, in the networks' memory layout ([`layout`]): the permuted
/// pixels already are channels-last.
pub fn normalised(pixels: &Tensor) -> Tensor {
    let device = pixels.device();
    let (scale, shift) = normalisation(device);
    let images = pixels.permute([0, 3, 1, 2]).to_kind(tch::Kind::Float) * scale + shift;
    if layout::channels_last(device) {
        images
    } else {
        images.contiguous()
    }
}

/// Per-channel `[1, 3, 1, 1]` scale and shift on `device`, made once per thread: copying them
/// to a GPU for every batch made the CPU wait for the GPU's queue each time.
fn normalisation(device: Device) -> (Tensor, Tensor) {
    thread_local! {
        static CONSTANTS: std::cell::RefCell<Vec<(Device, Tensor, Tensor)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    CONSTANTS.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((_, scale, shift)) = c.iter().find(|(d, _, _)| *d == device) {
            return (scale.shallow_clone(), shift.shallow_clone());
        }
        let per_channel = |v: [f32; 3]| Tensor::from_slice(&v).view([1, 3, 1, 1]).to_device(device);
        let scale = per_channel([0, 1, 2].map(|c| 1.0 / (255.0 * STD[c])));
        let shift = per_channel([0, 1, 2].map(|c| -MEAN[c] / STD[c]));
        c.push((device, scale.shallow_clone(), shift.shallow_clone()));
        (scale, shift)
    })
}

/// Threads that decode images ahead of training. On the CPU, libtorch's own threads already keep
/// the cores busy, and decoders competing with them stall its parallel regions (measured 5 %
/// slower training on 2 cores): decode with the cores libtorch leaves free, at least one. A GPU
/// trains without the CPU, so every core decodes.
pub fn decode_threads(device: Device) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    decoders(cores, tch::get_num_threads().max(0) as usize, device.is_cuda())
}

fn decoders(cores: usize, torch_threads: usize, cuda: bool) -> usize {
    if cuda {
        cores
    } else {
        cores.saturating_sub(torch_threads).max(1)
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        // Drain so the producer sees a closed channel and exits, then join it.
        while self.rx.try_recv().is_ok() {}
        let rx = std::mem::replace(&mut self.rx, bounded(0).1);
        drop(rx);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{decoders, normalised};
    use tch::Tensor;

    #[test]
    fn pixels_are_normalised_on_the_device_as_the_cpu_reference_does() {
        let img = image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([(x * 50) as u8, (y * 60) as u8, 200]));
        let expected = crate::data::normalise(&img);
        let t = normalised(&Tensor::from_slice(img.as_raw()).view([1, 4, 5, 3]));
        assert_eq!(t.size(), [1, 3, 4, 5]);
        let got = Vec::<f32>::try_from(t.contiguous().view([-1])).unwrap();
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-5, "{g} vs {e}");
        }
    }

    #[test]
    fn decoders_take_the_cores_libtorch_leaves_and_every_core_beside_a_gpu() {
        assert_eq!(decoders(16, 8, false), 8);
        assert_eq!(decoders(2, 2, false), 1, "always at least one decoder");
        assert_eq!(decoders(2, 4, false), 1);
        assert_eq!(decoders(16, 16, true), 16);
    }
}

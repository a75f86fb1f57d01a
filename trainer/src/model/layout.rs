//! Memory layout of images and convolution weights: channels-last (NHWC strides behind the usual
//! NCHW shape) on the CPU, NCHW on CUDA; `MEDMERGE_CHANNELS_LAST=1` or `=0` decides instead.
//!
//! libtorch's CPU convolutions (oneDNN) work natively in channels-last; given NCHW they reorder
//! every activation. On 2 CPU cores EfficientNet-Lite0 trained 1.4x and ResNet50 1.1x faster
//! channels-last (bench/results/train-throughput.md). On an H200 it changed nothing once warm,
//! and with bfloat16 each new batch shape first cost seconds of kernel compilation
//! (bench/results/gpu-h200.md). Files are unaffected: tensors are written contiguous (NCHW)
//! whatever their layout in memory.

use tch::{nn, Device, Tensor};

/// Whether images and weights on `device` are laid out channels-last.
pub fn channels_last(device: Device) -> bool {
    parse(std::env::var("MEDMERGE_CHANNELS_LAST").ok().as_deref()).unwrap_or(!device.is_cuda())
}

fn parse(value: Option<&str>) -> Option<bool> {
    match value.map(str::trim) {
        Some("1" | "true" | "on") => Some(true),
        Some("0" | "false" | "off") => Some(false),
        _ => None,
    }
}

/// Lays every 4-D variable of `vs` (the convolution kernels) out channels-last, in place: the
/// layers hold the same tensors and see the new layout.
pub fn to_channels_last(vs: &nn::VarStore) {
    for (_, mut var) in vs.variables() {
        if var.dim() == 4 {
            let nhwc = tch::no_grad(|| in_channels_last(&var));
            var.set_data(&nhwc);
        }
    }
}

/// `t` (4-D, NCHW shape) copied into channels-last strides.
pub fn in_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `t` (4-D) has channels-last strides.
    fn is_channels_last(t: &Tensor) -> bool {
        t.dim() == 4 && t.stride()[1] == 1 && t.size()[1] > 1
    }

    #[test]
    fn the_variable_overrides_the_device_default() {
        assert_eq!(parse(None), None);
        assert_eq!(parse(Some("1")), Some(true));
        assert_eq!(parse(Some(" off ")), Some(false));
        assert_eq!(parse(Some("maybe")), None);
        if std::env::var_os("MEDMERGE_CHANNELS_LAST").is_none() {
            assert!(channels_last(Device::Cpu));
            assert!(!channels_last(Device::Cuda(0)));
        }
    }

    #[test]
    fn variables_keep_their_values_in_the_new_layout() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let conv = nn::conv2d(vs.root() / "c", 3, 4, 3, Default::default());
        let before = conv.ws.copy();
        let x = Tensor::randn([2, 3, 8, 8], (tch::Kind::Float, tch::Device::Cpu));
        let y_before = x.apply(&conv);
        to_channels_last(&vs);
        assert!(is_channels_last(&conv.ws), "the layer's own handle sees the new layout: {:?}", conv.ws.stride());
        assert!(!is_channels_last(conv.bs.as_ref().unwrap()));
        assert!(conv.ws.allclose(&before, 0.0, 0.0, false));
        let y_after = in_channels_last(&x).apply(&conv);
        assert!(y_after.allclose(&y_before, 1e-5, 1e-5, false));
    }
}

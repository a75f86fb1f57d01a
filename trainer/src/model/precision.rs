//! Mixed precision on CUDA: forward passes under libtorch's autocast in bfloat16.
//!
//! bfloat16 has float32's exponent range, so gradients need no loss scaling and a training step
//! needs no overflow check (whose read-back stalled every float16 step on the GPU:
//! bench/results/gpu-h100.md). tch turns autocast on and off but cannot choose its type, so the
//! type is set through libtorch's own `at::autocast::set_autocast_dtype`.

use tch::Tensor;

/// `c10::DeviceType::CUDA`.
const CUDA: i8 = 1;
/// `c10::ScalarType::BFloat16`.
const BFLOAT16: i8 = 15;

mod ffi {
    extern "C" {
        // at::autocast::set_autocast_dtype(c10::DeviceType, c10::ScalarType) and its getter, in
        // libtorch_cpu (linked by torch-sys). Both enums are int8_t-backed: passed as i8.
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device: i8, dtype: i8);
        #[cfg(test)]
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        pub fn get_autocast_dtype(device: i8) -> i8;
    }
}

/// Runs `forward` with CUDA autocast in bfloat16 (matrix products and convolutions in bfloat16,
/// reductions and losses in float32) and returns its output as float32. Without CUDA it runs
/// `forward` as is.
pub fn bfloat16_autocast(forward: impl FnOnce() -> Tensor) -> Tensor {
    // SAFETY: plain setters of a libtorch global, valid for these enum values.
    unsafe { ffi::set_autocast_dtype(CUDA, BFLOAT16) };
    tch::autocast(true, forward).to_kind(tch::Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The type CUDA autocast runs in (a `c10::ScalarType` index).
    fn cuda_autocast_dtype() -> i8 {
        // SAFETY: a plain getter of a libtorch global.
        unsafe { ffi::get_autocast_dtype(CUDA) }
    }

    #[test]
    fn autocast_is_set_to_bfloat16_through_libtorch() {
        let x = Tensor::from_slice(&[1.0f32, 2.0]);
        let y = bfloat16_autocast(|| &x * 2.0);
        assert_eq!(cuda_autocast_dtype(), BFLOAT16, "libtorch reports the type medmerge asked for");
        assert_eq!(y.kind(), tch::Kind::Float);
        assert_eq!(Vec::<f32>::try_from(&y).unwrap(), vec![2.0, 4.0]);
    }
}

//! Batch normalisation that can also report the moments of its inputs, for restoration.

use std::sync::Mutex;

use tch::{nn, Kind, Tensor};

/// Per-channel moments of the inputs a batch-norm layer saw: count, sum and sum of squares, in
/// f64 so shards' moments add up exactly enough to be combined.
#[derive(Debug)]
pub struct Moments {
    /// Values per channel seen so far (batch x height x width, summed over batches).
    pub count: f64,
    /// Per-channel sum.
    pub sum: Tensor,
    /// Per-channel sum of squares.
    pub sum_sq: Tensor,
}

/// A batch-norm layer with a stable name and an optional moments collector.
#[derive(Debug)]
pub struct Bn {
    /// Checkpoint name prefix, e.g. `layer1.0.bn1`.
    pub name: String,
    /// The libtorch layer (weights, bias, running statistics).
    pub inner: nn::BatchNorm,
    eps: f64,
    collector: Mutex<Option<Moments>>,
}

impl Bn {
    /// A 2-D batch norm at `path` with `channels` channels. Momentum 0.1 whatever the source
    /// checkpoint used: TF-style 0.01 leaves running statistics near ImageNet values after a
    /// short fine-tune.
    pub fn new(path: nn::Path, channels: i64, eps: f64) -> Self {
        let name = path.components().collect::<Vec<_>>().join(".");
        let inner = nn::batch_norm2d(path, channels, nn::BatchNormConfig { eps, momentum: 0.1, ..Default::default() });
        Bn { name, inner, eps, collector: Mutex::new(None) }
    }

    /// Normalises `x`; while collecting, uses batch statistics (as in training) without touching
    /// the running statistics, and accumulates the input's moments.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut guard = self.collector.lock().expect("collector lock");
        if let Some(m) = guard.as_mut() {
            // Sums accumulate in f64 without a full f64 copy of the activations.
            let xd = x.detach();
            let dims = [0i64, 2, 3];
            m.count += (x.size()[0] * x.size()[2] * x.size()[3]) as f64;
            m.sum += xd.sum_dim_intlist(dims.as_slice(), false, Kind::Double);
            m.sum_sq += xd.square().sum_dim_intlist(dims.as_slice(), false, Kind::Double);
            return Tensor::batch_norm(x, self.inner.ws.as_ref(), self.inner.bs.as_ref(), None::<&Tensor>, None::<&Tensor>, true, 0.1, self.eps, false);
        }
        drop(guard);
        x.apply_t(&self.inner, train)
    }

    /// The epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Starts accumulating moments (discarding any previous ones).
    pub fn start_collecting(&self) {
        let c = self.inner.running_mean.size()[0];
        let opts = (Kind::Double, self.inner.running_mean.device());
        *self.collector.lock().expect("collector lock") = Some(Moments { count: 0.0, sum: Tensor::zeros([c], opts), sum_sq: Tensor::zeros([c], opts) });
    }

    /// Stops accumulating and returns what was collected.
    pub fn take_moments(&self) -> Option<Moments> {
        self.collector.lock().expect("collector lock").take()
    }
}

//! Torchvision-layout MobileNetV2, MobileNetV3 (Large, Small) and EfficientNet-B0 (tensor names
//! as torchvision writes them, so torchvision checkpoints import directly).

use std::rc::Rc;

use tch::{nn, Tensor};

use super::bn::Bn;
use super::Tap;
use crate::export::graph::{GraphBuilder, GraphError, Value};

/// Batch-norm epsilon of MobileNetV2 and EfficientNet-B0 (PyTorch's default).
const BN_EPS: f64 = 1e-5;
/// Batch-norm epsilon of MobileNetV3 (torchvision builds it with `eps=0.001`).
const BN_EPS_V3: f64 = 1e-3;

/// An activation between layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// max(x, 0).
    Relu,
    /// min(max(x, 0), 6).
    Relu6,
    /// x·sigmoid(x) (swish).
    Silu,
    /// x·relu6(x + 3)/6.
    Hardswish,
}

impl Act {
    /// Applies the activation.
    pub fn apply(self, t: Tensor) -> Tensor {
        match self {
            Act::Relu => t.relu(),
            Act::Relu6 => t.relu6(),
            Act::Silu => t.silu(),
            Act::Hardswish => t.hardswish(),
        }
    }
}

/// A convolution followed by batch norm (torchvision's `Conv2dNormActivation` without the act).
#[derive(Debug)]
pub(crate) struct ConvBn {
    conv: nn::Conv2D,
    bn: Rc<Bn>,
    stride: i64,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, groups: i64, eps: f64, bns: &mut Vec<Rc<Bn>>) -> Self {
        let conv = nn::conv2d(&p / 0, c_in, c_out, k, nn::ConvConfig { stride, padding: (k - 1) / 2, groups, bias: false, ..Default::default() });
        let bn = Rc::new(Bn::new(&p / 1, c_out, eps));
        bns.push(bn.clone());
        ConvBn { conv, bn, stride }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&x.apply(&self.conv), train)
    }

    fn emit_onnx(&self, g: &mut GraphBuilder, x: &Value) -> Result<Value, GraphError> {
        let y = g.conv_centred(x, &self.conv, self.stride)?;
        g.batch_norm(&y, &self.bn)
    }
}

/// The gate of a squeeze-and-excitation block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// sigmoid (EfficientNet).
    Sigmoid,
    /// relu6(x + 3)/6 (MobileNetV3).
    Hardsigmoid,
}

/// Squeeze-and-excitation as in torchvision (`fc1`, `fc2` 1x1 convolutions with bias).
#[derive(Debug)]
pub(crate) struct SqueezeExcite {
    fc1: nn::Conv2D,
    fc2: nn::Conv2D,
    act: Act,
    gate: Gate,
}

impl SqueezeExcite {
    fn new(p: nn::Path, channels: i64, squeeze: i64, act: Act, gate: Gate) -> Self {
        SqueezeExcite { fc1: nn::conv2d(&p / "fc1", channels, squeeze, 1, Default::default()), fc2: nn::conv2d(&p / "fc2", squeeze, channels, 1, Default::default()), act, gate }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let s = self.act.apply(x.adaptive_avg_pool2d([1, 1]).apply(&self.fc1)).apply(&self.fc2);
        let s = match self.gate {
            Gate::Sigmoid => s.sigmoid(),
            Gate::Hardsigmoid => s.hardsigmoid(),
        };
        x * s
    }

    fn emit_onnx(&self, g: &mut GraphBuilder, x: &Value) -> Result<Value, GraphError> {
        let p = g.global_pool(x);
        let s = g.conv_centred(&p, &self.fc1, 1)?;
        let s = g.act(&s, self.act);
        let s = g.conv_centred(&s, &self.fc2, 1)?;
        let s = match self.gate {
            Gate::Sigmoid => g.sigmoid(&s),
            Gate::Hardsigmoid => g.hardsigmoid(&s),
        };
        Ok(g.mul(x, &s))
    }
}

/// An inverted residual block: expand, depthwise, optional squeeze-excite, project.
#[derive(Debug)]
pub(crate) struct InvertedResidual {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    se: Option<SqueezeExcite>,
    project: ConvBn,
    residual: bool,
    act: Act,
}

impl InvertedResidual {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = match &self.expand {
            Some(e) => self.act.apply(e.forward_t(x, train)),
            None => x.shallow_clone(),
        };
        h = self.act.apply(self.depthwise.forward_t(&h, train));
        if let Some(se) = &self.se {
            h = se.forward(&h);
        }
        h = self.project.forward_t(&h, train);
        if self.residual {
            h + x
        } else {
            h
        }
    }

    fn emit_onnx(&self, g: &mut GraphBuilder, x: &Value) -> Result<Value, GraphError> {
        let mut h = match &self.expand {
            Some(e) => {
                let y = e.emit_onnx(g, x)?;
                g.act(&y, self.act)
            }
            None => x.clone(),
        };
        let y = self.depthwise.emit_onnx(g, &h)?;
        h = g.act(&y, self.act);
        if let Some(se) = &self.se {
            h = se.emit_onnx(g, &h)?;
        }
        h = self.project.emit_onnx(g, &h)?;
        Ok(if self.residual { g.add(&h, x) } else { h })
    }
}

/// One block of EfficientNet-B0 or MobileNetV3 as torchvision lays it out under `block`:
/// `block.0` expand (when `mid != c_in`), then depthwise, squeeze-excite (when asked), project.
struct BlockConf {
    c_in: i64,
    kernel: i64,
    mid: i64,
    c_out: i64,
    stride: i64,
    act: Act,
    /// Squeeze channels and gate, or no squeeze-excitation.
    se: Option<(i64, Act, Gate)>,
    eps: f64,
}

impl BlockConf {
    fn build(&self, bp: nn::Path, bns: &mut Vec<Rc<Bn>>) -> InvertedResidual {
        let mut idx = 0;
        let expand = (self.mid != self.c_in).then(|| {
            idx += 1;
            ConvBn::new(&bp / 0, self.c_in, self.mid, 1, 1, 1, self.eps, bns)
        });
        let depthwise = ConvBn::new(&bp / idx, self.mid, self.mid, self.kernel, self.stride, self.mid, self.eps, bns);
        idx += 1;
        let se = self.se.map(|(squeeze, act, gate)| {
            idx += 1;
            SqueezeExcite::new(&bp / (idx - 1), self.mid, squeeze, act, gate)
        });
        let project = ConvBn::new(&bp / idx, self.mid, self.c_out, 1, 1, 1, self.eps, bns);
        InvertedResidual { expand, depthwise, se, project, residual: self.stride == 1 && self.c_in == self.c_out, act: self.act }
    }
}

/// torchvision's `_make_divisible(v, 8)`: channel counts rounded to multiples of 8.
fn make_divisible(v: i64) -> i64 {
    let rounded = ((v + 4) / 8 * 8).max(8);
    if (rounded as f64) < 0.9 * v as f64 {
        rounded + 8
    } else {
        rounded
    }
}

/// The classifier after global pooling.
#[derive(Debug)]
enum Classifier {
    /// Dropout then one linear layer (`classifier.1`).
    Linear(nn::Linear),
    /// MobileNetV3: linear (`classifier.0`), hardswish, dropout, linear (`classifier.3`).
    Hidden { hidden: nn::Linear, out: nn::Linear },
}

/// MobileNetV2, MobileNetV3 or EfficientNet-B0 in torchvision's layout.
#[derive(Debug)]
pub struct TorchvisionMobile {
    stem: ConvBn,
    blocks: Vec<InvertedResidual>,
    head: ConvBn,
    classifier: Classifier,
    /// Activation after the stem and the last convolution.
    act: Act,
}

impl TorchvisionMobile {
    /// MobileNetV2 (width 1.0).
    pub fn mobilenet_v2(p: &nn::Path, classes: i64, bns: &mut Vec<Rc<Bn>>) -> Self {
        let f = p / "features";
        let stem = ConvBn::new(&f / 0, 3, 32, 3, 2, 1, BN_EPS, bns);
        let mut blocks = Vec::new();
        let mut c_in = 32;
        let mut idx = 1;
        for (t, c, n, s) in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)] {
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                let bp = &f / idx / "conv";
                let mid = c_in * t;
                let (expand, off) = if t != 1 { (Some(ConvBn::new(&bp / 0, c_in, mid, 1, 1, 1, BN_EPS, bns)), 1) } else { (None, 0) };
                let depthwise = ConvBn::new(&bp / off, mid, mid, 3, stride, mid, BN_EPS, bns);
                // The projection is a bare conv at `conv.{off+1}` and its norm at `conv.{off+2}`.
                let conv = nn::conv2d(&bp / (off + 1), mid, c, 1, nn::ConvConfig { bias: false, ..Default::default() });
                let bn = Rc::new(Bn::new(&bp / (off + 2), c, BN_EPS));
                bns.push(bn.clone());
                blocks.push(InvertedResidual { expand, depthwise, se: None, project: ConvBn { conv, bn, stride: 1 }, residual: stride == 1 && c_in == c, act: Act::Relu6 });
                c_in = c;
                idx += 1;
            }
        }
        let head = ConvBn::new(&f / idx, c_in, 1280, 1, 1, 1, BN_EPS, bns);
        let classifier = Classifier::Linear(nn::linear(p / "classifier" / 1, 1280, classes, Default::default()));
        TorchvisionMobile { stem, blocks, head, classifier, act: Act::Relu6 }
    }

    /// EfficientNet-B0.
    pub fn efficientnet_b0(p: &nn::Path, classes: i64, bns: &mut Vec<Rc<Bn>>) -> Self {
        let f = p / "features";
        let stem = ConvBn::new(&f / 0, 3, 32, 3, 2, 1, BN_EPS, bns);
        let mut blocks = Vec::new();
        let stages = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)];
        for (stage, (e, kernel, s, c_in0, c_out, n)) in stages.into_iter().enumerate() {
            for i in 0..n {
                let (c_in, stride) = if i == 0 { (c_in0, s) } else { (c_out, 1) };
                let se = Some(((c_in / 4).max(1), Act::Silu, Gate::Sigmoid));
                let conf = BlockConf { c_in, kernel, mid: c_in * e, c_out, stride, act: Act::Silu, se, eps: BN_EPS };
                blocks.push(conf.build(&f / (stage + 1) / i / "block", bns));
            }
        }
        let head = ConvBn::new(&f / 8, 320, 1280, 1, 1, 1, BN_EPS, bns);
        let classifier = Classifier::Linear(nn::linear(p / "classifier" / 1, 1280, classes, Default::default()));
        TorchvisionMobile { stem, blocks, head, classifier, act: Act::Silu }
    }

    /// MobileNetV3-Large (`large`) or -Small, width 1.0, as torchvision's `mobilenet_v3_*`.
    pub fn mobilenet_v3(p: &nn::Path, large: bool, classes: i64, bns: &mut Vec<Rc<Bn>>) -> Self {
        // (kernel, expanded, out, squeeze-excite, hardswish, stride) per block, from the paper's tables 1 and 2.
        const LARGE: [(i64, i64, i64, bool, bool, i64); 15] = [
            (3, 16, 16, false, false, 1),
            (3, 64, 24, false, false, 2),
            (3, 72, 24, false, false, 1),
            (5, 72, 40, true, false, 2),
            (5, 120, 40, true, false, 1),
            (5, 120, 40, true, false, 1),
            (3, 240, 80, false, true, 2),
            (3, 200, 80, false, true, 1),
            (3, 184, 80, false, true, 1),
            (3, 184, 80, false, true, 1),
            (3, 480, 112, true, true, 1),
            (3, 672, 112, true, true, 1),
            (5, 672, 160, true, true, 2),
            (5, 960, 160, true, true, 1),
            (5, 960, 160, true, true, 1),
        ];
        const SMALL: [(i64, i64, i64, bool, bool, i64); 11] = [
            (3, 16, 16, true, false, 2),
            (3, 72, 24, false, false, 2),
            (3, 88, 24, false, false, 1),
            (5, 96, 40, true, true, 2),
            (5, 240, 40, true, true, 1),
            (5, 240, 40, true, true, 1),
            (5, 120, 48, true, true, 1),
            (5, 144, 48, true, true, 1),
            (5, 288, 96, true, true, 2),
            (5, 576, 96, true, true, 1),
            (5, 576, 96, true, true, 1),
        ];
        let (table, last_channel): (&[_], i64) = if large { (&LARGE, 1280) } else { (&SMALL, 1024) };
        let f = p / "features";
        let stem = ConvBn::new(&f / 0, 3, 16, 3, 2, 1, BN_EPS_V3, bns);
        let mut blocks = Vec::new();
        let mut c_in = 16;
        for (i, &(kernel, mid, c_out, se, hs, stride)) in table.iter().enumerate() {
            let act = if hs { Act::Hardswish } else { Act::Relu };
            let se = se.then(|| (make_divisible(mid / 4), Act::Relu, Gate::Hardsigmoid));
            let conf = BlockConf { c_in, kernel, mid, c_out, stride, act, se, eps: BN_EPS_V3 };
            blocks.push(conf.build(&f / (i + 1) / "block", bns));
            c_in = c_out;
        }
        let last_conv = 6 * c_in;
        let head = ConvBn::new(&f / (table.len() + 1), c_in, last_conv, 1, 1, 1, BN_EPS_V3, bns);
        let c = p / "classifier";
        let classifier = Classifier::Hidden { hidden: nn::linear(&c / 0, last_conv, last_channel, Default::default()), out: nn::linear(&c / 3, last_channel, classes, Default::default()) };
        TorchvisionMobile { stem, blocks, head, classifier, act: Act::Hardswish }
    }

    /// Names of the layers `forward_t` can tap: `blocks.N`, then `head` (the last conv block).
    pub fn tap_names(&self) -> Vec<String> {
        (0..self.blocks.len()).map(|i| format!("blocks.{i}")).chain(["head".to_string()]).collect()
    }

    /// The input of the final linear layer `[N, d]` (before its dropout), with `tap` capturing
    /// a layer's output on the way.
    pub fn head_input(&self, x: &Tensor, train: bool, tap: &mut Tap) -> Tensor {
        let mut x = self.act.apply(self.stem.forward_t(x, train));
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward_t(&x, train);
            if tap.is_on() {
                tap.see(&format!("blocks.{i}"), &x);
            }
        }
        let x = self.act.apply(self.head.forward_t(&x, train));
        tap.see("head", &x);
        let pooled = x.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
        match &self.classifier {
            Classifier::Linear(_) => pooled,
            Classifier::Hidden { hidden, .. } => pooled.apply(hidden).hardswish(),
        }
    }

    fn output_layer(&self) -> &nn::Linear {
        match &self.classifier {
            Classifier::Linear(l) | Classifier::Hidden { out: l, .. } => l,
        }
    }

    /// Logits for a batch of normalised images; `tap` captures a layer's output on the way.
    pub fn forward_t(&self, x: &Tensor, train: bool, tap: &mut Tap) -> Tensor {
        self.head_input(x, train, tap).dropout(0.2, train).apply(self.output_layer())
    }

    /// The eval-mode forward pass as ONNX nodes, from normalised images `x` to logits.
    pub fn emit_onnx(&self, g: &mut GraphBuilder, x: &Value) -> Result<Value, GraphError> {
        let y = self.stem.emit_onnx(g, x)?;
        let mut h = g.act(&y, self.act);
        for b in &self.blocks {
            h = b.emit_onnx(g, &h)?;
        }
        let y = self.head.emit_onnx(g, &h)?;
        let y = g.act(&y, self.act);
        let mut pooled = g.pool_flatten(&y);
        if let Classifier::Hidden { hidden, .. } = &self.classifier {
            let z = g.linear(&pooled, hidden)?;
            pooled = g.act(&z, Act::Hardswish);
        }
        g.linear(&pooled, self.output_layer())
    }
}

#[cfg(test)]
mod tests {
    use super::make_divisible;

    #[test]
    fn channel_rounding_matches_torchvision() {
        // torchvision's SE squeeze sizes for MobileNetV3: 16/4 -> 8, 72/4 -> 24, 120/4 -> 32, 960/4 -> 240.
        for (v, want) in [(4, 8), (18, 24), (30, 32), (240, 240), (22, 24), (36, 40)] {
            assert_eq!(make_divisible(v), want, "{v}");
        }
    }
}

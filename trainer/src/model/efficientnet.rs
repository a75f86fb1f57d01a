//! EfficientNet-Lite0 with efficientnet_pytorch tensor names (`_conv_stem`, `_blocks.N...`,
//! `_fc`), so the shipped ImageNet checkpoint loads name for name.

use std::rc::Rc;

use tch::{nn, Tensor};

use super::bn::Bn;
use super::{Act, Tap};
use crate::export::graph::{GraphBuilder, GraphError, Value};

const BN_EPS: f64 = 1e-3;

/// (expand ratio, kernel, stride, in, out, repeats) of each stage.
const LITE0_STAGES: [(i64, i64, i64, i64, i64, usize); 7] =
    [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)];

/// A convolution with TensorFlow "SAME" padding, as the checkpoint was trained with.
#[derive(Debug)]
struct SameConv {
    conv: nn::Conv2D,
    kernel: i64,
    stride: i64,
    groups: i64,
}

impl SameConv {
    fn new(p: nn::Path, c_in: i64, c_out: i64, kernel: i64, stride: i64, groups: i64) -> Self {
        let cfg = nn::ConvConfig { stride, groups, bias: false, padding: 0, ..Default::default() };
        SameConv { conv: nn::conv2d(p, c_in, c_out, kernel, cfg), kernel, stride, groups }
    }

    /// Total padding along a dimension of `size` for TensorFlow's "same" output size.
    fn same_pad(&self, size: i64) -> i64 {
        let out = (size + self.stride - 1) / self.stride;
        ((out - 1) * self.stride + self.kernel - size).max(0)
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (ph, pw) = (self.same_pad(x.size()[2]), self.same_pad(x.size()[3]));
        if ph % 2 == 0 && pw % 2 == 0 {
            // Even padding splits evenly: the convolution pads by itself, without a padded copy
            // of the activations (and of their gradient) per layer.
            let c = &self.conv;
            return x.conv2d(&c.ws, c.bs.as_ref(), [self.stride; 2], [ph / 2, pw / 2], [1, 1], self.groups);
        }
        x.constant_pad_nd([pw / 2, pw - pw / 2, ph / 2, ph - ph / 2]).apply(&self.conv)
    }

    fn emit_onnx(&self, g: &mut GraphBuilder, x: &Value, bn: &Bn, act: Option<Act>) -> Result<Value, GraphError> {
        let (ph, pw) = (self.same_pad(x.hw.0), self.same_pad(x.hw.1));
        let y = g.conv(x, &self.conv, self.stride, [ph / 2, pw / 2, ph - ph / 2, pw - pw / 2])?;
        let y = g.batch_norm(&y, bn)?;
        Ok(match act {
            Some(a) => g.act(&y, a),
            None => y,
        })
    }
}

#[derive(Debug)]
struct MbConv {
    expand: Option<(SameConv, Rc<Bn>)>,
    depthwise: SameConv,
    bn1: Rc<Bn>,
    project: SameConv,
    bn2: Rc<Bn>,
    residual: bool,
}

/// EfficientNet-Lite0.
#[derive(Debug)]
pub struct EfficientNetLite {
    stem: SameConv,
    bn0: Rc<Bn>,
    blocks: Vec<MbConv>,
    head_conv: SameConv,
    bn1: Rc<Bn>,
    fc: nn::Linear,
}

impl EfficientNetLite {
    /// Builds Lite0 under `p` with a `classes`-way head; registers its batch norms in `bns`.
    pub fn lite0(p: &nn::Path, classes: i64, bns: &mut Vec<Rc<Bn>>) -> Self {
        let mut bn = |path: nn::Path, c: i64| {
            let b = Rc::new(Bn::new(path, c, BN_EPS));
            bns.push(b.clone());
            b
        };
        let stem = SameConv::new(p / "_conv_stem", 3, 32, 3, 2, 1);
        let bn0 = bn(p / "_bn0", 32);
        let mut blocks = Vec::new();
        for (expand, k, stride, c_in, c_out, repeats) in LITE0_STAGES {
            for r in 0..repeats {
                let (c_in, stride) = if r == 0 { (c_in, stride) } else { (c_out, 1) };
                let bp = p / "_blocks" / blocks.len();
                let mid = c_in * expand;
                let expand_layer = (expand != 1).then(|| (SameConv::new(&bp / "_expand_conv", c_in, mid, 1, 1, 1), bn(&bp / "_bn0", mid)));
                let depthwise = SameConv::new(&bp / "_depthwise_conv", mid, mid, k, stride, mid);
                let bn1 = bn(&bp / "_bn1", mid);
                let project = SameConv::new(&bp / "_project_conv", mid, c_out, 1, 1, 1);
                let bn2 = bn(&bp / "_bn2", c_out);
                blocks.push(MbConv { expand: expand_layer, depthwise, bn1, project, bn2, residual: stride == 1 && c_in == c_out });
            }
        }
        let head_conv = SameConv::new(p / "_conv_head", 320, 1280, 1, 1, 1);
        let bn1 = bn(p / "_bn1", 1280);
        let fc = nn::linear(p / "_fc", 1280, classes, Default::default());
        EfficientNetLite { stem, bn0, blocks, head_conv, bn1, fc }
    }

    /// Names of the layers `forward_t` can tap: `blocks.N`, then `head` (the last conv block).
    pub fn tap_names(&self) -> Vec<String> {
        (0..self.blocks.len()).map(|i| format!("blocks.{i}")).chain(["head".to_string()]).collect()
    }

    /// The pooled features the head sees `[N, 1280]` (before its dropout), with `tap`
    /// capturing a layer's output on the way.
    pub fn head_input(&self, x: &Tensor, train: bool, tap: &mut Tap) -> Tensor {
        let mut x = self.bn0.forward_t(&self.stem.forward(x), train).relu6();
        for (i, b) in self.blocks.iter().enumerate() {
            let input = &x;
            let mut h = match &b.expand {
                Some((conv, bn)) => bn.forward_t(&conv.forward(input), train).relu6(),
                None => input.shallow_clone(),
            };
            h = b.bn1.forward_t(&b.depthwise.forward(&h), train).relu6();
            h = b.bn2.forward_t(&b.project.forward(&h), train);
            x = if b.residual { h + input } else { h };
            if tap.is_on() {
                tap.see(&format!("blocks.{i}"), &x);
            }
        }
        let x = self.bn1.forward_t(&self.head_conv.forward(&x), train).relu6();
        tap.see("head", &x);
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }

    /// Logits for a batch of normalised images; `tap` captures a layer's output on the way.
    pub fn forward_t(&self, x: &Tensor, train: bool, tap: &mut Tap) -> Tensor {
        self.head_input(x, train, tap).dropout(0.2, train).apply(&self.fc)
    }

    /// The eval-mode forward pass as ONNX nodes, from normalised images `x` to logits.
    pub fn emit_onnx(&self, g: &mut GraphBuilder, x: &Value) -> Result<Value, GraphError> {
        let relu6 = Some(Act::Relu6);
        let mut x = self.stem.emit_onnx(g, x, &self.bn0, relu6)?;
        for b in &self.blocks {
            let h = match &b.expand {
                Some((conv, bn)) => conv.emit_onnx(g, &x, bn, relu6)?,
                None => x.clone(),
            };
            let h = b.depthwise.emit_onnx(g, &h, &b.bn1, relu6)?;
            let h = b.project.emit_onnx(g, &h, &b.bn2, None)?;
            x = if b.residual { g.add(&h, &x) } else { h };
        }
        let x = self.head_conv.emit_onnx(g, &x, &self.bn1, relu6)?;
        let pooled = g.pool_flatten(&x);
        g.linear(&pooled, &self.fc)
    }
}

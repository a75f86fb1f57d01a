//! Torchvision-layout MobileNetV2 and EfficientNet-B0 (tensor names as torchvision writes them,
//! so torchvision checkpoints import directly).

use std::rc::Rc;

use tch::{nn, Tensor};

use super::bn::Bn;
use super::Tap;

const BN_EPS: f64 = 1e-5;

/// A convolution followed by batch norm (torchvision's `Conv2dNormActivation` without the act).
#[derive(Debug)]
struct ConvBn {
    conv: nn::Conv2D,
    bn: Rc<Bn>,
}

impl ConvBn {
    fn new(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, groups: i64, bns: &mut Vec<Rc<Bn>>) -> Self {
        let conv = nn::conv2d(&p / 0, c_in, c_out, k, nn::ConvConfig { stride, padding: (k - 1) / 2, groups, bias: false, ..Default::default() });
        let bn = Rc::new(Bn::new(&p / 1, c_out, BN_EPS));
        bns.push(bn.clone());
        ConvBn { conv, bn }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&x.apply(&self.conv), train)
    }
}

/// Squeeze-and-excitation as in torchvision (`fc1`, `fc2` 1x1 convolutions with bias).
#[derive(Debug)]
struct SqueezeExcite {
    fc1: nn::Conv2D,
    fc2: nn::Conv2D,
}

impl SqueezeExcite {
    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.adaptive_avg_pool2d([1, 1]).apply(&self.fc1).silu().apply(&self.fc2).sigmoid();
        x * s
    }
}

#[derive(Debug)]
struct InvertedResidual {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    se: Option<SqueezeExcite>,
    project: ConvBn,
    residual: bool,
    swish: bool,
}

impl InvertedResidual {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let act = |t: Tensor| if self.swish { t.silu() } else { t.relu6() };
        let mut h = match &self.expand {
            Some(e) => act(e.forward_t(x, train)),
            None => x.shallow_clone(),
        };
        h = act(self.depthwise.forward_t(&h, train));
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
}

/// MobileNetV2 or EfficientNet-B0 in torchvision's layout.
#[derive(Debug)]
pub struct TorchvisionMobile {
    stem: ConvBn,
    blocks: Vec<InvertedResidual>,
    head: ConvBn,
    classifier: nn::Linear,
    swish: bool,
}

impl TorchvisionMobile {
    /// MobileNetV2 (width 1.0).
    pub fn mobilenet_v2(p: &nn::Path, classes: i64, bns: &mut Vec<Rc<Bn>>) -> Self {
        let f = p / "features";
        let stem = ConvBn::new(&f / 0, 3, 32, 3, 2, 1, bns);
        let mut blocks = Vec::new();
        let mut c_in = 32;
        let mut idx = 1;
        for (t, c, n, s) in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)] {
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                let bp = &f / idx / "conv";
                let mid = c_in * t;
                let (expand, off) = if t != 1 { (Some(ConvBn::new(&bp / 0, c_in, mid, 1, 1, 1, bns)), 1) } else { (None, 0) };
                let depthwise = ConvBn::new(&bp / off, mid, mid, 3, stride, mid, bns);
                // The projection is a bare conv at `conv.{off+1}` and its norm at `conv.{off+2}`.
                let conv = nn::conv2d(&bp / (off + 1), mid, c, 1, nn::ConvConfig { bias: false, ..Default::default() });
                let bn = Rc::new(Bn::new(&bp / (off + 2), c, BN_EPS));
                bns.push(bn.clone());
                blocks.push(InvertedResidual { expand, depthwise, se: None, project: ConvBn { conv, bn }, residual: stride == 1 && c_in == c, swish: false });
                c_in = c;
                idx += 1;
            }
        }
        let head = ConvBn::new(&f / idx, c_in, 1280, 1, 1, 1, bns);
        let classifier = nn::linear(p / "classifier" / 1, 1280, classes, Default::default());
        TorchvisionMobile { stem, blocks, head, classifier, swish: false }
    }

    /// EfficientNet-B0.
    pub fn efficientnet_b0(p: &nn::Path, classes: i64, bns: &mut Vec<Rc<Bn>>) -> Self {
        let f = p / "features";
        let stem = ConvBn::new(&f / 0, 3, 32, 3, 2, 1, bns);
        let mut blocks = Vec::new();
        let stages = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)];
        for (stage, (e, k, s, c_in0, c_out, n)) in stages.into_iter().enumerate() {
            for i in 0..n {
                let (c_in, stride) = if i == 0 { (c_in0, s) } else { (c_out, 1) };
                let bp = &f / (stage + 1) / i / "block";
                let mid = c_in * e;
                let (expand, off) = if e != 1 { (Some(ConvBn::new(&bp / 0, c_in, mid, 1, 1, 1, bns)), 1) } else { (None, 0) };
                let depthwise = ConvBn::new(&bp / off, mid, mid, k, stride, mid, bns);
                let squeeze = (c_in / 4).max(1);
                let sp = &bp / (off + 1);
                let se = SqueezeExcite { fc1: nn::conv2d(&sp / "fc1", mid, squeeze, 1, Default::default()), fc2: nn::conv2d(&sp / "fc2", squeeze, mid, 1, Default::default()) };
                let project = ConvBn::new(&bp / (off + 2), mid, c_out, 1, 1, 1, bns);
                blocks.push(InvertedResidual { expand, depthwise, se: Some(se), project, residual: stride == 1 && c_in == c_out, swish: true });
            }
        }
        let head = ConvBn::new(&f / 8, 320, 1280, 1, 1, 1, bns);
        let classifier = nn::linear(p / "classifier" / 1, 1280, classes, Default::default());
        TorchvisionMobile { stem, blocks, head, classifier, swish: true }
    }

    /// Names of the layers `forward_t` can tap: `blocks.N`, then `head` (the last conv block).
    pub fn tap_names(&self) -> Vec<String> {
        (0..self.blocks.len()).map(|i| format!("blocks.{i}")).chain(["head".to_string()]).collect()
    }

    /// Logits for a batch of normalised images; `tap` captures a layer's output on the way.
    pub fn forward_t(&self, x: &Tensor, train: bool, tap: &mut Tap) -> Tensor {
        let act = |t: Tensor| if self.swish { t.silu() } else { t.relu6() };
        let mut x = act(self.stem.forward_t(x, train));
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward_t(&x, train);
            if tap.is_on() {
                tap.see(&format!("blocks.{i}"), &x);
            }
        }
        let x = act(self.head.forward_t(&x, train));
        tap.see("head", &x);
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1).dropout(0.2, train).apply(&self.classifier)
    }
}

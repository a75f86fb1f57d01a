//! ResNet-18/34/50 with torchvision tensor names, so torchvision checkpoints import directly.

use std::rc::Rc;

use tch::{nn, Tensor};

use super::bn::Bn;
use super::{Act, Tap};
use crate::export::graph::{GraphBuilder, GraphError, Value};

const BN_EPS: f64 = 1e-5;

fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64) -> nn::Conv2D {
    nn::conv2d(p, c_in, c_out, k, nn::ConvConfig { stride, padding: k / 2, bias: false, ..Default::default() })
}

#[derive(Debug)]
struct Block {
    convs: Vec<(nn::Conv2D, Rc<Bn>)>,
    downsample: Option<(nn::Conv2D, Rc<Bn>)>,
    /// The block's stride, on its first 3x3 convolution (torchvision's ResNet v1.5) and the downsample.
    stride: i64,
}

impl Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = x.shallow_clone();
        let last = self.convs.len() - 1;
        for (i, (c, bn)) in self.convs.iter().enumerate() {
            h = bn.forward_t(&h.apply(c), train);
            if i != last {
                h = h.relu();
            }
        }
        let shortcut = match &self.downsample {
            Some((c, bn)) => bn.forward_t(&x.apply(c), train),
            None => x.shallow_clone(),
        };
        (h + shortcut).relu()
    }

    fn emit_onnx(&self, g: &mut GraphBuilder, x: &Value) -> Result<Value, GraphError> {
        let strided = if self.convs.len() == 3 { 1 } else { 0 };
        let last = self.convs.len() - 1;
        let mut h = x.clone();
        for (i, (c, bn)) in self.convs.iter().enumerate() {
            let y = g.conv_centred(&h, c, if i == strided { self.stride } else { 1 })?;
            h = g.batch_norm(&y, bn)?;
            if i != last {
                h = g.act(&h, Act::Relu);
            }
        }
        let shortcut = match &self.downsample {
            Some((c, bn)) => {
                let y = g.conv_centred(x, c, self.stride)?;
                g.batch_norm(&y, bn)?
            }
            None => x.clone(),
        };
        let sum = g.add(&h, &shortcut);
        Ok(g.act(&sum, Act::Relu))
    }
}

/// A torchvision-layout ResNet.
#[derive(Debug)]
pub struct ResNet {
    conv1: nn::Conv2D,
    bn1: Rc<Bn>,
    layers: Vec<Block>,
    /// Index in `layers` of each stage's last block.
    stage_ends: [usize; 4],
    fc: nn::Linear,
}

impl ResNet {
    /// Builds a ResNet with `blocks` per stage, bottleneck blocks when `bottleneck`.
    pub fn new(p: &nn::Path, blocks: [usize; 4], bottleneck: bool, classes: i64, bns: &mut Vec<Rc<Bn>>) -> Self {
        let mut bn = |path: nn::Path, c: i64| {
            let b = Rc::new(Bn::new(path, c, BN_EPS));
            bns.push(b.clone());
            b
        };
        let expansion = if bottleneck { 4 } else { 1 };
        let conv1 = nn::conv2d(p / "conv1", 3, 64, 7, nn::ConvConfig { stride: 2, padding: 3, bias: false, ..Default::default() });
        let bn1 = bn(p / "bn1", 64);
        let mut layers = Vec::new();
        let mut c_in = 64;
        for (stage, &n) in blocks.iter().enumerate() {
            let width = 64 << stage;
            for i in 0..n {
                let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                let bp = p / format!("layer{}", stage + 1) / i;
                let c_out = width * expansion;
                let convs = if bottleneck {
                    vec![
                        (conv(&bp / "conv1", c_in, width, 1, 1), bn(&bp / "bn1", width)),
                        (conv(&bp / "conv2", width, width, 3, stride), bn(&bp / "bn2", width)),
                        (conv(&bp / "conv3", width, c_out, 1, 1), bn(&bp / "bn3", c_out)),
                    ]
                } else {
                    vec![(conv(&bp / "conv1", c_in, width, 3, stride), bn(&bp / "bn1", width)), (conv(&bp / "conv2", width, width, 3, 1), bn(&bp / "bn2", width))]
                };
                let downsample = (stride != 1 || c_in != c_out).then(|| (conv(&bp / "downsample" / 0, c_in, c_out, 1, stride), bn(&bp / "downsample" / 1, c_out)));
                layers.push(Block { convs, downsample, stride });
                c_in = c_out;
            }
        }
        let fc = nn::linear(p / "fc", c_in, classes, Default::default());
        let mut stage_ends = [0; 4];
        let mut end = 0;
        for (stage, &n) in blocks.iter().enumerate() {
            end += n;
            stage_ends[stage] = end - 1;
        }
        ResNet { conv1, bn1, layers, stage_ends, fc }
    }

    /// Names of the layers `forward_t` can tap: the four stages, last = the last conv block.
    pub fn tap_names(&self) -> Vec<String> {
        (1..=4).map(|i| format!("layer{i}")).collect()
    }

    /// The pooled features the head sees `[N, d]`, with `tap` capturing a layer's output.
    pub fn head_input(&self, x: &Tensor, train: bool, tap: &mut Tap) -> Tensor {
        let mut x = self.bn1.forward_t(&x.apply(&self.conv1), train).relu().max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for (i, b) in self.layers.iter().enumerate() {
            x = b.forward_t(&x, train);
            if let Some(stage) = self.stage_ends.iter().position(|&end| end == i).filter(|_| tap.is_on()) {
                tap.see(&format!("layer{}", stage + 1), &x);
            }
        }
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }

    /// Logits for a batch of normalised images; `tap` captures a layer's output on the way.
    pub fn forward_t(&self, x: &Tensor, train: bool, tap: &mut Tap) -> Tensor {
        self.head_input(x, train, tap).apply(&self.fc)
    }

    /// The eval-mode forward pass as ONNX nodes, from normalised images `x` to logits.
    pub fn emit_onnx(&self, g: &mut GraphBuilder, x: &Value) -> Result<Value, GraphError> {
        let y = g.conv_centred(x, &self.conv1, 2)?;
        let y = g.batch_norm(&y, &self.bn1)?;
        let y = g.act(&y, Act::Relu);
        let mut h = g.max_pool(&y, 3, 2, 1);
        for b in &self.layers {
            h = b.emit_onnx(g, &h)?;
        }
        let pooled = g.pool_flatten(&h);
        g.linear(&pooled, &self.fc)
    }
}

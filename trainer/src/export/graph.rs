//! Builds an ONNX graph op by op from a network's layers: each architecture's `emit_onnx` walks
//! its layers in forward order and calls these, so the graph is the forward pass in eval mode.

use std::collections::HashMap;

use medmerge_crds::VectorEncoding;
use tch::{nn, Tensor};

use super::proto::{AttributeProto, NodeProto, TensorProto, ATTR_FLOAT, ATTR_INT, ATTR_INTS, FLOAT, INT8};
use crate::model::{tensor_to_vec, Act, Bn};
use crate::release::encoding::{encode, Encoded};

/// A value flowing through the graph: its name and, for feature maps, its channels and size
/// (EfficientNet-Lite's "same" padding depends on the input size).
#[derive(Clone, Debug)]
pub struct Value {
    /// Name in the graph.
    pub name: String,
    /// Channels.
    pub c: i64,
    /// Spatial height and width (1 x 1 after pooling).
    pub hw: (i64, i64),
}

/// Errors while building the graph.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// A layer's tensor is not one of the network's variables (a bug in an `emit_onnx`).
    #[error("a tensor of shape {0} is not one of the network's variables")]
    NoWeight(String),
    /// A batch-norm layer without scale and shift.
    #[error("batch-norm layer {0} has no affine weight and bias")]
    NoAffine(String),
    /// A libtorch read failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The nodes and initializers of a graph under construction.
pub struct GraphBuilder {
    pub(super) nodes: Vec<NodeProto>,
    pub(super) initializers: Vec<TensorProto>,
    /// Int8 weights, with the head's name prefix (kept float32).
    int8: Option<&'static str>,
    next: usize,
    /// The network's variable names by storage address, so initializers keep medmerge's names.
    names: HashMap<usize, String>,
}

/// Whether weight `name` of this shape is stored as int8 in an int8 export: every convolution
/// kernel and linear weight (two or more dimensions) except the first convolution (it sees the
/// image's three channels) and the classification head (`head_prefix`), which are small and the
/// layers quantisation hurts most; biases and batch-norm tensors stay float32.
pub fn quantised(name: &str, shape: &[i64], head_prefix: &str) -> bool {
    let first_conv = shape.len() == 4 && shape[1] == 3;
    shape.len() >= 2 && !first_conv && !name.starts_with(head_prefix)
}

/// A weight's values as the int8 export stores them: one scale per output channel, round to
/// nearest (the same encoding as `int8` data vectors).
pub fn int8_encode(values: &[f32], shape: &[i64]) -> (Vec<i8>, Vec<f32>) {
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    match encode(values, &dims, VectorEncoding::Int8, 1.0) {
        Encoded::Int8 { q, scales } => (q, scales),
        _ => unreachable!("encode returns the encoding it was asked for"),
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), i, r#type: ATTR_INT, ..Default::default() }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), ints: ints.to_vec(), r#type: ATTR_INTS, ..Default::default() }
}

fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto { name: name.into(), f, r#type: ATTR_FLOAT, ..Default::default() }
}

impl GraphBuilder {
    /// An empty graph; `int8` (with the network's head prefix) stores weights as in
    /// [`quantised`].
    pub fn new(variables: &[(String, Tensor)], int8: Option<&'static str>) -> Self {
        let names = variables.iter().map(|(n, t)| (t.data_ptr() as usize, n.clone())).collect();
        GraphBuilder { nodes: Vec::new(), initializers: Vec::new(), int8, next: 0, names }
    }

    fn fresh(&mut self, op: &str) -> String {
        self.next += 1;
        format!("{}_{}", op.to_lowercase(), self.next)
    }

    /// Adds a node with one output and returns the output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
        let out = self.fresh(op);
        self.nodes.push(NodeProto { input: inputs.iter().map(|s| s.to_string()).collect(), output: vec![out.clone()], name: out.clone(), op_type: op.into(), attribute });
        out
    }

    /// A float32 constant.
    pub fn constant(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(TensorProto { dims: dims.to_vec(), data_type: FLOAT, name: name.into(), raw_data });
        name.into()
    }

    /// A weight tensor under its medmerge name, as float32 or (int8 export, kernels and
    /// matrices) as int8 with per-output-channel scales behind a `DequantizeLinear`.
    pub fn weight(&mut self, t: &Tensor) -> Result<String, GraphError> {
        let name = self.names.get(&(t.data_ptr() as usize)).cloned().ok_or_else(|| GraphError::NoWeight(format!("{:?}", t.size())))?;
        let name = name.as_str();
        let dims = t.size();
        let values = tensor_to_vec(t)?;
        if !self.int8.is_some_and(|head| quantised(name, &dims, head)) {
            return Ok(self.constant(name, &dims, &values));
        }
        let (q, scales) = int8_encode(&values, &dims);
        let raw_data = q.iter().map(|&v| v as u8).collect();
        self.initializers.push(TensorProto { dims: dims.clone(), data_type: INT8, name: format!("{name}.int8"), raw_data });
        let scale = self.constant(&format!("{name}.scale"), &[scales.len() as i64], &scales);
        let zero = format!("{name}.zero_point");
        self.initializers.push(TensorProto { dims: vec![scales.len() as i64], data_type: INT8, name: zero.clone(), raw_data: vec![0; scales.len()] });
        Ok(self.node("DequantizeLinear", &[&format!("{name}.int8"), &scale, &zero], vec![attr_int("axis", 0)]))
    }

    /// A convolution with explicit `[top, left, bottom, right]` padding.
    pub fn conv(&mut self, x: &Value, conv: &nn::Conv2D, stride: i64, pads: [i64; 4]) -> Result<Value, GraphError> {
        let size = conv.ws.size();
        let (c_out, kh, kw) = (size[0], size[2], size[3]);
        let groups = x.c / size[1];
        let w = self.weight(&conv.ws)?;
        let mut inputs = vec![x.name.clone(), w];
        if let Some(b) = &conv.bs {
            inputs.push(self.weight(b)?);
        }
        let attrs = vec![attr_ints("kernel_shape", &[kh, kw]), attr_ints("strides", &[stride, stride]), attr_ints("pads", &pads), attr_int("group", groups)];
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let out = self.node("Conv", &refs, attrs);
        let (h, w) = x.hw;
        Ok(Value { name: out, c: c_out, hw: ((h + pads[0] + pads[2] - kh) / stride + 1, (w + pads[1] + pads[3] - kw) / stride + 1) })
    }

    /// A convolution padded by half its kernel on every side (odd kernels keep the size).
    pub fn conv_centred(&mut self, x: &Value, conv: &nn::Conv2D, stride: i64) -> Result<Value, GraphError> {
        let pad = (conv.ws.size()[2] - 1) / 2;
        self.conv(x, conv, stride, [pad; 4])
    }

    /// Batch norm in eval mode (running statistics); onnxruntime folds it into the convolution.
    pub fn batch_norm(&mut self, x: &Value, bn: &Bn) -> Result<Value, GraphError> {
        let inner = &bn.inner;
        let gamma = inner.ws.as_ref().ok_or_else(|| GraphError::NoAffine(bn.name.clone()))?;
        let beta = inner.bs.as_ref().ok_or_else(|| GraphError::NoAffine(bn.name.clone()))?;
        let mut inputs = vec![x.name.clone()];
        for t in [gamma, beta, &inner.running_mean, &inner.running_var] {
            inputs.push(self.weight(t)?);
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let out = self.node("BatchNormalization", &refs, vec![attr_float("epsilon", bn.eps() as f32)]);
        Ok(Value { name: out, c: x.c, hw: x.hw })
    }

    /// An activation.
    pub fn act(&mut self, x: &Value, act: Act) -> Value {
        let name = match act {
            Act::Relu => self.node("Relu", &[&x.name], vec![]),
            Act::Relu6 => {
                let (lo, hi) = (self.scalar("relu6.min", 0.0), self.scalar("relu6.max", 6.0));
                self.node("Clip", &[&x.name, &lo, &hi], vec![])
            }
            Act::Silu => {
                let s = self.node("Sigmoid", &[&x.name], vec![]);
                self.node("Mul", &[&x.name, &s], vec![])
            }
            Act::Hardswish => self.node("HardSwish", &[&x.name], vec![]),
        };
        Value { name, c: x.c, hw: x.hw }
    }

    /// A float32 scalar constant, shared by name.
    fn scalar(&mut self, name: &str, v: f32) -> String {
        if !self.initializers.iter().any(|t| t.name == name) {
            self.constant(name, &[], &[v]);
        }
        name.into()
    }

    /// sigmoid(x).
    pub fn sigmoid(&mut self, x: &Value) -> Value {
        Value { name: self.node("Sigmoid", &[&x.name], vec![]), c: x.c, hw: x.hw }
    }

    /// relu6(x + 3) / 6, as PyTorch's hardsigmoid.
    pub fn hardsigmoid(&mut self, x: &Value) -> Value {
        Value { name: self.node("HardSigmoid", &[&x.name], vec![attr_float("alpha", 1.0 / 6.0), attr_float("beta", 0.5)]), c: x.c, hw: x.hw }
    }

    /// Elementwise `a * b` (broadcasting `b`).
    pub fn mul(&mut self, a: &Value, b: &Value) -> Value {
        Value { name: self.node("Mul", &[&a.name, &b.name], vec![]), c: a.c, hw: a.hw }
    }

    /// Elementwise `a + b`.
    pub fn add(&mut self, a: &Value, b: &Value) -> Value {
        Value { name: self.node("Add", &[&a.name, &b.name], vec![]), c: a.c, hw: a.hw }
    }

    /// Global average pooling to `[N, C, 1, 1]`.
    pub fn global_pool(&mut self, x: &Value) -> Value {
        Value { name: self.node("GlobalAveragePool", &[&x.name], vec![]), c: x.c, hw: (1, 1) }
    }

    /// `[N, C, 1, 1]` to `[N, C]`.
    pub fn flatten(&mut self, x: &Value) -> Value {
        Value { name: self.node("Flatten", &[&x.name], vec![attr_int("axis", 1)]), c: x.c, hw: (1, 1) }
    }

    /// Global average pooling and flatten: `[N, C]`.
    pub fn pool_flatten(&mut self, x: &Value) -> Value {
        let p = self.global_pool(x);
        self.flatten(&p)
    }

    /// A linear layer `x · Wᵀ + b`.
    pub fn linear(&mut self, x: &Value, l: &nn::Linear) -> Result<Value, GraphError> {
        let w = self.weight(&l.ws)?;
        let mut inputs = vec![x.name.clone(), w];
        if let Some(b) = &l.bs {
            inputs.push(self.weight(b)?);
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(Value { name: self.node("Gemm", &refs, vec![attr_int("transB", 1)]), c: l.ws.size()[0], hw: (1, 1) })
    }

    /// Max pooling (square kernel, symmetric padding).
    pub fn max_pool(&mut self, x: &Value, kernel: i64, stride: i64, pad: i64) -> Value {
        let attrs = vec![attr_ints("kernel_shape", &[kernel, kernel]), attr_ints("strides", &[stride, stride]), attr_ints("pads", &[pad; 4])];
        let (h, w) = x.hw;
        Value { name: self.node("MaxPool", &[&x.name], attrs), c: x.c, hw: ((h + 2 * pad - kernel) / stride + 1, (w + 2 * pad - kernel) / stride + 1) }
    }
}

#[cfg(test)]
mod tests {
    use super::quantised;

    #[test]
    fn int8_export_keeps_the_first_convolution_the_head_and_vectors_in_float32() {
        assert!(quantised("layer1.0.conv1.weight", &[64, 64, 3, 3], "fc."));
        assert!(quantised("classifier.0.weight", &[1280, 960], "classifier.3."), "MobileNetV3's pretrained hidden layer");
        assert!(!quantised("conv1.weight", &[64, 3, 7, 7], "fc."), "the first convolution sees the image");
        assert!(!quantised("fc.weight", &[4, 2048], "fc."), "the head");
        assert!(!quantised("layer1.0.bn1.weight", &[64], "fc."), "batch norm and biases");
    }
}

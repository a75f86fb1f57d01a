//! The merged model as ONNX (opset 17) for serving stacks and edge devices, in float32 or with
//! int8 weights.
//!
//! The graph takes `image`: float32 `[batch, 3, size, size]`, RGB in [0, 1] (resized as medmerge
//! resizes), normalises it as training did, and gives `logits` and `probabilities` (softmax, or a
//! sigmoid per label for multi-label models). Batch norm stays a node (runtimes fold it into the
//! convolution). The int8 variant stores every convolution kernel and linear weight but the first
//! convolution and the head as int8 with one scale per output channel, dequantised in the graph; [`quantise_weights`] gives the same
//! weights in a [`Network`], so its accuracy can be measured where the float model's is.

pub mod graph;
pub mod proto;

use std::path::Path;

use prost::Message;
use tch::{Kind, Tensor};

use crate::data::{MEAN, STD};
use crate::model::{tensor_to_vec, Network};
use crate::release::encoding::Encoded;
use graph::{quantised, GraphBuilder, GraphError, Value};
use proto::{Dimension, GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto, FLOAT};

/// The ONNX operator set the export targets.
pub const OPSET: i64 = 17;
/// The ONNX IR version that goes with opset 17.
const IR_VERSION: i64 = 8;

/// Errors exporting a model.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Building the graph failed.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// Writing the file failed.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Which weights the exported file stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Every weight as float32.
    Float32,
    /// Convolution kernels and linear weights (but the first convolution and the head) as int8,
    /// one scale per output channel.
    Int8Weights,
}

impl Precision {
    /// How the file's metadata and the report name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Float32 => "float32",
            Precision::Int8Weights => "int8 weights (per output channel)",
        }
    }
}

fn tensor_value(name: &str, dims: Vec<Dimension>) -> ValueInfoProto {
    let tensor_type = TensorTypeProto { elem_type: FLOAT, shape: Some(TensorShapeProto { dim: dims }) };
    ValueInfoProto { name: name.into(), r#type: Some(TypeProto { tensor_type: Some(tensor_type) }) }
}

fn fixed(n: i64) -> Dimension {
    Dimension { dim_value: Some(n), dim_param: None }
}

fn batch() -> Dimension {
    Dimension { dim_value: None, dim_param: Some("batch".into()) }
}

/// The network as an ONNX model (serialised `ModelProto`).
pub fn onnx_model(net: &Network, precision: Precision) -> Result<Vec<u8>, ExportError> {
    let variables = net.named_tensors();
    let mut g = GraphBuilder::new(&variables, (precision == Precision::Int8Weights).then(|| net.head_prefix()));
    let size = net.image_size as i64;
    let image = Value { name: "image".into(), c: 3, hw: (size, size) };
    let mean = g.constant("input.mean", &[1, 3, 1, 1], &MEAN);
    let std = g.constant("input.std", &[1, 3, 1, 1], &STD);
    let centred = g.node("Sub", &["image", &mean], vec![]);
    let normalised = Value { name: g.node("Div", &[&centred, &std], vec![]), ..image };
    let logits = net.emit_onnx(&mut g, &normalised)?;
    let classes = net.classes.len() as i64;
    g.nodes.push(proto::NodeProto { input: vec![logits.name.clone()], output: vec!["logits".into()], name: "logits".into(), op_type: "Identity".into(), attribute: vec![] });
    let probabilities = if net.multi_label { ("Sigmoid", vec![]) } else { ("Softmax", vec![proto::AttributeProto { name: "axis".into(), i: 1, r#type: proto::ATTR_INT, ..Default::default() }]) };
    g.nodes.push(proto::NodeProto { input: vec!["logits".into()], output: vec!["probabilities".into()], name: "probabilities".into(), op_type: probabilities.0.into(), attribute: probabilities.1 });
    let graph = GraphProto {
        node: std::mem::take(&mut g.nodes),
        name: format!("medmerge {}", net.arch.as_str()),
        initializer: std::mem::take(&mut g.initializers),
        input: vec![tensor_value("image", vec![batch(), fixed(3), fixed(size), fixed(size)])],
        output: vec![tensor_value("logits", vec![batch(), fixed(classes)]), tensor_value("probabilities", vec![batch(), fixed(classes)])],
    };
    let meta = [
        ("architecture", net.arch.as_str().to_string()),
        ("classes", serde_json::to_string(&net.classes).unwrap_or_default()),
        ("image_size", size.to_string()),
        ("multi_label", net.multi_label.to_string()),
        ("input", format!("image: float32 [batch, 3, {size}, {size}], RGB in [0, 1]; normalised in the graph")),
        ("weights", precision.as_str().to_string()),
    ];
    let model = ModelProto {
        ir_version: IR_VERSION,
        producer_name: "medmerge".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: format!("{} classifier over {} classes, exported by medmerge", net.arch.as_str(), classes),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        metadata_props: meta.into_iter().map(|(key, value)| StringStringEntryProto { key: key.into(), value }).collect(),
    };
    Ok(model.encode_to_vec())
}

/// Writes the network as ONNX to `path` (atomically); returns the file's size in bytes.
pub fn write_onnx(net: &Network, path: &Path, precision: Precision) -> Result<u64, ExportError> {
    let bytes = onnx_model(net, precision)?;
    let io = |source| ExportError::Io { path: path.into(), source };
    let tmp = path.with_extension("onnx.tmp");
    std::fs::write(&tmp, &bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(bytes.len() as u64)
}

/// Replaces every weight that the int8 export quantises by its dequantised int8 value, so the
/// network computes what the int8 ONNX file computes.
pub fn quantise_weights(net: &mut Network) -> Result<(), ExportError> {
    let head = net.head_prefix();
    for (name, mut var) in net.named_tensors() {
        let dims = var.size();
        if !quantised(&name, &dims, head) {
            continue;
        }
        let values = tensor_to_vec(&var).map_err(GraphError::from)?;
        let (q, scales) = graph::int8_encode(&values, &dims);
        let deq = Encoded::Int8 { q, scales }.decode(values.len());
        let t = Tensor::from_slice(&deq).view(dims.as_slice()).to_kind(Kind::Float).to_device(var.device());
        tch::no_grad(|| var.f_copy_(&t)).map_err(GraphError::from)?;
    }
    Ok(())
}

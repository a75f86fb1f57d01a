//! The request and response bodies of the Open Inference Protocol (v2) REST API, as KServe and
//! Triton define them, for the inputs and outputs a classifier has.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /v2/models/{name}/infer` body.
#[derive(Debug, Deserialize)]
pub struct InferRequest {
    /// Echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// One input: `image` (BYTES, base64-encoded image files) or `input` (FP32 tensor).
    pub inputs: Vec<InferInput>,
    /// The outputs wanted (`probabilities`, `predicted`, `gradcam`); none listed: the first two.
    #[serde(default)]
    pub outputs: Vec<RequestedOutput>,
    /// Request parameters: `explain_class` (a class name) fixes the class `gradcam` explains
    /// (default: each image's predicted class).
    #[serde(default)]
    pub parameters: Option<Value>,
}

/// An output a request asks for.
#[derive(Debug, Deserialize)]
pub struct RequestedOutput {
    /// Output name.
    pub name: String,
}

/// One named input tensor; `data` is the flat row-major contents.
#[derive(Debug, Deserialize)]
pub struct InferInput {
    /// `image` or `input`.
    pub name: String,
    /// `BYTES` for `image`, `FP32` for `input`.
    pub datatype: String,
    /// `[n]` for `image`, `[n, 3, size, size]` for `input`.
    pub shape: Vec<i64>,
    /// The elements (strings for BYTES, numbers for FP32).
    pub data: Value,
}

/// The infer response body.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct InferResponse {
    /// The model that answered.
    pub model_name: String,
    /// The request's id, if it had one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
    /// `probabilities` (FP32, `[n, classes]`), `predicted` (BYTES, `[n]`: class names,
    /// `|`-joined for multi-label models) and, when asked for, `gradcam` (FP32,
    /// `[n, size, size]`: Grad-CAM heat in [0, 1] of the explained class).
    pub outputs: Vec<InferOutput>,
}

/// One named output tensor.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct InferOutput {
    /// `probabilities` or `predicted`.
    pub name: String,
    /// `FP32` or `BYTES`.
    pub datatype: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Flat row-major contents.
    pub data: Value,
}

/// A tensor's name, type and shape in model metadata (`-1`: any size).
#[derive(Debug, Serialize)]
pub struct TensorMetadata {
    /// Tensor name.
    pub name: &'static str,
    /// Element type.
    pub datatype: &'static str,
    /// Shape.
    pub shape: Vec<i64>,
}

/// `GET /v2/models/{name}` body.
#[derive(Debug, Serialize)]
pub struct ModelMetadata {
    /// Model name.
    pub name: String,
    /// Served versions.
    pub versions: Vec<String>,
    /// What runs it.
    pub platform: &'static str,
    /// Accepted inputs (one per request).
    pub inputs: Vec<TensorMetadata>,
    /// Returned outputs.
    pub outputs: Vec<TensorMetadata>,
    /// Classes, in the order of `probabilities`, and the image size the model sees.
    pub parameters: Value,
}

//! A model served over the Open Inference Protocol (v2) REST API that KServe and Triton speak:
//! `GET /v2/health/live`, `/v2/health/ready`, `/v2/models/{name}`, `/v2/models/{name}/ready`,
//! `POST /v2/models/{name}/infer` and Prometheus `/metrics`. Requests that arrive together are
//! answered with one forward pass (dynamic batching, up to [`MAX_BATCH`] images).

pub mod protocol;

use std::io::Read;
use std::net::SocketAddr;
use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use tch::{Device, Tensor};

use crate::data::decode_image_bytes;
use crate::model::Network;
use protocol::{InferOutput, InferRequest, InferResponse, ModelMetadata, TensorMetadata};

/// The outputs this server can return.
pub const OUTPUTS: [&str; 3] = ["probabilities", "predicted", "gradcam"];
/// Images per Grad-CAM pass (it keeps activations and gradients).
const GRADCAM_BATCH: usize = 8;

/// Most images one forward pass takes; more requests wait for the next pass.
pub const MAX_BATCH: usize = 64;
/// Largest request body accepted (a batch of full-size photographs).
pub const MAX_BODY_BYTES: usize = 256 << 20;

/// A refused request: its HTTP status and what was wrong, naming the field.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// The message returned as `{"error": ...}`.
    pub error: String,
}

fn bad_request(error: impl Into<String>) -> Refusal {
    Refusal { status: 400, error: error.into() }
}

/// One loaded model and its name in URLs.
pub struct ServedModel {
    /// The name in `/v2/models/{name}`.
    pub name: String,
    net: Network,
    device: Device,
}

impl ServedModel {
    /// Serves `net` as `name` on `device`.
    pub fn new(name: impl Into<String>, net: Network, device: Device) -> Self {
        ServedModel { name: name.into(), net, device }
    }

    /// The model's metadata (inputs, outputs, classes, image size).
    pub fn metadata(&self) -> ModelMetadata {
        let size = i64::from(self.net.image_size);
        ModelMetadata {
            name: self.name.clone(),
            versions: vec!["1".into()],
            platform: "medmerge_libtorch",
            inputs: vec![TensorMetadata { name: "image", datatype: "BYTES", shape: vec![-1] }, TensorMetadata { name: "input", datatype: "FP32", shape: vec![-1, 3, size, size] }],
            outputs: vec![
                TensorMetadata { name: "probabilities", datatype: "FP32", shape: vec![-1, self.net.classes.len() as i64] },
                TensorMetadata { name: "predicted", datatype: "BYTES", shape: vec![-1] },
                TensorMetadata { name: "gradcam", datatype: "FP32", shape: vec![-1, size, size] },
            ],
            parameters: json!({"classes": self.net.classes, "image_size": self.net.image_size, "multi_label": self.net.multi_label}),
        }
    }

    /// The normalised CHW images of an infer request body, refusing what the protocol or the
    /// model cannot take (naming the field).
    pub fn decode_request(&self, body: &[u8]) -> Result<(InferRequest, Vec<Vec<f32>>), Refusal> {
        let request: InferRequest = serde_json::from_slice(body).map_err(|e| bad_request(format!("request body: {e}")))?;
        let [input] = request.inputs.as_slice() else {
            return Err(bad_request(format!("inputs: expected exactly one input (image or input), got {}", request.inputs.len())));
        };
        let size = self.net.image_size as usize;
        let images = match (input.name.as_str(), input.datatype.as_str()) {
            ("image", "BYTES") => {
                let items = input.data.as_array().ok_or_else(|| bad_request("inputs[0].data: expected an array of base64 strings"))?;
                if input.shape != [items.len() as i64] {
                    return Err(bad_request(format!("inputs[0].shape: {:?} does not match {} data elements", input.shape, items.len())));
                }
                let decode = |(i, item): (usize, &Value)| {
                    let text = item.as_str().ok_or_else(|| bad_request(format!("inputs[0].data[{i}]: expected a base64 string")))?;
                    let bytes = STANDARD.decode(text).map_err(|e| bad_request(format!("inputs[0].data[{i}]: not base64: {e}")))?;
                    decode_image_bytes(&bytes, &format!("inputs[0].data[{i}]"), self.net.image_size).map_err(|e| bad_request(e.to_string()))
                };
                items.iter().enumerate().map(decode).collect::<Result<Vec<_>, _>>()?
            }
            ("input", "FP32") => {
                let n = match input.shape.as_slice() {
                    [n, 3, h, w] if *n >= 0 && *h as usize == size && *w as usize == size => *n as usize,
                    other => return Err(bad_request(format!("inputs[0].shape: expected [n, 3, {size}, {size}], got {other:?}"))),
                };
                let values = input.data.as_array().ok_or_else(|| bad_request("inputs[0].data: expected an array of numbers"))?;
                if values.len() != n * 3 * size * size {
                    return Err(bad_request(format!("inputs[0].data: {} numbers for shape {:?}", values.len(), input.shape)));
                }
                let flat = values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v.as_f64().filter(|f| f.is_finite()).map(|f| f as f32).ok_or_else(|| bad_request(format!("inputs[0].data[{i}]: not a finite number"))))
                    .collect::<Result<Vec<_>, _>>()?;
                flat.chunks(3 * size * size).map(<[f32]>::to_vec).collect()
            }
            (name, datatype) => return Err(bad_request(format!("inputs[0]: {name} ({datatype}) is not an input of this model; send image (BYTES) or input (FP32)"))),
        };
        for (i, o) in request.outputs.iter().enumerate() {
            if !OUTPUTS.contains(&o.name.as_str()) {
                return Err(bad_request(format!("outputs[{i}].name: {} is not an output of this model ({})", o.name, OUTPUTS.join(", "))));
            }
        }
        self.explained_class(&request)?;
        Ok((request, images))
    }

    /// The class `gradcam` explains for `request`: its `parameters.explain_class`, or None for
    /// each image's predicted class.
    fn explained_class(&self, request: &InferRequest) -> Result<Option<usize>, Refusal> {
        match request.parameters.as_ref().and_then(|p| p.get("explain_class")) {
            None => Ok(None),
            Some(Value::String(class)) => crate::explain::resolve_class(&self.net, class).map(Some).map_err(|e| bad_request(format!("parameters.explain_class: {e}"))),
            Some(other) => Err(bad_request(format!("parameters.explain_class: expected a class name, got {other}"))),
        }
    }

    /// Grad-CAM heat (`size` x `size`, in [0, 1]) of each image for the class `request` asks
    /// to explain, when it asks for output `gradcam`; None otherwise.
    pub fn grad_cams(&self, request: &InferRequest, images: &[Vec<f32>]) -> Result<Option<Vec<Vec<f32>>>, Refusal> {
        if !request.outputs.iter().any(|o| o.name == "gradcam") {
            return Ok(None);
        }
        let failed = |e: crate::explain::ExplainError| Refusal { status: 500, error: format!("Grad-CAM: {e}") };
        let layer = crate::explain::resolve_layer(&self.net, None).map_err(failed)?;
        let class = self.explained_class(request)?;
        let mut maps = Vec::with_capacity(images.len());
        for chunk in images.chunks(GRADCAM_BATCH) {
            let heat = crate::explain::grad_cam_normalised(&self.net, &chunk.concat(), chunk.len(), &layer, class, self.device).map_err(failed)?;
            maps.extend(heat.into_iter().map(|h| h.cam));
        }
        Ok(Some(maps))
    }

    /// Class probabilities of `images` (normalised CHW), one forward pass per [`MAX_BATCH`].
    pub fn probabilities(&self, images: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, Refusal> {
        let size = self.net.image_size as i64;
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(MAX_BATCH) {
            let flat: Vec<f32> = chunk.concat();
            let x = Tensor::from_slice(&flat).view([chunk.len() as i64, 3, size, size]).to_device(self.device);
            let logits = tch::no_grad(|| self.net.forward_t(&x, false));
            let probs = self.net.probabilities(&logits);
            let values = Vec::<f32>::try_from(probs.to_device(Device::Cpu).flatten(0, -1)).map_err(|e| Refusal { status: 500, error: format!("reading the model's output: {e}") })?;
            out.extend(values.chunks(self.net.classes.len()).map(<[f32]>::to_vec));
        }
        Ok(out)
    }

    /// The response to `request` given the probabilities of its images (and their Grad-CAM
    /// heat, when asked for): the outputs it lists, or `probabilities` and `predicted`.
    pub fn respond(&self, request: &InferRequest, probs: &[Vec<f32>], cams: Option<&[Vec<f32>]>) -> InferResponse {
        let n = probs.len() as i64;
        let size = i64::from(self.net.image_size);
        let wanted: Vec<&str> = if request.outputs.is_empty() { vec!["probabilities", "predicted"] } else { request.outputs.iter().map(|o| o.name.as_str()).collect() };
        let output = |name: &str| match name {
            "probabilities" => Some(InferOutput { name: name.into(), datatype: "FP32".into(), shape: vec![n, self.net.classes.len() as i64], data: json!(probs.concat()) }),
            "predicted" => Some(InferOutput { name: name.into(), datatype: "BYTES".into(), shape: vec![n], data: json!(probs.iter().map(|p| self.net.predicted(p)).collect::<Vec<_>>()) }),
            "gradcam" => cams.map(|c| InferOutput { name: name.into(), datatype: "FP32".into(), shape: vec![n, size, size], data: json!(c.concat()) }),
            _ => None,
        };
        InferResponse { model_name: self.name.clone(), id: request.id.clone(), outputs: wanted.into_iter().filter_map(output).collect() }
    }
}

/// Counters served at `/metrics`.
struct ServeMetrics {
    registry: prometheus_client::registry::Registry,
    requests: prometheus_client::metrics::family::Family<Vec<(String, String)>, prometheus_client::metrics::counter::Counter>,
    images: prometheus_client::metrics::counter::Counter,
    batches: prometheus_client::metrics::counter::Counter,
    seconds: prometheus_client::metrics::histogram::Histogram,
}

impl ServeMetrics {
    fn new() -> Self {
        let mut m = ServeMetrics {
            registry: Default::default(),
            requests: Default::default(),
            images: Default::default(),
            batches: Default::default(),
            seconds: prometheus_client::metrics::histogram::Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16)),
        };
        m.registry.register("medmerge_serve_requests", "HTTP requests by route and status", m.requests.clone());
        m.registry.register("medmerge_serve_images", "Images classified", m.images.clone());
        m.registry.register("medmerge_serve_batches", "Forward passes (each over one or more requests)", m.batches.clone());
        m.registry.register("medmerge_serve_infer_seconds", "Time from reading an infer request to answering it", m.seconds.clone());
        m
    }

    fn count(&self, route: &str, status: u16) {
        self.requests.get_or_create(&vec![("route".into(), route.into()), ("status".into(), status.to_string())]).inc();
    }
}

/// One received HTTP request, read whole.
struct Received {
    request: tiny_http::Request,
    started: Instant,
    body: Result<Vec<u8>, Refusal>,
}

fn receive(mut request: tiny_http::Request) -> Received {
    let started = Instant::now();
    let mut body = Vec::new();
    let read = request.as_reader().take(MAX_BODY_BYTES as u64 + 1).read_to_end(&mut body);
    let body = match read {
        Err(e) => Err(bad_request(format!("reading the request body: {e}"))),
        Ok(_) if body.len() > MAX_BODY_BYTES => Err(Refusal { status: 413, error: format!("request body over {MAX_BODY_BYTES} bytes") }),
        Ok(_) => Ok(body),
    };
    Received { request, started, body }
}

fn reply(request: tiny_http::Request, status: u16, body: &Value, metrics: &ServeMetrics, route: &str) {
    // Prometheus text is the one body that is not JSON.
    let (text, content_type) = match body {
        Value::String(text) if route == "/metrics" => (text.clone(), "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        _ => (body.to_string(), "application/json"),
    };
    metrics.count(route, status);
    let header = tiny_http::Header::from_bytes("Content-Type", content_type).expect("a valid header");
    let response = tiny_http::Response::from_data(text).with_status_code(status).with_header(header);
    if let Err(e) = request.respond(response) {
        tracing::warn!(error = %e, "client went away before its answer");
    }
}

/// Serves `model` on `listen` until the process ends; `on_ready` gets the bound address (port 0
/// picks a free one).
pub fn serve(model: ServedModel, listen: &str, on_ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let server = tiny_http::Server::http(listen).map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?;
    let address = server.server_addr().to_ip().ok_or_else(|| anyhow::anyhow!("{listen} is not an IP address"))?;
    on_ready(address);
    let metrics = ServeMetrics::new();
    let infer_path = format!("/v2/models/{}/infer", model.name);
    loop {
        let first = receive(server.recv()?);
        // Whatever else has already arrived joins this pass.
        let mut pending = vec![first];
        while pending.len() < MAX_BATCH {
            match server.try_recv()? {
                Some(r) => pending.push(receive(r)),
                None => break,
            }
        }
        let mut infers = Vec::new();
        for r in pending {
            if *r.request.method() == tiny_http::Method::Post && r.request.url() == infer_path {
                infers.push(r);
            } else {
                let (status, body) = route(&model, r.request.method(), r.request.url(), &metrics);
                let name = if status == 404 { "unknown" } else { r.request.url() }.to_string();
                reply(r.request, status, &body, &metrics, &name);
            }
        }
        answer_infers(&model, infers, &metrics);
    }
}

/// Everything but infer: health, metadata, metrics; 404 for anything else.
fn route(model: &ServedModel, method: &tiny_http::Method, url: &str, metrics: &ServeMetrics) -> (u16, Value) {
    let model_path = format!("/v2/models/{}", model.name);
    match (method, url) {
        (tiny_http::Method::Get, "/v2/health/live" | "/v2/health/ready") => (200, json!({})),
        (tiny_http::Method::Get, "/v2") => (200, json!({"name": "medmerge", "version": env!("CARGO_PKG_VERSION"), "extensions": []})),
        (tiny_http::Method::Get, u) if u == model_path => (200, serde_json::to_value(model.metadata()).unwrap_or_default()),
        (tiny_http::Method::Get, u) if u == format!("{model_path}/ready") => (200, json!({"name": model.name, "ready": true})),
        (tiny_http::Method::Get, "/metrics") => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &metrics.registry) {
                Ok(()) => (200, Value::String(text)),
                Err(e) => (500, json!({"error": e.to_string()})),
            }
        }
        (_, u) => (404, json!({"error": format!("{u}: no such endpoint (this server has model {})", model.name)})),
    }
}

/// Decodes every infer request, runs their images as one batch, and answers each.
fn answer_infers(model: &ServedModel, infers: Vec<Received>, metrics: &ServeMetrics) {
    let mut decoded = Vec::new();
    for Received { request: http, started, body } in infers {
        match body.and_then(|body| model.decode_request(&body)) {
            Ok((request, images)) => decoded.push((http, started, request, images)),
            Err(refusal) => reply(http, refusal.status, &json!({"error": refusal.error}), metrics, "infer"),
        }
    }
    if decoded.is_empty() {
        return;
    }
    let all: Vec<Vec<f32>> = decoded.iter().flat_map(|(_, _, _, images)| images.iter().cloned()).collect();
    metrics.batches.inc();
    metrics.images.inc_by(all.len() as u64);
    match model.probabilities(&all) {
        Ok(probs) => {
            let mut offset = 0;
            for (http, started, request, images) in decoded {
                let mine = &probs[offset..offset + images.len()];
                offset += images.len();
                match model.grad_cams(&request, &images) {
                    Ok(cams) => {
                        let body = serde_json::to_value(model.respond(&request, mine, cams.as_deref())).unwrap_or_default();
                        metrics.seconds.observe(started.elapsed().as_secs_f64());
                        reply(http, 200, &body, metrics, "infer");
                    }
                    Err(refusal) => reply(http, refusal.status, &json!({"error": refusal.error}), metrics, "infer"),
                }
            }
        }
        Err(refusal) => {
            for (http, _, _, _) in decoded {
                reply(http, refusal.status, &json!({"error": refusal.error}), metrics, "infer");
            }
        }
    }
}

//! `medmerge-trainer serve` answers a real HTTP client speaking the Open Inference Protocol (v2),
//! with the same predictions as `predict`, and refuses bad requests naming the field.

use std::sync::{mpsc, Mutex};

use base64::Engine;
use medmerge_crds::Architecture;
use medmerge_trainer::data::Dataset;
use medmerge_trainer::evaluate::predict;
use medmerge_trainer::model::Network;
use medmerge_trainer::serve::{serve, ServedModel};
use serde_json::{json, Value};
use tch::Device;

const SIZE: u32 = 32;

/// libtorch's seed is global: networks are made one at a time, or two threads' draws interleave.
static SEEDING: Mutex<()> = Mutex::new(());

fn network(classes: &[String]) -> Network {
    // The same seed gives the same weights: one copy serves, the other predicts in process.
    let _one_at_a_time = SEEDING.lock().unwrap_or_else(|e| e.into_inner());
    Network::new(Architecture::Resnet18, classes, SIZE, Device::Cpu, 7)
}

/// A server for a seeded ResNet-18 over `classes` on a free loopback port; its base URL.
fn start(classes: Vec<String>) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let model = ServedModel::new("fundus", network(&classes), Device::Cpu);
        serve(model, "127.0.0.1:0", |address| tx.send(address).unwrap()).unwrap();
    });
    format!("http://{}", rx.recv().unwrap())
}

fn post(url: &str, body: Value) -> (u16, Value) {
    match ureq::post(url).send_json(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{url}: {e}"),
    }
}

#[test]
fn a_kserve_v2_client_gets_the_predictions_of_predict() {
    let dir = tempfile::tempdir().unwrap();
    medmerge_trainer::synth::generate(dir.path(), 3, 3, 48, 5).unwrap();
    let data = Dataset::open(dir.path(), None).unwrap();
    let base = start(data.classes.clone());

    assert_eq!(ureq::get(&format!("{base}/v2/health/ready")).call().unwrap().status(), 200);
    let meta: Value = ureq::get(&format!("{base}/v2/models/fundus")).call().unwrap().into_json().unwrap();
    assert_eq!(meta["parameters"]["classes"], json!(data.classes));
    assert_eq!(meta["inputs"][1]["shape"], json!([-1, 3, SIZE, SIZE]));

    let expected = predict(&network(&data.classes), &data, 4, Device::Cpu).unwrap();
    let files: Vec<String> = data.samples.iter().map(|s| base64::engine::general_purpose::STANDARD.encode(std::fs::read(&s.path).unwrap())).collect();
    let infer = format!("{base}/v2/models/fundus/infer");
    let (status, answer) = post(&infer, json!({"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [files.len()], "data": files}]}));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["id"], "r1");
    let probabilities: Vec<f64> = serde_json::from_value(answer["outputs"][0]["data"].clone()).unwrap();
    assert_eq!(answer["outputs"][0]["shape"], json!([data.samples.len(), data.classes.len()]));
    for (got, want) in probabilities.iter().zip(expected.concat()) {
        assert!((got - f64::from(want)).abs() < 1e-5, "served {got}, predict {want}");
    }
    let predicted: Vec<String> = serde_json::from_value(answer["outputs"][1]["data"].clone()).unwrap();
    let want: Vec<String> = expected.iter().map(|p| data.classes[medmerge_trainer::metrics::argmax(p)].clone()).collect();
    assert_eq!(predicted, want);

    // The same images as an FP32 tensor give the same probabilities.
    let images: Vec<f32> = data.samples.iter().flat_map(|s| medmerge_trainer::data::decode_image(&s.path, SIZE, None).unwrap()).collect();
    let (status, tensor_answer) = post(&infer, json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [data.samples.len(), 3, SIZE, SIZE], "data": images}]}));
    assert_eq!(status, 200, "{tensor_answer}");
    assert_eq!(tensor_answer["outputs"][1], answer["outputs"][1]);

    let metrics = ureq::get(&format!("{base}/metrics")).call().unwrap().into_string().unwrap();
    assert!(metrics.contains(&format!("medmerge_serve_images_total {}", 2 * data.samples.len())), "{metrics}");

    // Grad-CAM on request: the outputs asked for, in that order, with the library's heat maps.
    let one = &files[..2];
    let class = data.classes[1].clone();
    let (status, explained) = post(
        &infer,
        json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": one}], "outputs": [{"name": "gradcam"}, {"name": "predicted"}], "parameters": {"explain_class": class}}),
    );
    assert_eq!(status, 200, "{explained}");
    let names: Vec<&str> = explained["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["gradcam", "predicted"]);
    assert_eq!(explained["outputs"][0]["shape"], json!([2, SIZE, SIZE]));
    let served: Vec<f64> = serde_json::from_value(explained["outputs"][0]["data"].clone()).unwrap();
    let net = network(&data.classes);
    let layer = medmerge_trainer::explain::resolve_layer(&net, None).unwrap();
    let pixels: Vec<f32> = images[..2 * 3 * (SIZE * SIZE) as usize].to_vec();
    let maps = medmerge_trainer::explain::grad_cam_normalised(&net, &pixels, 2, &layer, Some(1), Device::Cpu).unwrap();
    assert!(maps.iter().all(|m| m.explained == 1), "the class asked for is the one explained");
    for (got, want) in served.iter().zip(maps.iter().flat_map(|m| m.cam.iter())) {
        assert!((got - f64::from(*want)).abs() < 1e-4, "served heat {got}, library {want}");
    }
    assert!(served.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn bad_requests_are_refused_naming_the_field_and_the_server_keeps_serving() {
    let base = start(vec!["a".into(), "b".into()]);
    let infer = format!("{base}/v2/models/fundus/infer");
    let cases = [
        (json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aGVsbG8=", 3]}]}), "inputs[0].data[0]"),
        (json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}), "inputs[0].data[0]: not base64"),
        (json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": ["aGVsbG8="]}]}), "inputs[0].shape"),
        (json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": []}]}), "inputs[0].shape: expected [n, 3, 32, 32]"),
        (json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [1.0]}]}), "inputs[0].data: 1 numbers"),
        (json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}), "text (BYTES) is not an input"),
        (json!({"inputs": []}), "inputs: expected exactly one input"),
        (json!({"outputs": []}), "request body: missing field `inputs`"),
        (json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 3, 32, 32], "data": []}], "outputs": [{"name": "saliency"}]}), "outputs[0].name: saliency is not an output"),
        (
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 3, 32, 32], "data": []}], "parameters": {"explain_class": "zebra"}}),
            "parameters.explain_class: class \"zebra\" is not one",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = post(&infer, body);
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"].as_str().unwrap().contains(field), "{field}: {answer}");
    }
    match ureq::get(&format!("{base}/v2/models/other")).call() {
        Err(ureq::Error::Status(404, r)) => assert!(r.into_string().unwrap().contains("no such endpoint")),
        other => panic!("expected 404, got {other:?}"),
    }
    assert_eq!(ureq::get(&format!("{base}/v2/models/fundus/ready")).call().unwrap().status(), 200);
}

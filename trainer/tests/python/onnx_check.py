"""Checks an ONNX file medmerge exported: onnx's full checker, then onnxruntime's logits and
probabilities for the images in a safetensors file, against the logits medmerge computed.
Prints one JSON line."""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file

model_path, data_path = sys.argv[1], sys.argv[2]
model = onnx.load(model_path)
onnx.checker.check_model(model, full_check=True)
data = load_file(data_path)
session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
logits, probabilities = session.run(["logits", "probabilities"], {"image": data["image"]})
print(json.dumps({
    "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
    "inputs": [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input],
    "shape": list(logits.shape),
    "max_abs_diff": float(np.abs(logits - data["logits"]).max()),
    "max_abs_logit": float(np.abs(data["logits"]).max()),
    "probability_sums": [float(s) for s in probabilities.sum(axis=1)],
    "metadata": {p.key: p.value for p in model.metadata_props},
}))

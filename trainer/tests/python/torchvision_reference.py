"""Writes a torchvision model with random weights and batch-norm statistics, a batch of
normalised images and the model's eval-mode logits to one safetensors file, so medmerge's
network of the same name can be checked tensor name by tensor name and logit by logit."""
import sys

import torch
import torchvision
from safetensors.torch import save_file

name, classes, size, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(7)
model = getattr(torchvision.models, name)(num_classes=classes).eval()
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
    images = torch.randn(2, 3, size, size)
    logits = model(images)
tensors = {k: v.float().contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
tensors["input.images"] = images
tensors["output.logits"] = logits
save_file(tensors, out)

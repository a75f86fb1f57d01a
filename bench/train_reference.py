"""PyTorch (Python, eager) reference for `medmerge-trainer finetune` throughput.

Does the same work per epoch as the Rust trainer: decode JPEG/PNG from disk (Pillow), bilinear
resize to SIZE, random horizontal and vertical flips, ImageNet normalisation, batches of BATCH,
class-weighted cross-entropy, Adam lr 1e-4, on THREADS intra-op threads. EfficientNet-Lite0 is
written out here layer for layer (efficientnet_pytorch layout, TF "SAME" padding, ReLU6, no
squeeze-excite), ResNet50 comes from torchvision. Prints one JSON line per epoch.
LAYOUT `channels_last` converts the model and every batch to channels-last (PyTorch's advice for
convolutions on CPU), `contiguous` leaves them NCHW. With WORKERS > 0 the DataLoader keeps its
worker processes between epochs and prefetches.

REF_DEVICE=cuda trains on the GPU (batches pinned and copied asynchronously) and REF_AMP=bf16
runs the forward pass under bfloat16 autocast, as medmerge's `training.mixedPrecision` does.

usage: train_reference.py MANIFEST ARCH SIZE BATCH EPOCHS THREADS WORKERS [LAYOUT]
"""
import csv, json, math, os, random, sys, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
LITE0 = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]


class SameConv(nn.Conv2d):
    def forward(self, x):
        ih, iw = x.shape[-2:]
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


class MBConv(nn.Module):
    def __init__(self, e, k, s, cin, cout):
        super().__init__()
        mid = cin * e
        self.expand = nn.Sequential(SameConv(cin, mid, 1, bias=False), nn.BatchNorm2d(mid, eps=1e-3), nn.ReLU6()) if e != 1 else nn.Identity()
        self.dw = nn.Sequential(SameConv(mid, mid, k, s, groups=mid, bias=False), nn.BatchNorm2d(mid, eps=1e-3), nn.ReLU6())
        self.project = nn.Sequential(SameConv(mid, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=1e-3))
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        h = self.project(self.dw(self.expand(x)))
        return h + x if self.residual else h


def lite0(classes):
    layers = [SameConv(3, 32, 3, 2, bias=False), nn.BatchNorm2d(32, eps=1e-3), nn.ReLU6()]
    for e, k, s, cin, cout, n in LITE0:
        for r in range(n):
            layers.append(MBConv(e, k, s if r == 0 else 1, cin if r == 0 else cout, cout))
    layers += [SameConv(320, 1280, 1, bias=False), nn.BatchNorm2d(1280, eps=1e-3), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, classes)]
    return nn.Sequential(*layers)


def resnet50(classes):
    import torchvision
    return torchvision.models.resnet50(num_classes=classes)


class Images(torch.utils.data.Dataset):
    def __init__(self, rows, classes, size, seed):
        self.rows, self.classes, self.size, self.seed = rows, classes, size, seed

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        path, label = self.rows[i]
        img = Image.open(path).convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        a = np.asarray(img, dtype=np.float32) / 255.0
        rng = random.Random(self.seed * 1000003 + i)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        if rng.random() < 0.5:
            a = a[::-1]
        a = (a - MEAN) / STD
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))), self.classes.index(label)


def main():
    manifest, arch, size, batch, epochs, threads, workers = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
    layout = torch.channels_last if (sys.argv[8:] or ["contiguous"])[0] == "channels_last" else torch.contiguous_format
    torch.set_num_threads(threads)
    torch.manual_seed(3315)
    rows = [(r["path"], r["label"]) for r in csv.DictReader(open(manifest))]
    classes = sorted({l for _, l in rows})
    counts = np.array([sum(1 for _, l in rows if l == c) for c in classes], dtype=np.float32)
    weights = torch.from_numpy(counts.sum() / (len(classes) * counts))
    device = torch.device(os.environ.get("REF_DEVICE", "cpu"))
    amp = os.environ.get("REF_AMP") == "bf16"
    model = {"efficientnet-lite0": lite0, "resnet50": resnet50}[arch](len(classes)).to(device, memory_format=layout)
    weights = weights.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = Images(rows, classes, size, 0)
    loader = torch.utils.data.DataLoader(images, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    for epoch in range(1, epochs + 1):
        # Persistent workers keep the seed they started with (the flips repeat): the same work.
        images.seed = epoch
        model.train()
        started, seen = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True).contiguous(memory_format=layout), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, weight=weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(json.dumps({"epoch": epoch, "images": seen, "images_per_second": seen / (time.perf_counter() - started)}), flush=True)


if __name__ == "__main__":
    main()

"""PyTorch eager reference for the CAM-baseline train step (optional: `pip install
.[torch-bench]`), so the JAX/PyTorch ratio is measured side by side on one machine.

The model mirrors `models/registry.CAMNet` with a ResNet-50 backbone at output stride 16
(torchvision layout: layer4 dilated instead of strided), a bias-free 1x1 classifier on the
class maps, global average pooling, `MultiLabelSoftMarginLoss` and SGD with momentum and
weight decay. Written here (no torchvision) so the extra needs torch only. Channels-last
memory format is used where it helps XLA's competitor most (oneDNN's preferred layout on
CPU; tensor cores on GPU); `--torch_channels_last=false` turns it off.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the PyTorch baseline needs torch: pip install '.[torch-bench]'") from e
  return torch


def make_resnet50_cam(num_fg: int, output_stride: int = 16):
  """A torch ResNet-50 (bottleneck v1.5, like torchvision) + CAM classifier."""
  torch = _torch()
  nn = torch.nn

  class Bottleneck(nn.Module):

    def __init__(self, cin, width, stride, dilation, downsample):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation,
                             bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(width * 4)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = downsample

    def forward(self, x):
      idt = x if self.downsample is None else self.downsample(x)
      x = self.relu(self.bn1(self.conv1(x)))
      x = self.relu(self.bn2(self.conv2(x)))
      return self.relu(self.bn3(self.conv3(x)) + idt)

  def layer(cin, width, blocks, stride, dilation):
    down = None
    if stride != 1 or cin != width * 4:
      down = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False),
                           nn.BatchNorm2d(width * 4))
    mods = [Bottleneck(cin, width, stride, dilation, down)]
    mods += [Bottleneck(width * 4, width, 1, dilation, None) for _ in range(blocks - 1)]
    return nn.Sequential(*mods)

  if output_stride not in (16, 32):
    raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
  last_stride, last_dilation = (1, 2) if output_stride == 16 else (2, 1)

  class CAMNet(nn.Module):

    def __init__(self):
      super().__init__()
      self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
      self.layers = nn.Sequential(layer(64, 64, 3, 1, 1), layer(256, 128, 4, 2, 1),
                                  layer(512, 256, 6, 2, 1),
                                  layer(1024, 512, 3, last_stride, last_dilation))
      self.classifier = nn.Conv2d(2048, num_fg, 1, bias=False)

    def forward(self, x):
      cams = self.classifier(self.layers(self.stem(x)))
      return cams.mean(dim=(2, 3)), cams

  return CAMNet()


def measure_train_step(batch: int, crop: int, num_classes: int, *, steps: int = 10,
                       warmup: int = 2, repeats: int = 1, channels_last: bool = True,
                       output_stride: int = 16, lr: float = 0.01, threads: int = 0
                       ) -> dict[str, Any]:
  """Times the eager PyTorch CAM step (forward, loss, backward, SGD) on random data."""
  torch = _torch()
  if threads > 0:
    torch.set_num_threads(threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  model = make_resnet50_cam(num_classes - 1, output_stride).to(device).train()
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
  loss_fn = torch.nn.MultiLabelSoftMarginLoss()
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.normal(size=(batch, 3, crop, crop)).astype(np.float32))
  images = images.to(device).contiguous(memory_format=fmt)
  labels = torch.from_numpy((rng.random((batch, num_classes - 1)) < 0.15).astype(np.float32))
  labels = labels.to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def step():
    opt.zero_grad(set_to_none=True)
    logits, _ = model(images)
    loss = loss_fn(logits, labels)
    loss.backward()
    opt.step()
    return loss

  for _ in range(warmup):
    step()
  sync()
  samples = []
  for _ in range(max(1, repeats) * steps):
    t = time.perf_counter()
    loss = step()
    sync()
    samples.append(time.perf_counter() - t)
  s = np.asarray(samples)
  med = float(np.median(s))
  return {"kind": "torch_eager_train_step", "method": "cam", "backbone": "resnet50",
          "batch": batch, "crop": crop, "dtype": "float32", "devices": 1,
          "output_stride": output_stride, "channels_last": channels_last,
          "time_median_s": med, "time_min_s": float(s.min()),
          "time_p10_s": float(np.percentile(s, 10)), "time_p90_s": float(np.percentile(s, 90)),
          "img/s": batch / med, "img/s/device": batch / med, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "platform": device,
          "loss": float(loss.detach()), "finite": bool(np.isfinite(float(loss.detach())))}

"""PyTorch eager reference for the CAM-baseline train step (optional: `pip install
.[torch-bench]`), so the JAX/PyTorch ratio is measured side by side on one machine.

The model mirrors `models/registry.CAMNet` with a ResNet-50 backbone at output stride 16
(torchvision layout: layer4 dilated instead of strided), a bias-free 1x1 classifier on the
class maps, global average pooling, `MultiLabelSoftMarginLoss` and SGD with momentum and
weight decay. Written here (no torchvision) so the extra needs torch only; the same
module is the torch reference of `tests/test_resnet.py`, which loads real weights into
both and compares their outputs. `measure_train_step(channels_last=True)` runs PyTorch in
its faster layout (oneDNN's on CPU, tensor cores on GPU), so the comparison is with
PyTorch at its best.

`dtype='bfloat16'` is PyTorch's automatic mixed precision: float32 parameters and optimizer,
forward and loss under `torch.autocast(dtype=torch.bfloat16)` (no loss scaling: bf16 has
float32's exponent range). It is the counterpart of the JAX step's `model.dtype=bfloat16`
(bf16 compute, float32 master weights), so `bench --dtype=bfloat16 --what=train,torch`
compares like with like.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the PyTorch baseline needs torch: pip install '.[torch-bench]'") from e
  return torch


def torchvision_resnet(layers: tuple[int, ...], replace: tuple[bool, bool, bool]):
  """A torchvision-layout ResNet (bottleneck v1.5; `replace[i]` dilates layer i+2 instead
  of striding it, with torchvision's rule that a dilated layer's first block keeps the
  previous dilation). Same state-dict names as torchvision, so tests load real weights
  into it. `forward(x) -> (layer1 output, layer4 output)`, NCHW."""
  torch = _torch()
  tnn = torch.nn

  class Block(tnn.Module):

    def __init__(self, inplanes, planes, stride, downsample, dilation):
      super().__init__()
      self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(planes)
      self.conv2 = tnn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                              bias=False)
      self.bn2 = tnn.BatchNorm2d(planes)
      self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = tnn.BatchNorm2d(planes * 4)
      self.downsample = downsample

    def forward(self, x):
      out = torch.relu(self.bn1(self.conv1(x)))
      out = torch.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))

  class Net(tnn.Module):

    def __init__(self):
      super().__init__()
      self.inplanes, self.dilation = 64, 1
      self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = tnn.BatchNorm2d(64)
      self.maxpool = tnn.MaxPool2d(3, 2, 1)
      for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
        setattr(self, f"layer{i + 1}",
                self._make(planes, n, 1 if i == 0 else 2, i > 0 and replace[i - 1]))

    def _make(self, planes, blocks, stride, dilate):
      previous = self.dilation
      if dilate:
        self.dilation *= stride
        stride = 1
      down = None
      if stride != 1 or self.inplanes != planes * 4:
        down = tnn.Sequential(tnn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                              tnn.BatchNorm2d(planes * 4))
      mods = [Block(self.inplanes, planes, stride, down, previous)]
      self.inplanes = planes * 4
      mods += [Block(self.inplanes, planes, 1, None, self.dilation) for _ in range(1, blocks)]
      return tnn.Sequential(*mods)

    def forward(self, x):
      x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
      l1 = self.layer1(x)
      return l1, self.layer4(self.layer3(self.layer2(l1)))

  return Net()


def make_resnet50_cam(num_fg: int, output_stride: int = 16):
  """torchvision-layout ResNet-50 + bias-free 1x1 classifier; `forward -> (logits, cams)`."""
  torch = _torch()
  replace = {16: (False, False, True), 32: (False, False, False)}
  if output_stride not in replace:
    raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
  backbone = torchvision_resnet((3, 4, 6, 3), replace[output_stride])

  class CAMNet(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.backbone = backbone
      self.classifier = torch.nn.Conv2d(2048, num_fg, 1, bias=False)

    def forward(self, x):
      cams = self.classifier(self.backbone(x)[1])
      return cams.mean(dim=(2, 3)), cams

  return CAMNet()


DTYPES = ("float32", "bfloat16")


def _setup(batch: int, crop: int, num_classes: int, channels_last: bool,
           output_stride: int, lr: float, threads: int, dtype: str) -> dict[str, Any]:
  """Model, optimizer, loss, random batch, a device sync and the forward's autocast
  context (`t['autocast']()`) for the eager CAM step."""
  if dtype not in DTYPES:
    raise ValueError(f"the PyTorch baseline's dtype must be one of {DTYPES}, got {dtype!r}")
  torch = _torch()
  if threads > 0:
    torch.set_num_threads(threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  model = make_resnet50_cam(num_classes - 1, output_stride).to(device).train()
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.normal(size=(batch, 3, crop, crop)).astype(np.float32))
  labels = torch.from_numpy((rng.random((batch, num_classes - 1)) < 0.15).astype(np.float32))
  return {"torch": torch, "device": device, "model": model,
          "opt": torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4),
          "loss_fn": torch.nn.MultiLabelSoftMarginLoss(),
          "images": images.to(device).contiguous(memory_format=fmt),
          "labels": labels.to(device),
          "sync": torch.cuda.synchronize if device == "cuda" else (lambda: None),
          "dtype": dtype,
          "autocast": (lambda: torch.autocast(device, dtype=torch.bfloat16))
                      if dtype == "bfloat16" else contextlib.nullcontext}


def _time(fn, sync, *, warmup: int, steps: int, repeats: int) -> dict[str, float]:
  """Seconds per call of the eager `fn` (synchronised), after `warmup` calls."""
  for _ in range(warmup):
    fn()
  sync()
  samples = []
  for _ in range(max(1, repeats) * steps):
    t = time.perf_counter()
    fn()
    sync()
    samples.append(time.perf_counter() - t)
  s = np.asarray(samples)
  return {"time_median_s": float(np.median(s)), "time_min_s": float(s.min()),
          "time_p10_s": float(np.percentile(s, 10)),
          "time_p90_s": float(np.percentile(s, 90))}


def _describe(t: dict[str, Any], batch: int, crop: int, output_stride: int,
              channels_last: bool) -> dict[str, Any]:
  torch = t["torch"]
  return {"method": "cam", "backbone": "resnet50", "batch": batch, "crop": crop,
          "dtype": t["dtype"], "amp": t["dtype"] != "float32", "devices": 1,
          "output_stride": output_stride,
          "channels_last": channels_last, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "platform": t["device"]}


def measure_train_step(batch: int, crop: int, num_classes: int, *, steps: int = 10,
                       warmup: int = 2, repeats: int = 1, channels_last: bool = True,
                       output_stride: int = 16, lr: float = 0.01, threads: int = 0,
                       dtype: str = "float32") -> dict[str, Any]:
  """Times the eager PyTorch CAM step (forward, loss, backward, SGD) on random data;
  `dtype='bfloat16'` runs forward and loss under autocast (module docstring)."""
  t = _setup(batch, crop, num_classes, channels_last, output_stride, lr, threads, dtype)
  model, opt, loss_fn = t["model"], t["opt"], t["loss_fn"]
  losses = []

  def step():
    opt.zero_grad(set_to_none=True)
    with t["autocast"]():
      logits, _ = model(t["images"])
      loss = loss_fn(logits, t["labels"])
    loss.backward()
    opt.step()
    losses.append(loss)

  times = _time(step, t["sync"], warmup=warmup, steps=steps, repeats=repeats)
  loss = float(losses[-1].detach())
  return {"kind": "torch_eager_train_step",
          **_describe(t, batch, crop, output_stride, channels_last), **times,
          "img/s": batch / times["time_median_s"],
          "img/s/device": batch / times["time_median_s"],
          "loss": loss, "finite": bool(np.isfinite(loss))}


def measure_breakdown(batch: int, crop: int, num_classes: int, *, steps: int = 5,
                      warmup: int = 1, repeats: int = 1, channels_last: bool = True,
                      output_stride: int = 16, lr: float = 0.01, threads: int = 0,
                      dtype: str = "float32") -> list[dict[str, Any]]:
  """The eager step cut into the phases of `bench/breakdown.py` (forward in eval and train
  mode without autograd, forward + backward, the full step), in `dtype` as
  `measure_train_step`."""
  t = _setup(batch, crop, num_classes, channels_last, output_stride, lr, threads, dtype)
  torch, model, opt, loss_fn = t["torch"], t["model"], t["opt"], t["loss_fn"]

  def fwd(train: bool):
    def fn():
      model.train(train)
      with torch.no_grad(), t["autocast"]():
        model(t["images"])
    return fn

  def fwd_bwd():
    model.train()
    opt.zero_grad(set_to_none=True)
    with t["autocast"]():
      loss = loss_fn(model(t["images"])[0], t["labels"])
    loss.backward()

  def step():
    fwd_bwd()
    opt.step()

  records = []
  for phase, fn in (("fwd_eval", fwd(False)), ("fwd_train", fwd(True)),
                    ("fwd_bwd", fwd_bwd), ("step", step)):
    times = _time(fn, t["sync"], warmup=warmup, steps=steps, repeats=repeats)
    records.append({"kind": "breakdown", "phase": phase, "framework": "torch",
                    **_describe(t, batch, crop, output_stride, channels_last), **times,
                    "img/s/device": batch / times["time_median_s"]})
  model.train()
  return records

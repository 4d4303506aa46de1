"""wsss_jax.bench: sweep parsing, config keys, and one real measured step."""
import numpy as np
import pytest

from tiny_model import tiny_config
from wsss_jax.bench import sweep as cli
from wsss_jax.bench import steps
from wsss_jax.bench import timing


def test_sweep_points_cartesian_product():
  pts = cli.sweep_points(["data.batch_size=8,16", "model.dtype=float32,bfloat16"])
  assert pts == [{"data.batch_size": "8", "model.dtype": "float32"},
                 {"data.batch_size": "8", "model.dtype": "bfloat16"},
                 {"data.batch_size": "16", "model.dtype": "float32"},
                 {"data.batch_size": "16", "model.dtype": "bfloat16"}]
  assert cli.sweep_points([]) == [{}]
  with pytest.raises(ValueError, match="expected key=v1,v2"):
    cli.sweep_points(["data.batch_size"])


def test_set_key_casts_and_names_unknown_keys():
  c = tiny_config()
  cli.set_key(c, "data.batch_size", "32")
  cli.set_key(c, "model.pretrained", "false")
  assert c.data.batch_size == 32 and c.model.pretrained is False
  with pytest.raises(KeyError, match="data.batchsize"):
    cli.set_key(c, "data.batchsize", "8")


def test_time_calls_counts_and_orders_statistics():
  calls = []
  out = timing.time_calls(lambda: calls.append(1) or np.zeros(()), warmup=2, steps=3,
                          repeats=2)
  assert len(calls) == 2 + 6 and out["samples"] == 6 and len(out["repeat_means_s"]) == 2
  assert out["time_min_s"] <= out["time_p10_s"] <= out["time_median_s"] <= out["time_p90_s"]


def test_measure_train_step_real_model():
  c = tiny_config()
  c.model.backbone = "efficientnet_lite0"
  c.data.crop_size = 32
  c.mesh.data = 2
  rec = steps.measure_train_step(c, 5, batch=4, steps=2, warmup=1, repeats=1)
  assert rec["kind"] == "train_step" and rec["method"] == "cam" and rec["devices"] == 2
  assert rec["finite"] and rec["time_median_s"] > 0 and rec["compile_s"] > 0
  np.testing.assert_allclose(rec["img/s"], 4 / rec["time_median_s"])
  np.testing.assert_allclose(rec["img/s/device"], rec["img/s"] / 2)
  # XLA counts the FLOPs of one step on one device; per image that is x devices / batch.
  assert rec["gflop_per_image"] == pytest.approx(rec["gflop_per_call_device"] * 2 / 4)
  assert rec["mfu"] is None  # no known peak on CPU
  batch = steps.random_train_batch(2, 16, 5)
  assert batch["mask"].max() == 255 and batch["labels"].shape == (2, 4)


def test_torch_baseline_is_the_same_architecture_and_runs():
  torch = pytest.importorskip("torch")
  import jax
  from wsss_jax import models
  from wsss_jax.bench import torch_baseline
  c = tiny_config()
  c.model.backbone = "resnet50"
  jax_model = models.build_model(c.model, 21, kind="cam")
  shapes = jax.eval_shape(lambda: jax_model.init(jax.random.key(0),
                                                 jax.numpy.zeros((1, 64, 64, 3))))
  jax_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  torch_model = torch_baseline.make_resnet50_cam(20)
  torch_params = sum(p.numel() for p in torch_model.parameters())
  assert torch_params == jax_params == 23_508_032 + 2048 * 20
  with torch.no_grad():
    logits, cams = torch_model(torch.zeros(1, 3, 64, 64))
  assert tuple(cams.shape) == (1, 20, 4, 4) and tuple(logits.shape) == (1, 20)  # OS16
  rec = torch_baseline.measure_train_step(2, 32, 21, steps=1, warmup=1)
  assert rec["finite"] and rec["time_median_s"] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_baseline_convs_run_in_the_requested_dtype(dtype):
  torch = pytest.importorskip("torch")
  from wsss_jax.bench import torch_baseline
  conv_outputs = set()

  def record(module, _, output):
    if isinstance(module, torch.nn.Conv2d):
      conv_outputs.add(str(output.dtype).removeprefix("torch."))

  hook = torch.nn.modules.module.register_module_forward_hook(record)
  try:
    rec = torch_baseline.measure_train_step(2, 32, 21, steps=1, warmup=0, dtype=dtype)
  finally:
    hook.remove()
  # Every conv of the timed step (backbone and classifier) ran in the requested dtype.
  assert conv_outputs == {dtype}
  assert rec["dtype"] == dtype and rec["amp"] == (dtype == "bfloat16") and rec["finite"]
  with pytest.raises(ValueError, match="float16"):
    torch_baseline.measure_train_step(2, 32, 21, steps=1, warmup=0, dtype="float16")


def test_breakdown_phases_and_attribution():
  from wsss_jax.bench import breakdown
  c = tiny_config()
  c.model.backbone = "efficientnet_lite0"
  c.data.crop_size, c.data.batch_size = 32, 2
  recs = breakdown.measure_breakdown(c, 5, steps=1, warmup=1)
  assert [r["phase"] for r in recs] == list(breakdown.PHASES)
  assert all(r["framework"] == "jax" and r["time_median_s"] > 0 for r in recs)
  # The loss phase differentiates the same CAM loss the full step minimises.
  assert recs[-1]["finite"]
  # Attribution is the difference of consecutive phases (hand-made times).
  fake = [{"framework": fw, "phase": p, "time_median_s": t}
          for fw, ts in (("jax", (1.0, 1.5, 4.0, 4.25)), ("torch", (2.0, 2.5, 5.0, 6.0)))
          for p, t in zip(breakdown.PHASES, ts)]
  parts = breakdown.attribute(fake)
  assert parts["jax"] == {"forward": 1.0, "batchnorm_stats": 0.5, "backward": 2.5,
                          "update": 0.25, "step": 4.25}
  assert parts["torch"]["update"] == 1.0
  table = breakdown.format_attribution(fake)
  assert "jax/torch" in table and "0.25" in table.splitlines()[4]  # update: 0.25 / 1.0
  assert breakdown.attribute(fake[3:]) == {"torch": parts["torch"]}  # jax incomplete


def test_interleave_child_argv_pins_one_point():
  from wsss_jax.bench import interleave
  argv = ["--backbone=resnet50", "--sweep=model.maxpool_impl=window,argmax", "--interleave",
          "3", "--out", "x.jsonl", "--steps=5", "--sweep", "data.batch_size=4,8"]
  point = {"model.maxpool_impl": "argmax", "data.batch_size": "8"}
  assert interleave.child_argv(argv, point) == [
      "--backbone=resnet50", "--steps=5", "--sweep=model.maxpool_impl=argmax",
      "--sweep=data.batch_size=8"]


def test_interleave_alternates_points_and_reports_per_round_ratios():
  from wsss_jax.bench import interleave
  points = cli.sweep_points(["model.maxpool_impl=window,argmax"])
  calls, emitted = [], []
  fake_times = iter([2.0, 1.0, 3.0, 1.5])  # the host slows down in round 2

  def runner(args):
    calls.append(args[-1])
    return [{"kind": "train_step", "method": "cam", "time_median_s": next(fake_times)}]

  records = interleave.run(["--steps=2"], points, 2, emitted.append, runner=runner)
  assert calls == ["--sweep=model.maxpool_impl=window", "--sweep=model.maxpool_impl=argmax"] * 2
  assert [r["round"] for r in records] == [1, 1, 2, 2] and emitted == records
  assert records[1]["sweep"] == {"model.maxpool_impl": "argmax"}
  table = interleave.format_rounds(records)
  # Per-round ratios 0.5 and 0.5: the drift between rounds cancels.
  assert '{"model.maxpool_impl": "argmax"}: 1.000 1.500  ratio 0.500 (0.500-0.500)' in table
  assert '{"model.maxpool_impl": "window"}: 2.000 3.000  ratio 1.000' in table


def test_interleave_rejects_a_single_point():
  from wsss_jax.bench import interleave
  with pytest.raises(ValueError, match="at least 2 points"):
    interleave.schedule([{}], 3)
  with pytest.raises(ValueError, match="--interleave must be >= 1"):
    interleave.schedule([{"a": "1"}, {"a": "2"}], 0)

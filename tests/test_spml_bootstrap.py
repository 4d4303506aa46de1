"""SPML's bootstrapped classifiers: score normalisation, logit averaging, a frozen
embedding under the shared train step, and the stages end to end on a tiny synthetic set."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from conftest import REPO_ROOT
from tiny_model import fast_compile  # noqa: F401  (module fixture)
from tiny_model import TinyTwoScaleBackbone, max_abs_diff, run_steps, tiny_config
from wsss_jax.data import sources
from wsss_jax.methods import seg as seg_method
from wsss_jax.methods import spml
from wsss_jax.ops import propagation
from wsss_jax.ops import seg_inference
from wsss_jax.stages import spml_bootstrap

pytestmark = pytest.mark.usefixtures("fast_compile")
NUM_CLASSES = 4  # background + 3


# ---------------------------------------------------------------------------------------
# Pure pieces.
# ---------------------------------------------------------------------------------------
def test_bootstrap_scores_hand_case():
  # One image of 1x3 pixels, 3 classes; the third pixel is padding.
  logits = np.array([[[[0.0, 0.0, 0.0], [2.0, 0.0, 1.0], [0.0, 9.0, 0.0]]]], np.float32)
  valid = np.array([[[True, True, False]]])
  present = np.array([[True, True, False]])      # background + class 1; class 2 absent
  got = np.asarray(propagation.bootstrap_scores(jnp.asarray(logits), jnp.asarray(valid),
                                                jnp.asarray(present)))
  e = np.exp(logits[0, 0])
  probs = e / e.sum(-1, keepdims=True)
  # Per-class maxima over the two valid pixels only (the padding pixel's 0.9998 for class 1
  # must not count).
  bg_max = max(probs[0, 0], probs[1, 0])
  c1_max = max(probs[0, 1], probs[1, 1])
  want = np.stack([probs[:, 0] / bg_max, probs[:, 1] / c1_max, np.zeros(3)], -1)
  np.testing.assert_allclose(got[0, 0], want, rtol=1e-5)
  assert got[0, 0, 1, 0] == pytest.approx(1.0)       # the bg peak is pixel 1 (2 vs 0, 1)
  assert got[0, 0, 0, 1] == pytest.approx(1.0)       # class 1 peaks at pixel 0: 1/3 > 1/(e^2+1+e)


def test_multiscale_logits_average_logits_not_probabilities():
  # A map that is not flip-equivariant: logits = x + column index. The mirrored pass,
  # mirrored back, sees the columns reversed, so the mean adds (W - 1) / 2 everywhere.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 4, 6, 3)).astype(np.float32))
  ramp = jnp.arange(6, dtype=jnp.float32)[None, None, :, None]
  got = seg_inference.multiscale_logits(lambda y: y + ramp, x, scales=(1.0,), flip=True)
  np.testing.assert_allclose(got, x + 2.5, atol=1e-5)
  probs = seg_inference.multiscale_probs(lambda y: y + ramp, x, scales=(1.0,), flip=True)
  want = 0.5 * (jax.nn.softmax(x + ramp, -1) + jax.nn.softmax(x + ramp[:, :, ::-1], -1))
  np.testing.assert_allclose(probs, want, atol=1e-6)


# ---------------------------------------------------------------------------------------
# The classifier trains on a frozen embedding under the shared step.
# ---------------------------------------------------------------------------------------
def _classifier_method(frozen):
  cfg = tiny_config(**{"data.batch_size": 8, "data.crop_size": 16, "mesh.data": 1})
  cfg.optim.frozen = frozen
  model = spml.SPMLNet(TinyTwoScaleBackbone(name=None), NUM_CLASSES, embedding_dim=8,
                       aspp_rates=(1, 2), classifier_hidden=8, classifier_dropout=0.0,
                       freeze_embedding=True)
  return seg_method.make_seg_method(cfg, NUM_CLASSES, model=model), cfg


def _classifier_run(frozen, batches):
  method, cfg = _classifier_method(frozen)
  return run_steps(method, cfg, 1, "jit", batches)


def _initial_state(batch):
  from wsss_jax.runtime import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from wsss_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  method, cfg = _classifier_method(spml_bootstrap.EMBEDDING_PARAMS)
  opt = state_lib.make_optimizer_for(method, cfg, batch)
  return jax.device_get(state_lib.create_train_state(
      method, cfg, mesh_lib.make_mesh(cfg.mesh), batch, optimizer=opt))


def _label_batches(n):
  rng = np.random.default_rng(3)
  out = []
  for _ in range(n):
    mask = rng.integers(0, NUM_CLASSES, (8, 16, 16)).astype(np.int32)
    mask[:, :3] = 255
    out.append({"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
                "mask": mask, "labels": np.ones((8, NUM_CLASSES - 1), np.float32)})
  return out


def test_frozen_embedding_trains_only_the_classifier():
  batches = _label_batches(3)
  start = _initial_state(batches[0])
  end, hist = _classifier_run(spml_bootstrap.EMBEDDING_PARAMS, batches)
  for name in ("backbone", "embed_aspp0", "embed_aspp1"):
    assert max_abs_diff(start.params[name], end.params[name]) == 0.0, name
  # BatchNorm of the backbone runs in inference mode: its statistics do not move ...
  assert max_abs_diff(start.batch_stats["backbone"], end.batch_stats["backbone"]) == 0.0
  # ... while the classifier's BatchNorm and weights train.
  assert max_abs_diff(start.batch_stats["classifier_bn"], end.batch_stats["classifier_bn"]) > 0
  for name in ("classifier_conv", "classifier_bn", "classifier_out"):
    assert max_abs_diff(start.params[name], end.params[name]) > 0, name
  assert np.isfinite(hist[-1]["loss"])
  # Control: without the frozen groups, weight decay alone moves the embedding network.
  free, _ = _classifier_run((), batches)
  assert max_abs_diff(start.params["backbone"], free.params["backbone"]) > 0


# ---------------------------------------------------------------------------------------
# spml_labels -> spml_bootstrap through the command line (tiny synthetic set).
# ---------------------------------------------------------------------------------------
CONFIG = os.path.join(REPO_ROOT, "configs", "synthetic", "spml.py") + ":runlocal"
TINY = [
    "--config.data.synthetic.num_train=16", "--config.data.synthetic.num_val=8",
    "--config.data.synthetic.image_size=64", "--config.data.crop_size=64",
    "--config.data.batch_size=8", "--config.data.eval_batch_size=8",
    "--config.baseline.num_steps=2", "--config.train.num_steps=2",
    "--config.train.ckpt_every=1", "--config.train.log_every=1",
    "--config.train.progress=False", "--config.cams.scales=(1.0,)",
    "--config.pseudo.crf_iters=2", "--config.spml.superpixels.n_segments=8",
    "--config.spml_labels.nn_grid=4", "--config.spml_labels.nn_topk=4",
    "--config.spml_bootstrap.steps=2", "--config.spml_bootstrap.batch_size=8",
    "--config.spml_bootstrap.label_scales=(1.0,)",
    "--config.spml_bootstrap.final_scales=(0.75,1.0)",
    "--config.stages=data,baseline,cams,sweep,pseudo,train,spml_labels,spml_bootstrap",
]

def _wsss(workdir, cache, *extra):
  env = {**os.environ, "WSSS_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "wsss_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
       *TINY, *extra], capture_output=True, text=True, timeout=1200, env=env)
  return proc


@pytest.fixture(scope="module")
def boot_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("spml_boot")
  workdir, cache = root / "work", root / "cache"
  proc = _wsss(workdir, cache)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return {"workdir": workdir, "cache": cache}


def test_bootstrap_writes_tag_restricted_labels_and_scores(boot_run):
  w = boot_run["workdir"]
  with open(w / "results.json") as f:
    r = json.load(f)
  for key in ("spml_boot_miou", "spml_boot_pseudo_miou", "spml_boot_round2_pseudo_miou",
              "spml_pseudo_miou"):
    assert 0.0 <= r[key] <= 1.0, key
  for d in ("classifier1", "classifier2"):
    assert (w / "spml_boot" / d / "final_variables.msgpack").exists(), d
  round2 = sorted((w / "spml_boot" / "round2" / "pseudo").glob("*.png"))
  final = sorted((w / "spml_boot" / "pseudo").glob("*.png"))
  assert len(round2) == 16 and len(final) == 16
  # Every final label is background or one of the image's tags.
  with open(w / "config.json") as f:
    data_cfg = ml_collections.ConfigDict(json.load(f)["data"])
  data_cfg.cache_dir = str(boot_run["cache"])
  source = sources.get_source(data_cfg, data_cfg.train_split)
  assert len(source) == 16
  for i in range(len(source)):
    record = source[i]
    label = np.asarray(Image.open(w / "spml_boot" / "pseudo" / f"{record['id']}.png"))
    assert label.shape == record["mask"].shape
    allowed = {0} | {k + 1 for k in np.flatnonzero(np.asarray(record["labels"]) > 0)}
    assert set(np.unique(label).tolist()) <= allowed, record["id"]


def test_bootstrap_reuses_its_outputs_and_refuses_changed_inputs(boot_run):
  w = boot_run["workdir"]
  before = (w / "spml_boot" / "classifier1" / "final_variables.msgpack").stat().st_mtime_ns
  proc = _wsss(w, boot_run["cache"])
  assert proc.returncode == 0, proc.stderr[-4000:]
  after = (w / "spml_boot" / "classifier1" / "final_variables.msgpack").stat().st_mtime_ns
  assert before == after
  # Another schedule for the classifiers must not resume the finished ones silently.
  proc = _wsss(w, boot_run["cache"], "--config.spml_bootstrap.steps=3")
  assert proc.returncode != 0
  assert "classifier1" in proc.stderr and "Delete" in proc.stderr


def test_bootstrap_is_on_for_the_full_config_and_opt_in_on_cpu():
  from conftest import load_config_file  # pylint: disable=import-outside-toplevel

  def boot(path, arg):
    c = load_config_file(path, arg)
    on = "spml_bootstrap" in c.stages.split(",")
    assert c.seg.pseudo_dir == os.path.join("spml_boot" if on else "spml", "pseudo")
    return on

  assert boot("configs/voc/spml.py", "")
  assert not boot("configs/voc/spml.py", "bootstrap=false")
  assert not boot("configs/voc/spml.py", "runlocal")
  assert boot("configs/voc/spml.py", "runlocal,bootstrap")
  assert not boot("configs/synthetic/spml.py", "")
  assert boot("configs/synthetic/spml.py", "bootstrap=true")
  # Points never bootstrap (the stage is for tags).
  assert not boot("configs/voc/spml.py", "weak_label=points")
  with pytest.raises(ValueError, match="'bootstrap' wants true, false or auto"):
    load_config_file("configs/voc/spml.py", "bootstrap=maybe")

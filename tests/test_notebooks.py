"""The research notebooks run end to end against a tiny work directory.

Each `notebooks/*.py` (jupytext percent format) is converted to a notebook in memory and
executed cell by cell in a fresh Python kernel with nbclient; a cell that raises fails
the test with its traceback. The work directory is built here through the real command
line (all stages, 8+4 images of 64²) rather than shared with tests/test_stages.py,
whose tests delete and rebuild parts of theirs. A real `python -m wsss_jax.bench`
batch-size sweep (two tiny points) feeds the throughput notebook.

Plus `wsss_jax.viz` without a kernel, and `stages/figures.py` skipping figures when
matplotlib is missing.
"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK_DIR = os.path.join(REPO_ROOT, "notebooks")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOK_DIR,
                                                                      "[0-9]*.py")))
CONFIG = os.path.join(REPO_ROOT, "configs", "synthetic", "cam.py") + ":runlocal"
TINY = [
    "--config.data.synthetic.num_train=8", "--config.data.synthetic.num_val=4",
    "--config.data.synthetic.image_size=64", "--config.data.crop_size=64",
    "--config.data.batch_size=4", "--config.data.eval_batch_size=4",
    "--config.train.num_steps=2", "--config.train.ckpt_every=2",
    "--config.train.log_every=1", "--config.train.progress=False",
    "--config.seg.num_steps=1", "--config.seg.batch_size=4",
    "--config.cams.scales=(1.0,)", "--config.pseudo.crf_iters=2",
]
CELL_TIMEOUT_S = 300


def _env(cache) -> dict:
  # Most XLA optimisations off (as conftest's `fast_compile`): compiles of the real
  # EfficientNet steps drop from minutes to seconds on a busy 2-core box, and these tests
  # check that the notebooks run, not how fast the code is.
  env = {**os.environ, "WSSS_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu",
         "MPLBACKEND": "Agg", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  env.pop("XLA_FLAGS", None)  # one CPU device: the fake 8 of conftest only cost compiles
  return env


def _run(args, env, timeout=900):
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=REPO_ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("notebooks")
  workdir, cache, bench = root / "work", root / "cache", root / "bench.jsonl"
  env = _env(cache)
  _run(["-m", "wsss_jax.main", f"--config={CONFIG}", f"--workdir={workdir}", *TINY], env)
  _run(["-m", "wsss_jax.bench", f"--config={CONFIG}", "--crop=32", "--num_classes=11",
        "--sweep=data.batch_size=1,2", "--steps=2", "--warmup=1", "--repeats=1",
        f"--out={bench}"], env)
  return {"workdir": workdir, "cache": cache, "bench": bench, "env": env}


def _execute(name: str, out_dir) -> None:
  """Runs one notebook in a fresh kernel; raises nbclient's CellExecutionError (with the
  failing cell and traceback) if a cell raises. The executed notebook is written to
  `out_dir` for a look after a failure (pytest keeps the last runs' tmp folders)."""
  import nbformat  # pylint: disable=import-outside-toplevel
  nb = jupytext.read(os.path.join(NOTEBOOK_DIR, name))
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOK_DIR}})
  try:
    client.execute()
  finally:
    nbformat.write(nb, str(out_dir / name.replace(".py", ".ipynb")))
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.get("execution_count") for c in code), f"{name}: cells not run"
  images = sum(1 for c in code for o in c.get("outputs", [])
               if "image/png" in o.get("data", {}))
  assert images >= 1, f"{name} displayed no figure"


@pytest.mark.slow
def test_notebooks_run_end_to_end(inputs, monkeypatch, tmp_path):
  # One test for all notebooks (not one per notebook): under `pytest -n 2` parametrized
  # cases could land on both workers and each would build the module fixture again.
  env = {**inputs["env"], "WSSS_WORKDIR": str(inputs["workdir"]),
         # The comparison section gets two runs: the same directory twice is enough to
         # exercise the multi-run code paths.
         "WSSS_WORKDIRS": f"{inputs['workdir']},{inputs['workdir']}",
         "WSSS_BENCH": str(inputs["bench"]), "WSSS_NUM_IMAGES": "2",
         "WSSS_NUM_CRF_IMAGES": "1"}
  for k, v in env.items():
    monkeypatch.setenv(k, v)  # the kernel inherits this process's environment
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  failures = {}
  for name in NOTEBOOKS:
    try:
      _execute(name, tmp_path)
    except Exception as e:  # pylint: disable=broad-except  (report every notebook)
      failures[name] = str(e)[-3000:]
  assert not failures, "\n\n".join(f"{n}:\n{msg}" for n, msg in failures.items())


def test_notebooks_are_percent_format_and_define_no_training():
  assert len(NOTEBOOKS) == 4, NOTEBOOKS
  for name in NOTEBOOKS:
    with open(os.path.join(NOTEBOOK_DIR, name)) as f:
      text = f.read()
    assert "format_name: percent" in text and "# %% [markdown]" in text, name
    for forbidden in ("make_train_step", "optax", "value_and_grad", "jax.grad"):
      assert forbidden not in text, (name, forbidden)


def test_viz_figures_from_arrays(tmp_path):
  from wsss_jax import viz
  rng = np.random.default_rng(0)
  img = rng.integers(0, 255, (16, 20, 3), np.uint8)
  mask = rng.integers(0, 3, (16, 20)).astype(np.uint8)
  mask[0] = 255
  cams = rng.random((2, 16, 20)).astype(np.float32)
  seg = rng.integers(-1, 4, (16, 20))
  figs = [
      viz.threshold_curve({"thresholds": [0.1, 0.2], "miou": [0.3, 0.4],
                           "best_threshold": 0.2, "best_miou": 0.4, "split": "train"}),
      viz.per_class_bars(["bg", "a", "b"], {"cam": [0.5, None, 0.2]}),
      viz.confusion_heatmap(rng.integers(0, 9, (3, 3)), ["bg", "a", "b"]),
      viz.cam_overlays([img, img], [cams, cams[:0]], ["x", "y"]),
      viz.cam_per_class([img], [cams], [[1, 2]], ["bg", "a", "b"], masks=[mask]),
      viz.label_gallery([img], {"gt": [mask]}, ["x"]),
      viz.image_grid([{"a": img, "b": cams[0]}, {"c": img}]),
      viz.lines([0, 1, 2], {"loss": [1.0, 0.5, None]}, xlabel="step"),
      viz.throughput([{"kind": "train_step", "batch": b, "img/s/device": 2.0 * b,
                       "mfu": None} for b in (1, 2)]),
  ]
  for i, fig in enumerate(figs):
    viz.save(fig, str(tmp_path / f"{i}.png"))
    assert (tmp_path / f"{i}.png").stat().st_size > 0
  overlay = viz.segment_overlay(img, seg)
  assert overlay.shape == img.shape and overlay.dtype == np.uint8
  edges = viz.segment_boundaries(np.array([[0, 0, 1], [0, 0, 1]]))
  assert edges.tolist() == [[False, True, False], [False, True, False]]


def test_figures_are_skipped_without_matplotlib(tmp_path, monkeypatch):
  from wsss_jax import viz
  from wsss_jax.stages import figures
  monkeypatch.setattr(viz, "available", lambda: False)
  path = tmp_path / "curve.png"
  figures.threshold_curve(str(path), {"thresholds": [0.1], "miou": [0.3],
                                      "best_threshold": 0.1, "best_miou": 0.3,
                                      "split": "train"})
  assert not path.exists()


def test_bench_jsonl_reader_skips_table_lines(tmp_path):
  from wsss_jax.analysis import reader
  path = tmp_path / "out.txt"
  path.write_text(json.dumps({"batch": 1}) + "\n  kind  batch\n{\"cut\n" +
                  json.dumps({"batch": 2}) + "\n")
  assert [r["batch"] for r in reader.read_bench([str(path)])] == [1, 2]


def test_image_miou_and_label_resize():
  from wsss_jax.analysis import reader
  from wsss_jax.analysis import features as feats
  gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
  pred = np.array([[0, 0, 1, 0], [0, 255, 1, 1]])  # 255 in a prediction is background
  # bg: tp 4, fp 1, fn 0 -> 4/5; class 1: tp 2, fn 1 -> 2/3 (the ignore pixel not counted).
  assert reader.image_miou(gt, pred, 3) == pytest.approx((4 / 5 + 2 / 3) / 2)
  # Nearest pixel centres: output (0, j) samples input (1, 2j + 1).
  assert feats.resize_labels(gt, (1, 2)).tolist() == [[0, 255]]
  assert feats.resize_labels(np.array([[3]]), (2, 2)).tolist() == [[3, 3], [3, 3]]


def test_bank_statistics_and_summaries():
  import jax.numpy as jnp
  from wsss_jax.ops import memory
  from wsss_jax.analysis import features as feats
  bank = memory.fifo_init(4, {"feat": jnp.zeros((2,)), "step": jnp.zeros((), jnp.int32)})
  items = {"feat": np.array([[1, 0], [0, 1], [1, 1]], np.float32),
           "step": np.zeros(3, np.int32)}
  bank = memory.fifo_enqueue(bank, items, jnp.array([True, True, False]))
  stats = feats.bank_statistics(bank, step=2, queries=np.array([[1.0, 0.0]]))
  assert stats["count"] == 2 and stats["fill"] == 0.5 and stats["mean_age"] == 2
  assert stats["mean_pairwise_cos"] == pytest.approx(0.0)  # orthogonal entries
  assert stats["fg_to_bank_cos"] == pytest.approx(1.0)
  # As orbax restores a FifoBank inside `extra`: plain dicts; plus a per-class bank.
  extra = {"bank": {"items": np.asarray(bank.items["feat"]), "ptr": 2, "count": 2},
           "per_class": {"items": np.ones((2, 3, 2), np.float32), "ptr": np.zeros(2),
                         "count": np.array([3, 0])}}
  rows = {r["bank"]: r for r in feats.bank_summaries(extra)}
  assert rows["bank"]["capacity"] == 4 and rows["bank"]["count"] == 2
  assert rows["per_class[0]"]["mean_pairwise_cos"] == pytest.approx(1.0)
  assert rows["per_class[1]"]["count"] == 0 and rows["per_class[1]"]["mean_pairwise_cos"] is None


def test_workdir_repr_is_one_short_line(tmp_path):
  from wsss_jax.analysis import reader
  from wsss_jax.stages import workdir as wd
  config = {"method": "csrm", "data": {"name": "voc", "root": "/d"},
            "optim": {f"key_{i}": i for i in range(50)}}
  wd.write_json(str(tmp_path / "config.json"), config)
  w = reader.open_workdir(str(tmp_path))
  assert repr(w) == f"Workdir({str(tmp_path)!r}, method='csrm', dataset='voc')"

"""Read a finished (or partial) work directory for notebooks: results, CAMs, pseudo-labels,
per-image scores, confusion matrices, metrics logs and benchmark JSON lines.

Nothing here plots (that is `wsss_jax.viz`) and nothing writes to the work directory:
notebooks may point at a run that is still going. Every reader reuses the stage that
wrote the file (`cam_store`, `data.label_sources.read_label`) and the ops that scored it
(`ops.cam.cams_to_labels`), so what a notebook shows is what the pipeline scored.

  w = reader.open_workdir("runs/synthetic_cam")
  w.results["cam_miou"], w.sweep()["best_threshold"]
  rec = w.record(w.sweep_split, 0); cams = w.cams(w.sweep_split, rec["id"])
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Iterable, Sequence

import ml_collections as mlc
import numpy as np

from wsss_jax import fs
from wsss_jax.data import label_sources
from wsss_jax.data import sources
from wsss_jax.ops import IGNORE_INDEX
from wsss_jax.ops import metrics
from wsss_jax.ops import cam as cam_ops
from wsss_jax.ops import crf
from wsss_jax.ops import pseudo_labels
from wsss_jax.stages import cam_store
from wsss_jax.stages import workdir as wd

# results.json keys of the headline table (compare.HEADLINE_KEYS plus the labelled-pixel
# pseudo-label score, which the audit notebook discusses).
HEADLINE_KEYS = ("train_map", "cam_miou", "cam_threshold", "pseudo_miou",
                 "pseudo_miou_labelled", "pseudo_labelled_fraction", "seg_miou",
                 "seg_gt_miou")
# results.json per-class IoU lists by the stage that produced them.
PER_CLASS_KEYS = {"cam": "cam_per_class_iou", "pseudo": "pseudo_per_class_iou",
                  "seg": "seg_per_class_iou", "seg_gt": "seg_gt_per_class_iou"}


@dataclasses.dataclass
class Workdir:
  """A work directory opened for reading. Build with `open_workdir`.

  Attributes:
    path: absolute path.
    config: the resolved config the run wrote (`config.json`).
  """
  path: str
  config: mlc.ConfigDict
  _sources: dict[str, sources.RecordSource] = dataclasses.field(
      default_factory=dict, repr=False, compare=False)

  def __repr__(self) -> str:
    # The config runs to hundreds of lines; `w.config` shows it when wanted.
    c = self.config
    return (f"Workdir({self.path!r}, method={c.get('method')!r}, "
            f"dataset={c.get('data', {}).get('name')!r})")

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.path))

  @property
  def results(self) -> dict[str, Any]:
    """`results.json` as it is now (re-read on every access: a run may still be going)."""
    return wd.read_results(self.path)

  @property
  def train_split(self) -> str:
    return self.config.data.train_split

  @property
  def sweep_split(self) -> str:
    return self.config.data.sweep_split

  @property
  def val_split(self) -> str:
    return self.config.data.val_split

  @functools.cached_property
  def meta(self) -> sources.DatasetMeta:
    """Dataset facts; the dataset must be prepared (same cache dir as the run)."""
    return sources.get_meta(self.config.data)

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.meta.class_names

  @property
  def num_classes(self) -> int:
    return self.meta.num_classes

  def source(self, split: str) -> sources.RecordSource:
    """The records of `split` (opened once per Workdir)."""
    if split not in self._sources:
      self._sources[split] = sources.get_source(self.config.data, split)
    return self._sources[split]

  def record(self, split: str, index: int) -> dict[str, Any]:
    """Record `index` of `split`: id, image uint8 [H,W,3], mask uint8 [H,W], labels."""
    return self.source(split)[index]

  def ids(self, split: str) -> list[str]:
    src = self.source(split)
    return [src[i]["id"] for i in range(len(src))]

  def file(self, *parts: str) -> str:
    return os.path.join(self.path, *parts)

  def has(self, *parts: str) -> bool:
    return fs.exists(self.file(*parts))

  def json(self, *parts: str) -> dict[str, Any] | None:
    """A JSON file of the work directory, or None if the stage has not written it."""
    return wd.read_json(self.file(*parts)) if self.has(*parts) else None

  def sweep(self) -> dict[str, Any] | None:
    """`sweep.json`: thresholds, miou per threshold, best_threshold, per_class_iou."""
    return self.json(wd.SWEEP_FILE)

  def evaluation(self, prefix: str = "seg") -> dict[str, Any] | None:
    """`<prefix>_evaluate.json` (headline, confusion [C, C], class names) or None."""
    return self.json(f"{prefix}_evaluate.json")

  def cams(self, split: str, image_id: str) -> dict[str, np.ndarray]:
    """One image's CAMs: keys [K] class ids, cam [K,h4,w4], high_res [K,H,W] in [0, 1]."""
    return cam_store.load(cam_store.split_dir(self.path, split), image_id)

  def pseudo_label(self, image_id: str) -> np.ndarray | None:
    """uint8 [H, W] pseudo-label (255 = unsure), or None if not written."""
    path = label_sources.label_path(os.path.join(self.path, "pseudo"), image_id)
    return label_sources.read_label(path) if fs.exists(path) else None

  def cam_threshold(self) -> float:
    """The sweep's best background threshold (the config's fallback if not swept yet)."""
    sweep = self.sweep()
    if sweep is not None:
      return float(sweep["best_threshold"])
    t = float(self.config.pseudo.fg_threshold)
    return t if t >= 0 else 0.5

  def cam_prediction(self, split: str, record: dict[str, Any],
                     threshold: float | None = None) -> np.ndarray:
    """int32 [H, W] CAM label map at `threshold` (default: the sweep's best), as scored."""
    scores = cam_store.dense_scores(self.cams(split, record["id"]), self.num_classes - 1)
    t = self.cam_threshold() if threshold is None else threshold
    return np.asarray(cam_ops.cams_to_labels(scores.transpose(1, 2, 0), record["labels"], t))

  def metrics_log(self, stage: str = "train") -> list[dict[str, Any]]:
    """`<stage>/metrics.jsonl` as a list of dicts (empty if absent)."""
    return read_jsonl(self.file(stage, "metrics.jsonl"))

  def variables(self, stage: str = "train") -> dict[str, Any]:
    """Trained `{'params', 'batch_stats'}` written by the `train` (or `seg`) stage."""
    from wsss_jax.stages import inference  # pylint: disable=import-outside-toplevel
    return inference.load_variables(self.file(stage, inference.VARIABLES_FILE))


def open_workdir(path: str) -> Workdir:
  """Opens a work directory written by `wsss` (needs `config.json`).

  The dataset is read from the cache the config names (`data.cache_dir`, else
  `$WSSS_JAX_CACHE`, else `~/.cache/wsss_jax`): set the same one the run used.
  """
  path = fs.absolute(path)
  cfg = os.path.join(path, "config.json")
  if not fs.exists(cfg):
    raise FileNotFoundError(f"{cfg} not found: {path} is not a wsss work directory (run "
                            "`wsss --config=... --workdir=DIR` first)")
  return Workdir(path, mlc.ConfigDict(wd.read_json(cfg)))


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """JSON objects, one per line; other lines (a bench table printed after them) skipped."""
  if not fs.exists(path):
    return []
  out = []
  with fs.open_file(path) as f:
    for line in f:
      line = line.strip()
      if line.startswith("{"):
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          continue  # a line cut off by a killed writer
  return out


def read_bench(paths: Iterable[str]) -> list[dict[str, Any]]:
  """Records of `python -m wsss_jax.bench` (its `--out` files or captured stdout)."""
  return [r for p in paths for r in read_jsonl(p)]


# ----------------------------------------------------------------------------- scores


def image_miou(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
  """Mean IoU of one image over the classes in its ground truth or prediction.

  Per-image scores rank images (worst first); the split mIoU is computed from summed
  confusion matrices instead, as the stages do. Ignore pixels (255) in `gt` do not count;
  255 in `pred` counts as background (as `pseudo_miou` does).
  """
  pred = np.where(pred == IGNORE_INDEX, 0, pred)
  conf = metrics.confusion_matrix_np(gt, pred, num_classes).astype(np.float64)
  union = conf.sum(0) + conf.sum(1) - np.diag(conf)
  present = union > 0
  return float(np.mean(np.diag(conf)[present] / union[present])) if present.any() else 1.0


def per_image_scores(w: Workdir, split: str, which: str = "cam",
                     limit: int | None = None) -> list[dict[str, Any]]:
  """Per-image mIoU of the CAMs (at the best threshold) or the pseudo-labels, worst first.

  Args:
    w: the work directory.
    split: a split with CAMs (`which='cam'`) or pseudo-labels (`'pseudo'`) on disk.
    which: 'cam' or 'pseudo'.
    limit: score only the first `limit` images (large splits in a notebook).

  Returns:
    [{'index', 'id', 'miou', 'classes'}] sorted by ascending mIoU.
  """
  src = w.source(split)
  out = []
  for i in range(len(src) if limit is None else min(limit, len(src))):
    rec = src[i]
    if which == "cam":
      pred = w.cam_prediction(split, rec)
    elif which == "pseudo":
      pred = w.pseudo_label(rec["id"])
      if pred is None:
        continue
    else:
      raise ValueError(f"which={which!r}; expected 'cam' or 'pseudo'")
    classes = [w.class_names[k + 1] for k in np.flatnonzero(rec["labels"])]
    out.append({"index": i, "id": rec["id"], "miou": image_miou(rec["mask"], pred,
                                                                w.num_classes),
                "classes": classes})
  return sorted(out, key=lambda r: r["miou"])


def pseudo_confusion(w: Workdir, split: str | None = None) -> np.ndarray:
  """int64 [C, C] confusion (rows = ground truth) of the pseudo-labels of `split` (default
  the sweep split, where `pseudo_miou` is scored); unsure pixels count as background."""
  split = split or w.sweep_split
  c = w.num_classes
  conf = np.zeros((c, c), np.int64)
  src = w.source(split)
  for i in range(len(src)):
    rec = src[i]
    label = w.pseudo_label(rec["id"])
    if label is None:
      continue
    label = np.where(label == IGNORE_INDEX, 0, label)
    conf += metrics.confusion_matrix_np(rec["mask"], label, c)
  return conf


def pseudo_label_modes(w: Workdir, split: str, indices: Sequence[int],
                       modes: Sequence[str] = ("threshold", "double", "crf"),
                       crf_iters: int | None = None) -> dict[str, list[np.ndarray]]:
  """Pseudo-labels of a few images recomputed in each mode from the CAMs on disk.

  Uses the run's own settings (threshold, bg threshold, CRF preset) and the same
  `ops.pseudo_labels` function as the `pseudo` stage, so 'crf' reproduces the run's labels
  when the run used mode 'crf', and the other modes show what the CRF changed.

  Returns:
    {mode: [int32 [H, W] per image]} (255 = unsure).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  pc = w.config.pseudo
  fg_t = w.cam_threshold() if float(pc.fg_threshold) < 0 else float(pc.fg_threshold)
  params = crf.PRESETS[pc.crf]
  iters = int(pc.crf_iters if crf_iters is None else crf_iters)
  out: dict[str, list[np.ndarray]] = {m: [] for m in modes}
  for i in indices:
    rec = w.record(split, i)
    cams = cam_store.dense_scores(w.cams(split, rec["id"]), w.num_classes - 1)
    h, wd_ = rec["mask"].shape
    for mode in modes:
      labels = pseudo_labels.pseudo_labels(
          jnp.asarray(cams.transpose(1, 2, 0)[None]), jnp.asarray(rec["labels"][None]),
          jnp.asarray(rec["image"][None], jnp.float32), jnp.ones((1, h, wd_), bool),
          mode=mode, fg_threshold=fg_t, bg_threshold=float(pc.bg_threshold),
          crf_params=params, crf_iters=iters)
      out[mode].append(np.asarray(labels[0]))
  return out


# ----------------------------------------------------------------------------- comparison


def headline_table(workdirs: Sequence[Workdir],
                   keys: Sequence[str] = HEADLINE_KEYS) -> list[dict[str, Any]]:
  """One row per work directory: name, method, dataset, backbone and the headline keys
  it has (None where a stage has not run)."""
  rows = []
  for w in workdirs:
    r = w.results
    rows.append({"workdir": w.name, "method": r.get("method", w.config.method),
                 "dataset": r.get("dataset"), "backbone": r.get("backbone"),
                 **{k: r.get(k) for k in keys}})
  return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  """A Markdown table of dict rows (floats to 3 decimals, None as '-')."""
  if not rows:
    return "(no rows)"
  cols = list(rows[0])

  def cell(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines)

"""Plots of CAMs, label maps, scores and throughput, for notebooks and `workdir/figures/`.

Matplotlib is an optional extra (`pip install -e ".[viz]"`): it is imported when a plot is
made, never when `wsss_jax` is imported, so training and the other stages run without it
(`available()` says whether plots can be made; `stages/figures.py` skips them otherwise).

Every function returns a `matplotlib.figure.Figure` built without `pyplot`: no global
figure registry (nothing to close, no leaks in long runs), no backend switch (the pipeline
saves PNGs headless; a notebook shows the returned figure through IPython's inline
formatter, `%matplotlib inline`). `save(fig, path)` writes a PNG atomically.

Images are uint8 [H, W, 3]; CAMs float [K, H, W] in [0, 1]; label maps int [H, W] with
class ids and 255 = ignore, coloured with the VOC palette (as the pseudo-label PNGs).
"""
from __future__ import annotations

import importlib.util
from typing import Any, Mapping, Sequence

import numpy as np

from wsss_jax.data.palette import colorize  # also for notebooks: viz.colorize(labels)

INSTALL_HINT = 'matplotlib is not installed: pip install "wsss_jax[viz]" (or matplotlib)'
# Panel size in inches of one image in a grid: small enough for 8 columns on a screen.
PANEL = 2.2
IGNORE = 255  # label value drawn as "ignore" (docs/CONVENTIONS.md)
CAM_SCALE_LABEL = "CAM (max-normalised per class)"


def available() -> bool:
  """True when matplotlib can be imported (plots can be made)."""
  try:
    return importlib.util.find_spec("matplotlib") is not None
  except (ImportError, ValueError):  # ValueError: a module blocked as sys.modules[m] = None
    return False


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float],
               squeeze: bool = False) -> tuple[Any, Any]:
  """`(Figure, axes)` without pyplot; axes is a 2-D array unless `squeeze`."""
  try:
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(INSTALL_HINT) from e
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save(fig: Any, path: str, dpi: int = 100) -> None:
  """Writes `fig` as a PNG at `path`, atomically (a killed run leaves no half file)."""
  from wsss_jax import fs  # pylint: disable=import-outside-toplevel
  with fs.atomic_path(path) as tmp:  # local or gs:// (creates a local folder as needed)
    fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")


def _off(axes: Any) -> None:
  for ax in np.ravel(axes):
    ax.set_xticks([])
    ax.set_yticks([])


# ----------------------------------------------------------------------------- scores


def threshold_curve(sweep: Mapping[str, Any], ax: Any = None) -> Any:
  """mIoU against the background threshold (`sweep.json`), best point marked."""
  fig, ax = (ax.figure, ax) if ax is not None else new_figure(figsize=(5, 3.5),
                                                              squeeze=True)
  ax.plot(sweep["thresholds"], sweep["miou"], marker="o")
  ax.axvline(sweep["best_threshold"], color="gray", linestyle="--")
  ax.set_xlabel("background threshold")
  ax.set_ylabel(f"mIoU ({sweep['split']})")
  ax.set_title(f"best {sweep['best_miou']:.3f} at t={sweep['best_threshold']:.2f}")
  ax.grid(alpha=0.3)
  return fig


def per_class_bars(class_names: Sequence[str], series: Mapping[str, Sequence[float]],
                   ax: Any = None, ylabel: str = "IoU",
                   splits: Mapping[str, str] | None = None) -> Any:
  """Grouped bars, one group per class and one bar per series (e.g. cam, pseudo, seg).

  A measured 0 is a short dash on the axis in the series' colour; a missing value
  (None/NaN: the class is absent from the split, in neither the ground truth nor the
  prediction, and not counted in the mIoU) is a grey cross, so the two never look alike.
  `splits` names the split each series was scored on (legend and title).
  """
  if ax is None:
    fig, ax = new_figure(figsize=(max(6, 0.5 * len(class_names)), 3.5), squeeze=True)
  fig = ax.figure
  width = 0.8 / max(1, len(series))
  x = np.arange(len(class_names))
  splits = dict(splits or {})
  handles, any_absent = [], False
  for i, (name, values) in enumerate(series.items()):
    v = np.asarray([np.nan if a is None else a for a in values], float)
    label = f"{name} ({splits[name]})" if name in splits else name
    bars = ax.bar(x + i * width, np.nan_to_num(v), width, label=label)
    handles.append(bars)
    zero, absent = v == 0, np.isnan(v)
    ax.scatter(x[zero] + i * width, np.zeros(zero.sum()), marker="_", s=60, linewidths=2,
               color=bars.patches[0].get_facecolor() if len(bars.patches) else None,
               clip_on=False, zorder=3)
    if absent.any():
      any_absent = True
      ax.scatter(x[absent] + i * width, np.full(absent.sum(), 0.03), marker="x", s=14,
                 color="0.5", zorder=3)
  if any_absent:  # one legend entry for all series
    handles.append(ax.scatter([], [], marker="x", s=14, color="0.5",
                              label="absent from the split (not in the mIoU)"))
  ax.set_xticks(x + 0.4 - width / 2, class_names, rotation=60, ha="right")
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, 1)
  if splits:
    by_split: dict[str, list[str]] = {}
    for name in series:
      if name in splits:
        by_split.setdefault(splits[name], []).append(name)
    ax.set_title("per-class " + ylabel + ": " + "; ".join(
        f"{', '.join(names)} on split '{split}'" for split, names in by_split.items()),
                 fontsize=9)
  if series:
    ax.legend(handles=handles, fontsize=8)
  return fig


def confusion_heatmap(conf: np.ndarray, class_names: Sequence[str], *,
                      normalize: bool = True, title: str = "", ax: Any = None) -> Any:
  """Confusion matrix as a heat map: rows = ground truth, columns = prediction.

  With `normalize`, each row is divided by its pixel count, so cell (i, j) is the fraction
  of class i's pixels predicted as j (the diagonal is the per-class recall); rows of
  classes absent from the ground truth stay 0.
  """
  conf = np.asarray(conf, np.float64)
  c = len(class_names)
  if ax is None:
    side = max(4.0, 0.45 * c + 1.5)
    fig, ax = new_figure(figsize=(side + 1, side), squeeze=True)
  fig = ax.figure
  values = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1) if normalize else conf
  im = ax.imshow(values, cmap="viridis", vmin=0, vmax=1 if normalize else None)
  ax.set_xticks(range(c), class_names, rotation=60, ha="right", fontsize=7)
  ax.set_yticks(range(c), class_names, fontsize=7)
  ax.set_xlabel("predicted")
  ax.set_ylabel("ground truth")
  if c <= 25:  # numbers stay legible up to VOC's 21 classes
    for i in range(c):
      for j in range(c):
        if values[i, j] >= 0.005:
          ax.text(j, i, f"{values[i, j]:.2f}" if normalize else f"{int(values[i, j])}",
                  ha="center", va="center", fontsize=5,
                  color="white" if values[i, j] < 0.5 * values.max() else "black")
  fig.colorbar(im, ax=ax, fraction=0.046)
  if title:
    ax.set_title(title)
  return fig


def lines(x: Sequence[float], series: Mapping[str, Sequence[float]], *, xlabel: str,
          ylabels: Mapping[str, str] | None = None, ncols: int = 3) -> Any:
  """One small line plot per series over a shared x (training curves, bank statistics)."""
  names = list(series)
  ncols = max(1, min(ncols, len(names)))
  nrows = max(1, -(-len(names) // ncols))
  fig, axes = new_figure(nrows, ncols, figsize=(3.6 * ncols, 2.6 * nrows))
  for ax, name in zip(axes.flat, names):
    y = np.asarray([np.nan if v is None else v for v in series[name]], float)
    ax.plot(np.asarray(x)[:len(y)], y, marker="." if len(y) < 50 else None)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    if ylabels and name in ylabels:
      ax.set_ylabel(ylabels[name], fontsize=8)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(names):]:
    ax.set_visible(False)
  fig.tight_layout()
  return fig


# ----------------------------------------------------------------------------- images


def cam_overlays(images: Sequence[np.ndarray], cams: Sequence[np.ndarray],
                 titles: Sequence[str]) -> Any:
  """One column per image: the photo, then the max over its CAMs as a heat map overlay.

  Args:
    images: uint8 [H, W, 3] each.
    cams: float [K, H, W] each (K may be 0: an image without foreground labels).
    titles: one per image.
  """
  n = len(images)
  fig, axes = new_figure(2, n, figsize=(PANEL * n, 2 * PANEL))
  for j, (img, cam, title) in enumerate(zip(images, cams, titles)):
    axes[0, j].imshow(img)
    axes[0, j].set_title(title, fontsize=7)
    heat = cam.max(axis=0) if len(cam) else np.zeros(img.shape[:2])
    axes[1, j].imshow(img)
    axes[1, j].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[1, j].set_title("max over its classes' CAMs", fontsize=7)
  _off(axes)
  cam_colorbar(fig, axes)
  return fig


def cam_colorbar(fig: Any, axes: Any, label: str = CAM_SCALE_LABEL) -> Any:
  """The colour bar of CAM overlays ('jet', 0..1) beside `axes`."""
  from matplotlib import cm, colors  # pylint: disable=import-outside-toplevel
  mappable = cm.ScalarMappable(norm=colors.Normalize(0, 1), cmap="jet")
  return fig.colorbar(mappable, ax=list(np.ravel(axes)), fraction=0.02, pad=0.02,
                      label=label)


def cam_per_class(images: Sequence[np.ndarray], cams: Sequence[np.ndarray],
                  keys: Sequence[Sequence[int]], class_names: Sequence[str],
                  titles: Sequence[str] | None = None, masks: Sequence[np.ndarray] |
                  None = None) -> Any:
  """One row per image: photo, [ground truth], then each labelled class's CAM overlay.

  Args:
    images: uint8 [H, W, 3] each.
    cams: float [K_i, H, W] each, channel k is class `keys[i][k]`.
    keys: class ids (1..C-1) of each image's CAM channels.
    class_names: background first.
    titles: row titles (default: none).
    masks: optional ground-truth label maps, shown after the photo.
  """
  n = len(images)
  ncols = 1 + (masks is not None) + max([len(k) for k in keys] + [1])
  fig, axes = new_figure(n, ncols, figsize=(PANEL * ncols, PANEL * n))
  for i in range(n):
    axes[i, 0].imshow(images[i])
    axes[i, 0].set_title(titles[i] if titles else "image", fontsize=7)
    col = 1
    if masks is not None:
      axes[i, 1].imshow(colorize(masks[i]))
      axes[i, 1].set_title("ground truth", fontsize=7)
      col = 2
    for k, class_id in enumerate(keys[i]):
      axes[i, col + k].imshow(images[i])
      axes[i, col + k].imshow(cams[i][k], cmap="jet", alpha=0.5, vmin=0, vmax=1)
      axes[i, col + k].set_title(f"CAM {class_names[int(class_id)]}", fontsize=7)
    if not len(keys[i]):
      axes[i, col].set_title("no foreground class", fontsize=7)
      axes[i, col].imshow(images[i])
      col += 1
    for ax in axes[i, col + len(keys[i]):]:
      ax.set_visible(False)
  _off(axes)
  if masks is not None:
    label_legend(fig, masks, class_names)
  cam_colorbar(fig, axes)
  return fig


def label_gallery(images: Sequence[np.ndarray], rows: Mapping[str, Sequence[np.ndarray]],
                  titles: Sequence[str], class_names: Sequence[str] | None = None) -> Any:
  """Photo row, then one row per set of label maps (e.g. 'ground truth', 'pseudo'), and a
  legend of the colours shown: each class present (named from `class_names`, else by
  id) and "ignore" for 255 pixels (the VOC palette's cream colour).
  """
  n = len(images)
  fig, axes = new_figure(1 + len(rows), n, figsize=(PANEL * n, PANEL * (1 + len(rows))))
  for j in range(n):
    axes[0, j].imshow(images[j])
    axes[0, j].set_title(titles[j], fontsize=7)
    for i, (name, maps) in enumerate(rows.items(), start=1):
      axes[i, j].imshow(colorize(maps[j]))
      if j == 0:
        axes[i, j].set_ylabel(name)
  _off(axes)
  label_legend(fig, [m for maps in rows.values() for m in maps], class_names)
  return fig


def label_legend(fig: Any, label_maps: Sequence[np.ndarray],
                 class_names: Sequence[str] | None = None) -> Any:
  """A legend under the figure: one VOC-colour swatch per class id present in
  `label_maps`, named from `class_names` (else "class <id>"), and "ignore" for 255."""
  from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel
  present = sorted(set().union(*(np.unique(m).tolist() for m in label_maps)))
  names = list(class_names or [])
  handles = []
  for v in present:
    label = ("ignore" if v == IGNORE else names[v] if 0 <= v < len(names) else f"class {v}")
    handles.append(Patch(facecolor=colorize(np.array(v)) / 255.0, edgecolor="0.3",
                         label=label))
  if not handles:
    return None
  return fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                    ncol=min(len(handles), 7), fontsize=7, frameon=False)


def segment_colors(segments: np.ndarray, seed: int = 0) -> np.ndarray:
  """int [H, W] segment ids (-1 = none) → uint8 [H, W, 3]; -1 is black.

  Colours are a fixed random permutation so neighbouring ids do not look alike.
  """
  segments = np.asarray(segments)
  n = int(segments.max()) + 1 if segments.size and segments.max() >= 0 else 1
  rng = np.random.default_rng(seed)
  table = np.concatenate([rng.integers(40, 256, size=(n, 3)), np.zeros((1, 3))], 0)
  return table[np.where(segments >= 0, segments, n)].astype(np.uint8)


def segment_boundaries(segments: np.ndarray) -> np.ndarray:
  """bool [H, W]: pixels whose right or lower neighbour is in another segment."""
  s = np.asarray(segments)
  edge = np.zeros(s.shape, bool)
  edge[:, :-1] |= s[:, :-1] != s[:, 1:]
  edge[:-1, :] |= s[:-1, :] != s[1:, :]
  return edge


def segment_overlay(image: np.ndarray, segments: np.ndarray, alpha: float = 0.45
                    ) -> np.ndarray:
  """The photo blended with segment colours, boundaries in white: uint8 [H, W, 3]."""
  out = (1 - alpha) * image.astype(np.float32) + alpha * segment_colors(segments)
  out[segment_boundaries(segments)] = 255
  return out.clip(0, 255).astype(np.uint8)


def image_grid(panels: Sequence[Mapping[str, np.ndarray]], *, row_titles: Sequence[str] |
               None = None, cmap: str = "viridis", vmin: float | None = None,
               vmax: float | None = None) -> Any:
  """A grid with one row per mapping {panel title: array}; 2-D arrays use `cmap`.

  Rows may have different numbers of panels (extra cells are hidden).
  """
  n = len(panels)
  ncols = max([len(p) for p in panels] + [1])
  fig, axes = new_figure(n, ncols, figsize=(PANEL * ncols, PANEL * n))
  for i, row in enumerate(panels):
    for j, (title, arr) in enumerate(row.items()):
      if arr.ndim == 2:
        axes[i, j].imshow(arr, cmap=cmap, vmin=vmin, vmax=vmax)
      else:
        axes[i, j].imshow(arr)
      label = f"{row_titles[i]}: {title}" if row_titles and j == 0 else title
      axes[i, j].set_title(label, fontsize=7)
    for ax in axes[i, len(row):]:
      ax.set_visible(False)
  _off(axes)
  return fig


# ----------------------------------------------------------------------------- throughput

# Bench record keys that tell measurements apart (one line per group in the plots).
GROUP_KEYS = ("kind", "method", "backbone", "crop", "dtype", "step_impl", "devices",
              "device_kind")


def throughput(records: Sequence[Mapping[str, Any]], x: str = "batch") -> Any:
  """img/s/device and MFU against `x` (default the batch size), one line per setting.

  Args:
    records: `python -m wsss_jax.bench` JSON lines (kernel records are left out).
    x: the record key on the horizontal axis.

  MFU is None where the device's peak is unknown (CPU): that panel then says so instead
  of plotting zeros.
  """
  groups: dict[tuple, list[Mapping[str, Any]]] = {}
  for r in records:
    if "kernel" in r or x not in r or r.get("img/s/device") is None:
      continue
    groups.setdefault(tuple(r.get(k) for k in GROUP_KEYS), []).append(r)
  fig, axes = new_figure(1, 2, figsize=(11, 3.8), squeeze=True)
  any_mfu = False
  for key, rs in groups.items():
    rs = sorted(rs, key=lambda r: r[x])
    label = " ".join(str(v) for k, v in zip(GROUP_KEYS, key)
                     if v is not None and k not in ("kind",)) or "run"
    xs = [r[x] for r in rs]
    axes[0].plot(xs, [r["img/s/device"] for r in rs], marker="o", label=label)
    mfu = [r.get("mfu") for r in rs]
    if any(m is not None for m in mfu):
      any_mfu = True
      axes[1].plot(xs, [np.nan if m is None else 100 * m for m in mfu], marker="o",
                   label=label)
  axes[0].set_ylabel("img/s/device")
  axes[1].set_ylabel("MFU (%)")
  if not any_mfu:
    axes[1].text(0.5, 0.5, "no MFU: the device's peak FLOP/s\nis unknown (e.g. CPU)",
                 ha="center", va="center", transform=axes[1].transAxes)
  xs_all = [r[x] for rs in groups.values() for r in rs]
  # Batch sizes are usually powers of two: a log2 axis spaces them evenly.
  log_x = xs_all and min(xs_all) > 0 and max(xs_all) >= 4 * min(xs_all)
  for ax in axes:
    ax.set_xlabel(x)
    ax.grid(alpha=0.3)
    if log_x:
      ax.set_xscale("log", base=2)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  return fig

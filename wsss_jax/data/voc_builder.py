"""The `voc` builder: any folder in the PASCAL VOC 2012 segmentation layout.

Layout read (paths relative to `data.root`):

    JPEGImages/<id>.jpg            image (also .jpeg / .png, any case; .jpg preferred)
    SegmentationClass/<id>.png     mask: palette PNG (indices = class ids, VOC convention),
    SegmentationClassAug/<id>.png    grey PNG (values = ids) or RGB in the VOC colour map
    ImageSets/Segmentation/<split>.txt   one id per line; every *.txt is a split
    classes.txt                    optional, one name per line, first line = background

Decisions:
- Mask resolution per id: `SegmentationClass/<id>.png` when it exists, else
  `SegmentationClassAug/<id>.png`. The official VOC masks win where both exist (val is
  scored on them), SBD's converted masks fill in the train_aug ids VOC does not annotate.
- Split lines: the whole line, stripped, is the id (ids may contain spaces); a DeepLab list
  line (`/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`) or a
  path-like line is reduced to the image's file stem. Blank lines and lines starting with
  '#' are ignored. Each line is decoded on its own: a line that is not UTF-8 is a bad
  input named by its line number (skipped with `on_bad_input=skip`), not the whole file.
- Classes: `data.class_names` if set, else `classes.txt`, else the 20 VOC classes +
  background (`configs.common.VOC_CLASSES`). Mask ids must be < C or 255 (ignore).
- Image-level labels are the foreground ids present in the mask.
- Storage: the union of all splits' ids is written once, as one tfds split (`records`);
  each split is a list of record indices (VOC's train, val, trainval and train_aug share
  most images, so this halves the disk and build time of VOC + SBD). Record i of a split is
  the i-th usable id of its split file.
- The cache key is the real path of the root + a fingerprint of the split files' contents,
  classes, and (name, size, content digest) of every file in JPEGImages/ and the mask
  folders, so a changed folder is rebuilt and never silently reused, and a copy with new
  mtimes (same root, same bytes) is not rebuilt. Digests are memoised by (size, mtime)
  under the data cache (`content_digests`), so a scan only rehashes changed files.
- EXIF orientation is not applied: masks are annotated on the stored pixel grid.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
from typing import Callable, Iterable

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from wsss_jax.data import builders
from wsss_jax.data import content_digests
from wsss_jax.data import palette
from wsss_jax.ops import IGNORE_INDEX

IMAGE_DIR = "JPEGImages"
MASK_DIRS = ("SegmentationClass", "SegmentationClassAug")  # in order of preference
SPLIT_DIR = os.path.join("ImageSets", "Segmentation")
CLASSES_FILE = "classes.txt"
RECORDS_SPLIT = "records"  # the single tfds split holding the union of all ids
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")  # preference order, case-insensitive
# Same as configs/common.py:VOC_CLASSES (configs/ is not an installed package; a test checks
# that the two agree).
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor")
_PATH_LIKE = re.compile(r"[/\\]|\.(jpe?g|png)$", re.IGNORECASE)
# DeepLab list format: `<image path> <mask path>`; paths may contain spaces.
_LIST_LINE = re.compile(r"^(.+?\.(?:jpe?g|png))\s+\S.*\.png$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class VocLayout:
  """What `scan` found in a VOC-layout folder (cheap: directory listings + split files)."""
  root: str                                   # real absolute path
  class_names: tuple[str, ...]
  class_source: str                           # where the class names came from
  split_files: dict[str, str]                 # split -> path of its .txt
  split_entries: dict[str, tuple[tuple[int, str], ...]]  # split -> ((line number, id), ...)
  images: dict[str, str]                      # id -> image path
  masks: dict[str, tuple[str, str]]           # id -> (mask path, mask folder name)
  fingerprint: str
  # split -> messages about lines that could not be read (not UTF-8), naming file and line
  split_problems: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self.split_files)


def _listing(folder: str, exts: tuple[str, ...]) -> tuple[dict[str, str], list]:
  """(stem -> file name with the most preferred extension, [(name, size, mtime_ns)])."""
  best: dict[str, tuple[int, str]] = {}
  stats = []
  if not os.path.isdir(folder):
    return {}, stats
  with os.scandir(folder) as it:
    for entry in it:
      stem, ext = os.path.splitext(entry.name)
      ext = ext.lower()
      if ext not in exts or not entry.is_file():
        continue
      st = entry.stat()
      stats.append((entry.name, st.st_size, st.st_mtime_ns))
      rank = exts.index(ext)
      if stem not in best or rank < best[stem][0]:
        best[stem] = (rank, entry.name)
  return {k: v[1] for k, v in best.items()}, sorted(stats)


def split_line_id(line: str) -> str:
  """The image id a (stripped, non-empty) split-file line names."""
  listed = _LIST_LINE.match(line)
  path = listed.group(1) if listed else line
  if _PATH_LIKE.search(path):
    return os.path.splitext(os.path.basename(path.replace("\\", "/")))[0]
  return path


def _parse_split_file(path: str) -> tuple[tuple[tuple[int, str], ...], tuple[str, ...]]:
  """((line number, id), ...) of a split file, and messages naming unreadable lines."""
  try:
    with open(path, "rb") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise builders.BadInputError(f"{path}: cannot read split file ({e})") from e
  out, problems = [], []
  for n, raw in enumerate(lines, 1):
    try:
      line = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
      problems.append(f"{path}:{n}: line is not valid UTF-8 ({e.reason} at byte {e.start} "
                      f"of {raw!r}); write the split file as UTF-8")
      continue
    if line.startswith("\ufeff") and n == 1:  # a byte-order mark (Windows editors)
      line = line[1:].strip()
    if not line or line.startswith("#"):
      continue
    out.append((n, split_line_id(line)))
  return tuple(out), tuple(problems)


def _class_names(root: str, configured: Iterable[str]) -> tuple[tuple[str, ...], str]:
  configured = tuple(configured or ())
  if configured:
    names, source = configured, "data.class_names"
  elif os.path.isfile(os.path.join(root, CLASSES_FILE)):
    path = os.path.join(root, CLASSES_FILE)
    try:
      with open(path, encoding="utf-8") as f:
        names = tuple(line.strip() for line in f if line.strip())
    except (OSError, UnicodeDecodeError) as e:
      raise builders.BadInputError(f"{path}: cannot read class names ({e})") from e
    source = path
  else:
    names, source = VOC_CLASSES, "the VOC 2012 default (configs.common.VOC_CLASSES)"
  if not 2 <= len(names) <= 255:
    raise builders.BadInputError(
        f"{source}: need 2..255 class names (background first), got {len(names)}")
  dup = [n for n, c in collections.Counter(names).items() if c > 1]
  if dup:
    raise builders.BadInputError(f"{source}: duplicate class names {dup}")
  return names, source


def scan(root: str, class_names: Iterable[str] = (), digest_memo_dir: str | None = None
         ) -> VocLayout:
  """Lists a VOC-layout folder and fingerprints its content (see the module docstring).

  `digest_memo_dir`: where the files' content digests are memoised (None: hash them all).
  Raises BadInputError on a bad layout.
  """
  if not root:
    raise builders.BadInputError(
        "data.root is empty: the voc dataset needs --config.data.root=<VOC-layout folder>")
  real = os.path.realpath(os.path.expanduser(root))
  if not os.path.isdir(real):
    raise builders.BadInputError(f"data.root {root!r} is not a directory")
  if not os.path.isdir(os.path.join(real, IMAGE_DIR)):
    raise builders.BadInputError(
        f"{os.path.join(real, IMAGE_DIR)}: missing; a VOC-layout root needs {IMAGE_DIR}/, "
        f"{' or '.join(MASK_DIRS)}/ and {SPLIT_DIR}/")
  if not any(os.path.isdir(os.path.join(real, d)) for d in MASK_DIRS):
    raise builders.BadInputError(
        f"{real}: no mask folder; expected {MASK_DIRS[0]}/ or {MASK_DIRS[1]}/")
  split_dir = os.path.join(real, SPLIT_DIR)
  if not os.path.isdir(split_dir):
    raise builders.BadInputError(f"{split_dir}: missing; it holds one <split>.txt per split")
  split_files = {os.path.splitext(n)[0]: os.path.join(split_dir, n)
                 for n in sorted(os.listdir(split_dir)) if n.endswith(".txt")}
  if not split_files:
    raise builders.BadInputError(f"{split_dir}: no split files (<split>.txt) found")
  names, class_source = _class_names(real, class_names)

  h = hashlib.sha256()
  h.update(repr((builders.FORMAT_VERSION, names)).encode())
  entries, split_problems = {}, {}
  for split, path in split_files.items():
    entries[split], split_problems[split] = _parse_split_file(path)
    with open(path, "rb") as f:
      h.update(repr((split, hashlib.sha256(f.read()).hexdigest())).encode())

  def content(folder: str, stats: list) -> list:
    try:
      return content_digests.digests(folder, stats, digest_memo_dir)
    except OSError as e:
      raise builders.BadInputError(f"{e.filename or folder}: cannot read ({e.strerror or e})"
                                   ) from e

  image_names, stats = _listing(os.path.join(real, IMAGE_DIR), _IMAGE_EXTS)
  h.update(repr((IMAGE_DIR, content(os.path.join(real, IMAGE_DIR), stats))).encode())
  images = {k: os.path.join(real, IMAGE_DIR, v) for k, v in image_names.items()}
  masks: dict[str, tuple[str, str]] = {}
  for d in MASK_DIRS:
    mask_names, stats = _listing(os.path.join(real, d), (".png",))
    h.update(repr((d, content(os.path.join(real, d), stats))).encode())
    for k, v in mask_names.items():
      masks.setdefault(k, (os.path.join(real, d, v), d))
  return VocLayout(root=real, class_names=names, class_source=class_source,
                   split_files=split_files, split_entries=entries,
                   split_problems=split_problems, images=images, masks=masks,
                   fingerprint=h.hexdigest())


def voc_key(layout: VocLayout) -> str:
  """Prepared-folder name: root basename + hash of the real root path + fingerprint."""
  base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(layout.root))[:40] or "root"
  root_hash = hashlib.sha256(layout.root.encode()).hexdigest()[:8]
  return f"{base}-{root_hash}-{layout.fingerprint[:16]}"


# ---------------------------------------------------------------------------------------
# Reading and checking one example.

_PALETTE = palette.voc_palette().astype(np.int64)
_PALETTE_CODES = (_PALETTE[:, 0] << 16) | (_PALETTE[:, 1] << 8) | _PALETTE[:, 2]
_CODE_ORDER = np.argsort(_PALETTE_CODES)


def _open(path: str, what: str) -> Image.Image:
  try:
    im = Image.open(path)
    im.load()  # decode now: truncated or corrupt data fails here, not later
    return im
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
    raise builders.BadInputError(
        f"{path}: cannot read {what} ({type(e).__name__}: {e})") from e


def read_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] RGB."""
  with _open(path, "image") as im:
    try:
      return np.asarray(im.convert("RGB"))
    except Exception as e:  # pylint: disable=broad-except
      raise builders.BadInputError(
          f"{path}: cannot convert image of mode {im.mode} to RGB ({e})") from e


def read_mask(path: str) -> np.ndarray:
  """uint8 [H, W] class ids from a palette, grey (8/16-bit) or VOC-coloured RGB PNG."""
  with _open(path, "mask") as im:
    mode = im.mode
    if mode == "P":
      return np.asarray(im, np.uint8)  # palette indices are the class ids
    if mode == "1":
      return np.asarray(im).astype(np.uint8)
    if mode == "L":
      return np.asarray(im, np.uint8)
    if mode == "LA":
      return np.asarray(im)[..., 0].astype(np.uint8)
    if mode.startswith("I"):
      arr = np.asarray(im)
      if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise builders.BadInputError(
            f"{path}: {mode} mask has values outside 0..255 (min {arr.min()}, max "
            f"{arr.max()})")
      return arr.astype(np.uint8)
    if mode in ("RGB", "RGBA"):
      rgb = np.asarray(im)[..., :3].astype(np.int64)
      code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
      pos = np.clip(np.searchsorted(_PALETTE_CODES, code, sorter=_CODE_ORDER), 0, 255)
      ids = _CODE_ORDER[pos]
      unknown = _PALETTE_CODES[ids] != code
      if unknown.any():
        bad = rgb[unknown][:3].tolist()
        raise builders.BadInputError(
            f"{path}: RGB mask has {int(unknown.sum())} pixels whose colour is not in the "
            f"VOC colour map (e.g. {bad}); use a palette or grey PNG of class ids")
      return ids.astype(np.uint8)
    raise builders.BadInputError(f"{path}: unsupported mask PNG mode {mode!r}")


def load_example(image_path: str, mask_path: str, num_classes: int, class_source: str
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks one (image, mask) pair; BadInputError names the file and problem."""
  image = read_image(image_path)
  mask = read_mask(mask_path)
  if mask.shape != image.shape[:2]:
    raise builders.BadInputError(
        f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image "
        f"{image_path} is {image.shape[0]}x{image.shape[1]}")
  counts = np.bincount(mask.ravel(), minlength=256)
  bad = [v for v in np.flatnonzero(counts) if num_classes <= v != IGNORE_INDEX]
  if bad:
    raise builders.BadInputError(
        f"{mask_path}: class ids {[int(v) for v in bad]} are >= num_classes={num_classes} "
        f"(classes from {class_source}) and not {IGNORE_INDEX} (ignore)")
  return image, mask


class WsssVoc(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the (checked) examples of a VOC-layout folder as one tfds split, in order."""

  VERSION = tfds.core.Version("1.0.0")
  # No checksums/metadata files live next to this code; tfds' lookup of them needs
  # importlib_resources for packages installed in editable mode (not in our stack).
  code_path = None

  def __init__(self, *, num_classes: int, class_source: str,
               items: list[tuple[str, str, str]], on_bad: Callable[[str], None],
               stats: builders.StatsCollector, written: list[str], workers: int, root: str,
               **kwargs):
    self._num_classes = num_classes
    self._class_source = class_source
    self._items = items            # (id, image path, mask path)
    self._on_bad = on_bad
    self._stats = stats
    self._written = written        # ids in record order, filled while writing
    self._workers = workers
    self._root = root
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="A VOC 2012-layout folder; see wsss_jax/data/voc_builder.py",
        features=builders.record_features(self._num_classes), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {RECORDS_SPLIT: self._generate_examples()}

  def _load(self, item: tuple[str, str, str]):
    """Worker thread: read, check, label and compress one example."""
    id_, image_path, mask_path = item
    image, mask = load_example(image_path, mask_path, self._num_classes, self._class_source)
    rec = {"id": id_, "image": image, "mask": mask,
           "labels": builders.labels_from_mask(mask, self._num_classes)}
    return builders.encode_record(rec, self._num_classes)

  def _generate_examples(self):
    for (id_, _, _), result, error in builders.bounded_map(self._load, self._items,
                                                           self._workers):
      builders.check_preemption()
      if error is not None:
        self._on_bad(str(error))  # raises in error mode
        continue
      rec, row = result
      self._stats.add_row(RECORDS_SPLIT, row)
      key = len(self._written)
      self._written.append(id_)
      yield key, rec
    if not self._written:  # tfds would fail with "No examples were yielded"
      raise builders.BadInputError(
          f"{self._root}: no usable examples in any split (all {len(self._items)} are bad)")


def build_voc(folder: str, layout: VocLayout, on_bad_input: str,
              workers: int | None = None) -> None:
  """Checks and writes every split of `layout` into the prepared folder `folder`.

  on_bad_input: 'error' raises BadInputError at the first bad example or split file;
  'skip' logs a warning per bad example, a final count, and records them in meta.json.
  """
  problems: list[str] = []
  on_bad = builders.bad_input_handler(on_bad_input, problems)

  # Cheap checks first (no decoding): split files, duplicates, missing files.
  split_ids: dict[str, list[str]] = {}
  for split, entries in layout.split_entries.items():
    path = layout.split_files[split]
    for message in layout.split_problems.get(split, ()):
      on_bad(message)
    if not entries:
      on_bad(f"{path}: split file lists no ids (empty split '{split}')")
      continue
    first_line: dict[str, int] = {}
    ids = []
    for line, id_ in entries:
      if id_ in first_line:
        on_bad(f"{path}:{line}: id {id_!r} is listed again (first at line "
               f"{first_line[id_]})")
        continue
      first_line[id_] = line
      ids.append(id_)
    split_ids[split] = ids
  listed_in: dict[str, str] = {}
  for split, ids in split_ids.items():
    for id_ in ids:
      listed_in.setdefault(id_, layout.split_files[split])
  items, mask_dir_of = [], {}
  for id_, split_file in listed_in.items():
    if id_ not in layout.images:
      on_bad(f"{os.path.join(layout.root, IMAGE_DIR, id_ + '.jpg')}: image missing for id "
             f"{id_!r} listed in {split_file}")
    elif id_ not in layout.masks:
      on_bad(f"{os.path.join(layout.root, MASK_DIRS[0], id_ + '.png')}: mask missing for id "
             f"{id_!r} listed in {split_file} (also not in {MASK_DIRS[1]}/)")
    else:
      mask_path, mask_dir = layout.masks[id_]
      items.append((id_, layout.images[id_], mask_path))
      mask_dir_of[id_] = mask_dir
  workers = workers or builders.default_workers()
  num_classes = len(layout.class_names)

  def build(tmp: str):
    stats = builders.StatsCollector(num_classes)
    written: list[str] = []
    if not items:
      raise builders.BadInputError(f"{layout.root}: no usable examples in any split")
    builder = WsssVoc(num_classes=num_classes, class_source=layout.class_source, items=items,
                      on_bad=on_bad, stats=stats, written=written, workers=workers,
                      root=layout.root, data_dir=tmp)
    builders.run_tfds_build(builder)
    position = {id_: i for i, id_ in enumerate(written)}
    arrays = stats.arrays()
    splits = {}
    for split, ids in split_ids.items():
      idx = np.asarray([position[i] for i in ids if i in position], np.int64)
      if not len(idx):
        on_bad(f"{layout.split_files[split]}: none of its {len(ids)} ids is usable; "
               f"split '{split}' dropped")
        continue
      arrays[f"indices__{split}"] = idx
      splits[split] = {"tfds_split": RECORDS_SPLIT, "indexed": True, "count": int(len(idx)),
                       "skipped": len(layout.split_entries[split]) - int(len(idx))
                                  + len(layout.split_problems.get(split, ())),
                       "split_file": layout.split_files[split]}
    if not splits:
      raise builders.BadInputError(f"{layout.root}: every split is empty after skipping")
    meta = {
        "format": builders.FORMAT_VERSION, "name": "voc",
        "class_names": list(layout.class_names), "class_source": layout.class_source,
        "tfds_dir": os.path.relpath(os.fspath(builder.data_path), tmp),
        "splits": splits,
        "source": {"root": layout.root, "fingerprint": layout.fingerprint,
                   "records": len(written),
                   "mask_dirs": dict(collections.Counter(mask_dir_of[i] for i in written))},
        "skipped": problems,
    }
    if problems:
      logging.warning("%s: skipped %d bad inputs (on_bad_input='skip'); %d records written.",
                      layout.root, len(problems), len(written))
    return meta, arrays

  logging.info("Building VOC-layout dataset %s (%d unique ids in splits %s) into %s",
               layout.root, len(listed_in), sorted(split_ids), folder)
  builders.build_atomically(folder, build)

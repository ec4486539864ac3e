"""Input pipelines of the architecture search.

A search reads two streams of batches from the training split of a dataset:
one trains the network weights, the other (disjoint) one trains the
architecture weights. This module provides the pieces:

* `load_source` opens a dataset: a TFDS name, `folder:PATH` (one subfolder
  per class, optionally under `train/` and `test/`) or `tfrecord:PATTERN`
  (tf.train.Example records in the TF Model Garden image layout).
* `measure_mean_std` measures per-channel normalization statistics.
* `search_split` splits the training split into the two search subsets.
* `preprocess_image` augments and normalizes one decoded image.
* `search_streams` builds the infinite, reproducible (train, val) stream, and
  `eval_dataset` a plain evaluation pass over a split.
* `DataConfig` and `build_search_data` do all of the above from one config.

Reproducibility: every random choice is a stateless op seeded from the
search seed, the epoch and the example index. The stream started at step k
therefore yields exactly the batches that the stream started at step 0
yields from step k on, so a search can resume mid-epoch.

How examples are read: when the decoded search subsets fit under
`cache_limit_bytes`, they are decoded once into memory (uint8) and gathered
by index. Otherwise folders are read file by file with parallel decoding.
TFRecord and TFDS sources have no random access, so without the cache each
epoch reads the split in order, keeps the selected examples and shuffles
them within seeded windows.
"""

import dataclasses
import math
import os
import pathlib
from typing import Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
AUGMENT_MODES = ("cifar", "imagenet", "none")
SPLIT_MODES = ("portion", "fractions")
DEFAULT_CACHE_LIMIT_BYTES = 2 * 1024**3

FOLDER_PREFIX = "folder:"
TFRECORD_PREFIX = "tfrecord:"

# Per-channel mean and std of the training split, in [0, 1] pixel units, as
# published with the datasets' standard training recipes.
KNOWN_STATISTICS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# image_size and augment of the datasets with a standard recipe.
KNOWN_DEFAULTS = {
    "cifar10": (32, "cifar"),
    "cifar100": (32, "cifar"),
    "imagenet2012": (224, "imagenet"),
}

# Images with both sides at most this size default to the CIFAR recipe at
# their own size, larger ones to the ImageNet recipe at 224.
_SMALL_IMAGE_MAX_SIDE = 64

# The ImageNet evaluation transform resizes the shorter side to
# image_size / 0.875 (256 for 224) and then crops the center.
_IMAGENET_CENTER_CROP_FRACTION = 0.875
_CIFAR_PADDING = 4

# Shuffle window, in examples, of the sequential TFRecord and TFDS reader. It
# contains encoded images, so about 0.5 GB for ImageNet JPEGs (an estimate
# from their mean size of about 110 kB).
_RECORD_SHUFFLE_BUFFER = 4096

# Seed tags that keep the random streams of one search seed independent.
_TRAIN_ORDER_TAG = 1
_VAL_ORDER_TAG = 2
_TRAIN_AUGMENT_TAG = 3
_VAL_AUGMENT_TAG = 4

_TFRECORD_IMAGE_KEY = "image/encoded"
_TFRECORD_LABEL_KEY = "image/class/label"
_TFRECORD_TEXT_KEY = "image/class/text"
_TFRECORD_EVAL_SPLITS = (("validation", "validation"), ("val", "validation"),
                         ("test", "test"))


# ---------------------------------------------------------------------------
# Sources.


@dataclasses.dataclass(eq=False)
class Source:
  """An image classification dataset with named splits.

  Attributes:
    name: the dataset value it was loaded from, e.g. "cifar10" or
      "folder:/data/flowers".
    kind: "tfds", "folder" or "tfrecord".
    class_names: one name per label, in label order.
    num_classes: the number of labels.
    splits: the names of the available splits, e.g. ("train", "test").
    mean: known per-channel mean in [0, 1] pixel units, float32 [3], or None
      when the dataset has no published statistics (folders, TFRecords).
    std: known per-channel standard deviation, like `mean`.
    skip_corrupt_images: whether pipelines skip images that fail to decode
      instead of raising.
    reader: the internal reader of the source kind that the methods use.
  """

  name: str
  kind: str
  class_names: tuple[str, ...]
  num_classes: int
  splits: tuple[str, ...]
  mean: Optional[np.ndarray] = None
  std: Optional[np.ndarray] = None
  skip_corrupt_images: bool = False
  reader: object = dataclasses.field(default=None, repr=False)

  @property
  def random_access(self) -> bool:
    """Whether an example can be read by its index without a pass in order."""
    return self.kind == "folder"

  def check_split(self, split: str) -> None:
    """Raise ValueError unless `split` is one of `splits`."""
    if split not in self.splits:
      raise ValueError(
          f"split {split!r} not found in dataset {self.name!r}; its splits "
          f"are {list(self.splits)}.")

  def split_dataset(self, split: str) -> tf.data.Dataset:
    """Return a split as a dataset of dicts, in a fixed order.

    Each element has "encoded" (the image file bytes, tf.string), "label"
    (tf.int64), "path" (the file path; "FILE:RECORD" for TFRecords;
    "tfds:INDEX" for TFDS) and "index" (tf.int64, the position in the split).
    """
    self.check_split(split)
    return self.reader.dataset(split)

  def split_size(self, split: str) -> int:
    """Return the number of examples in a split, counted once and stored."""
    self.check_split(split)
    return self.reader.size(split)

  def split_labels(self, split: str) -> np.ndarray:
    """Return the labels of a split in index order, int64, read once."""
    self.check_split(split)
    return self.reader.labels(split)

  def file_paths(self, split: str) -> np.ndarray:
    """Return the file path of every example of a folder split.

    Raises:
      ValueError: when the source is not a folder.
    """
    self.check_split(split)
    if not self.random_access:
      raise ValueError(
          f"dataset {self.name!r} is a {self.kind} source, which has no file "
          "per example; only folder: sources have file paths.")
    return self.reader.paths(split)


def load_source(dataset: str,
                data_dir: Optional[str] = None,
                download: bool = False,
                skip_corrupt_images: bool = False,
                label_offset: int = 0,
                num_classes: Optional[int] = None) -> Source:
  """Open a dataset by name.

  Args:
    dataset: a TFDS image classification name (cifar10, cifar100,
      imagenet2012, ...), `folder:PATH` or `tfrecord:PATTERN`.
    data_dir: the TFDS data directory; None for TFDS's default.
    download: whether TFDS may download and prepare a missing dataset.
    skip_corrupt_images: whether pipelines skip images that fail to decode
      instead of raising.
    label_offset: subtracted from TFRecord labels, e.g. 1 for the 1-based
      ImageNet labels of TF Model Garden.
    num_classes: the number of TFRecord classes; by default the largest
      label of the training split plus one.

  Returns:
    The `Source`.

  Raises:
    ValueError: for an unknown dataset, a missing folder or files, an empty
      split, or TFDS data that is missing while download is False.
  """
  if dataset.startswith(FOLDER_PREFIX):
    source = _load_folder_source(dataset, skip_corrupt_images)
  elif dataset.startswith(TFRECORD_PREFIX):
    source = _load_tfrecord_source(dataset, skip_corrupt_images, label_offset,
                                   num_classes)
  else:
    source = _load_tfds_source(dataset, data_dir, download,
                               skip_corrupt_images)

  logging.info("Loaded dataset %s (%s): %d classes, splits %s.", source.name,
               source.kind, source.num_classes, list(source.splits))
  return source


def _unknown_dataset_error(dataset: str, reason: str) -> ValueError:
  return ValueError(
      f"unknown dataset {dataset!r}: {reason}. Use a TFDS image "
      "classification name such as cifar10, cifar100 or imagenet2012, "
      f"{FOLDER_PREFIX}PATH for a folder with one subfolder per class, or "
      f"{TFRECORD_PREFIX}PATTERN for tf.train.Example files.")


# Folder sources.


class _FolderReader:
  """Reads a folder split by its list of files."""

  def __init__(self, files: dict[str, tuple[np.ndarray, np.ndarray]]):
    self._files = files

  def paths(self, split):
    return self._files[split][0]

  def labels(self, split):
    return self._files[split][1]

  def size(self, split):
    return len(self._files[split][0])

  def dataset(self, split):
    paths, labels = self._files[split]
    examples = tf.data.Dataset.from_tensor_slices({
        "path": paths,
        "label": labels,
        "index": np.arange(len(paths), dtype=np.int64),
    })
    return examples.map(
        lambda example: {**example, "encoded": tf.io.read_file(example["path"])},
        num_parallel_calls=AUTOTUNE)


def _load_folder_source(dataset: str, skip_corrupt_images: bool) -> Source:
  path_text = dataset[len(FOLDER_PREFIX):]
  root = pathlib.Path(path_text).expanduser()
  if not path_text or not root.is_dir():
    raise ValueError(
        f"image folder {path_text!r} (from {dataset!r}) not found. Pass "
        f"{FOLDER_PREFIX}PATH with an existing folder that has one subfolder "
        "per class, either directly or under train/ and test/.")

  # A train/ subfolder marks the layout with split folders. Without it the
  # class folders sit directly under the root, which is the train split.
  if (root / "train").is_dir():
    split_dirs = {"train": root / "train"}
    for name in ("validation", "val", "test"):
      if (root / name).is_dir():
        split_dirs[name] = root / name
  else:
    split_dirs = {"train": root}

  class_names = _list_class_folders(split_dirs["train"])
  if len(class_names) < 2:
    raise ValueError(
        f"image folder {split_dirs['train']} has {len(class_names)} class "
        f"subfolder(s) {class_names}, but classification needs at least two. "
        "Put the images of each class in their own subfolder.")

  files = {}
  for split, split_dir in split_dirs.items():
    files[split] = _list_split_files(split, split_dir, class_names)

  return Source(
      name=dataset, kind="folder", class_names=tuple(class_names),
      num_classes=len(class_names), splits=tuple(split_dirs),
      skip_corrupt_images=skip_corrupt_images, reader=_FolderReader(files))


def _list_class_folders(split_dir: pathlib.Path) -> list[str]:
  return sorted(entry.name for entry in os.scandir(split_dir)
                if entry.is_dir() and not entry.name.startswith("."))


def _list_split_files(split: str, split_dir: pathlib.Path,
                      class_names: Sequence[str]):
  """List the image files of a split: (paths, int64 labels) in sorted order."""
  unknown = sorted(set(_list_class_folders(split_dir)) - set(class_names))
  if unknown:
    raise ValueError(
        f"split folder {split_dir} has class subfolders {unknown} that the "
        f"train split lacks; its classes are {list(class_names)}. Give every "
        "split the same class subfolders.")

  paths, labels = [], []
  for label, class_name in enumerate(class_names):
    class_dir = split_dir / class_name
    if not class_dir.is_dir():
      continue
    names = sorted(
        entry.name for entry in os.scandir(class_dir)
        if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
      logging.warning("Class folder %s has no image files.", class_dir)
    paths.extend(str(class_dir / name) for name in names)
    labels.extend([label] * len(names))

  if not paths:
    raise ValueError(
        f"split {split!r} of image folder {split_dir} has no image files "
        f"({', '.join(IMAGE_EXTENSIONS)}) in its class subfolders. Add images "
        "or point folder: at the right folder.")
  return np.asarray(paths), np.asarray(labels, np.int64)


# TFRecord sources.


class _TFRecordReader:
  """Reads tf.train.Example files in order: file by file, record by record."""

  def __init__(self, files: dict[str, list[str]], label_offset: int,
               has_text: bool):
    self._files = files
    self._label_offset = label_offset
    self._has_text = has_text
    self._labels = {}
    self.texts = {}

  def _records(self, split):
    """Return (record id, serialized record) pairs of a split."""

    def records_of_file(file_name):
      records = tf.data.TFRecordDataset(file_name).enumerate()
      return records.map(lambda number, record: (tf.strings.join(
          [file_name, ":", tf.strings.as_string(number)]), record))

    files = tf.data.Dataset.from_tensor_slices(self._files[split])
    return files.flat_map(records_of_file)

  def dataset(self, split):
    features = {
        _TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
        _TFRECORD_LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
    }
    offset = self._label_offset

    def parse(index, record_id_and_record):
      record_id, record = record_id_and_record
      example = tf.io.parse_single_example(record, features)
      return {
          "encoded": example[_TFRECORD_IMAGE_KEY],
          "label": example[_TFRECORD_LABEL_KEY] - offset,
          "path": record_id,
          "index": index,
      }

    return self._records(split).enumerate().map(
        parse, num_parallel_calls=AUTOTUNE)

  def labels(self, split):
    if split not in self._labels:
      self._labels[split] = self._scan_labels(split)
    return self._labels[split]

  def size(self, split):
    return len(self.labels(split))

  def _scan_labels(self, split):
    """Read the labels (and class texts) of a split without the images."""
    features = {_TFRECORD_LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}
    if self._has_text:
      features[_TFRECORD_TEXT_KEY] = tf.io.FixedLenFeature([], tf.string, "")
    batches = self._records(split).map(lambda _, record: record).batch(1024)
    batches = batches.map(lambda records: tf.io.parse_example(records, features),
                          num_parallel_calls=AUTOTUNE)

    labels = []
    for batch in batches:
      batch_labels = batch[_TFRECORD_LABEL_KEY].numpy() - self._label_offset
      labels.append(batch_labels)
      if self._has_text:
        for label, text in zip(batch_labels,
                               batch[_TFRECORD_TEXT_KEY].numpy()):
          if text:
            self.texts.setdefault(int(label), text.decode("utf-8"))
    return (np.concatenate(labels).astype(np.int64) if labels
            else np.zeros([0], np.int64))


def _load_tfrecord_source(dataset: str, skip_corrupt_images: bool,
                          label_offset: int,
                          num_classes: Optional[int]) -> Source:
  pattern = dataset[len(TFRECORD_PREFIX):]
  files = sorted(tf.io.gfile.glob(pattern)) if pattern else []
  if not files:
    raise ValueError(
        f"no files match the TFRecord pattern {pattern!r} (from "
        f"{dataset!r}). Pass {TFRECORD_PREFIX}PATTERN with a glob of "
        "existing files, e.g. tfrecord:/data/imagenet/*-of-*.")

  split_files = _tfrecord_split_files(files)
  has_text = _check_tfrecord_keys(split_files["train"][0])
  reader = _TFRecordReader(split_files, label_offset, has_text)

  labels = reader.labels("train")
  if len(labels) == 0:
    raise ValueError(
        f"the train split of {dataset!r} has no records (files "
        f"{split_files['train']}). Check the pattern.")
  if labels.min() < 0:
    raise ValueError(
        f"the TFRecords of {dataset!r} have label {labels.min()} after "
        f"subtracting label_offset={label_offset}; labels must be >= 0. "
        "Lower label_offset.")
  if labels.min() > 0 and label_offset == 0:
    logging.warning(
        "Label 0 never occurs in %s; if its labels are 1-based (as in TF "
        "Model Garden's ImageNet), pass label_offset=1.", dataset)

  if num_classes is None:
    num_classes = int(labels.max()) + 1
  elif labels.max() >= num_classes:
    raise ValueError(
        f"the TFRecords of {dataset!r} have label {labels.max()}, but "
        f"num_classes={num_classes}. Raise num_classes or set label_offset.")

  class_names = tuple(reader.texts.get(label, f"class_{label}")
                      for label in range(num_classes))
  return Source(
      name=dataset, kind="tfrecord", class_names=class_names,
      num_classes=num_classes, splits=tuple(split_files),
      skip_corrupt_images=skip_corrupt_images, reader=reader)


def _tfrecord_split_files(files: list[str]) -> dict[str, list[str]]:
  """Assign files to splits by the words train/validation/val/test in names."""
  by_split = {}
  for file_name in files:
    base = os.path.basename(file_name).lower()
    split = None
    if "train" in base:
      split = "train"
    else:
      for word, name in _TFRECORD_EVAL_SPLITS:
        if word in base:
          split = name
          break
    by_split.setdefault(split, []).append(file_name)

  # Names decide the splits only when both training and evaluation files
  # match; otherwise every file belongs to the train split.
  has_eval = any(name in by_split for _, name in _TFRECORD_EVAL_SPLITS)
  if "train" not in by_split or not has_eval:
    return {"train": files}
  if None in by_split:
    raise ValueError(
        f"TFRecord files {by_split[None][:3]} name no split, while others "
        "name train and validation/val/test. Put 'train', 'validation' or "
        "'test' in every file name, or narrow the pattern.")
  return by_split


def _check_tfrecord_keys(file_name: str) -> bool:
  """Check the first record's features; return whether it has class texts."""
  first = next(iter(tf.data.TFRecordDataset(file_name).take(1)), None)
  if first is None:
    raise ValueError(f"TFRecord file {file_name} has no records.")
  feature = tf.train.Example.FromString(first.numpy()).features.feature
  for key in (_TFRECORD_IMAGE_KEY, _TFRECORD_LABEL_KEY):
    if key not in feature:
      raise ValueError(
          f"the records of {file_name} lack the feature {key!r}; expected "
          f"tf.train.Example records with {_TFRECORD_IMAGE_KEY!r} (bytes) and "
          f"{_TFRECORD_LABEL_KEY!r} (int64).")
  return _TFRECORD_TEXT_KEY in feature


# TFDS sources.


class _TfdsReader:
  """Reads a TFDS split in its stored order with the images left encoded."""

  def __init__(self, builder, image_key: str, label_key: str):
    self._builder = builder
    self._image_key = image_key
    self._label_key = label_key
    self._sizes = {}
    self._labels = {}

  def raw(self, split):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return self._builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={self._image_key: tfds.decode.SkipDecoding()})

  def dataset(self, split):
    image_key, label_key = self._image_key, self._label_key

    def to_example(index, example):
      return {
          "encoded": example[image_key],
          "label": tf.cast(example[label_key], tf.int64),
          "path": tf.strings.join(["tfds:", tf.strings.as_string(index)]),
          "index": index,
      }

    return self.raw(split).enumerate().map(to_example,
                                           num_parallel_calls=AUTOTUNE)

  def size(self, split):
    if split not in self._sizes:
      if split in self._labels:
        self._sizes[split] = len(self._labels[split])
      else:
        count = int(self.raw(split).cardinality())
        if count < 0:
          count = len(self.labels(split))
        self._sizes[split] = count
    return self._sizes[split]

  def labels(self, split):
    if split not in self._labels:
      label_key = self._label_key
      batches = self.raw(split).map(lambda example: example[label_key])
      labels = [batch.numpy() for batch in batches.batch(4096)]
      self._labels[split] = (np.concatenate(labels).astype(np.int64)
                             if labels else np.zeros([0], np.int64))
    return self._labels[split]


def _load_tfds_source(dataset: str, data_dir: Optional[str], download: bool,
                      skip_corrupt_images: bool) -> Source:
  if dataset.startswith(("/", ".", "~")) or os.path.isdir(dataset):
    raise _unknown_dataset_error(
        dataset, f"it looks like a path; did you mean {FOLDER_PREFIX}{dataset}?")

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise _unknown_dataset_error(dataset, "it is not a TFDS name") from error

  image_key, label_key = _tfds_image_and_label_keys(dataset, builder)
  if download:
    try:
      builder.download_and_prepare()
    except Exception as error:  # Network and archive errors vary by source.
      raise ValueError(
          f"Downloading or preparing the TFDS dataset {dataset!r} failed: "
          f"{error}. Check the network connection, or use --data_dir with "
          f"a directory that holds it, or {FOLDER_PREFIX}PATH for images in "
          "class folders.") from error

  missing_message = (
      f"the TFDS data of {dataset!r} is not in "
      f"{data_dir or 'the default TFDS data directory'}. Pass --download "
      "(download=True) to download and prepare it, --data_dir with the "
      f"directory that holds it, or use {FOLDER_PREFIX}PATH for images in "
      "class folders.")
  splits = tuple(builder.info.splits)
  try:
    builder.as_dataset(split=splits[0] if splits else "train")
  except AssertionError as error:
    # TFDS raises AssertionError ("could not find data") for a dataset that
    # has not been prepared.
    raise ValueError(missing_message) from error

  if not splits:
    # Without prepared metadata (as under tfds.testing.mock_data) the split
    # names are unknown, so keep the standard names that open.
    splits = tuple(_openable_tfds_splits(builder))

  base_name = dataset.split(":")[0].split("/")[0]
  mean, std = _known_statistics(base_name)
  class_names = tuple(builder.info.features[label_key].names)
  return Source(
      name=dataset, kind="tfds", class_names=class_names,
      num_classes=len(class_names), splits=splits, mean=mean, std=std,
      skip_corrupt_images=skip_corrupt_images,
      reader=_TfdsReader(builder, image_key, label_key))


def _tfds_image_and_label_keys(dataset: str, builder) -> tuple[str, str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  keys = builder.info.supervised_keys
  features = builder.info.features
  if (not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys)
      or not isinstance(features[keys[0]], tfds.features.Image)
      or not isinstance(features[keys[1]], tfds.features.ClassLabel)):
    raise ValueError(
        f"TFDS dataset {dataset!r} is not an image classification dataset: "
        f"its supervised keys are {keys}, but an (image, class label) pair "
        "is needed. Choose another dataset or use folder:PATH.")
  return keys[0], keys[1]


def _openable_tfds_splits(builder) -> list[str]:
  splits = []
  for split in ("train", "validation", "test"):
    try:
      builder.as_dataset(split=split)
    except (AssertionError, ValueError, KeyError):
      continue
    splits.append(split)
  return splits


def _known_statistics(name: str):
  if name not in KNOWN_STATISTICS:
    return None, None
  mean, std = KNOWN_STATISTICS[name]
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def default_image_size_and_augment(source: Source) -> tuple[int, str]:
  """Return the image_size and augment mode that suit a source.

  Datasets with a standard recipe use it (CIFAR: 32 and "cifar"; ImageNet:
  224 and "imagenet"). Others look at their first training image: images with
  both sides at most 64 pixels use "cifar" at their larger side, larger ones
  "imagenet" at 224.
  """
  base_name = source.name.split(":")[0].split("/")[0]
  if source.kind == "tfds" and base_name in KNOWN_DEFAULTS:
    return KNOWN_DEFAULTS[base_name]

  first = next(iter(source.split_dataset("train").take(1)))
  try:
    height, width, _ = _decode(first["encoded"]).shape
  except tf.errors.InvalidArgumentError as error:
    raise ValueError(
        f"corrupt image file {first['path'].numpy().decode()}: {error.message}. "
        "Fix or remove the file, or pass image_size and augment "
        "explicitly.") from error
  if max(height, width) <= _SMALL_IMAGE_MAX_SIDE:
    return max(height, width), "cifar"
  return 224, "imagenet"


# ---------------------------------------------------------------------------
# Decoding and augmentation.


def _decode(encoded: tf.Tensor) -> tf.Tensor:
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _try_decode(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Decode an image; return (uint8 image, ok) instead of raising.

  TensorFlow has no decode op that reports failure as a value, so the decode
  runs inside a one-element dataset whose errors are dropped, and a fallback
  element (a 1x1 black image, ok=False) follows it.
  """
  decoded = tf.data.Dataset.from_tensors(encoded).map(
      lambda data: (_decode(data), tf.constant(True))).ignore_errors()
  fallback = tf.data.Dataset.from_tensors(
      (tf.zeros([1, 1, 3], tf.uint8), tf.constant(False)))
  return decoded.concatenate(fallback).take(1).get_single_element()


def _decode_or_raise(encoded: tf.Tensor, path: tf.Tensor) -> tf.Tensor:
  """Decode an image; a corrupt one raises InvalidArgumentError naming path."""
  image, ok = _try_decode(encoded)
  message = tf.strings.join([
      "corrupt image file ", path, ": tf.io.decode_image failed. Fix or "
      "remove the file, or pass skip_corrupt_images=True to skip it."
  ])
  with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):
    return tf.identity(image)


def _corrupt_files_error(paths: Sequence[str]) -> ValueError:
  more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
  return ValueError(
      f"corrupt image file {paths[0]}{more}: tf.io.decode_image failed. Fix "
      "or remove the file, or pass skip_corrupt_images=True "
      "(--skip_corrupt_images) to skip it.")


def _check_augment(augment: str) -> None:
  if augment not in AUGMENT_MODES:
    raise ValueError(
        f"unknown augment mode {augment!r}; use one of {list(AUGMENT_MODES)}.")


def _resize_to_square(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Resize a float image to image_size x image_size unless it has that size."""
  if image.shape[0] == image_size and image.shape[1] == image_size:
    return image
  shape = tf.shape(image)
  return tf.cond(
      tf.logical_and(shape[0] == image_size, shape[1] == image_size),
      lambda: image, lambda: tf.image.resize(image, [image_size, image_size]))


def _pad_crop_flip(image, image_size, seed):
  """Pad with 4 zero pixels, crop and flip at random (the CIFAR augmentation)."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed))
  image = _resize_to_square(image, image_size)
  image = tf.pad(image, [[_CIFAR_PADDING, _CIFAR_PADDING],
                         [_CIFAR_PADDING, _CIFAR_PADDING], [0, 0]])
  image = tf.image.stateless_random_crop(image, [image_size, image_size, 3],
                                         seed=crop_seed)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _random_resized_crop_flip(image, image_size, seed):
  """Crop at random, resize and flip at random (the ImageNet augmentation).

  The crop covers 8% to 100% of the image area with an aspect ratio from 3/4
  to 4/3. NOTE: when 10 draws find no such crop, the whole image is used
  (torchvision's RandomResizedCrop takes a center crop instead).
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed))
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=crop_seed, min_object_covered=0.0,
      aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, size)
  image = tf.image.resize(image, [image_size, image_size])
  return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _resize_shorter_and_center_crop(image, image_size):
  """Resize the shorter side and crop the center (ImageNet evaluation)."""
  shorter = int(round(image_size / _IMAGENET_CENTER_CROP_FRACTION))
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = shorter / tf.reduce_min(shape)
  new_size = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
  image = tf.image.resize(image, new_size)
  top = (new_size[0] - image_size) // 2
  left = (new_size[1] - image_size) // 2
  return tf.slice(image, [top, left, 0], [image_size, image_size, 3])


def preprocess_image(image: tf.Tensor,
                     augment: str,
                     image_size: int,
                     mean=None,
                     std=None,
                     seed: Optional[tf.Tensor] = None,
                     training: bool = True) -> tf.Tensor:
  """Augment (when training) and normalize one decoded image.

  Args:
    image: uint8 [height, width, 3].
    augment: "cifar" pads 4 pixels with zeros, crops at random and flips
      horizontally at random. "imagenet" takes a random resized crop and
      flips at random, and for evaluation resizes the shorter side to
      image_size / 0.875 and crops the center. "none" resizes to image_size.
    image_size: the output height and width.
    mean: per-channel mean in [0, 1] pixel units, or None to skip the
      normalization.
    std: per-channel standard deviation, like `mean`.
    seed: int [2], the seed of the stateless random ops; required when
      training with "cifar" or "imagenet".
    training: whether to apply the random training transform; evaluation
      transforms are deterministic.

  Returns:
    float32 [image_size, image_size, 3]: pixels scaled to [0, 1], then
    normalized by mean and std.
  """
  _check_augment(augment)
  randomized = training and augment != "none"
  if randomized and seed is None:
    raise ValueError(
        f"augment={augment!r} with training=True needs a seed; pass an int "
        "[2] seed tensor.")

  image = tf.image.convert_image_dtype(image, tf.float32)
  if randomized and augment == "cifar":
    image = _pad_crop_flip(image, image_size, seed)
  elif randomized:
    image = _random_resized_crop_flip(image, image_size, seed)
  elif augment == "imagenet":
    image = _resize_shorter_and_center_crop(image, image_size)
  else:
    image = _resize_to_square(image, image_size)

  if mean is not None:
    image = image - tf.constant(np.asarray(mean, np.float32))
  if std is not None:
    image = image / tf.constant(np.asarray(std, np.float32))
  image.set_shape([image_size, image_size, 3])
  return image


# ---------------------------------------------------------------------------
# Decoding passes over a subset: validity, statistics, the in-memory cache.


def _subset_examples(source: Source, split: str,
                     indices: np.ndarray) -> tf.data.Dataset:
  """Return the examples of a split at sorted `indices`, as split_dataset."""
  if source.random_access:
    paths = source.file_paths(split)
    labels = source.split_labels(split)
    subset = tf.data.Dataset.from_tensor_slices({
        "path": paths[indices],
        "label": labels[indices],
        "index": indices,
    })
    return subset.map(
        lambda example: {**example, "encoded": tf.io.read_file(example["path"])},
        num_parallel_calls=AUTOTUNE)

  mask = np.zeros([source.split_size(split)], bool)
  mask[indices] = True
  last = int(indices[-1]) if len(indices) else -1
  examples = source.split_dataset(split)
  # Stop after the last selected index, so a small subset reads little.
  examples = examples.take_while(lambda example: example["index"] <= last)
  return examples.filter(lambda example: tf.gather(mask, example["index"]))


def _check_indices(source, split, indices, argument):
  indices = np.asarray(indices, np.int64).reshape([-1])
  size = source.split_size(split)
  outside = indices[(indices < 0) | (indices >= size)]
  if len(outside):
    raise ValueError(
        f"{argument} contain index {outside[0]}, outside split {split!r} of "
        f"{source.name!r} with {size} examples. Take the indices from "
        "search_split on that split.")
  return indices


def find_corrupt_images(source: Source,
                        split: str = "train",
                        indices=None) -> list[tuple[int, str]]:
  """Decode every selected image of a split and list those that fail.

  Args:
    source: the dataset.
    split: the split to scan.
    indices: the example indices to scan; None scans the whole split.

  Returns:
    (index, path) of each image that tf.io.decode_image rejects, by index.
  """
  if indices is None:
    indices = np.arange(source.split_size(split), dtype=np.int64)
  indices = np.unique(_check_indices(source, split, indices, "indices"))

  def check(example):
    _, ok = _try_decode(example["encoded"])
    return example["index"], example["path"], ok

  checks = _subset_examples(source, split, indices).map(
      check, num_parallel_calls=AUTOTUNE).batch(1024)
  corrupt = []
  for batch_indices, paths, ok in checks:
    for index, path in zip(batch_indices.numpy()[~ok.numpy()],
                           paths.numpy()[~ok.numpy()]):
      corrupt.append((int(index), path.decode("utf-8")))
  return corrupt


def measure_mean_std(source: Source,
                     split: str = "train",
                     sample: int = 2000,
                     seed: int = 0,
                     image_size: Optional[int] = None):
  """Measure the per-channel mean and std of pixels on a sample of a split.

  Args:
    source: the dataset.
    split: the split to sample.
    sample: the number of images; the whole split when it has fewer.
    seed: seeds the choice of images, so the result is reproducible.
    image_size: resize every image to this square size first; None measures
      the images at their own sizes (each pixel counts once).

  Returns:
    (mean, std), numpy float32 [3] in [0, 1] pixel units.

  Raises:
    ValueError: when a sampled image is corrupt and the source does not skip
      corrupt images.
  """
  size = source.split_size(split)
  rng = np.random.default_rng(seed)
  indices = np.sort(rng.choice(size, size=min(sample, size), replace=False))

  def pixel_sums(example):
    image, ok = _try_decode(example["encoded"])
    image = tf.image.convert_image_dtype(image, tf.float32)
    if image_size is not None:
      image = tf.image.resize(image, [image_size, image_size])
    pixels = tf.reshape(tf.cast(image, tf.float64), [-1, 3])
    return (tf.reduce_sum(pixels, 0), tf.reduce_sum(pixels * pixels, 0),
            tf.cast(tf.shape(pixels)[0], tf.float64), ok, example["path"])

  sums = np.zeros([3])
  squares = np.zeros([3])
  count = 0.0
  corrupt = []
  batches = _subset_examples(source, split, indices).map(
      pixel_sums, num_parallel_calls=AUTOTUNE).batch(256)
  for batch_sums, batch_squares, batch_counts, ok, paths in batches:
    ok = ok.numpy()
    corrupt.extend(path.decode("utf-8") for path in paths.numpy()[~ok])
    sums += batch_sums.numpy()[ok].sum(0)
    squares += batch_squares.numpy()[ok].sum(0)
    count += batch_counts.numpy()[ok].sum()

  if corrupt and not source.skip_corrupt_images:
    raise _corrupt_files_error(corrupt)
  if count == 0:
    raise ValueError(
        f"no image of split {split!r} of {source.name!r} could be decoded for "
        "the mean and std; check the images.")
  mean = sums / count
  std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
  logging.info("Measured mean %s and std %s on %d images of %s/%s.",
               np.round(mean, 4), np.round(std, 4), len(indices) - len(corrupt),
               source.name, split)
  return mean.astype(np.float32), std.astype(np.float32)


def _decode_into_memory(source, split, indices, image_size):
  """Decode the images at sorted `indices` to uint8 [n, size, size, 3].

  Returns:
    (images, labels int64 [n], (index, path) of each corrupt image); corrupt
    images are left black.
  """

  def decode_square(example):
    image, ok = _try_decode(example["encoded"])
    image = tf.image.convert_image_dtype(image, tf.float32)
    image = _resize_to_square(image, image_size)
    image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
    image.set_shape([image_size, image_size, 3])
    return image, example["label"], ok, example["index"], example["path"]

  images = np.zeros([len(indices), image_size, image_size, 3], np.uint8)
  labels = np.zeros([len(indices)], np.int64)
  corrupt = []
  row = 0
  batches = _subset_examples(source, split, indices).map(
      decode_square, num_parallel_calls=AUTOTUNE).batch(512)
  for batch_images, batch_labels, ok, batch_indices, paths in batches:
    count = len(batch_labels)
    images[row:row + count] = batch_images.numpy()
    labels[row:row + count] = batch_labels.numpy()
    failed = ~ok.numpy()
    corrupt.extend(
        (int(index), path.decode("utf-8"))
        for index, path in zip(batch_indices.numpy()[failed],
                               paths.numpy()[failed]))
    row += count
  return images, labels, corrupt


# ---------------------------------------------------------------------------
# The split of the training data into the two search subsets.


def search_split(num_examples: int,
                 labels=None,
                 mode: str = "portion",
                 train_portion: float = 0.5,
                 train_fraction: float = 0.1,
                 val_fraction: float = 0.025,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Split a training split into the weight and architecture subsets.

  Args:
    num_examples: the size of the training split.
    labels: int labels of the training split; needed for "fractions".
    mode: "portion" cuts a seeded permutation at floor(train_portion * n), as
      the DARTS CIFAR-10 search does (25,000 / 25,000). "fractions" samples,
      per class, round(train_fraction * count) examples for the weight subset
      and a disjoint round(val_fraction * count) for the architecture subset,
      as the PC-DARTS ImageNet search does (10% / 2.5%). Every class with two
      or more examples gets at least one example in each subset.
    train_portion: the share of the weight subset in "portion" mode.
    train_fraction: the per-class share of the weight subset in "fractions".
    val_fraction: the per-class share of the architecture subset.
    seed: the same seed gives the same split.

  Returns:
    (train_indices, val_indices): disjoint sorted int64 indices.

  Raises:
    ValueError: for an unknown mode, shares out of range, missing labels or
      a split that leaves a subset empty.
  """
  if mode not in SPLIT_MODES:
    raise ValueError(
        f"unknown split mode {mode!r}; use one of {list(SPLIT_MODES)}.")
  rng = np.random.default_rng(seed)

  if mode == "portion":
    if not 0.0 < train_portion < 1.0:
      raise ValueError(
          f"train_portion={train_portion} is outside (0, 1); it is the share "
          "of the training split that trains the weights, e.g. 0.5.")
    cut = int(math.floor(train_portion * num_examples))
    if cut < 1 or cut >= num_examples:
      raise ValueError(
          f"train_portion={train_portion} of {num_examples} examples leaves "
          "a search subset empty; use more examples or a portion nearer 0.5.")
    order = rng.permutation(num_examples)
    return np.sort(order[:cut]).astype(np.int64), np.sort(
        order[cut:]).astype(np.int64)

  for name, value in (("train_fraction", train_fraction),
                      ("val_fraction", val_fraction)):
    if not value > 0.0:
      raise ValueError(f"{name}={value} must be > 0; it is a per-class share "
                       "of the training split, e.g. 0.1.")
  if train_fraction + val_fraction > 1.0:
    raise ValueError(
        f"train_fraction + val_fraction = {train_fraction + val_fraction} "
        "exceeds 1; the two subsets must fit into each class. Lower them.")
  if labels is None:
    raise ValueError("split mode 'fractions' needs the labels of the "
                     "training split; pass labels.")
  labels = np.asarray(labels).reshape([-1])
  if len(labels) != num_examples:
    raise ValueError(
        f"labels has {len(labels)} entries but num_examples={num_examples}; "
        "pass one label per example.")

  train, val = [], []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = len(members)
    train_count = max(1, _round_half_up(train_fraction * count))
    val_count = max(1, _round_half_up(val_fraction * count)) if count >= 2 else 0
    train_count = min(train_count, count - 1) if count >= 2 else count
    val_count = min(val_count, count - train_count)
    chosen = rng.permutation(members)
    train.append(chosen[:train_count])
    val.append(chosen[train_count:train_count + val_count])
  return (np.sort(np.concatenate(train)).astype(np.int64),
          np.sort(np.concatenate(val)).astype(np.int64))


def _round_half_up(value: float) -> int:
  return int(math.floor(value + 0.5))


def balanced_subset(labels, max_examples: int, seed: int = 0) -> np.ndarray:
  """Choose at most max_examples indices, balanced over classes, seeded.

  Classes take turns: every class gives its first seeded example, then its
  second, and so on, so class counts differ by at most one until a class
  runs out.

  Returns:
    Sorted int64 indices into labels.
  """
  if max_examples < 1:
    raise ValueError(f"max_train_examples={max_examples} must be >= 1.")
  labels = np.asarray(labels).reshape([-1])
  if max_examples >= len(labels):
    return np.arange(len(labels), dtype=np.int64)

  rng = np.random.default_rng(seed)
  rank = np.zeros([len(labels)], np.int64)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    rank[rng.permutation(members)] = np.arange(len(members))
  order = np.lexsort((labels, rank))
  return np.sort(order[:max_examples]).astype(np.int64)


# ---------------------------------------------------------------------------
# The search streams.


def _fold_seed(seed: tf.Tensor, *values) -> tf.Tensor:
  for value in values:
    seed = tf.random.experimental.stateless_fold_in(
        seed, tf.cast(value, tf.int64))
  return seed


def _base_seed(seed: int, tag: int) -> tf.Tensor:
  return tf.constant([seed, tag], tf.int64)


@dataclasses.dataclass
class _ExampleStore:
  """Storage of the examples that the streams read.

  kind "memory" gathers decoded squares, "files" reads and decodes folder
  files by index, and "records" reads the split in order.
  """

  kind: str
  images: Optional[tf.Tensor] = None  # memory: uint8 [rows, size, size, 3]
  rows: Optional[tf.Tensor] = None  # memory: the row of each split index
  row_labels: Optional[tf.Tensor] = None  # memory: int64 [rows]
  paths: Optional[tf.Tensor] = None  # files: string [split size]
  labels: Optional[tf.Tensor] = None  # files: int64 [split size]
  records: Optional[tf.data.Dataset] = None  # records: split_dataset
  split_size: int = 0


def _epoch_indices(indices, count, order_seed, first_epoch):
  """Return (index, epoch, cycle) elements: count per epoch, from first_epoch.

  Epoch e shuffles the indices with the seed (order_seed, e, cycle) and
  repeats (cycle 1, 2, ...) with fresh permutations until it has count
  elements.
  """
  indices = tf.constant(indices, tf.int64)
  cycles = -(-count // int(indices.shape[0]))

  def one_epoch(epoch):

    def one_cycle(cycle):
      order = tf.random.experimental.stateless_shuffle(
          indices, seed=_fold_seed(order_seed, epoch, cycle))
      return tf.data.Dataset.from_tensor_slices(order).map(
          lambda index: (index, epoch, cycle))

    return tf.data.Dataset.range(cycles).flat_map(one_cycle).take(count)

  return tf.data.Dataset.counter(first_epoch).flat_map(one_epoch)


def _epoch_records(store, indices, count, order_seed, first_epoch):
  """Return (example, epoch, cycle) elements read from records in order.

  Each cycle reads the split, keeps the selected indices and shuffles them
  within windows of _RECORD_SHUFFLE_BUFFER examples: each example gets a
  stateless random key seeded from (order_seed, epoch, cycle, index), and a
  window is sorted by key. (Dataset.shuffle does not fit here, because its
  seed mixes with the global seed and a tensor seed fails under
  tf.config.experimental.enable_op_determinism.)
  NOTE: examples move only within their window, so the order is less random
  than a permutation when the records are sorted by class.
  """
  selected = _sorted_subset_of_records(store, indices)
  cycles = -(-count // len(indices))
  window = min(len(indices), _RECORD_SHUFFLE_BUFFER)

  def one_epoch(epoch):

    def one_cycle(cycle):
      cycle_seed = _fold_seed(order_seed, epoch, cycle)

      def with_key(example):
        key = tf.random.stateless_uniform(
            [], seed=_fold_seed(cycle_seed, example["index"]))
        return example, key

      def sort_window(examples, keys):
        order = tf.argsort(keys, stable=True)
        return tf.nest.map_structure(lambda t: tf.gather(t, order), examples)

      shuffled = selected.map(with_key).batch(window).map(sort_window).unbatch()
      return shuffled.map(lambda example: (example, epoch, cycle))

    return tf.data.Dataset.range(cycles).flat_map(one_cycle).take(count)

  return tf.data.Dataset.counter(first_epoch).flat_map(one_epoch)


def _sorted_subset_of_records(store, indices):
  mask = np.zeros([store.split_size], bool)
  mask[indices] = True
  last = int(indices.max())
  records = store.records.take_while(lambda example: example["index"] <= last)
  return records.filter(lambda example: tf.gather(mask, example["index"]))


def _stream(store, indices, batch_size, steps_per_epoch, start_step, seed,
            order_tag, augment_tag, image_size, augment, mean, std):
  """Build one stream of (images, labels) batches, steps_per_epoch per epoch."""
  count = steps_per_epoch * batch_size
  first_epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
  order_seed = _base_seed(seed, order_tag)
  augment_seed = _base_seed(seed, augment_tag)

  def finish(image, label, epoch, cycle, index):
    example_seed = _fold_seed(augment_seed, epoch, cycle, index)
    image = preprocess_image(image, augment, image_size, mean, std,
                             seed=example_seed, training=True)
    return image, tf.cast(label, tf.int32)

  if store.kind == "records":
    elements = _epoch_records(store, indices, count, order_seed, first_epoch)
    elements = elements.skip(step_in_epoch * batch_size)

    def load(example, epoch, cycle):
      image = _decode_or_raise(example["encoded"], example["path"])
      return finish(image, example["label"], epoch, cycle, example["index"])

  else:
    elements = _epoch_indices(indices, count, order_seed, first_epoch)
    elements = elements.skip(step_in_epoch * batch_size)

    if store.kind == "memory":

      def load(index, epoch, cycle):
        row = tf.gather(store.rows, index)
        return finish(tf.gather(store.images, row),
                      tf.gather(store.row_labels, row), epoch, cycle, index)

    else:

      def load(index, epoch, cycle):
        path = tf.gather(store.paths, index)
        image = _decode_or_raise(tf.io.read_file(path), path)
        return finish(image, tf.gather(store.labels, index), epoch, cycle,
                      index)

  return elements.map(load, num_parallel_calls=AUTOTUNE).batch(
      batch_size, drop_remainder=True)


@dataclasses.dataclass(eq=False)
class _PreparedStreams:
  """The checked subsets and their example store, ready to start a stream."""

  store: _ExampleStore
  train_indices: np.ndarray
  val_indices: np.ndarray
  steps_per_epoch: int
  skipped_images: tuple[str, ...]
  settings: dict

  def dataset(self, start_step: int = 0) -> tf.data.Dataset:
    """Return the (train, val) stream that starts at step start_step."""
    if start_step < 0:
      raise ValueError(f"start_step={start_step} must be >= 0.")
    common = dict(steps_per_epoch=self.steps_per_epoch, start_step=start_step,
                  **self.settings)
    train = _stream(self.store, self.train_indices, order_tag=_TRAIN_ORDER_TAG,
                    augment_tag=_TRAIN_AUGMENT_TAG, **common)
    val = _stream(self.store, self.val_indices, order_tag=_VAL_ORDER_TAG,
                  augment_tag=_VAL_AUGMENT_TAG, **common)
    dataset = tf.data.Dataset.zip((train, val)).prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options)


def _prepare_streams(source, train_indices, val_indices, batch_size,
                     image_size, augment, mean, std, seed, steps_per_epoch,
                     cache_limit_bytes) -> _PreparedStreams:
  """Check the subsets, cache or locate their examples, drop corrupt ones."""
  _check_augment(augment)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  train_indices = _check_indices(source, "train", train_indices,
                                 "train_indices")
  val_indices = _check_indices(source, "train", val_indices, "val_indices")
  selected = np.union1d(train_indices, val_indices)

  # Only the CIFAR and resize transforms start from an image_size square, so
  # only they can read decoded squares from memory.
  cache_bytes = len(selected) * image_size * image_size * 3
  cached = augment in ("cifar", "none") and cache_bytes <= cache_limit_bytes
  store = _ExampleStore(kind="memory" if cached else
                        ("files" if source.random_access else "records"),
                        split_size=source.split_size("train"))

  corrupt = []
  if cached:
    logging.info("Decoding %d images (%.1f MB) of %s into memory.",
                 len(selected), cache_bytes / 2**20, source.name)
    images, labels, corrupt = _decode_into_memory(source, "train", selected,
                                                  image_size)
    rows = np.full([store.split_size], -1, np.int64)
    rows[selected] = np.arange(len(selected))
    store.images = tf.constant(images)
    store.rows = tf.constant(rows)
    store.row_labels = tf.constant(labels)
  else:
    logging.info(
        "Streaming %d images of %s from %s (estimated %.1f MB decoded, cache "
        "limit %.1f MB, augment %s).", len(selected), source.name, store.kind,
        cache_bytes / 2**20, cache_limit_bytes / 2**20, augment)
    if source.skip_corrupt_images:
      # A decoding pass first, so that every epoch keeps its exact length.
      corrupt = find_corrupt_images(source, "train", selected)
    if store.kind == "files":
      store.paths = tf.constant(source.file_paths("train"))
      store.labels = tf.constant(source.split_labels("train"))
    else:
      store.records = source.split_dataset("train")

  corrupt_paths = [path for _, path in corrupt]
  if corrupt:
    if not source.skip_corrupt_images:
      raise _corrupt_files_error(corrupt_paths)
    logging.warning("Skipping %d corrupt image files of %s: %s%s",
                    len(corrupt), source.name, corrupt_paths[:10],
                    " ..." if len(corrupt) > 10 else "")
    corrupt_indices = [index for index, _ in corrupt]
    train_indices = np.setdiff1d(train_indices, corrupt_indices)
    val_indices = np.setdiff1d(val_indices, corrupt_indices)

  if len(train_indices) < batch_size:
    raise ValueError(
        f"the train subset has {len(train_indices)} examples, fewer than "
        f"batch_size={batch_size}. Lower batch_size or use more examples.")
  if len(val_indices) == 0:
    raise ValueError("the val subset is empty; use more examples or a larger "
                     "val share.")
  if steps_per_epoch is None:
    steps_per_epoch = len(train_indices) // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1.")

  settings = dict(batch_size=batch_size, seed=seed, image_size=image_size,
                  augment=augment, mean=mean, std=std)
  return _PreparedStreams(store, train_indices, val_indices, steps_per_epoch,
                          tuple(corrupt_paths), settings)


def search_streams(source: Source,
                   train_indices,
                   val_indices,
                   batch_size: int,
                   image_size: int,
                   augment: str,
                   mean,
                   std,
                   seed: int,
                   start_step: int = 0,
                   steps_per_epoch: Optional[int] = None,
                   cache_limit_bytes: int = DEFAULT_CACHE_LIMIT_BYTES
                  ) -> tf.data.Dataset:
  """Build the infinite (train batch, val batch) stream of a search.

  Epoch e of each stream visits its subset in the order of a stateless
  permutation seeded by (seed, stream, e), and example i gets the
  augmentation seed (seed, stream, e, cycle, i). An epoch has
  steps_per_epoch batches in both streams: a subset with fewer examples
  repeats with a fresh permutation (a new cycle), a larger one is cut.

  Args:
    source: the dataset; the subsets index its train split.
    train_indices: the indices that train the network weights.
    val_indices: the indices that train the architecture weights.
    batch_size: examples per batch (drop_remainder, so the shape is static).
    image_size: the height and width of the images.
    augment: "cifar", "imagenet" or "none"; see preprocess_image.
    mean: per-channel mean in [0, 1] pixel units, or None.
    std: per-channel standard deviation, or None.
    seed: the search seed.
    start_step: the number of batches already consumed; the stream then
      yields exactly what the stream from step 0 yields from this step on.
    steps_per_epoch: batches per epoch; default len(train_indices) //
      batch_size.
    cache_limit_bytes: decode the subsets into memory when their uint8 size
      is at most this (only for "cifar" and "none").

  Returns:
    A dataset of ((train_images, train_labels), (val_images, val_labels)):
    float32 [batch_size, image_size, image_size, 3] and int32 [batch_size].

  Raises:
    ValueError: for bad arguments, or a corrupt image found while caching
      when the source does not skip corrupt images. A corrupt image read
      while streaming raises InvalidArgumentError naming the file.
  """
  prepared = _prepare_streams(source, train_indices, val_indices, batch_size,
                              image_size, augment, mean, std, seed,
                              steps_per_epoch, cache_limit_bytes)
  return prepared.dataset(start_step)


def eval_dataset(source: Source, split: str, batch_size: int, image_size: int,
                 augment: str, mean, std) -> tf.data.Dataset:
  """Build a single, deterministic pass over a split for evaluation.

  Images get the evaluation transform of `augment` (see preprocess_image).
  With source.skip_corrupt_images, an image that fails to decode is dropped
  and its path printed to stderr; otherwise it raises InvalidArgumentError
  naming the file.

  Returns:
    A dataset of (images float32 [b, image_size, image_size, 3], labels
    int32 [b]) that keeps the last partial batch.
  """
  _check_augment(augment)
  examples = source.split_dataset(split)

  def finish(image, label):
    image = preprocess_image(image, augment, image_size, mean, std,
                             training=False)
    return image, tf.cast(label, tf.int32)

  if source.skip_corrupt_images:

    def load(example):
      image, ok = _try_decode(example["encoded"])
      return image, example["label"], ok, example["path"]

    def keep(image, label, ok, path):
      del image, label
      report = lambda: tf.print("Skipping corrupt image file", path,
                                output_stream=logging.warning)
      return tf.cond(ok, lambda: ok,
                     lambda: _after(report, tf.constant(False)))

    images = examples.map(load, num_parallel_calls=AUTOTUNE).filter(keep)
    images = images.map(lambda image, label, ok, path: finish(image, label),
                        num_parallel_calls=AUTOTUNE)
  else:
    images = examples.map(
        lambda example: finish(
            _decode_or_raise(example["encoded"], example["path"]),
            example["label"]),
        num_parallel_calls=AUTOTUNE)
  return images.batch(batch_size).prefetch(AUTOTUNE)


def _after(operation, value):
  with tf.control_dependencies([operation()]):
    return tf.identity(value)


# ---------------------------------------------------------------------------
# One call from a config.


@dataclasses.dataclass
class DataConfig:
  """The data settings of a search."""

  # A TFDS name, folder:PATH or tfrecord:PATTERN.
  dataset: str = "cifar10"
  # The TFDS data directory; None for TFDS's default.
  data_dir: Optional[str] = None
  # Whether TFDS may download and prepare a missing dataset.
  download: bool = False
  # "portion" or "fractions"; None: "fractions" for imagenet2012, else
  # "portion".
  split_mode: Optional[str] = None
  # The share of the training split that trains the weights ("portion").
  train_portion: float = 0.5
  # Per-class shares of the two subsets ("fractions").
  train_fraction: float = 0.1
  val_fraction: float = 0.025
  # Image height and width; None: the dataset's default.
  image_size: Optional[int] = None
  # "cifar", "imagenet" or "none"; None: the dataset's default.
  augment: Optional[str] = None
  # The global batch size of each stream.
  batch_size: int = 64
  # Seeds the split, the order of the streams and the augmentation.
  seed: int = 0
  # Skip images that fail to decode instead of raising.
  skip_corrupt_images: bool = False
  # Cap on the training split, as a seeded class-balanced subset taken before
  # the split (for smoke runs); None: no cap.
  max_train_examples: Optional[int] = None
  # Subtracted from TFRecord labels (1 for TF Model Garden's ImageNet).
  label_offset: int = 0
  # The number of TFRecord classes; None: the largest label plus one.
  num_classes: Optional[int] = None
  # Decode the search subsets into memory when their uint8 size, in bytes,
  # is at most this (only for augment "cifar" and "none").
  cache_limit_bytes: int = DEFAULT_CACHE_LIMIT_BYTES


@dataclasses.dataclass(eq=False)
class SearchData:
  """The streams of a search and what the model and logs need to know.

  Attributes:
    streams: the infinite ((train_images, train_labels), (val_images,
      val_labels)) dataset, started at the requested step.
    steps_per_epoch: batches per epoch in both streams.
    num_classes: the number of labels.
    class_names: one name per label.
    mean: the per-channel mean used for normalization, float32 [3].
    std: the per-channel standard deviation used, float32 [3].
    image_size: the height and width of the images.
    train_size: examples in the weight subset.
    val_size: examples in the architecture subset.
    augment: the augmentation mode.
    skipped_images: paths of the corrupt images left out (with
      skip_corrupt_images).
    source: the loaded dataset, for evaluation with eval_dataset.
  """

  streams: tf.data.Dataset
  steps_per_epoch: int
  num_classes: int
  class_names: tuple[str, ...]
  mean: np.ndarray
  std: np.ndarray
  image_size: int
  train_size: int
  val_size: int
  augment: str = "cifar"
  skipped_images: tuple[str, ...] = ()
  source: Optional[Source] = None
  prepared: Optional[_PreparedStreams] = dataclasses.field(default=None,
                                                           repr=False)

  def streams_from(self, start_step: int) -> tf.data.Dataset:
    """Return the streams started at start_step, reusing the decoded cache.

    The result equals build_search_data(config, start_step).streams without
    loading and decoding the data again.
    """
    return self.prepared.dataset(start_step)


def _default_split_mode(source: Source) -> str:
  base_name = source.name.split(":")[0].split("/")[0]
  if source.kind == "tfds" and base_name == "imagenet2012":
    return "fractions"
  return "portion"


def _search_subsets(source: Source, config: DataConfig, split_mode: str):
  """Cap the training split as configured, then split it; return indices."""
  # Read the labels only for the per-class choices, because for TFDS and
  # TFRecords they cost a pass over the split.
  needs_labels = split_mode == "fractions" or config.max_train_examples
  labels = source.split_labels("train") if needs_labels else None

  candidates = np.arange(source.split_size("train"), dtype=np.int64)
  if config.max_train_examples:
    candidates = balanced_subset(labels, config.max_train_examples,
                                 config.seed)
  train_positions, val_positions = search_split(
      len(candidates), None if labels is None else labels[candidates],
      mode=split_mode, train_portion=config.train_portion,
      train_fraction=config.train_fraction, val_fraction=config.val_fraction,
      seed=config.seed)
  return candidates[train_positions], candidates[val_positions]


def build_search_data(config: DataConfig, start_step: int = 0) -> SearchData:
  """Load the dataset, split it and build the search streams.

  Args:
    config: the data settings.
    start_step: the number of batches already consumed (for a resume).

  Returns:
    The `SearchData`.
  """
  source = load_source(config.dataset, data_dir=config.data_dir,
                       download=config.download,
                       skip_corrupt_images=config.skip_corrupt_images,
                       label_offset=config.label_offset,
                       num_classes=config.num_classes)

  image_size, augment = config.image_size, config.augment
  if image_size is None or augment is None:
    default_size, default_augment = default_image_size_and_augment(source)
    image_size = image_size or default_size
    augment = augment or default_augment
  split_mode = config.split_mode or _default_split_mode(source)
  train_indices, val_indices = _search_subsets(source, config, split_mode)

  mean, std = source.mean, source.std
  if mean is None or std is None:
    mean, std = measure_mean_std(source, "train", seed=config.seed)

  prepared = _prepare_streams(
      source, train_indices, val_indices, config.batch_size, image_size,
      augment, mean, std, config.seed, None, config.cache_limit_bytes)
  logging.info(
      "Search data: %d train and %d val examples of %s (split %s), %d steps "
      "per epoch of batch %d, image size %d, augment %s.",
      len(prepared.train_indices), len(prepared.val_indices), source.name,
      split_mode, prepared.steps_per_epoch, config.batch_size, image_size,
      augment)
  return SearchData(
      streams=prepared.dataset(start_step),
      steps_per_epoch=prepared.steps_per_epoch,
      num_classes=source.num_classes, class_names=source.class_names,
      mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32),
      image_size=image_size, train_size=len(prepared.train_indices),
      val_size=len(prepared.val_indices), augment=augment,
      skipped_images=prepared.skipped_images, source=source,
      prepared=prepared)

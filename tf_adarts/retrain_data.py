"""Input pipelines for retraining a discrete network.

The search reads (train, val) pairs from two halves of the training split.
Retraining instead reads one stream over the whole training split (or a
class-balanced subset of it) and evaluates on the test split. Optionally a
class-balanced set of training-split examples is held out as a validation
set: it is never trained on, so tuning can select on it instead of on the
test split.

The stream is resumable: epoch e visits the examples in the order of a
stateless permutation seeded by (seed, e), and example i of epoch e draws
its augmentation and its cutout square from (seed, e, i). A stream started at
step s therefore yields what the stream from step 0 yields from step s on.

Only public functions of `tf_adarts.data` are used: sources, balanced
subsets, the mean and std, `preprocess_image` and `eval_dataset`.
"""

import dataclasses
from typing import Optional

from absl import logging
import numpy as np
import tensorflow as tf

from tf_adarts import data as data_lib

AUTOTUNE = tf.data.AUTOTUNE

# Tags that keep the order and augmentation seeds apart from each other and
# from the search streams' tags (1 to 4 in tf_adarts.data).
_ORDER_TAG = 11
_AUGMENT_TAG = 12
_CUTOUT_TAG = 13
_VALIDATION_TAG = 14
# Records (TFDS, TFRecords) are shuffled by sorting windows of this many
# examples on stateless random keys.
_RECORD_SHUFFLE_WINDOW = 4096
# The evaluation splits tried in order when "test" is missing.
EVAL_SPLITS = ("test", "validation", "val")


def cutout(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
  """Zero a size x size square of `image` centred at a random pixel.

  As in the DARTS recipe, the centre is uniform over the image, so the
  square is clipped at the borders and may cover less than size x size
  pixels. The draw is stateless, from `seed` (int [2]).

  Args:
    image: float [height, width, channels], already normalized.
    size: the side of the square in pixels; 0 returns the image unchanged.
    seed: the stateless seed of the centre.
  """
  if size <= 0:
    return image
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  centre = tf.random.stateless_uniform([2], seed=seed, minval=0,
                                       maxval=tf.int32.max, dtype=tf.int32)
  centre_y = centre[0] % height
  centre_x = centre[1] % width
  rows = tf.range(height)[:, None]
  columns = tf.range(width)[None, :]
  half = size // 2
  inside = ((rows >= centre_y - half) & (rows < centre_y - half + size)
            & (columns >= centre_x - half) & (columns < centre_x - half + size))
  mask = tf.cast(tf.logical_not(inside), image.dtype)[:, :, None]
  return image * mask


def _fold(seed: tf.Tensor, *values) -> tf.Tensor:
  for value in values:
    seed = tf.random.experimental.stateless_fold_in(seed,
                                                    tf.cast(value, tf.int64))
  return seed


@dataclasses.dataclass(eq=False)
class RetrainData:
  """The training stream of a retrain and what the model and logs need.

  Attributes:
    source: the loaded dataset, also used for evaluation.
    steps_per_epoch: batches per epoch (the last partial batch is dropped).
    batch_size: the global batch size.
    train_size: training examples used.
    num_classes: the number of labels.
    class_names: one name per label.
    mean: the per-channel mean used for normalization, float32 [3].
    std: the per-channel standard deviation used, float32 [3].
    image_size: the input height and width in pixels.
    augment: "cifar", "imagenet" or "none".
    cutout: the side of the cutout square in pixels, 0 for none.
    seed: the seed of the order, augmentation and cutout draws.
    storage: "memory" (decoded squares), "files" or "records".
    validation_size: held-out examples of the train split, 0 for none.
    indices: the sorted train-split indices of the training examples.
    validation_indices: the sorted train-split indices of the held-out
      examples, disjoint from `indices`.
    images, labels: the decoded training examples (memory storage only).
    validation_images, validation_labels: the decoded held-out examples
      (memory storage only).
  """

  source: data_lib.Source
  steps_per_epoch: int
  batch_size: int
  train_size: int
  num_classes: int
  class_names: tuple
  mean: np.ndarray
  std: np.ndarray
  image_size: int
  augment: str
  cutout: int
  seed: int
  storage: str
  validation_size: int = 0
  indices: np.ndarray = dataclasses.field(repr=False, default=None)
  images: Optional[np.ndarray] = dataclasses.field(repr=False, default=None)
  labels: Optional[np.ndarray] = dataclasses.field(repr=False, default=None)
  validation_indices: np.ndarray = dataclasses.field(
      repr=False, default_factory=lambda: np.zeros([0], np.int64))
  validation_images: Optional[np.ndarray] = dataclasses.field(
      repr=False, default=None)
  validation_labels: Optional[np.ndarray] = dataclasses.field(
      repr=False, default=None)

  def train_stream(self, start_step: int = 0) -> tf.data.Dataset:
    """Return the infinite (images, labels) stream started at start_step."""
    if start_step < 0:
      raise ValueError(f"start_step={start_step} must be >= 0.")
    first_epoch, step_in_epoch = divmod(start_step, self.steps_per_epoch)
    count = self.steps_per_epoch * self.batch_size
    if self.storage == "records":
      elements = self._record_elements(count, first_epoch)
    else:
      elements = self._indexed_elements(count, first_epoch)
    elements = elements.skip(step_in_epoch * self.batch_size)
    dataset = elements.batch(self.batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return dataset.prefetch(AUTOTUNE).with_options(options)

  def eval_stream(self, split: str, batch_size: int) -> tf.data.Dataset:
    """Return one deterministic pass over `split` with the eval transform."""
    return data_lib.eval_dataset(self.source, split, batch_size,
                                 self.image_size, self.augment, self.mean,
                                 self.std)

  def validation_stream(self, batch_size: int) -> tf.data.Dataset:
    """Return one pass over the held-out examples with the eval transform.

    The examples come in train-split index order, transformed as
    `eval_stream` transforms a split, and the last partial batch is kept.

    Raises:
      ValueError: when no examples are held out.
    """
    if not self.validation_size:
      raise ValueError(
          "no examples of the train split are held out, so there is no "
          "validation stream. Build the data with validation_examples > 0.")
    if self.storage == "memory":
      images = tf.data.Dataset.from_tensor_slices(
          (self.validation_images, self.validation_labels))
    else:
      # NOTE: with records storage every pass reads the train split in order
      # up to the last held-out index, which is usually near its end.
      images = _train_examples(self.source, self.validation_indices).map(
          lambda example: (_decode(example["encoded"]), example["label"]),
          num_parallel_calls=AUTOTUNE)

    def finish(image, label):
      image = data_lib.preprocess_image(image, self.augment, self.image_size,
                                        self.mean, self.std, training=False)
      return image, tf.cast(label, tf.int32)

    images = images.map(finish, num_parallel_calls=AUTOTUNE)
    return images.batch(batch_size).prefetch(AUTOTUNE)

  def _finish(self, image, label, epoch, index):
    augment_seed = _fold(tf.constant([self.seed, _AUGMENT_TAG], tf.int64),
                         epoch, index)
    cutout_seed = _fold(tf.constant([self.seed, _CUTOUT_TAG], tf.int64),
                        epoch, index)
    image = data_lib.preprocess_image(image, self.augment, self.image_size,
                                      self.mean, self.std, seed=augment_seed,
                                      training=True)
    image = cutout(image, self.cutout, cutout_seed)
    return image, tf.cast(label, tf.int32)

  def _indexed_elements(self, count, first_epoch):
    """Memory or file storage: a stateless permutation per epoch."""
    indices = tf.constant(self.indices, tf.int64)
    order_seed = tf.constant([self.seed, _ORDER_TAG], tf.int64)
    cycles = -(-count // len(self.indices))

    def one_epoch(epoch):
      def one_cycle(cycle):
        order = tf.random.experimental.stateless_shuffle(
            indices, seed=_fold(order_seed, epoch, cycle))
        return tf.data.Dataset.from_tensor_slices(order).map(
            lambda index: (index, epoch))
      return tf.data.Dataset.range(cycles).flat_map(one_cycle).take(count)

    elements = tf.data.Dataset.counter(first_epoch).flat_map(one_epoch)
    if self.storage == "memory":
      # Rows of the decoded array, addressed by split index.
      rows = np.full([int(self.indices.max()) + 1], -1, np.int64)
      rows[self.indices] = np.arange(len(self.indices))
      rows = tf.constant(rows)
      images = tf.constant(self.images)
      labels = tf.constant(self.labels)

      def load(index, epoch):
        row = tf.gather(rows, index)
        return self._finish(tf.gather(images, row), tf.gather(labels, row),
                            epoch, index)
    else:
      paths = tf.constant(self.source.file_paths("train"))
      labels = tf.constant(self.source.split_labels("train"))

      def load(index, epoch):
        encoded = tf.io.read_file(tf.gather(paths, index))
        image = tf.io.decode_image(encoded, channels=3,
                                   expand_animations=False)
        image.set_shape([None, None, 3])
        return self._finish(image, tf.gather(labels, index), epoch, index)

    return elements.map(load, num_parallel_calls=AUTOTUNE)

  def _record_elements(self, count, first_epoch):
    """Records: read in order, shuffle within windows by stateless keys."""
    mask = np.zeros([self.source.split_size("train")], bool)
    mask[self.indices] = True
    mask = tf.constant(mask)
    records = self.source.split_dataset("train").filter(
        lambda example: tf.gather(mask, example["index"]))
    order_seed = tf.constant([self.seed, _ORDER_TAG], tf.int64)
    window = min(len(self.indices), _RECORD_SHUFFLE_WINDOW)
    cycles = -(-count // len(self.indices))

    def one_epoch(epoch):
      def one_cycle(cycle):
        cycle_seed = _fold(order_seed, epoch, cycle)

        def with_key(example):
          key = tf.random.stateless_uniform(
              [], seed=_fold(cycle_seed, example["index"]))
          return example, key

        def sort_window(examples, keys):
          order = tf.argsort(keys, stable=True)
          return tf.nest.map_structure(lambda t: tf.gather(t, order),
                                       examples)

        shuffled = records.map(with_key).batch(window).map(
            sort_window).unbatch()
        return shuffled.map(lambda example: (example, epoch))
      return tf.data.Dataset.range(cycles).flat_map(one_cycle).take(count)

    def load(example, epoch):
      image = tf.io.decode_image(example["encoded"], channels=3,
                                 expand_animations=False)
      image.set_shape([None, None, 3])
      return self._finish(image, example["label"], epoch, example["index"])

    # NOTE: examples move only within their window, so records sorted by
    # class give a less random order than a full permutation.
    return tf.data.Dataset.counter(first_epoch).flat_map(one_epoch).map(
        load, num_parallel_calls=AUTOTUNE)


def _decode(encoded: tf.Tensor) -> tf.Tensor:
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _train_examples(source, indices):
  """Return the train-split examples at sorted `indices`, as split_dataset.

  Folders read only the selected files. Records have no random access, so
  the split is read in order up to the last selected index.
  """
  if source.random_access:
    return tf.data.Dataset.from_tensor_slices({
        "path": source.file_paths("train")[indices],
        "label": source.split_labels("train")[indices],
        "index": indices,
    }).map(lambda example: {**example,
                            "encoded": tf.io.read_file(example["path"])},
           num_parallel_calls=AUTOTUNE)

  mask = np.zeros([source.split_size("train")], bool)
  mask[indices] = True
  mask = tf.constant(mask)
  last = int(indices[-1]) if len(indices) else -1
  examples = source.split_dataset("train").take_while(
      lambda example: example["index"] <= last)
  return examples.filter(lambda example: tf.gather(mask, example["index"]))


def _decode_squares(source, indices, image_size):
  """Decode the train images at sorted `indices` to uint8 squares."""

  def decode(example):
    image = tf.image.convert_image_dtype(_decode(example["encoded"]),
                                         tf.float32)
    image = tf.image.resize(image, [image_size, image_size])
    image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
    return image, example["label"]

  examples = _train_examples(source, indices)
  images = np.zeros([len(indices), image_size, image_size, 3], np.uint8)
  labels = np.zeros([len(indices)], np.int64)
  row = 0
  for batch_images, batch_labels in examples.map(
      decode, num_parallel_calls=AUTOTUNE).batch(1024):
    count = len(batch_labels)
    images[row:row + count] = batch_images.numpy()
    labels[row:row + count] = batch_labels.numpy()
    row += count
  return images, labels


def select_examples(labels, max_train_examples: Optional[int],
                    validation_examples: int, seed: int = 0):
  """Choose the held-out and the training examples of a train split.

  The held-out examples are a class-balanced subset (data.balanced_subset)
  drawn from `seed` alone, so they stay the same when max_train_examples
  changes. The training examples are the rest, or a class-balanced subset
  of max_train_examples of the rest. With validation_examples=0 the
  training examples are those of data.balanced_subset(labels,
  max_train_examples, seed), or all of them without max_train_examples.

  Args:
    labels: the labels of the train split, in index order.
    max_train_examples: the number of training examples; None or 0 for all
      that are not held out.
    validation_examples: the number of held-out examples, 0 or more.
    seed: seeds both choices.

  Returns:
    (training indices, held-out indices): disjoint, sorted int64 indices
    into labels.

  Raises:
    ValueError: when validation_examples is negative, when
      validation_examples + max_train_examples exceeds the split (checked
      only when validation_examples > 0), or when nothing is left to train
      on.
  """
  labels = np.asarray(labels).reshape([-1])
  size = len(labels)
  if validation_examples < 0:
    raise ValueError(
        f"validation_examples={validation_examples} is negative. Give the "
        "number of train-split examples to hold out, or 0 for none.")
  if not validation_examples:
    if max_train_examples:
      return (data_lib.balanced_subset(labels, max_train_examples, seed),
              np.zeros([0], np.int64))
    return np.arange(size, dtype=np.int64), np.zeros([0], np.int64)

  if max_train_examples and validation_examples + max_train_examples > size:
    raise ValueError(
        f"validation_examples={validation_examples} plus max_train_examples="
        f"{max_train_examples} is {validation_examples + max_train_examples}, "
        f"more than the {size} examples of the train split. Lower one of "
        "them.")
  if validation_examples >= size:
    raise ValueError(
        f"validation_examples={validation_examples} leaves none of the {size} "
        "examples of the train split for training. Hold out fewer.")

  # A seed of its own keeps the held-out draw apart from the subset draw.
  validation_seed = int(np.random.SeedSequence(
      [seed, _VALIDATION_TAG]).generate_state(1)[0])
  validation = data_lib.balanced_subset(labels, validation_examples,
                                        validation_seed)
  rest = np.setdiff1d(np.arange(size, dtype=np.int64), validation)
  if max_train_examples:
    rest = rest[data_lib.balanced_subset(labels[rest], max_train_examples,
                                         seed)]
  return rest, validation


def find_eval_split(source: data_lib.Source, split: str = "test") -> str:
  """Return `split` when the source has it, else its validation split.

  Raises:
    ValueError: when none of the evaluation splits exist.
  """
  if split in source.splits:
    return split
  for candidate in EVAL_SPLITS:
    if candidate in source.splits:
      logging.info("Split %r not found in %s; evaluating on %r.", split,
                   source.name, candidate)
      return candidate
  raise ValueError(
      f"split {split!r} not found in dataset {source.name!r}, and it has no "
      f"test or validation split; its splits are {list(source.splits)}.")


def build_retrain_data(dataset: str,
                       batch_size: int,
                       seed: int = 0,
                       data_dir: Optional[str] = None,
                       download: bool = False,
                       image_size: Optional[int] = None,
                       augment: Optional[str] = None,
                       cutout_size: int = 0,
                       max_train_examples: Optional[int] = None,
                       cache_limit_bytes: int = data_lib.DEFAULT_CACHE_LIMIT_BYTES,
                       validation_examples: int = 0) -> RetrainData:
  """Load a dataset and prepare the retraining stream over its train split.

  Args:
    dataset: a TFDS name, folder:PATH or tfrecord:PATTERN.
    batch_size: the global batch size.
    seed: seeds the subset, the order, the augmentation and cutout.
    data_dir: the TFDS data directory.
    download: whether TFDS may download a missing dataset.
    image_size: the input size in pixels; None for the dataset's default.
    augment: "cifar", "imagenet" or "none"; None for the dataset's default.
    cutout_size: the side of the cutout square in pixels; 0 disables it.
    max_train_examples: use a seeded class-balanced subset of this size.
    cache_limit_bytes: decode the training and held-out images into memory
      when their uint8 size is at most this (only for augment "cifar" and
      "none").
    validation_examples: hold out this many class-balanced examples of the
      train split (see select_examples); 0 holds out none.

  Raises:
    ValueError: for an unknown dataset, an invalid validation_examples, or
      fewer training examples than batch_size.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  source = data_lib.load_source(dataset, data_dir=data_dir, download=download)
  if image_size is None or augment is None:
    default_size, default_augment = data_lib.default_image_size_and_augment(
        source)
    image_size = image_size or default_size
    augment = augment or default_augment

  if max_train_examples or validation_examples:
    indices, validation_indices = select_examples(
        source.split_labels("train"), max_train_examples, validation_examples,
        seed)
  else:
    # The whole split needs no labels, which some TFDS datasets read in a
    # pass over the split.
    indices = np.arange(source.split_size("train"), dtype=np.int64)
    validation_indices = np.zeros([0], np.int64)
  if len(indices) < batch_size:
    if validation_examples:
      raise ValueError(
          f"the training split has {len(indices)} examples left after "
          f"holding out validation_examples={validation_examples}, fewer "
          f"than batch_size={batch_size}. Lower validation_examples or "
          "batch_size.")
    raise ValueError(
        f"the training split has {len(indices)} examples, fewer than "
        f"batch_size={batch_size}. Lower batch_size or use more examples.")

  mean, std = source.mean, source.std
  if mean is None or std is None:
    mean, std = data_lib.measure_mean_std(source, "train", seed=seed)

  cache_bytes = ((len(indices) + len(validation_indices)) * image_size
                 * image_size * 3)
  images = labels = validation_images = validation_labels = None
  if augment in ("cifar", "none") and cache_bytes <= cache_limit_bytes:
    storage = "memory"
    logging.info("Decoding %d training and %d held-out images (%.1f MB) of "
                 "%s into memory.", len(indices), len(validation_indices),
                 cache_bytes / 2**20, source.name)
    images, labels = _decode_squares(source, indices, image_size)
    if len(validation_indices):
      validation_images, validation_labels = _decode_squares(
          source, validation_indices, image_size)
  elif source.random_access:
    storage = "files"
  else:
    storage = "records"

  steps_per_epoch = len(indices) // batch_size
  logging.info(
      "Retrain data: %d training and %d held-out examples of %s, %d steps "
      "per epoch of batch %d, image size %d, augment %s, cutout %d px, "
      "storage %s.", len(indices), len(validation_indices), source.name,
      steps_per_epoch, batch_size, image_size, augment, cutout_size, storage)
  return RetrainData(
      source=source, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
      train_size=len(indices), num_classes=source.num_classes,
      class_names=tuple(source.class_names),
      mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32),
      image_size=image_size, augment=augment, cutout=cutout_size, seed=seed,
      storage=storage, validation_size=len(validation_indices),
      indices=indices, images=images, labels=labels,
      validation_indices=validation_indices,
      validation_images=validation_images,
      validation_labels=validation_labels)

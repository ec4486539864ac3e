"""Tests of the search input pipelines on real CIFAR-10 JPEGs."""

import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import cifar10_dir, two_replica_strategy
from tf_adarts import data

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                   "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def cifar_source():
  root = cifar10_dir()
  if not (root / "train").is_dir():
    pytest.fail(f"CIFAR-10 images not found at {root}; set TF_ADARTS_SHARED "
                "to the folder that holds data/cifar10.")
  return data.load_source(f"folder:{root}")


@pytest.fixture(scope="module")
def small_subsets(cifar_source):
  """40 train and 24 val indices of the CIFAR-10 train split."""
  chosen = data.balanced_subset(cifar_source.split_labels("train"), 64, seed=3)
  chosen = np.random.default_rng(3).permutation(chosen)
  return np.sort(chosen[:40]), np.sort(chosen[40:])


def _copy_images(destination, classes=("cat", "dog", "ship"), per_class=5):
  """Copy the first per_class JPEGs of each class into destination/<class>."""
  for name in classes:
    (destination / name).mkdir(parents=True)
    for path in sorted((cifar10_dir() / "train" / name).glob("*.jpg"))[:per_class]:
      shutil.copy(path, destination / name / path.name)
  return destination


def _take_batches(dataset, count):
  return [tf.nest.map_structure(lambda t: t.numpy(), batch)
          for batch in dataset.take(count)]


def _batches_equal(first, second):
  flat_first = tf.nest.flatten(first)
  flat_second = tf.nest.flatten(second)
  return all(np.array_equal(a, b) for a, b in zip(flat_first, flat_second))


# Folder sources.


def test_folder_class_names_sorted(cifar_source):
  assert cifar_source.class_names == CIFAR10_CLASSES
  assert cifar_source.num_classes == 10


def test_folder_split_sizes_counted(cifar_source):
  assert cifar_source.splits == ("train", "test")
  assert cifar_source.split_size("train") == 50000
  assert cifar_source.split_size("test") == 10000


def test_folder_batch_shape_and_range(cifar_source):
  images, labels = next(iter(data.eval_dataset(
      cifar_source, "test", batch_size=16, image_size=32, augment="none",
      mean=None, std=None)))

  assert images.shape == (16, 32, 32, 3)
  assert labels.shape == (16,)
  assert float(tf.reduce_min(images)) >= 0.0
  assert float(tf.reduce_max(images)) <= 1.0
  assert float(tf.reduce_max(images)) > 0.5


def test_folder_examples_keep_paths(cifar_source):
  example = next(iter(cifar_source.split_dataset("test")))
  path = example["path"].numpy().decode()

  assert path.endswith("airplane/0000.jpg")
  assert int(example["label"]) == 0


def test_single_split_folder_layout(tmp_path):
  _copy_images(tmp_path / "three")
  source = data.load_source(f"folder:{tmp_path / 'three'}")

  assert source.splits == ("train",)
  assert source.class_names == ("cat", "dog", "ship")
  assert source.split_size("train") == 15
  assert source.split_labels("train").tolist() == [0] * 5 + [1] * 5 + [2] * 5


def test_single_split_folder_has_no_test(tmp_path):
  _copy_images(tmp_path / "three")
  source = data.load_source(f"folder:{tmp_path / 'three'}")

  with pytest.raises(ValueError, match="split 'test' not found"):
    source.split_dataset("test")


def test_one_class_folder_rejected(tmp_path):
  folder = _copy_images(tmp_path / "one", classes=("cat",))

  with pytest.raises(ValueError, match="at least two") as raised:
    data.load_source(f"folder:{folder}")
  assert str(folder) in str(raised.value)


def test_missing_folder_rejected(tmp_path):
  missing = tmp_path / "nowhere"

  with pytest.raises(ValueError, match="not found") as raised:
    data.load_source(f"folder:{missing}")
  assert str(missing) in str(raised.value)


def test_unknown_dataset_rejected():
  with pytest.raises(ValueError, match="unknown dataset 'no_such_set'"):
    data.load_source("no_such_set")


def test_path_without_prefix_rejected(tmp_path):
  with pytest.raises(ValueError, match="did you mean folder:"):
    data.load_source(str(tmp_path))


# TFRecord sources.


def _write_records(path, files_and_labels, with_text=False):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for file_path, label in files_and_labels:
      feature = {
          "image/encoded": tf.train.Feature(
              bytes_list=tf.train.BytesList(value=[file_path.read_bytes()])),
          "image/class/label": tf.train.Feature(
              int64_list=tf.train.Int64List(value=[label])),
      }
      if with_text:
        feature["image/class/text"] = tf.train.Feature(
            bytes_list=tf.train.BytesList(
                value=[CIFAR10_CLASSES[label - 1].encode()]))
      example = tf.train.Example(features=tf.train.Features(feature=feature))
      writer.write(example.SerializeToString())


@pytest.fixture(scope="module")
def tfrecord_files(tmp_path_factory):
  """Train files (2 x 12 records) and a validation file (6 records).

  Labels are 1-based, as TF Model Garden writes ImageNet: cat is 4.
  """
  folder = tmp_path_factory.mktemp("records")
  images = {
      name: sorted((cifar10_dir() / "train" / name).glob("*.jpg"))[:10]
      for name in ("cat", "dog", "ship")
  }
  labels = {name: CIFAR10_CLASSES.index(name) + 1 for name in images}
  entries = [(path, labels[name]) for position in range(10)
             for name, paths in images.items() for path in paths[position:position + 1]]
  _write_records(folder / "train-00000-of-00002", entries[:12], with_text=True)
  _write_records(folder / "train-00001-of-00002", entries[12:24],
                 with_text=True)
  _write_records(folder / "validation-00000-of-00001", entries[24:],
                 with_text=True)
  return folder, entries


def test_tfrecord_splits_from_names(tfrecord_files):
  folder, _ = tfrecord_files
  source = data.load_source(f"tfrecord:{folder}/*", label_offset=1)

  assert source.splits == ("train", "validation")
  assert source.split_size("train") == 24
  assert source.split_size("validation") == 6


def test_tfrecord_labels_match_written(tfrecord_files):
  folder, entries = tfrecord_files
  source = data.load_source(f"tfrecord:{folder}/*", label_offset=1)

  expected = [label - 1 for _, label in entries[:24]]
  assert source.split_labels("train").tolist() == expected
  assert source.num_classes == 9


def test_tfrecord_class_names_from_text(tfrecord_files):
  folder, _ = tfrecord_files
  source = data.load_source(f"tfrecord:{folder}/*", label_offset=1)

  assert source.class_names[3] == "cat"
  assert source.class_names[0] == "class_0"


def test_tfrecord_images_match_jpeg_decode(tfrecord_files):
  folder, entries = tfrecord_files
  source = data.load_source(f"tfrecord:{folder}/*", label_offset=1)

  examples = list(source.split_dataset("validation"))
  for example, (path, label) in zip(examples, entries[24:]):
    expected = tf.io.decode_jpeg(path.read_bytes(), channels=3)
    decoded = tf.io.decode_image(example["encoded"], channels=3)
    assert np.array_equal(decoded.numpy(), expected.numpy()), path
    assert int(example["label"]) == label - 1
  assert examples[0]["path"].numpy().decode().endswith(
      "validation-00000-of-00001:0")


def test_tfrecord_train_only_pattern(tfrecord_files):
  folder, _ = tfrecord_files
  source = data.load_source(f"tfrecord:{folder}/train-*", label_offset=1)

  assert source.splits == ("train",)
  assert source.split_size("train") == 24


def test_tfrecord_negative_label_rejected(tfrecord_files):
  folder, _ = tfrecord_files

  with pytest.raises(ValueError, match="Lower label_offset"):
    data.load_source(f"tfrecord:{folder}/*", label_offset=5)


def test_tfrecord_empty_pattern_rejected(tmp_path):
  with pytest.raises(ValueError, match="no files match"):
    data.load_source(f"tfrecord:{tmp_path}/*.tfrecord")


# TFDS sources.


def test_tfds_mock_cifar10_source():
  with tfds.testing.mock_data(num_examples=12):
    source = data.load_source("cifar10")
    size = source.split_size("train")

  assert source.kind == "tfds"
  assert source.num_classes == 10
  assert size == 12
  assert np.allclose(source.mean, [0.4914, 0.4822, 0.4465])
  assert np.allclose(source.std, [0.2470, 0.2435, 0.2616])


def test_tfds_mock_eval_batch_shape():
  with tfds.testing.mock_data(num_examples=12):
    source = data.load_source("cifar10")
    batches = _take_batches(data.eval_dataset(
        source, "test", batch_size=5, image_size=32, augment="cifar",
        mean=source.mean, std=source.std), 3)

  assert [images.shape for images, _ in batches] == [(5, 32, 32, 3),
                                                      (5, 32, 32, 3),
                                                      (2, 32, 32, 3)]


def test_tfds_mock_builds_search_data():
  config = data.DataConfig(dataset="cifar10", batch_size=4, seed=1)
  with tfds.testing.mock_data(num_examples=16):
    search_data = data.build_search_data(config)
    (images, labels), (val_images, _) = next(iter(search_data.streams))

  assert search_data.train_size == 8
  assert search_data.val_size == 8
  assert search_data.steps_per_epoch == 2
  assert images.shape == (4, 32, 32, 3)
  assert labels.dtype == tf.int32
  assert val_images.shape == (4, 32, 32, 3)


def test_tfds_missing_data_error(tmp_path):
  with pytest.raises(ValueError, match="--download") as raised:
    data.load_source("cifar10", data_dir=str(tmp_path))
  assert "folder:PATH" in str(raised.value)
  assert "--data_dir" in str(raised.value)


# The search split.


def test_portion_split_sizes():
  train, val = data.search_split(50000, mode="portion", train_portion=0.5)

  assert len(train) == 25000
  assert len(val) == 25000


def test_portion_split_disjoint():
  train, val = data.search_split(1001, mode="portion", train_portion=0.3)

  assert len(np.intersect1d(train, val)) == 0
  assert len(train) == 300
  assert len(np.union1d(train, val)) == 1001


def test_fractions_split_class_counts():
  labels = np.repeat(np.arange(4), [400, 200, 40, 2])
  train, val = data.search_split(len(labels), labels, mode="fractions",
                                 train_fraction=0.1, val_fraction=0.025)

  assert np.bincount(labels[train]).tolist() == [40, 20, 4, 1]
  assert np.bincount(labels[val]).tolist() == [10, 5, 1, 1]


def test_fractions_split_disjoint():
  labels = np.repeat(np.arange(10), 100)
  train, val = data.search_split(len(labels), labels, mode="fractions",
                                 train_fraction=0.5, val_fraction=0.5)

  assert len(np.intersect1d(train, val)) == 0
  assert len(train) + len(val) == 1000


@pytest.mark.parametrize("mode", ["portion", "fractions"])
def test_split_same_seed_same(mode):
  labels = np.repeat(np.arange(5), 60)
  first = data.search_split(300, labels, mode=mode, seed=4)
  second = data.search_split(300, labels, mode=mode, seed=4)
  other = data.search_split(300, labels, mode=mode, seed=5)

  assert np.array_equal(first[0], second[0])
  assert np.array_equal(first[1], second[1])
  assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("train_fraction,val_fraction,message", [
    (0.0, 0.1, "train_fraction=0.0 must be > 0"),
    (0.1, -0.1, "val_fraction=-0.1 must be > 0"),
    (0.8, 0.3, "exceeds 1"),
])
def test_fractions_invalid_values_rejected(train_fraction, val_fraction,
                                           message):
  labels = np.repeat(np.arange(2), 10)
  with pytest.raises(ValueError, match=message):
    data.search_split(20, labels, mode="fractions",
                      train_fraction=train_fraction, val_fraction=val_fraction)


def test_portion_invalid_value_rejected():
  with pytest.raises(ValueError, match="train_portion=1.0 is outside"):
    data.search_split(100, mode="portion", train_portion=1.0)


def test_balanced_subset_class_counts():
  labels = np.repeat(np.arange(3), [50, 50, 3])
  chosen = data.balanced_subset(labels, 21, seed=0)

  assert np.bincount(labels[chosen]).tolist() == [9, 9, 3]


# The search streams.


def _cifar_streams(source, subsets, **overrides):
  arguments = dict(batch_size=8, image_size=32, augment="cifar",
                   mean=source.mean, std=source.std, seed=7)
  arguments.update(overrides)
  return data.search_streams(source, subsets[0], subsets[1], **arguments)


def test_streams_same_seed_identical(cifar_source, small_subsets):
  first = _take_batches(_cifar_streams(cifar_source, small_subsets), 2)
  second = _take_batches(_cifar_streams(cifar_source, small_subsets), 2)
  other = _take_batches(_cifar_streams(cifar_source, small_subsets, seed=8), 2)

  assert _batches_equal(first, second)
  assert not _batches_equal(first, other)


def test_streams_batch_structure(cifar_source, small_subsets):
  (images, labels), (val_images, val_labels) = next(iter(
      _cifar_streams(cifar_source, small_subsets)))

  assert images.shape == (8, 32, 32, 3)
  assert images.dtype == tf.float32
  assert labels.shape == (8,)
  assert val_images.shape == (8, 32, 32, 3)
  assert val_labels.dtype == tf.int32


@pytest.mark.parametrize("cache_limit_bytes", [data.DEFAULT_CACHE_LIMIT_BYTES, 0],
                         ids=["memory", "files"])
def test_streams_resume_matches_start(cifar_source, small_subsets,
                                      cache_limit_bytes):
  # 40 train examples in batches of 8: 5 steps per epoch, so steps 3..9
  # cross the boundary of epoch 0 and 1.
  full = _take_batches(_cifar_streams(
      cifar_source, small_subsets, cache_limit_bytes=cache_limit_bytes), 10)
  resumed = _take_batches(_cifar_streams(
      cifar_source, small_subsets, start_step=3,
      cache_limit_bytes=cache_limit_bytes), 7)

  for step in range(3, 10):
    assert _batches_equal(full[step], resumed[step - 3]), step


def test_cached_and_streamed_batches_equal(cifar_source, small_subsets):
  cached = _take_batches(_cifar_streams(cifar_source, small_subsets), 3)
  streamed = _take_batches(_cifar_streams(
      cifar_source, small_subsets, cache_limit_bytes=0), 3)

  assert _batches_equal(cached, streamed)


def test_epoch_visits_every_train_example(cifar_source, small_subsets):
  train, _ = small_subsets
  labels = cifar_source.split_labels("train")
  batches = _take_batches(_cifar_streams(cifar_source, small_subsets), 5)

  epoch_labels = np.concatenate([batch[0][1] for batch in batches])
  assert np.bincount(epoch_labels, minlength=10).tolist() == np.bincount(
      labels[train], minlength=10).tolist()


def test_tfrecord_streams_resume_matches_start(tfrecord_files):
  folder, _ = tfrecord_files
  source = data.load_source(f"tfrecord:{folder}/*", label_offset=1)
  arguments = dict(batch_size=4, image_size=24, augment="imagenet", mean=None,
                   std=None, seed=2)
  train, val = np.arange(0, 24, 2), np.arange(1, 24, 2)

  # 12 train examples in batches of 4: steps 2..5 cross into epoch 1.
  full = _take_batches(data.search_streams(source, train, val, **arguments), 6)
  resumed = _take_batches(data.search_streams(
      source, train, val, start_step=2, **arguments), 4)

  assert full[0][0][0].shape == (4, 24, 24, 3)
  for step in range(2, 6):
    assert _batches_equal(full[step], resumed[step - 2]), step


def test_tfrecord_stream_epochs_shuffled(tfrecord_files):
  folder, _ = tfrecord_files
  source = data.load_source(f"tfrecord:{folder}/*", label_offset=1)
  train, val = np.arange(0, 24, 2), np.arange(1, 24, 2)
  batches = _take_batches(data.search_streams(
      source, train, val, batch_size=4, image_size=32, augment="none",
      mean=None, std=None, seed=2, cache_limit_bytes=0), 6)

  in_order = source.split_labels("train")[train]
  epoch_0 = np.concatenate([batch[0][1] for batch in batches[:3]])
  epoch_1 = np.concatenate([batch[0][1] for batch in batches[3:]])
  assert sorted(epoch_0) == sorted(in_order)
  assert not np.array_equal(epoch_0, in_order)
  assert not np.array_equal(epoch_0, epoch_1)


def test_streams_feed_two_replicas(cifar_source, small_subsets):
  strategy = two_replica_strategy()
  streams = _cifar_streams(cifar_source, small_subsets)
  (images, _), _ = next(iter(strategy.experimental_distribute_dataset(streams)))

  shapes = [tuple(part.shape) for part in images.values]
  assert shapes == [(4, 32, 32, 3), (4, 32, 32, 3)]


def test_build_search_data_folder_subset(cifar_source):
  config = data.DataConfig(dataset=cifar_source.name, batch_size=16,
                           max_train_examples=200, seed=0)
  search_data = data.build_search_data(config)
  (images, _), _ = next(iter(search_data.streams))

  assert search_data.train_size == 100
  assert search_data.val_size == 100
  assert search_data.steps_per_epoch == 6
  assert search_data.image_size == 32
  assert search_data.augment == "cifar"
  assert images.shape == (16, 32, 32, 3)


def test_streams_from_matches_rebuild(tmp_path):
  folder = _copy_images(tmp_path / "images", per_class=12)
  config = data.DataConfig(dataset=f"folder:{folder}", batch_size=4, seed=5)
  search_data = data.build_search_data(config)
  rebuilt = data.build_search_data(config, start_step=5)

  # 36 images: 18 train, 4 steps per epoch, so step 5 is inside epoch 1.
  assert search_data.steps_per_epoch == 4
  assert _batches_equal(_take_batches(search_data.streams_from(5), 3),
                        _take_batches(rebuilt.streams, 3))
  assert _batches_equal(_take_batches(search_data.streams, 6)[5],
                        _take_batches(rebuilt.streams, 1)[0])


# Decoding and augmentation.


@pytest.fixture(scope="module")
def cat_image():
  path = sorted((cifar10_dir() / "train" / "cat").glob("*.jpg"))[0]
  return tf.io.decode_jpeg(path.read_bytes(), channels=3)


def test_cifar_augment_output_shape(cat_image):
  image = data.preprocess_image(cat_image, "cifar", 32, seed=[1, 2])

  assert image.shape == (32, 32, 3)
  assert image.dtype == tf.float32


def test_cifar_augment_depends_on_seed(cat_image):
  first = data.preprocess_image(cat_image, "cifar", 32, seed=[1, 2])
  again = data.preprocess_image(cat_image, "cifar", 32, seed=[1, 2])
  other = data.preprocess_image(cat_image, "cifar", 32, seed=[1, 3])

  assert np.array_equal(first.numpy(), again.numpy())
  assert not np.array_equal(first.numpy(), other.numpy())


def test_imagenet_augment_output_shape(cat_image):
  image = data.preprocess_image(cat_image, "imagenet", 24, seed=[1, 2])

  assert image.shape == (24, 24, 3)


def test_imagenet_eval_output_shape():
  wide = tf.zeros([300, 500, 3], tf.uint8)
  image = data.preprocess_image(wide, "imagenet", 224, training=False)

  assert image.shape == (224, 224, 3)


def test_none_augment_ignores_seed(cat_image):
  first = data.preprocess_image(cat_image, "none", 32, seed=[1, 2])
  other = data.preprocess_image(cat_image, "none", 32, seed=[5, 6])
  plain = tf.image.convert_image_dtype(cat_image, tf.float32)

  assert np.array_equal(first.numpy(), other.numpy())
  assert np.array_equal(first.numpy(), plain.numpy())


def test_normalization_uses_mean_std(cat_image):
  mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
  image = data.preprocess_image(cat_image, "none", 32, mean, std)
  plain = tf.image.convert_image_dtype(cat_image, tf.float32).numpy()

  assert np.allclose(image.numpy(), (plain - mean) / std, atol=1e-6)


def test_unknown_augment_rejected(cat_image):
  with pytest.raises(ValueError, match="unknown augment mode 'autoaugment'"):
    data.preprocess_image(cat_image, "autoaugment", 32)


# Corrupt images.


@pytest.fixture()
def corrupt_folder(tmp_path):
  """Two classes of 8 JPEGs; the first dog file is cut in half."""
  folder = _copy_images(tmp_path / "images", classes=("cat", "dog"),
                        per_class=8)
  broken = sorted((folder / "dog").glob("*.jpg"))[0]
  content = broken.read_bytes()
  broken.write_bytes(content[:len(content) // 2])
  return folder, str(broken)


def test_corrupt_image_eval_names_path(corrupt_folder):
  folder, broken = corrupt_folder
  source = data.load_source(f"folder:{folder}")
  dataset = data.eval_dataset(source, "train", 4, 32, "none", None, None)

  with pytest.raises(tf.errors.InvalidArgumentError) as raised:
    _take_batches(dataset, 4)
  assert broken in raised.value.message


def test_corrupt_image_streamed_names_path(corrupt_folder):
  folder, broken = corrupt_folder
  source = data.load_source(f"folder:{folder}")
  dataset = data.search_streams(source, np.arange(16), np.arange(16), 16, 32,
                                "cifar", None, None, 0, cache_limit_bytes=0)

  with pytest.raises(tf.errors.InvalidArgumentError) as raised:
    next(iter(dataset))
  assert broken in raised.value.message


def test_corrupt_image_cached_names_path(corrupt_folder):
  folder, broken = corrupt_folder
  source = data.load_source(f"folder:{folder}")

  with pytest.raises(ValueError, match="skip_corrupt_images") as raised:
    data.search_streams(source, np.arange(8), np.arange(8, 16), 4, 32, "cifar",
                        None, None, 0)
  assert broken in str(raised.value)


@pytest.mark.parametrize("cache_limit_bytes", [data.DEFAULT_CACHE_LIMIT_BYTES, 0],
                         ids=["memory", "files"])
def test_skip_corrupt_images_skips_file(corrupt_folder, cache_limit_bytes):
  folder, broken = corrupt_folder
  config = data.DataConfig(dataset=f"folder:{folder}", batch_size=2,
                           skip_corrupt_images=True,
                           cache_limit_bytes=cache_limit_bytes)
  search_data = data.build_search_data(config)
  batches = _take_batches(search_data.streams, 8)

  assert search_data.skipped_images == (broken,)
  assert search_data.train_size + search_data.val_size == 15
  assert len(batches) == 8


def test_eval_skips_corrupt_image(corrupt_folder):
  folder, _ = corrupt_folder
  source = data.load_source(f"folder:{folder}", skip_corrupt_images=True)
  batches = _take_batches(
      data.eval_dataset(source, "train", 4, 32, "none", None, None), 10)

  assert sum(len(labels) for _, labels in batches) == 15


def test_find_corrupt_images_lists_file(corrupt_folder):
  folder, broken = corrupt_folder
  source = data.load_source(f"folder:{folder}")

  assert data.find_corrupt_images(source) == [(8, broken)]


# Normalization statistics.


def test_measured_mean_std_near_cifar(cifar_source):
  mean, std = data.measure_mean_std(cifar_source, sample=2000, seed=0)

  assert mean.dtype == np.float32
  assert np.abs(mean - [0.4914, 0.4822, 0.4465]).max() < 0.02
  assert np.abs(std - [0.2470, 0.2435, 0.2616]).max() < 0.02


def test_measured_mean_std_reproducible(cifar_source):
  first = data.measure_mean_std(cifar_source, sample=50, seed=1)
  second = data.measure_mean_std(cifar_source, sample=50, seed=1)

  assert np.array_equal(first[0], second[0])
  assert np.array_equal(first[1], second[1])

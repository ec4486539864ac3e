"""The held-out validation examples of a retrain (validation_examples).

The data here is a folder of 100 training and 20 test images linked from the
real CIFAR-10 folder (10 and 2 per class), and the same training images
written as TFRecords, with 10 of the test images as a "validation" split.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, link_cifar10_subset
from tf_adarts import data as data_lib
from tf_adarts import retrain
from tf_adarts import retrain_data

_TRAIN_PER_CLASS = 10
_TEST_PER_CLASS = 2
_TRAIN_SIZE = 10 * _TRAIN_PER_CLASS
# The tiny preset trains on 64 examples in batches of 16: 4 steps per epoch.
_MAX_TRAIN_EXAMPLES = 64
_BATCH_SIZE = 16
_HELD_OUT = 20


@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory):
  """A folder dataset of symbolic links to a few real CIFAR-10 images."""
  return link_cifar10_subset(tmp_path_factory.mktemp("cifar_small"),
                             {"train": _TRAIN_PER_CLASS,
                              "test": _TEST_PER_CLASS})


@pytest.fixture(scope="module")
def train_labels(small_cifar):
  return data_lib.load_source(f"folder:{small_cifar}").split_labels("train")


def _write_records(path, files, labels):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for file_path, label in zip(files, labels):
      with open(file_path, "rb") as stream:
        encoded = stream.read()
      feature = {
          "image/encoded": tf.train.Feature(
              bytes_list=tf.train.BytesList(value=[encoded])),
          "image/class/label": tf.train.Feature(
              int64_list=tf.train.Int64List(value=[int(label)])),
      }
      example = tf.train.Example(features=tf.train.Features(feature=feature))
      writer.write(example.SerializeToString())


@pytest.fixture(scope="module")
def train_records(small_cifar, tmp_path_factory):
  """The folder as TFRecords: train-* in the folder's index order.

  validation-* contains every other test image (10), so that the dataset's
  evaluation split is named "validation".
  """
  source = data_lib.load_source(f"folder:{small_cifar}")
  folder = tmp_path_factory.mktemp("records")
  _write_records(folder / "train-00000-of-00001", source.file_paths("train"),
                 source.split_labels("train"))
  _write_records(folder / "validation-00000-of-00001",
                 source.file_paths("test")[::2],
                 source.split_labels("test")[::2])
  return folder


def _tiny_config(data_root, **changes):
  changes.setdefault("dataset", f"folder:{data_root}")
  return retrain.get_preset("tiny").replace(**changes)


def _build_data(dataset, **changes):
  """Build retrain data without augmentation, so images can be compared."""
  arguments = dict(batch_size=_BATCH_SIZE, seed=0, augment="none",
                   cutout_size=0, max_train_examples=_MAX_TRAIN_EXAMPLES,
                   validation_examples=_HELD_OUT)
  arguments.update(changes)
  return retrain_data.build_retrain_data(dataset, **arguments)


# Choosing the examples.


def test_held_out_disjoint_from_training(train_labels):
  for max_train_examples in (None, 30, _MAX_TRAIN_EXAMPLES):
    train, held_out = retrain_data.select_examples(
        train_labels, max_train_examples, _HELD_OUT, seed=0)
    assert len(held_out) == _HELD_OUT
    assert not np.intersect1d(train, held_out).size, max_train_examples
  train, _ = retrain_data.select_examples(train_labels, None, _HELD_OUT, 0)
  assert len(train) == _TRAIN_SIZE - _HELD_OUT


def test_held_out_class_balanced(train_labels):
  _, held_out = retrain_data.select_examples(train_labels, None, 20, seed=0)
  assert np.bincount(train_labels[held_out], minlength=10).tolist() == [2] * 10
  _, held_out = retrain_data.select_examples(train_labels, None, 25, seed=0)
  counts = np.bincount(train_labels[held_out], minlength=10)
  assert counts.sum() == 25
  assert counts.max() - counts.min() <= 1


def test_training_subset_class_balanced(train_labels):
  train, _ = retrain_data.select_examples(train_labels, _MAX_TRAIN_EXAMPLES,
                                          _HELD_OUT, seed=0)
  counts = np.bincount(train_labels[train], minlength=10)
  assert counts.sum() == _MAX_TRAIN_EXAMPLES
  assert counts.max() - counts.min() <= 1


def test_held_out_deterministic(train_labels):
  first = retrain_data.select_examples(train_labels, _MAX_TRAIN_EXAMPLES,
                                       _HELD_OUT, seed=3)
  again = retrain_data.select_examples(train_labels, _MAX_TRAIN_EXAMPLES,
                                       _HELD_OUT, seed=3)
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  other_seed = retrain_data.select_examples(train_labels, _MAX_TRAIN_EXAMPLES,
                                            _HELD_OUT, seed=4)
  assert not np.array_equal(first[1], other_seed[1])


def test_held_out_ignores_subset_size(train_labels):
  _, reference = retrain_data.select_examples(train_labels, None, _HELD_OUT,
                                              seed=0)
  for max_train_examples in (10, 30, _MAX_TRAIN_EXAMPLES, 80):
    _, held_out = retrain_data.select_examples(
        train_labels, max_train_examples, _HELD_OUT, seed=0)
    np.testing.assert_array_equal(held_out, reference)


def test_zero_keeps_training_examples(small_cifar, train_labels):
  # The training examples chosen before validation_examples existed.
  expected = data_lib.balanced_subset(train_labels, _MAX_TRAIN_EXAMPLES, 5)
  for extra in ({}, {"validation_examples": 0}):
    data = retrain_data.build_retrain_data(
        f"folder:{small_cifar}", _BATCH_SIZE, seed=5,
        max_train_examples=_MAX_TRAIN_EXAMPLES, **extra)
    np.testing.assert_array_equal(data.indices, expected)
    assert data.validation_size == 0
    assert data.train_size == _MAX_TRAIN_EXAMPLES
  whole = retrain_data.build_retrain_data(f"folder:{small_cifar}",
                                          _BATCH_SIZE, validation_examples=0)
  np.testing.assert_array_equal(whole.indices, np.arange(_TRAIN_SIZE))


def test_zero_has_no_validation_stream(small_cifar):
  data = retrain_data.build_retrain_data(f"folder:{small_cifar}", _BATCH_SIZE)
  with pytest.raises(ValueError, match="validation_examples > 0"):
    data.validation_stream(8)


# The storage paths: decoded in memory, files, records.


def _storage_data(storage, small_cifar, train_records):
  if storage == "memory":
    data = _build_data(f"folder:{small_cifar}")
  elif storage == "files":
    data = _build_data(f"folder:{small_cifar}", cache_limit_bytes=0)
  else:
    data = _build_data(f"tfrecord:{train_records}/train-*",
                       cache_limit_bytes=0)
  assert data.storage == storage
  return data


def _stack(dataset):
  images, labels = [], []
  for batch_images, batch_labels in dataset:
    images.append(batch_images.numpy())
    labels.append(batch_labels.numpy())
  return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("storage", ["memory", "files", "records"])
def test_stream_never_yields_held_out(storage, small_cifar, train_records):
  data = _storage_data(storage, small_cifar, train_records)
  steps = _MAX_TRAIN_EXAMPLES // _BATCH_SIZE
  train_images, _ = _stack(data.train_stream(0).take(steps))
  held_out_images, held_out_labels = _stack(data.validation_stream(8))

  assert len(held_out_images) == _HELD_OUT
  assert np.bincount(held_out_labels, minlength=10).tolist() == [2] * 10
  # Without augmentation one epoch yields each training image once.
  assert len(np.unique(train_images.reshape([steps * _BATCH_SIZE, -1]),
                       axis=0)) == _MAX_TRAIN_EXAMPLES
  same = np.all(train_images[:, None] == held_out_images[None],
                axis=(2, 3, 4))
  assert not same.any()


def test_held_out_same_in_every_storage(small_cifar, train_records):
  reference_images, reference_labels = _stack(
      _storage_data("memory", small_cifar, train_records).validation_stream(8))
  for storage in ("files", "records"):
    data = _storage_data(storage, small_cifar, train_records)
    images, labels = _stack(data.validation_stream(8))
    np.testing.assert_array_equal(labels, reference_labels)
    np.testing.assert_allclose(images, reference_images, atol=1e-6)


# A tiny retrain with held-out examples.


def _event_scalars(log_dir):
  """Return {tag: {step: value}} of the TensorBoard events under log_dir."""
  scalars = {}
  for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        number = float(tf.make_ndarray(value.tensor))
        scalars.setdefault(value.tag, {})[event.step] = number
  return scalars


@pytest.fixture(scope="module")
def validated_run(small_cifar, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("retrain") / "run"
  config = _tiny_config(small_cifar, validation_examples=_HELD_OUT)
  result = retrain.run_retrain(config, str(model_dir), verbose=0,
                               eval_every_epochs=1)
  return model_dir, result


def test_result_has_validation_metrics(validated_run):
  model_dir, result = validated_run
  stored = json.loads((model_dir / "result.json").read_text())
  assert stored == pytest.approx(result.metrics)
  assert stored["validation_examples"] == _HELD_OUT
  assert 0.0 <= stored["validation_top1"] <= stored["validation_top5"] <= 1.0
  assert np.isfinite(stored["validation_loss"])
  assert stored["validation_loss"] > 0.0


def test_split_metrics_kept_apart(validated_run):
  _, result = validated_run
  assert result.metrics["test_examples"] == 10 * _TEST_PER_CLASS
  assert "test_top1" in result.metrics


def test_config_stores_validation_examples(validated_run):
  model_dir, _ = validated_run
  stored = json.loads((model_dir / "config.json").read_text())
  assert stored["validation_examples"] == _HELD_OUT


def test_validation_tensorboard_scalars(validated_run):
  model_dir, result = validated_run
  scalars = _event_scalars(str(model_dir / "logs" / "validation"))
  steps_per_epoch = result.steps // 2
  for tag in ("loss", "top1", "top5"):
    assert sorted(scalars[tag]) == [steps_per_epoch, result.steps], tag
  final = scalars["top1"][result.steps]
  assert final == pytest.approx(result.metrics["validation_top1"])


def test_validation_matches_final_weights(validated_run, small_cifar):
  # Evaluating the last checkpoint on the held-out examples with the eval
  # transform gives the metrics that the retrain stored.
  model_dir, result = validated_run
  meta = json.loads((model_dir / "run_meta.json").read_text())
  network = retrain.network_from_meta(meta)
  checkpoint = tf.train.Checkpoint(**retrain._network_items(network))  # pylint: disable=protected-access
  checkpoint.restore(tf.train.latest_checkpoint(
      str(model_dir / "checkpoints"))).expect_partial()
  config = _tiny_config(small_cifar, validation_examples=_HELD_OUT)
  data = retrain_data.build_retrain_data(
      config.dataset, config.batch_size, seed=config.seed,
      augment=config.augment, cutout_size=config.cutout,
      max_train_examples=config.max_train_examples,
      validation_examples=config.validation_examples)
  metrics = retrain.evaluate_network(network, data.validation_stream(256))
  assert metrics["examples"] == _HELD_OUT
  assert metrics["top1"] == pytest.approx(result.metrics["validation_top1"])
  assert metrics["loss"] == pytest.approx(result.metrics["validation_loss"],
                                          rel=1e-4)


def test_validation_split_reported_as_test(train_records, tmp_path):
  # The records' evaluation split is named "validation", so its metrics
  # move to test_* and validation_* stay the held-out examples'.
  config = retrain.get_preset("tiny").replace(
      dataset=f"tfrecord:{train_records}/*", epochs=1,
      validation_examples=_HELD_OUT)
  result = retrain.run_retrain(config, str(tmp_path / "run"), verbose=0,
                               eval_every_epochs=1)
  assert result.metrics["test_examples"] == 10
  assert result.metrics["validation_examples"] == _HELD_OUT
  assert 0.0 <= result.metrics["test_top1"] <= 1.0


def test_changed_validation_examples_rejected(validated_run, small_cifar):
  model_dir, _ = validated_run
  config = _tiny_config(small_cifar, validation_examples=10)
  with pytest.raises(retrain.RetrainError,
                     match="validation_examples: 20 -> 10"):
    retrain.run_retrain(config, str(model_dir), verbose=0)


# Bad values.


def test_negative_validation_examples_rejected(small_cifar, tmp_path):
  config = _tiny_config(small_cifar, validation_examples=-1)
  with pytest.raises(retrain.RetrainError, match="validation_examples=-1"):
    retrain.run_retrain(config, str(tmp_path / "run"), verbose=0)
  assert not (tmp_path / "run" / "config.json").exists()


def test_select_rejects_negative(train_labels):
  with pytest.raises(ValueError, match="validation_examples=-5 is negative"):
    retrain_data.select_examples(train_labels, None, -5)


def test_held_out_plus_subset_too_large(small_cifar, tmp_path):
  config = _tiny_config(small_cifar, validation_examples=40)
  with pytest.raises(retrain.RetrainError) as error:
    retrain.run_retrain(config, str(tmp_path / "run"), verbose=0)
  message = str(error.value)
  assert "validation_examples=40 plus max_train_examples=64" in message
  assert f"the {_TRAIN_SIZE} examples of the train split" in message


def test_held_out_leaves_no_batch(small_cifar, tmp_path):
  config = _tiny_config(small_cifar, max_train_examples=None,
                        validation_examples=90)
  with pytest.raises(retrain.RetrainError) as error:
    retrain.run_retrain(config, str(tmp_path / "run"), verbose=0)
  message = str(error.value)
  assert "10 examples left" in message
  assert "validation_examples=90" in message
  assert "batch_size=16" in message


def test_held_out_whole_split_rejected(train_labels):
  with pytest.raises(ValueError, match="leaves none of the 100 examples"):
    retrain_data.select_examples(train_labels, None, _TRAIN_SIZE)


def test_binary_rejects_negative_flag(small_cifar, tmp_path):
  completed = subprocess.run(
      [sys.executable, "-m", "train.retrain", "--preset=tiny",
       f"--dataset=folder:{small_cifar}", f"--model_dir={tmp_path / 'run'}",
       "--validation_examples=-2", "--verbose=0"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 1, completed.stderr[-2000:]
  assert "validation_examples=-2" in completed.stderr

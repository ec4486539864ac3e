"""The retrain job and evaluation: run directory, resume, losses, bad input.

The retrains here use the `tiny` preset on a folder of 80 training and 40
test images linked from the real CIFAR-10 folder.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, link_cifar10_subset, two_replica_strategy
from tf_adarts import retrain
from tf_adarts import retrain_data
from tf_adarts import trainer

_TRAIN_PER_CLASS = 8
_TEST_PER_CLASS = 4
# The tiny preset trains on 64 of the 80 images in batches of 16.
_STEPS_PER_EPOCH = 64 // 16


@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory):
  """A folder dataset of symbolic links to a few real CIFAR-10 images."""
  return link_cifar10_subset(tmp_path_factory.mktemp("cifar_small"),
                             {"train": _TRAIN_PER_CLASS,
                              "test": _TEST_PER_CLASS})


def _tiny_config(data_root, **changes):
  changes.setdefault("dataset", f"folder:{data_root}")
  return retrain.get_preset("tiny").replace(**changes)


def _event_tags(log_dir):
  tags = set()
  for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"),
                        recursive=True):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags.add((os.path.basename(os.path.dirname(path)), value.tag))
  return tags


@pytest.fixture(scope="module")
def finished_run(small_cifar, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("retrain") / "run"
  result = retrain.run_retrain(_tiny_config(small_cifar), str(model_dir),
                               checkpoint_every_steps=3, verbose=0,
                               summary_every_steps=1, eval_every_epochs=1)
  return model_dir, result


# The run directory.


def test_run_directory_files(finished_run):
  model_dir, _ = finished_run
  for name in ("config.json", "run_meta.json", "result.json",
               "checkpoints/checkpoint"):
    assert (model_dir / name).exists(), name


def test_checkpoints_at_steps(finished_run):
  model_dir, result = finished_run
  assert result.steps == 2 * _STEPS_PER_EPOCH
  assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith(
      f"ckpt-{result.steps}")


def test_run_meta_contents(finished_run):
  model_dir, _ = finished_run
  meta = json.loads((model_dir / "run_meta.json").read_text())
  assert meta["network_class"] == "NetworkCIFAR"
  assert meta["channels"] == 8
  assert meta["layers"] == 3
  assert meta["auxiliary"] is True
  assert meta["image_size"] == 32
  assert len(meta["class_names"]) == 10
  assert len(meta["mean"]) == 3
  assert len(meta["std"]) == 3
  assert meta["params"] > 0
  assert meta["flops"] > 0
  assert len(meta["genotype"]["normal"]) == 8


def test_tensorboard_tags(finished_run):
  model_dir, _ = finished_run
  tags = _event_tags(str(model_dir / "logs"))
  for tag in ("loss", "top1", "top5", "learning_rate", "drop_path_rate"):
    assert ("train", tag) in tags, tag
  for tag in ("loss", "top1", "top5"):
    assert ("test", tag) in tags, tag


def test_finished_run_returns_early(finished_run, small_cifar):
  model_dir, result = finished_run
  again = retrain.run_retrain(_tiny_config(small_cifar), str(model_dir),
                              verbose=0)
  assert again.already_finished
  assert again.metrics["steps"] == result.steps


def test_evaluate_writes_eval_json(finished_run):
  model_dir, _ = finished_run
  metrics = retrain.evaluate_run(str(model_dir))
  stored = json.loads((model_dir / "eval.json").read_text())
  assert stored["examples"] == 10 * _TEST_PER_CLASS
  assert 0.0 <= stored["top1"] <= 1.0
  assert 0.0 <= stored["top5"] <= 1.0
  assert stored["top1"] <= stored["top5"]
  assert stored["top1"] == pytest.approx(metrics["top1"])


def test_evaluate_matches_logged_test(finished_run):
  # The final test metrics logged by training come from the same weights.
  model_dir, result = finished_run
  metrics = retrain.evaluate_run(str(model_dir))
  assert metrics["top1"] == pytest.approx(result.metrics["test_top1"])


def test_evaluate_without_meta(tmp_path):
  with pytest.raises(retrain.RetrainError, match="run_meta.json"):
    retrain.evaluate_run(str(tmp_path))


# Bad input.


def test_unknown_genotype_rejected(small_cifar, tmp_path):
  config = _tiny_config(small_cifar, genotype="NO_SUCH_GENOTYPE")
  with pytest.raises(retrain.RetrainError, match="NO_SUCH_GENOTYPE"):
    retrain.run_retrain(config, str(tmp_path / "run"), verbose=0)
  assert not (tmp_path / "run" / "config.json").exists()


def test_search_dir_without_genotype(small_cifar, tmp_path):
  config = _tiny_config(small_cifar, genotype=str(tmp_path))
  with pytest.raises(retrain.RetrainError, match="genotype.json"):
    retrain.run_retrain(config, str(tmp_path / "run"), verbose=0)


def test_changed_settings_rejected(finished_run, small_cifar):
  model_dir, _ = finished_run
  config = _tiny_config(small_cifar, learning_rate=0.5, cutout=4)
  with pytest.raises(retrain.RetrainError) as error:
    retrain.run_retrain(config, str(model_dir), verbose=0)
  assert "learning_rate: 0.05 -> 0.5" in str(error.value)
  assert "cutout: 8 -> 4" in str(error.value)


def test_unknown_preset_rejected():
  with pytest.raises(ValueError, match="cpu_smoke"):
    retrain.get_preset("huge")


# The step: decay, clipping, auxiliary weight.


def test_coupled_weight_decay():
  variable = tf.Variable([2.0, -4.0])
  optimizer = tf.keras.optimizers.SGD(learning_rate=1.0, momentum=0.0)
  trainer.apply_coupled_gradients(optimizer, [tf.constant([0.5, 0.5])],
                                  [variable], decay=0.1)
  # v - lr * (g + decay * v): 2 - (0.5 + 0.2), -4 - (0.5 - 0.4).
  np.testing.assert_allclose(variable.numpy(), [1.3, -4.1], rtol=1e-6)


def test_clip_before_decay():
  variable = tf.Variable([1.0, 1.0])
  optimizer = tf.keras.optimizers.SGD(learning_rate=1.0, momentum=0.0)
  trainer.apply_coupled_gradients(optimizer, [tf.constant([3.0, 4.0])],
                                  [variable], decay=0.5, clip_norm=1.0)
  # The gradient [3, 4] is clipped to [0.6, 0.8], then 0.5 * v is added.
  np.testing.assert_allclose(variable.numpy(), [-0.1, -0.3], rtol=1e-6)


class _FixedOutputs:
  """Stands in for a network: returns fixed (logits, aux_logits)."""

  num_classes = 3

  def __init__(self, logits, aux_logits):
    self.logits = tf.constant(logits, tf.float32)
    self.aux_logits = tf.constant(aux_logits, tf.float32)

  def __call__(self, images, training=None, seed=None):
    return self.logits, self.aux_logits


def test_auxiliary_loss_weight():
  logits = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
  aux_logits = [[0.0, 0.0, 0.0], [0.0, 0.0, 3.0]]
  labels = tf.constant([0, 1])
  step = retrain.RetrainStep(_FixedOutputs(logits, aux_logits), None,
                             global_batch_size=2, weight_decay=0.0,
                             clip_norm=None, label_smoothing=0.1,
                             auxiliary_weight=0.4, seed=0)
  loss, _ = step.loss(tf.zeros([2, 1]), labels, None)

  def cross_entropy(rows):
    rows = np.asarray(rows)
    log_softmax = rows - np.log(np.exp(rows).sum(1, keepdims=True))
    targets = np.eye(3)[[0, 1]] * 0.9 + 0.1 / 3
    return float(np.mean(-(targets * log_softmax).sum(1)))

  expected = cross_entropy(logits) + 0.4 * cross_entropy(aux_logits)
  assert float(loss) == pytest.approx(expected, rel=1e-5)


# Data.


def test_cutout_is_seeded():
  image = tf.ones([32, 32, 3])
  seed = tf.constant([1, 2], tf.int64)
  first = retrain_data.cutout(image, 16, seed).numpy()
  second = retrain_data.cutout(image, 16, seed).numpy()
  np.testing.assert_array_equal(first, second)
  zeroed = int((first[..., 0] == 0).sum())
  assert 0 < zeroed <= 16 * 16


def test_stream_resumes_at_step(small_cifar):
  data = retrain_data.build_retrain_data(
      f"folder:{small_cifar}", batch_size=16, seed=3, cutout_size=8)
  from_start = [batch for batch in data.train_stream(0).take(7)]
  resumed = next(iter(data.train_stream(6)))
  np.testing.assert_array_equal(resumed[1].numpy(), from_start[6][1].numpy())
  np.testing.assert_allclose(resumed[0].numpy(), from_start[6][0].numpy())


# Resume after a kill, and the binary.


def _retrain_command(model_dir, data_root, *extra):
  return [sys.executable, "-m", "train.retrain", "--preset=tiny",
          f"--dataset=folder:{data_root}", f"--model_dir={model_dir}",
          "--verbose=0", *extra]


def test_killed_retrain_resumes(small_cifar, tmp_path):
  model_dir = tmp_path / "run"
  command = _retrain_command(model_dir, small_cifar, "--epochs=8",
                            "--checkpoint_every_steps=1")
  process = subprocess.Popen(command, cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while not list((model_dir / "checkpoints").glob("ckpt-2.index")):
      assert process.poll() is None, "the retrain ended before a checkpoint"
      assert time.time() < deadline, "no checkpoint within 120 s"
      time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
  finally:
    if process.poll() is None:
      process.kill()
  assert not (model_dir / "result.json").exists()

  again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300, check=False)
  assert again.returncode == 0, again.stderr[-2000:]
  result = json.loads((model_dir / "result.json").read_text())
  assert result["steps"] == 8 * _STEPS_PER_EPOCH
  assert "Resumed" in again.stderr
  assert (model_dir / "flags.txt").read_text().startswith("--preset=tiny")


def test_binaries_train_and_evaluate(small_cifar, tmp_path):
  model_dir = tmp_path / "run"
  trained = subprocess.run(
      _retrain_command(model_dir, small_cifar, "--epochs=1"),
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert trained.returncode == 0, trained.stderr[-2000:]
  evaluated = subprocess.run(
      [sys.executable, "-m", "train.evaluate", f"--model_dir={model_dir}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  assert "top-1" in evaluated.stdout
  assert (model_dir / "eval.json").exists()


def test_binary_flagfile_reruns(small_cifar, tmp_path):
  model_dir = tmp_path / "run"
  first = subprocess.run(
      _retrain_command(model_dir, small_cifar, "--epochs=1"),
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert first.returncode == 0, first.stderr[-2000:]
  rerun = subprocess.run(
      [sys.executable, "-m", "train.retrain",
       f"--flagfile={model_dir / 'flags.txt'}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "already finished" in rerun.stdout


def test_mirrored_retrain_finishes(small_cifar, tmp_path):
  strategy = two_replica_strategy()
  result = retrain.run_retrain(_tiny_config(small_cifar, epochs=1),
                               str(tmp_path / "run"), strategy=strategy,
                               verbose=0)
  assert result.steps == _STEPS_PER_EPOCH
  assert np.isfinite(result.metrics["train_loss"])

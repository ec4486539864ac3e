"""The search job: run directory, TensorBoard, resume, and bad input.

The searches here use the `tiny` preset on a class-balanced subset of the
real CIFAR-10 images, read as a folder.
"""

import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, cifar10_dir
from tf_adarts import genotype as genotype_lib
from tf_adarts import presets
from tf_adarts import search


def _tiny_config(**changes):
  changes.setdefault("dataset", f"folder:{cifar10_dir()}")
  return presets.get_preset("tiny").replace(**changes)


def _event_tags(log_dir):
  tags = set()
  for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"),
                        recursive=True):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags.add((os.path.basename(os.path.dirname(path)), value.tag))
  return tags


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("search") / "run"
  result = search.run_search(_tiny_config(), str(model_dir),
                             checkpoint_every_steps=3, verbose=0,
                             summary_every_steps=1)
  return model_dir, result


@pytest.mark.slow
def test_run_directory_files(finished_run):
  model_dir, result = finished_run
  epochs = presets.get_preset("tiny").epochs
  expected = ["config.json", "data.json", "genotype.json", "normal_cell.png",
              "reduce_cell.png", "checkpoints/checkpoint"]
  expected += [f"genotypes/epoch_{e:03d}.json" for e in range(1, epochs + 1)]
  expected += [f"arch_weights/epoch_{e:03d}.json"
               for e in range(1, epochs + 1)]
  missing = [name for name in expected if not (model_dir / name).exists()]
  assert missing == []
  assert not result.already_finished


@pytest.mark.slow
def test_checkpoint_restores_every_variable(finished_run):
  model_dir, _ = finished_run
  config = _tiny_config()
  model = search.build_search_model(config, num_classes=10,
                                    steps_per_epoch=4)
  step = tf.Variable(0, dtype=tf.int64)
  checkpoint = search.search_checkpoint(model, step)
  latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
  checkpoint.restore(latest).assert_consumed()
  assert int(step.numpy()) == 8

  stored = json.loads((model_dir / "arch_weights" / "epoch_002.json")
                      .read_text())
  restored = search.softmaxed_arch_weights(model.network)
  for name in ("alpha_normal", "beta_reduce"):
    np.testing.assert_allclose(restored[name], stored[name], rtol=1e-5)
  assert int(model.weight_optimizer.iterations.numpy()) == 8


@pytest.mark.slow
def test_final_genotype_matches_last_epoch(finished_run):
  model_dir, result = finished_run
  final = genotype_lib.load(model_dir / "genotype.json")
  last = genotype_lib.load(model_dir / "genotypes" / "epoch_002.json")
  assert final == last
  assert final == result.genotype


@pytest.mark.slow
def test_arch_weights_are_softmaxed(finished_run):
  model_dir, _ = finished_run
  weights = json.loads((model_dir / "arch_weights" / "epoch_002.json")
                       .read_text())
  for name in ("alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce"):
    rows = np.asarray(weights[name])
    assert rows.shape[0] == 14, name
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_data_json_records_normalization(finished_run):
  model_dir, _ = finished_run
  data = json.loads((model_dir / "data.json").read_text())
  assert data["class_names"][0] == "airplane"
  assert len(data["mean"]) == 3
  assert len(data["std"]) == 3


@pytest.mark.slow
def test_cell_drawings_are_png(finished_run):
  model_dir, _ = finished_run
  for cell in ("normal", "reduce"):
    assert (model_dir / f"{cell}_cell.png").read_bytes()[:8] == (
        b"\x89PNG\r\n\x1a\n")


@pytest.mark.slow
def test_tensorboard_tags_written(finished_run):
  model_dir, _ = finished_run
  tags = _event_tags(model_dir / "logs")
  expected = {
      ("train", "loss"), ("train", "accuracy"), ("val", "loss"),
      ("val", "accuracy"), ("train", "learning_rate/weights"),
      ("train", "learning_rate/alpha"), ("train", "learning_rate/beta"),
      ("train", "alpha_normal"), ("train", "alpha_reduce"),
      ("train", "beta_normal"), ("train", "beta_reduce"),
      ("train", "entropy/alpha_normal"), ("train", "entropy/beta_normal"),
      ("train", "skip_connect/normal"), ("train", "genotype"),
      ("train", "genotype_params/cifar_36x20"),
  }
  assert expected - tags == set()


@pytest.mark.slow
def test_finished_run_not_repeated(finished_run):
  model_dir, _ = finished_run
  stamp = (model_dir / "genotype.json").stat().st_mtime_ns
  result = search.run_search(_tiny_config(), str(model_dir), verbose=0)
  assert result.already_finished
  assert (model_dir / "genotype.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_config_a_freezes_final_beta(finished_run):
  model_dir, _ = finished_run
  space, frozen = search.resolve_space(f"config_a:{model_dir}")
  stored = json.loads((model_dir / "arch_weights" / "epoch_002.json")
                      .read_text())
  assert space.name == "factorized"
  for name in ("beta_normal", "beta_reduce"):
    softmax = tf.nn.softmax(frozen[name]).numpy()
    np.testing.assert_allclose(softmax, stored[name], rtol=1e-5)


def test_config_a_needs_beta(tmp_path):
  with pytest.raises(search.SearchError, match="no beta found"):
    search.resolve_space(f"config_a:{tmp_path}")


def test_changed_settings_rejected_on_resume(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "config.json").write_text(_tiny_config().to_json_string())
  with pytest.raises(search.SearchError) as error:
    search.run_search(_tiny_config(learning_rate=0.1, channels=8),
                      str(model_dir), verbose=0)
  assert "learning_rate: 0.05 -> 0.1" in str(error.value)
  assert "channels: 4 -> 8" in str(error.value)
  assert json.loads((model_dir / "config.json").read_text())[
      "learning_rate"] == 0.05


def test_contradictory_warmup_rejected(tmp_path):
  with pytest.raises(search.SearchError, match="warmup_epochs=2"):
    search.run_search(_tiny_config(warmup_epochs=2), str(tmp_path / "run"))


def test_indivisible_partial_channels_rejected(tmp_path):
  with pytest.raises(search.SearchError, match="partial_channels=3"):
    search.run_search(_tiny_config(partial_channels=3), str(tmp_path / "run"))


def test_unknown_dataset_rejected(tmp_path):
  with pytest.raises(ValueError, match="no_such_dataset"):
    search.run_search(_tiny_config(dataset="no_such_dataset"),
                      str(tmp_path / "run"))


def test_missing_folder_rejected(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(ValueError, match=str(missing)):
    search.run_search(_tiny_config(dataset=f"folder:{missing}"),
                      str(tmp_path / "run"))


def _copy_images(target, classes=("cat", "dog"), per_class=8):
  for name in classes:
    (target / name).mkdir(parents=True)
    for path in sorted((cifar10_dir() / "train" / name).glob("*.jpg"))[
        :per_class]:
      shutil.copy(path, target / name / path.name)


def test_single_class_rejected(tmp_path):
  _copy_images(tmp_path / "images", classes=("cat",))
  with pytest.raises(ValueError, match="class"):
    search.run_search(_tiny_config(dataset=f"folder:{tmp_path / 'images'}"),
                      str(tmp_path / "run"))


@pytest.mark.slow
def test_corrupt_image_named(tmp_path):
  images = tmp_path / "images"
  _copy_images(images, per_class=16)
  corrupt = images / "cat" / "broken.jpg"
  corrupt.write_bytes((images / "dog").glob("*.jpg").__next__()
                      .read_bytes()[:200])
  config = _tiny_config(dataset=f"folder:{images}", max_train_examples=None,
                        batch_size=8, epochs=1)
  with pytest.raises(Exception, match="broken.jpg"):
    search.run_search(config, str(tmp_path / "run"), verbose=0)

  result = search.run_search(config.replace(skip_corrupt_images=True),
                             str(tmp_path / "run_skip"), verbose=0)
  assert not result.already_finished


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
  # During warm-up the first step's loss, at the initial weights, is finite;
  # its update with a learning rate of 1e30 makes the second loss infinite.
  model_dir = tmp_path / "run"
  config = _tiny_config(learning_rate=1e30, min_learning_rate=1e29,
                        warmup_epochs=1)
  with pytest.raises(search.SearchError, match="diverged") as error:
    search.run_search(config, str(model_dir), checkpoint_every_steps=1,
                      verbose=0)
  assert "step 2" in str(error.value)
  latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
  assert latest.endswith("-1")
  assert not (model_dir / "genotype.json").exists()


# The binary, in subprocesses.


def _search_command(model_dir, *extra):
  return [sys.executable, "-m", "train.search", "--preset=tiny",
          f"--dataset=folder:{cifar10_dir()}", f"--model_dir={model_dir}",
          "--deterministic", "--checkpoint_every_steps=1", "--verbose=0",
          *extra]


def _run_binary(model_dir, *extra):
  return subprocess.run(_search_command(model_dir, *extra), cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=900)


def _latest_step(model_dir):
  state = model_dir / "checkpoints" / "checkpoint"
  if not state.exists():
    return 0
  latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
  return int(latest.rsplit("-", 1)[1]) if latest else 0


@pytest.mark.slow
def test_killed_search_resumes_identically(tmp_path):
  reference = tmp_path / "reference"
  completed = _run_binary(reference)
  assert completed.returncode == 0, completed.stderr[-3000:]

  # Kill a second run with SIGKILL in the middle of its first epoch (4 steps
  # per epoch in the tiny preset), after its checkpoint at step 2.
  interrupted = tmp_path / "interrupted"
  process = subprocess.Popen(_search_command(interrupted), cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while _latest_step(interrupted) < 2 and time.time() < deadline:
    assert process.poll() is None, "the search ended before it was killed"
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = _latest_step(interrupted)
  assert 2 <= killed_at < 8
  assert not (interrupted / "genotype.json").exists()

  resumed = _run_binary(interrupted)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed" in resumed.stderr

  assert (genotype_lib.load(interrupted / "genotype.json")
          == genotype_lib.load(reference / "genotype.json"))
  want = json.loads((reference / "arch_weights" / "epoch_002.json")
                    .read_text())
  got = json.loads((interrupted / "arch_weights" / "epoch_002.json")
                   .read_text())
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_flagfile_reruns_search(tmp_path):
  model_dir = tmp_path / "run"
  first = _run_binary(model_dir, "--epochs=1")
  assert first.returncode == 0, first.stderr[-3000:]
  flagfile = model_dir / "flags.txt"
  assert "--epochs=1" in flagfile.read_text()

  again = subprocess.run(
      [sys.executable, "-m", "train.search", f"--flagfile={flagfile}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "already finished" in again.stdout

  changed = _run_binary(model_dir, "--epochs=1", "--seed=5")
  assert changed.returncode == 1
  assert "seed: 0 -> 5" in changed.stderr

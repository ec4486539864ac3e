"""Shared test setup: quiet TensorFlow, two logical CPUs, real CIFAR-10.

The CPU is split into two logical devices before TensorFlow starts, so that
MirroredStrategy can run with two replicas as it would on two GPUs.
"""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def shared_dir() -> pathlib.Path:
  """Return the shared folder that contains data/cifar10.

  TF_ADARTS_SHARED names it; the default is ../shared beside the repository.
  """
  configured = os.environ.get("TF_ADARTS_SHARED")
  return pathlib.Path(configured) if configured else REPO_ROOT.parent / "shared"


def cifar10_dir() -> pathlib.Path:
  return shared_dir() / "data" / "cifar10"


def load_cifar10_images(split="train", count=512, seed=0):
  """Read `count` real CIFAR-10 JPEGs, balanced over classes.

  Returns:
    (images float32 [count, 32, 32, 3] scaled to [0, 1], labels int32).
  """
  root = cifar10_dir() / split
  if not root.is_dir():
    pytest.fail(f"CIFAR-10 images not found at {root}; set TF_ADARTS_SHARED "
                "to the folder that holds data/cifar10.")
  classes = sorted(p.name for p in root.iterdir() if p.is_dir())
  per_class = -(-count // len(classes))
  rng = np.random.default_rng(seed)
  files, labels = [], []
  for label, name in enumerate(classes):
    names = sorted((root / name).glob("*.jpg"))
    chosen = rng.choice(len(names), size=per_class, replace=False)
    files.extend(str(names[i]) for i in sorted(chosen))
    labels.extend([label] * per_class)

  order = rng.permutation(len(files))[:count]
  images = np.stack([
      tf.io.decode_jpeg(tf.io.read_file(files[i]), channels=3).numpy()
      for i in order]).astype(np.float32) / 255.0
  return images, np.asarray([labels[i] for i in order], np.int32)


_TWO_REPLICAS = []


def two_replica_strategy():
  """Return one MirroredStrategy over the two logical CPUs, shared by tests.

  Each MirroredStrategy numbers its collective operations from the same
  start, so a second strategy over the same devices in one process collides
  with the first one's ("Shape mismatch in the collective instance").
  """
  if not _TWO_REPLICAS:
    _TWO_REPLICAS.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
  return _TWO_REPLICAS[0]


def link_cifar10_subset(root: pathlib.Path, per_class: dict) -> pathlib.Path:
  """Build a folder dataset of symbolic links to real CIFAR-10 images.

  Args:
    root: the folder to create; it receives SPLIT/CLASS/*.jpg.
    per_class: images per class for each split, e.g. {"train": 8}.

  Returns:
    root.
  """
  for split, count in per_class.items():
    split_dir = cifar10_dir() / split
    if not split_dir.is_dir():
      pytest.fail(f"CIFAR-10 images not found at {split_dir}; set "
                  "TF_ADARTS_SHARED to the folder that holds data/cifar10.")
    for class_dir in sorted(split_dir.iterdir()):
      target = root / split / class_dir.name
      target.mkdir(parents=True)
      for path in sorted(class_dir.glob("*.jpg"))[:count]:
        os.symlink(path, target / path.name)
  return root

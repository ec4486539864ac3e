"""Search configurations and the named recipes (presets).

A `SearchConfig` holds every knob of one search. Presets are registered
configs named after the recipe they reproduce; a binary starts from a preset
and overrides the fields given explicitly on its command line. The resolved
config is written beside the run, so a run directory describes itself.
"""

import dataclasses
import json
from typing import Optional


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Every setting of one architecture search.

  Lengths are in epochs or steps, learning rates are per step, and batch
  sizes are global (summed over replicas).
  """
  # Data.
  dataset: str = "cifar10"  # TFDS name, folder:PATH or tfrecord:PATTERN.
  data_dir: Optional[str] = None  # TFDS data directory.
  download: bool = False  # Let TFDS download a missing dataset.
  split_mode: str = "portion"  # portion (CIFAR) or fractions (ImageNet).
  train_portion: float = 0.5  # portion: share of the train split for w.
  train_fraction: float = 0.1  # fractions: per-class share for w.
  val_fraction: float = 0.025  # fractions: per-class share for alpha, beta.
  max_train_examples: Optional[int] = None  # Cap on the train split.
  image_size: int = 32  # Square input size in pixels.
  augment: str = "cifar"  # cifar, imagenet or none.
  skip_corrupt_images: bool = False  # Skip undecodable files, else fail.

  # Search space and network.
  space: str = "factorized"  # factorized, non_factorized, fixed:ACT, config_a:RUN_DIR.
  channels: int = 16  # Initial channels C.
  layers: int = 8  # Cells.
  stem: str = "cifar"  # cifar or imagenet.
  partial_channels: int = 1  # PC-DARTS K; 1 disables partial channels.
  edge_normalization: bool = False  # PC-DARTS edge weights.

  # Optimization.
  epochs: int = 25
  batch_size: int = 64
  learning_rate: float = 0.05  # Weights: SGD, cosine from this value...
  min_learning_rate: float = 0.001  # ...down to this one.
  momentum: float = 0.9
  weight_decay: float = 3e-4  # Coupled (added to the gradient).
  clip_norm: float = 5.0  # Global norm of the weight gradients.
  arch_learning_rate: float = 6e-4  # Adam for alpha and for beta.
  arch_beta_1: float = 0.5
  arch_beta_2: float = 0.999
  arch_weight_decay: float = 1e-3  # Coupled.
  arch_update: str = "sequential"  # sequential (tri-level) or joint.
  arch_update_every: int = 1  # Weight steps per architecture update.
  warmup_epochs: int = 0  # Epochs that train only the weights.

  # Reproducibility.
  seed: int = 0
  deterministic: bool = False  # determinism.enable_determinism().
  # Grappler on the search step; off, the first step starts sooner.
  graph_optimizer: bool = False
  mixed_precision: bool = False  # bfloat16 compute; alpha, beta float32.
  # Batch-norm statistics over the global batch under several replicas.
  sync_batch_norm: bool = False

  def replace(self, **changes) -> "SearchConfig":
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise ValueError(f"Unknown search settings {unknown}.")
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, values: dict) -> "SearchConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(
          f"Unknown search settings {unknown} in a stored config; it was "
          "written by another version of tf-adarts.")
    return cls(**values)

  def to_json_string(self) -> str:
    return json.dumps(self.to_json(), indent=2, sort_keys=True)


# Settings that do not change what a search computes: they may differ when
# a run is resumed.
NON_RESULT_FIELDS = frozenset({"data_dir", "download", "graph_optimizer"})


def result_differences(stored: SearchConfig, requested: SearchConfig) -> list:
  """List the settings that differ and would change the search's result.

  Returns:
    Lines "name: stored -> requested", sorted by name.
  """
  lines = []
  for field in dataclasses.fields(SearchConfig):
    if field.name in NON_RESULT_FIELDS:
      continue
    old = getattr(stored, field.name)
    new = getattr(requested, field.name)
    if old != new:
      lines.append(f"{field.name}: {old!r} -> {new!r}")
  return lines


_CIFAR10 = SearchConfig()

SEARCH_PRESETS = {
    # The published A-DARTS search on CIFAR-10: 25 epochs on two halves of
    # the training set, 8 cells of C = 16, batch 64, 0.3 GPU-days on a V100.
    "a_darts_cifar10": _CIFAR10,
    # A-PC-DARTS on ImageNet: 10% / 2.5% of the training set per class,
    # partial channels K = 2, edge normalization, batch 1,024 over 8 GPUs,
    # 50 epochs of which the first 15 train only the weights.
    "a_pc_darts_imagenet": _CIFAR10.replace(
        dataset="imagenet2012", split_mode="fractions", image_size=224,
        augment="imagenet", stem="imagenet", partial_channels=2,
        edge_normalization=True, epochs=50, warmup_epochs=15,
        batch_size=1024, learning_rate=0.5, min_learning_rate=0.0,
        weight_decay=3e-5, arch_learning_rate=6e-3),
    # DARTS (first order) with every searched activation fixed to ReLU.
    "darts_cifar10": _CIFAR10.replace(space="fixed:relu"),
    # The non-factorized baseline: one softmax over 40 combined operators.
    "non_factorized_cifar10": _CIFAR10.replace(space="non_factorized"),
    # A small search that finishes in a few minutes on 2 CPU cores: 1,024
    # training images, 5 cells of C = 8, 2 epochs of 16 steps. It may download CIFAR-10 through TFDS, so that it runs as it is.
    "cpu_smoke": _CIFAR10.replace(
        max_train_examples=1024, channels=8, layers=5, epochs=2,
        batch_size=32, download=True),
    # The smallest useful search, for tests: 128 images, 3 cells of C = 4,
    # 2 epochs of 4 steps.
    "tiny": _CIFAR10.replace(
        max_train_examples=128, channels=4, layers=3, epochs=2,
        batch_size=16),
}


def get_preset(name: str) -> SearchConfig:
  try:
    return SEARCH_PRESETS[name]
  except KeyError:
    raise ValueError(
        f"Unknown preset {name!r}; use one of "
        f"{', '.join(sorted(SEARCH_PRESETS))}.") from None

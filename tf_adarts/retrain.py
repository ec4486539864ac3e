"""Retraining a searched genotype from scratch, and evaluating the result.

`run_retrain(config, model_dir)` is what `python -m train.retrain` runs.
The run directory describes itself:

  config.json          the resolved RetrainConfig
  flags.txt            the flags that rerun it (written by the binary)
  run_meta.json        what evaluation needs to rebuild the network without
                       flags: dataset, classes, image size, normalization,
                       genotype, network class, width, depth, parameter and
                       FLOP counts
  checkpoints/         tf.train.CheckpointManager: weights, optimizer, step
  logs/train           TensorBoard: loss, top-1, top-5, learning rate, drop
                       path rate
  logs/test            TensorBoard: test loss, top-1, top-5 (optional)
  logs/validation      TensorBoard: loss, top-1, top-5 on the held-out
                       training examples (with validation_examples > 0)
  result.json          the final training metrics; written last
  eval.json            written by `evaluate_run`

Running again on the same directory resumes from the latest checkpoint,
also in the middle of an epoch. The data order, augmentation, cutout, drop
path and RReLU draws follow from the seed and the step.
"""

import dataclasses
import json
import os
import shutil
import time
from typing import Optional

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tf_adarts import data as data_lib
from tf_adarts import determinism
from tf_adarts import distribute
from tf_adarts import flops as flops_lib
from tf_adarts import genotype as genotype_lib
from tf_adarts import networks
from tf_adarts import operations
from tf_adarts import retrain_data
from tf_adarts import search
from tf_adarts import trainer

CONFIG_FILE = "config.json"
META_FILE = "run_meta.json"
RESULT_FILE = "result.json"
EVAL_FILE = "eval.json"
NETWORK_CLASSES = {"cifar": networks.NetworkCIFAR,
                   "imagenet": networks.NetworkImageNet}
# Batch size of the test and held-out evaluations during training.
_EVAL_BATCH_SIZE = 256


class RetrainError(RuntimeError):
  """A retrain stopped on bad input or a diverged loss."""


@dataclasses.dataclass(frozen=True)
class RetrainConfig:
  """Every setting of one retrain.

  Lengths are in epochs, learning rates are per step, and batch sizes are
  global (summed over replicas).
  """
  # Architecture.
  genotype: str = "DARTS_V2"  # Published name, JSON file or search run directory.
  activation_override: Optional[str] = None  # Replaces every activation.
  network: str = "cifar"  # cifar (NetworkCIFAR) or imagenet.
  channels: int = 36  # Initial channels C.
  layers: int = 20  # Cells.
  auxiliary: bool = True  # Auxiliary head.
  max_flops: Optional[float] = None  # MFLOPs budget; picks channels.

  # Data.
  dataset: str = "cifar10"  # TFDS name, folder:PATH or tfrecord:PATTERN.
  data_dir: Optional[str] = None  # TFDS data directory.
  download: bool = False  # Let TFDS download a missing dataset.
  image_size: int = 32  # Square input size in pixels.
  augment: str = "cifar"  # cifar, imagenet or none.
  cutout: int = 16  # Side of the cutout square in pixels; 0 disables it.
  max_train_examples: Optional[int] = None  # Class-balanced subset size.
  # Class-balanced train-split examples held out from training and
  # evaluated as validation_* (0 holds out none).
  validation_examples: int = 0

  # Optimization.
  epochs: int = 600
  batch_size: int = 128
  learning_rate: float = 0.03  # SGD, cosine from this value...
  min_learning_rate: float = 0.0  # ...down to this one.
  warmup_epochs: int = 0  # Linear warm-up from 0 before the cosine.
  momentum: float = 0.9
  weight_decay: float = 3e-4  # Coupled (added to the gradient).
  clip_norm: float = 5.0  # Global gradient norm; 0 disables clipping.
  label_smoothing: float = 0.0
  auxiliary_weight: float = 0.4  # Weight of the auxiliary head's loss.
  drop_path_rate: float = 0.4  # Final rate, linear from 0 over the epochs.

  # Reproducibility.
  seed: int = 0
  deterministic: bool = False  # determinism.enable_determinism().
  mixed_precision: bool = False  # bfloat16 compute, float32 variables.
  # Batch-norm statistics over the global batch under several replicas.
  sync_batch_norm: bool = False

  def replace(self, **changes) -> "RetrainConfig":
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise ValueError(f"Unknown retrain settings {unknown}.")
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, values: dict) -> "RetrainConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(
          f"Unknown retrain settings {unknown} in a stored config; it was "
          "written by another version of tf-adarts.")
    return cls(**values)

  def to_json_string(self) -> str:
    return json.dumps(self.to_json(), indent=2, sort_keys=True)


# Settings that do not change what a retrain computes.
NON_RESULT_FIELDS = frozenset({"data_dir", "download"})

_CIFAR10 = RetrainConfig()

RETRAIN_PRESETS = {
    # The DARTS CIFAR-10 retrain as used for the A-DARTS results: 20 cells
    # of C = 36, 600 epochs of batch 128, SGD 0.03 cosine to 0, cutout 16,
    # drop path 0.4, auxiliary weight 0.4.
    "cifar10": _CIFAR10,
    # The ImageNet mobile setting: 14 cells of C = 48 (or --max_flops=600),
    # 250 epochs of batch 512, SGD 0.25 with 5 warm-up epochs then cosine,
    # weight decay 3e-5, label smoothing 0.1, auxiliary weight 0.2.
    "imagenet": _CIFAR10.replace(
        network="imagenet", channels=48, layers=14, dataset="imagenet2012",
        image_size=224, augment="imagenet", cutout=0, epochs=250,
        batch_size=512, learning_rate=0.25, warmup_epochs=5,
        weight_decay=3e-5, label_smoothing=0.1, auxiliary_weight=0.2,
        drop_path_rate=0.0),
    # A CIFAR-10 retrain sized for 2 CPU cores (about 65 images/s there):
    # 8 cells of C = 16 on a 15,000-image subset, 3 epochs of batch 96.
    "cpu_smoke": _CIFAR10.replace(
        channels=16, layers=8, max_train_examples=15000, epochs=3,
        batch_size=96, learning_rate=0.08, cutout=0, drop_path_rate=0.0),
    # The smallest retrain, for tests: 3 cells of C = 8, 64 images, batch 16.
    "tiny": _CIFAR10.replace(
        channels=8, layers=3, max_train_examples=64, epochs=2, batch_size=16,
        learning_rate=0.05, cutout=8, drop_path_rate=0.2),
}


def get_preset(name: str) -> RetrainConfig:
  try:
    return RETRAIN_PRESETS[name]
  except KeyError:
    raise ValueError(
        f"Unknown retrain preset {name!r}; use one of "
        f"{', '.join(sorted(RETRAIN_PRESETS))}.") from None


def result_differences(stored: RetrainConfig,
                       requested: RetrainConfig) -> list:
  """List the settings that differ and would change the retrain's result.

  Returns:
    Lines "name: stored -> requested", sorted by name.
  """
  lines = []
  for field in dataclasses.fields(RetrainConfig):
    if field.name in NON_RESULT_FIELDS:
      continue
    old = getattr(stored, field.name)
    new = getattr(requested, field.name)
    if old != new:
      lines.append(f"{field.name}: {old!r} -> {new!r}")
  return lines


@dataclasses.dataclass
class RetrainResult:
  """Outcome of a retrain run: steps taken and the final metrics."""
  model_dir: str
  steps: int
  resumed: bool
  already_finished: bool
  metrics: dict


# Genotype and config.


def resolve_genotype(value: str) -> genotype_lib.Genotype:
  """Return the genotype named by a published name, JSON file or run directory.

  A directory is a search run directory; its genotype.json is read.

  Raises:
    RetrainError: when a run directory has no genotype.json, or the value
      is neither a published name nor an existing file.
  """
  if os.path.isdir(value):
    path = os.path.join(value, search.GENOTYPE_FILE)
    if not os.path.isfile(path):
      raise RetrainError(
          f"--genotype={value} is a directory without {search.GENOTYPE_FILE}; "
          "give the run directory of a finished search, a genotype JSON file "
          "or a published name.")
    value = path
  try:
    return genotype_lib.get_genotype(value)
  except ValueError as error:
    raise RetrainError(str(error)) from None


def normalize_config(config: RetrainConfig) -> RetrainConfig:
  """Return the config with its dataset and genotype paths made absolute."""
  changes = {}
  for prefix in ("folder:", "tfrecord:"):
    if config.dataset.startswith(prefix):
      path = config.dataset[len(prefix):]
      changes["dataset"] = prefix + os.path.abspath(os.path.expanduser(path))
  if (config.genotype not in genotype_lib.PUBLISHED
      and os.path.exists(os.path.expanduser(config.genotype))):
    changes["genotype"] = os.path.abspath(os.path.expanduser(config.genotype))
  return config.replace(**changes)


def _validate(config: RetrainConfig) -> None:
  if config.network not in NETWORK_CLASSES:
    raise RetrainError(
        f"network={config.network!r}; use one of {sorted(NETWORK_CLASSES)}.")
  if config.epochs < 1:
    raise RetrainError(f"epochs={config.epochs}; give at least 1.")
  if not 0 <= config.warmup_epochs < config.epochs:
    raise RetrainError(
        f"warmup_epochs={config.warmup_epochs} must be at least 0 and below "
        f"epochs={config.epochs}.")
  if config.batch_size < 1:
    raise RetrainError(f"batch_size={config.batch_size}; give at least 1.")
  if config.learning_rate <= 0 or not (
      0 <= config.min_learning_rate <= config.learning_rate):
    raise RetrainError(
        f"learning_rate={config.learning_rate} and min_learning_rate="
        f"{config.min_learning_rate}: need learning_rate > 0 and 0 <= "
        "min_learning_rate <= learning_rate.")
  if not 0.0 <= config.drop_path_rate < 1.0:
    raise RetrainError(
        f"drop_path_rate={config.drop_path_rate}; give a value in [0, 1).")
  if not 0.0 <= config.label_smoothing < 1.0:
    raise RetrainError(
        f"label_smoothing={config.label_smoothing}; give a value in [0, 1).")
  if config.cutout < 0:
    raise RetrainError(f"cutout={config.cutout}; give 0 or more pixels.")
  if config.validation_examples < 0:
    raise RetrainError(
        f"Invalid validation_examples={config.validation_examples}. Give the "
        "number of train-split examples to hold out, or 0 for none.")


def _check_run_directory(config, model_dir) -> bool:
  """Compare with the stored config; return True when resuming a run."""
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as stream:
    stored = RetrainConfig.from_json(json.load(stream))
  differences = result_differences(stored, config)
  if differences:
    raise RetrainError(
        f"{model_dir} contains a retrain with other settings, so it cannot "
        "be resumed with these. Use a new --model_dir, or rerun with the "
        f"stored flags ({model_dir}/flags.txt). Differences (stored -> "
        "requested):\n  " + "\n  ".join(differences))
  return True


# The network and the training step.


def build_network(genotype, network, num_classes, channels, layers,
                  auxiliary, activation_override=None, mixed_precision=False,
                  drop_path_rate=0.0):
  """Build a NetworkCIFAR or NetworkImageNet under the requested policy."""
  previous_policy = keras.mixed_precision.global_policy()
  if mixed_precision:
    keras.mixed_precision.set_global_policy(search.MIXED_PRECISION_POLICY)
  try:
    return NETWORK_CLASSES[network](
        genotype, num_classes=num_classes, channels=channels, layers=layers,
        auxiliary=auxiliary, drop_path_rate=drop_path_rate,
        activation_override=activation_override)
  finally:
    keras.mixed_precision.set_global_policy(previous_policy)


def learning_rate_schedule(config: RetrainConfig, steps_per_epoch: int):
  """Cosine from learning_rate to min_learning_rate, after a linear warm-up."""
  total_steps = max(1, steps_per_epoch * config.epochs)
  warmup_steps = config.warmup_epochs * steps_per_epoch
  alpha = config.min_learning_rate / config.learning_rate
  if not warmup_steps:
    return keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=total_steps, alpha=alpha)
  return keras.optimizers.schedules.CosineDecay(
      0.0, decay_steps=max(1, total_steps - warmup_steps), alpha=alpha,
      warmup_target=config.learning_rate, warmup_steps=warmup_steps)


def smoothed_cross_entropy(labels, logits, num_classes, label_smoothing):
  """Per-example cross entropy against one-hot labels with smoothing."""
  targets = tf.one_hot(labels, num_classes, dtype=tf.float32)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return tf.nn.softmax_cross_entropy_with_logits(
      targets, tf.cast(logits, tf.float32))


class RetrainStep:
  """One SGD step of a retraining network, run per replica.

  loss = CE(logits) + auxiliary_weight * CE(aux_logits), each averaged over
  the global batch with tf.nn.compute_average_loss, with label smoothing.
  Drop path and RReLU draw from the stateless seed (seed, step, replica).
  """

  def __init__(self, network, optimizer, global_batch_size, weight_decay,
               clip_norm, label_smoothing, auxiliary_weight, seed):
    self.network = network
    self.optimizer = optimizer
    self.global_batch_size = global_batch_size
    self.weight_decay = weight_decay
    self.clip_norm = clip_norm
    self.label_smoothing = label_smoothing
    self.auxiliary_weight = auxiliary_weight
    self.seed = seed

  def noise_seed(self):
    step = tf.cast(self.optimizer.iterations, tf.int64)
    seed = tf.stack([tf.constant(self.seed, tf.int64), step])
    context = tf.distribute.get_replica_context()
    if context is not None:
      seed = tf.random.experimental.stateless_fold_in(
          seed, context.replica_id_in_sync_group)
    return seed

  def loss(self, images, labels, seed):
    """Return (total loss, logits) of one training pass."""
    outputs = self.network(images, training=True, seed=seed)
    aux_logits = None
    if isinstance(outputs, (tuple, list)):
      logits, aux_logits = outputs
    else:
      logits = outputs
    num_classes = self.network.num_classes
    loss = tf.nn.compute_average_loss(
        smoothed_cross_entropy(labels, logits, num_classes,
                               self.label_smoothing),
        global_batch_size=self.global_batch_size)
    if aux_logits is not None and self.auxiliary_weight:
      loss += self.auxiliary_weight * tf.nn.compute_average_loss(
          smoothed_cross_entropy(labels, aux_logits, num_classes,
                                 self.label_smoothing),
          global_batch_size=self.global_batch_size)
    return loss, logits

  def __call__(self, images, labels):
    variables = self.network.trainable_variables
    with tf.GradientTape() as tape:
      loss, logits = self.loss(images, labels, self.noise_seed())
    gradients = tape.gradient(loss, variables)
    trainer.apply_coupled_gradients(self.optimizer, gradients, variables,
                            self.weight_decay, self.clip_norm)
    logits = tf.cast(logits, tf.float32)
    return {
        "loss": loss,
        "top1": tf.reduce_sum(tf.cast(
            tf.math.in_top_k(labels, logits, 1), tf.float32)),
        "top5": tf.reduce_sum(tf.cast(
            tf.math.in_top_k(labels, logits, min(5, logits.shape[-1])),
            tf.float32)),
        "count": tf.cast(tf.shape(labels)[0], tf.float32),
    }


def _make_train_function(step, strategy):

  @tf.function
  def train_function(batch):
    images, labels = batch
    logs = strategy.run(step, args=(images, labels))
    # The loss is already divided by the global batch, so summing the
    # replicas' values gives the mean over the global batch.
    return {name: strategy.reduce(tf.distribute.ReduceOp.SUM, value,
                                  axis=None)
            for name, value in logs.items()}

  return train_function


# Evaluation.


def evaluate_network(network, dataset, max_examples=None, label_smoothing=0.0):
  """Return {"top1", "top5", "loss", "examples"} of a network on a dataset."""
  num_classes = network.num_classes

  @tf.function(reduce_retracing=True)
  def batch_sums(images, labels):
    logits = tf.cast(network(images, training=False), tf.float32)
    losses = smoothed_cross_entropy(labels, logits, num_classes,
                                    label_smoothing)
    return (tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, 1),
                                  tf.float32)),
            tf.reduce_sum(tf.cast(tf.math.in_top_k(
                labels, logits, min(5, num_classes)), tf.float32)),
            tf.reduce_sum(losses))

  top1 = top5 = loss = 0.0
  examples = 0
  for images, labels in dataset:
    if max_examples is not None and examples >= max_examples:
      break
    if max_examples is not None and examples + len(labels) > max_examples:
      keep = max_examples - examples
      images, labels = images[:keep], labels[:keep]
    sums = batch_sums(images, labels)
    top1 += float(sums[0])
    top5 += float(sums[1])
    loss += float(sums[2])
    examples += int(len(labels))
  if not examples:
    raise RetrainError("the evaluation split has no examples.")
  return {"top1": top1 / examples, "top5": top5 / examples,
          "loss": loss / examples, "examples": examples}


def _network_items(network):
  """Return the checkpoint entries of a network's variables.

  NOTE: tf.train.Checkpoint(network=network) saves only the variables that
  the network owns directly (8 of 117 in a 3-cell NetworkCIFAR with Keras
  3.15.1), because the layers kept in Python lists (cells, stems) are not
  tracked as checkpoint dependencies. The variables are therefore saved as
  one list, in the network's build order, which the same run_meta.json
  reproduces.
  """
  return {"network_variables": list(network.variables)}


def _read_json(path):
  with open(path, encoding="utf-8") as stream:
    return json.load(stream)


def network_from_meta(meta: dict):
  """Rebuild the network of a run from its run_meta.json contents."""
  return build_network(
      genotype_lib.get_genotype(meta["genotype"]), meta["network"],
      meta["num_classes"], meta["channels"], meta["layers"],
      meta["auxiliary"], meta["activation_override"],
      meta.get("mixed_precision", False))


def evaluate_run(model_dir: str, split: str = "test",
                 checkpoint: Optional[str] = None, batch_size: int = 256,
                 max_examples: Optional[int] = None,
                 data_dir: Optional[str] = None) -> dict:
  """Evaluate a retrain run on a split and write MODEL_DIR/eval.json.

  The network is rebuilt from run_meta.json alone, and the weights come
  from `checkpoint` or the latest checkpoint of the run.

  Args:
    model_dir: the run directory.
    split: the split to evaluate; "test" falls back to the dataset's
      validation split when it has no test split.
    checkpoint: a checkpoint prefix; None for the latest one.
    batch_size: evaluation batch size.
    max_examples: evaluate only the first this many examples of the split
      (a quick check); None evaluates all of them.
    data_dir: the TFDS data directory, if the run's dataset needs one.

  Returns:
    The metrics written to eval.json: top1, top5, loss, examples, split,
    checkpoint, step.

  Raises:
    RetrainError: when run_meta.json or a checkpoint is missing.
  """
  meta_path = os.path.join(model_dir, META_FILE)
  if not os.path.isfile(meta_path):
    raise RetrainError(
        f"{meta_path} not found; give the run directory of a retrain "
        "(python -m train.retrain writes it before training).")
  meta = _read_json(meta_path)
  network = network_from_meta(meta)
  step_variable = tf.Variable(0, dtype=tf.int64, trainable=False)
  if checkpoint is None:
    checkpoint = tf.train.latest_checkpoint(
        os.path.join(model_dir, "checkpoints"))
    if checkpoint is None:
      raise RetrainError(
          f"No checkpoint found in {model_dir}/checkpoints; train first.")
  status = tf.train.Checkpoint(**_network_items(network),
                               step=step_variable).restore(checkpoint)
  status.assert_existing_objects_matched().expect_partial()

  source = data_lib.load_source(meta["dataset"],
                                             data_dir=data_dir)
  split = retrain_data.find_eval_split(source, split)
  dataset = data_lib.eval_dataset(
      source, split, batch_size, meta["image_size"], meta["augment"],
      meta["mean"], meta["std"])
  start = time.time()
  metrics = evaluate_network(network, dataset, max_examples)
  metrics.update(split=split, checkpoint=checkpoint,
                 step=int(step_variable.numpy()),
                 seconds=round(time.time() - start, 1))
  search.write_text_atomic(os.path.join(model_dir, EVAL_FILE),
                           json.dumps(metrics, indent=2, sort_keys=True) + "\n")
  logging.info("Evaluated %s on %s (%d examples): top-1 %.4f, top-5 %.4f.",
               checkpoint, split, metrics["examples"], metrics["top1"],
               metrics["top5"])
  return metrics


# The loop.


def _run_meta(config, data, genotype, channels, network):
  return {
      "dataset": config.dataset,
      "class_names": list(data.class_names),
      "num_classes": data.num_classes,
      "image_size": data.image_size,
      "augment": data.augment,
      "mean": [float(v) for v in data.mean],
      "std": [float(v) for v in data.std],
      "train_size": data.train_size,
      "steps_per_epoch": data.steps_per_epoch,
      "genotype": genotype.to_json(),
      "activation_override": config.activation_override,
      "network": config.network,
      "network_class": type(network).__name__,
      "channels": channels,
      "layers": config.layers,
      "auxiliary": config.auxiliary,
      "mixed_precision": config.mixed_precision,
      "params": networks.count_params(network),
      "flops": flops_lib.count_flops(network, data.image_size),
  }


def _choose_channels(config, genotype, num_classes):
  if not config.max_flops:
    return config.channels
  channels = flops_lib.channels_for_max_flops(
      genotype, config.max_flops, NETWORK_CLASSES[config.network],
      image_size=config.image_size, layers=config.layers,
      num_classes=num_classes,
      activation_override=config.activation_override)
  logging.info("max_flops=%sM: %d initial channels.", config.max_flops,
               channels)
  return channels


def run_retrain(config: RetrainConfig, model_dir: str, *,
                checkpoint_every_steps: Optional[int] = None,
                keep_checkpoints: int = 3, strategy=None, verbose: int = 1,
                summary_every_steps: int = 10, eval_every_epochs: int = 0,
                before_start=None) -> RetrainResult:
  """Train (or resume) a genotype's network and write its run directory.

  Args:
    config: the resolved settings.
    model_dir: the run directory; an existing one is resumed.
    checkpoint_every_steps: also save a checkpoint every this many steps
      (one is always saved at the end of each epoch).
    keep_checkpoints: checkpoints kept on disk.
    strategy: a tf.distribute strategy (default: the current one).
    verbose: 1 shows a progress bar, 0 logs a line every 30 s.
    summary_every_steps: TensorBoard scalars every this many steps.
    eval_every_epochs: evaluate on the test split every this many epochs
      and after the last one, into logs/test; 0 never. The held-out
      examples of config.validation_examples are evaluated at the same
      epochs, or only after the last one when this is 0.
    before_start: called once the settings are accepted, before training.

  Returns:
    A RetrainResult with the metrics of the last epoch; with
    validation_examples > 0 they include validation_top1, validation_top5,
    validation_loss and validation_examples of the held-out examples.

  Raises:
    RetrainError: on invalid settings, a run directory written with other
      settings, or a non-finite loss (the last good checkpoint stays).
  """
  config = normalize_config(config)
  _validate(config)
  genotype = resolve_genotype(config.genotype)
  strategy = strategy or tf.distribute.get_strategy()
  result_path = os.path.join(model_dir, RESULT_FILE)
  chief_dir = model_dir
  if not distribute.is_chief(strategy):
    # Every worker saves checkpoints (the saving is collective), but only
    # the chief's go to model_dir; the others write a scratch copy.
    model_dir = distribute.worker_directory(chief_dir, strategy)
  resumed = _check_run_directory(config, model_dir)
  if os.path.exists(result_path):
    logging.info("The retrain in %s has finished; see %s.", model_dir,
                 result_path)
    return RetrainResult(model_dir, -1, resumed=True, already_finished=True,
                         metrics=_read_json(result_path))

  if config.deterministic:
    determinism.enable_determinism()
  keras.utils.set_random_seed(config.seed)

  try:
    data = retrain_data.build_retrain_data(
        config.dataset, config.batch_size, seed=config.seed,
        data_dir=config.data_dir, download=config.download,
        image_size=config.image_size, augment=config.augment,
        cutout_size=config.cutout,
        max_train_examples=config.max_train_examples,
        validation_examples=config.validation_examples)
  except ValueError as error:
    raise RetrainError(str(error)) from None
  if data.steps_per_epoch < 1:
    raise RetrainError(
        f"{data.train_size} training examples give no full batch of "
        f"{config.batch_size}.")
  steps_per_epoch = data.steps_per_epoch
  total_steps = steps_per_epoch * config.epochs
  channels = _choose_channels(config, genotype, data.num_classes)

  with strategy.scope(), operations.synchronized_batch_norm(
      config.sync_batch_norm):
    network = build_network(genotype, config.network, data.num_classes,
                            channels, config.layers, config.auxiliary,
                            config.activation_override,
                            config.mixed_precision)
    optimizer = keras.optimizers.SGD(
        learning_rate_schedule(config, steps_per_epoch),
        momentum=config.momentum, name="sgd")
    optimizer.build(network.trainable_variables)
    step_variable = tf.Variable(0, dtype=tf.int64, trainable=False,
                                name="step")

  if not resumed:
    search.write_text_atomic(os.path.join(model_dir, CONFIG_FILE),
                             config.to_json_string() + "\n")
  meta = _run_meta(config, data, genotype, channels, network)
  search.write_text_atomic(os.path.join(model_dir, META_FILE),
                           json.dumps(meta, indent=2, sort_keys=True) + "\n")
  logging.info("%s: %d channels, %d cells, %.3fM parameters, %.1fM FLOPs.",
               meta["network_class"], channels, config.layers,
               meta["params"] / 1e6, meta["flops"] / 1e6)
  if before_start is not None:
    before_start()

  checkpoint = tf.train.Checkpoint(**_network_items(network),
                                   optimizer=optimizer, step=step_variable)
  manager = tf.train.CheckpointManager(
      checkpoint, os.path.join(model_dir, "checkpoints"),
      max_to_keep=keep_checkpoints, step_counter=step_variable)
  if manager.latest_checkpoint:
    checkpoint.restore(
        manager.latest_checkpoint).assert_existing_objects_matched()
    logging.info("Resumed %s at step %d.", manager.latest_checkpoint,
                 int(step_variable.numpy()))
  start_step = int(step_variable.numpy())

  step_fn = RetrainStep(network, optimizer, config.batch_size,
                        config.weight_decay, config.clip_norm,
                        config.label_smoothing, config.auxiliary_weight,
                        config.seed)
  train_function = _make_train_function(step_fn, strategy)
  iterator = iter(strategy.experimental_distribute_dataset(
      data.train_stream(start_step)))
  writer_names = ["train", "test"]
  if data.validation_size:
    writer_names.append("validation")
  writers = {name: tf.summary.create_file_writer(
      os.path.join(model_dir, "logs", name)) for name in writer_names}
  progress = search._Progress(steps_per_epoch, total_steps,  # pylint: disable=protected-access
                              config.batch_size, verbose)
  eval_split = None
  test_prefix = None
  if eval_every_epochs:
    eval_split = retrain_data.find_eval_split(data.source, "test")
    test_prefix = eval_split
    if data.validation_size and eval_split == "validation":
      # The held-out examples own the validation_* metrics, so a dataset
      # whose evaluation split is named "validation" reports it as test_*,
      # as its TensorBoard directory logs/test does.
      test_prefix = "test"
      logging.info("The %r split is reported as test_* metrics; "
                   "validation_* are the held-out training examples.",
                   eval_split)
  validation = None
  if data.validation_size:
    validation = data.validation_stream(_EVAL_BATCH_SIZE)

  step = start_step
  epoch_metrics = {}
  started = time.time()
  while step < total_steps:
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    network.set_drop_path_rate(networks.drop_path_schedule(
        config.drop_path_rate, epoch, config.epochs))
    progress.epoch_begin(epoch, config.epochs, step_in_epoch)
    sums = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0, "steps": 0}

    for step_in_epoch in range(step_in_epoch, steps_per_epoch):
      logs = {k: float(v) for k, v in train_function(next(iterator)).items()}
      if not np.isfinite(logs["loss"]):
        raise RetrainError(
            f"The loss became {logs['loss']} at step {step + 1}; the "
            "retrain diverged. The last good checkpoint in "
            f"{manager.directory} is kept. Lower the learning rate or check "
            "the input data.")
      step += 1
      step_variable.assign(step)
      for name in ("loss", "top1", "top5", "count"):
        sums[name] += logs[name]
      sums["steps"] += 1
      step_metrics = {"loss": logs["loss"],
                      "top1": logs["top1"] / logs["count"],
                      "top5": logs["top5"] / logs["count"]}
      progress.step_end(step, step_in_epoch + 1, step_metrics)

      if (step % summary_every_steps == 0
          or step_in_epoch + 1 == steps_per_epoch):
        _write_step_summaries(writers["train"], step_metrics, optimizer,
                              network, step)
      if checkpoint_every_steps and step % checkpoint_every_steps == 0:
        manager.save(checkpoint_number=step)

    manager.save(checkpoint_number=step)
    epoch_metrics = {
        "epoch": epoch + 1,
        "train_loss": sums["loss"] / max(sums["steps"], 1),
        "train_top1": sums["top1"] / max(sums["count"], 1),
        "train_top5": sums["top5"] / max(sums["count"], 1),
    }
    logging.info("Epoch %d/%d: %s", epoch + 1, config.epochs,
                 ", ".join(f"{k} {v:.4f}" for k, v in epoch_metrics.items()
                           if k != "epoch"))
    last_epoch = epoch + 1 == config.epochs
    if eval_split and ((epoch + 1) % eval_every_epochs == 0 or last_epoch):
      test = evaluate_network(network,
                              data.eval_stream(eval_split, _EVAL_BATCH_SIZE))
      epoch_metrics.update({f"{test_prefix}_{k}": v for k, v in test.items()})
      _write_eval_summaries(writers["test"], test, step)
      logging.info("Epoch %d %s: top-1 %.4f, top-5 %.4f", epoch + 1,
                   eval_split, test["top1"], test["top5"])
      if validation is not None:
        epoch_metrics.update(_evaluate_validation(
            network, validation, writers["validation"], step))

  # Without eval_every_epochs, and in a resumed run that had trained every
  # step already, the held-out examples are evaluated here, once.
  if validation is not None and "validation_top1" not in epoch_metrics:
    epoch_metrics.update(_evaluate_validation(
        network, validation, writers["validation"], step))

  for writer in writers.values():
    writer.flush()
  metrics = dict(epoch_metrics, steps=step,
                 seconds_this_session=round(time.time() - started, 1))
  if model_dir != chief_dir:
    shutil.rmtree(model_dir, ignore_errors=True)
    logging.info("Worker finished; the chief writes %s.", result_path)
    return RetrainResult(chief_dir, step, resumed, False, metrics)
  search.write_text_atomic(result_path,
                           json.dumps(metrics, indent=2, sort_keys=True) + "\n")
  logging.info("Retrain finished: %s", result_path)
  return RetrainResult(model_dir, step, resumed, False, metrics)


def _write_eval_summaries(writer, metrics, step):
  with writer.as_default(step=step):
    for name in ("loss", "top1", "top5"):
      tf.summary.scalar(name, metrics[name])
  writer.flush()


def _evaluate_validation(network, dataset, writer, step):
  """Evaluate on the held-out examples; return their validation_* metrics."""
  metrics = evaluate_network(network, dataset)
  _write_eval_summaries(writer, metrics, step)
  logging.info("Step %d, %d held-out examples: top-1 %.4f, top-5 %.4f, loss "
               "%.4f", step, metrics["examples"], metrics["top1"],
               metrics["top5"], metrics["loss"])
  return {f"validation_{name}": value for name, value in metrics.items()}


def _write_step_summaries(writer, step_metrics, optimizer, network, step):
  with writer.as_default(step=step):
    tf.summary.scalar("loss", step_metrics["loss"])
    tf.summary.scalar("top1", step_metrics["top1"])
    tf.summary.scalar("top5", step_metrics["top5"])
    tf.summary.scalar("learning_rate", float(keras.ops.convert_to_numpy(
        optimizer.learning_rate)))
    tf.summary.scalar("drop_path_rate",
                      float(network.drop_path_rate.numpy()))

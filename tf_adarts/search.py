"""One architecture search from a config to a run directory.

`run_search(config, model_dir)` is what `python -m train.search` runs, and
what a notebook or a study calls. The run directory describes itself:

  config.json                 the resolved SearchConfig
  data.json                   class names, split sizes, normalization used
  checkpoints/                tf.train.CheckpointManager: weights, alpha,
                              beta, edge weights, three optimizer states,
                              the step (the epoch follows from it)
  genotypes/epoch_NNN.json    the genotype after each epoch
  arch_weights/epoch_NNN.json softmaxed alpha, beta and edge weights
  genotype.json               the final genotype; written last
  normal_cell.png, reduce_cell.png
  logs/train, logs/val        TensorBoard event files

Running again on the same directory resumes from the latest checkpoint.
Every random draw of the search (data order, augmentation, RReLU slopes)
follows from the seed and the step, so with `deterministic` a search
killed at any point and resumed ends as an uninterrupted one would.
"""

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from typing import Optional

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tf_adarts import data as data_lib
from tf_adarts import determinism
from tf_adarts import distribute
from tf_adarts import genotype as genotype_lib
from tf_adarts import networks
from tf_adarts import operations
from tf_adarts import presets
from tf_adarts import search_space
from tf_adarts import supernet
from tf_adarts import trainer
from tf_adarts import visualize

CONFIG_FILE = "config.json"
DATA_FILE = "data.json"
GENOTYPE_FILE = "genotype.json"
CONFIG_A_PREFIX = "config_a:"
# bfloat16 keeps float32's exponent range, so the three optimizers need no
# loss scaling; it runs on recent GPUs, TPUs and this project's CPU tests.
MIXED_PRECISION_POLICY = "mixed_bfloat16"


class SearchError(RuntimeError):
  """A search stopped on bad input or a diverged loss."""


@dataclasses.dataclass
class SearchResult:
  """The outcome of a search run: its genotype and where it was written."""
  genotype: genotype_lib.Genotype
  model_dir: str
  steps: int
  resumed: bool
  already_finished: bool


# Files.


def write_text_atomic(path, text):
  """Write `text` to `path` through a temporary file and a rename."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  handle, temp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-")
  try:
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
      stream.write(text)
    os.chmod(temp_path, 0o644)  # mkstemp makes it readable by its owner only.
    os.replace(temp_path, path)
  except BaseException:
    if os.path.exists(temp_path):
      os.remove(temp_path)
    raise


def write_bytes_atomic(path, payload):
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  handle, temp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-")
  try:
    with os.fdopen(handle, "wb") as stream:
      stream.write(payload)
    os.chmod(temp_path, 0o644)
    os.replace(temp_path, path)
  except BaseException:
    if os.path.exists(temp_path):
      os.remove(temp_path)
    raise


def _write_json(path, value):
  write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


# Space and frozen beta.


def resolve_space(space_name):
  """Return (SearchSpace, frozen beta or None) for a --space value.

  `config_a:RUN_DIR` is the factorized space with beta frozen to the final
  softmaxed beta of the factorized search in RUN_DIR.
  """
  if not space_name.startswith(CONFIG_A_PREFIX):
    return search_space.get_space(space_name), None

  run_dir = space_name[len(CONFIG_A_PREFIX):]
  final = latest_arch_weights(run_dir)
  if final is None or "beta_normal" not in final:
    raise SearchError(
        f"--space={space_name}: no beta found under {run_dir}/arch_weights. "
        "Config-A needs the run directory of a finished factorized search.")
  # log(p) has softmax p, so the frozen raw beta reproduces the stored
  # softmax exactly.
  frozen = {name: np.log(np.maximum(np.asarray(final[name], np.float64),
                                    1e-30)).astype(np.float32)
            for name in ("beta_normal", "beta_reduce")}
  return search_space.factorized_space(), frozen


def latest_arch_weights(run_dir):
  """Return the last arch_weights/epoch_NNN.json of a run, or None."""
  folder = os.path.join(run_dir, "arch_weights")
  if not os.path.isdir(folder):
    return None
  files = sorted(f for f in os.listdir(folder)
                 if f.startswith("epoch_") and f.endswith(".json"))
  if not files:
    return None
  with open(os.path.join(folder, files[-1]), encoding="utf-8") as stream:
    return json.load(stream)


# The run directory.


def normalize_config(config):
  """Return the config with its dataset and Config-A paths made absolute.

  A run directory then reruns from any working directory, and a resume
  from another one is not taken for a change of settings.
  """
  changes = {}
  for prefix in ("folder:", "tfrecord:"):
    if config.dataset.startswith(prefix):
      path = config.dataset[len(prefix):]
      if not path.strip():
        raise SearchError(
            f"dataset={config.dataset!r} has no path; give "
            f"{prefix}PATH.")
      changes["dataset"] = prefix + os.path.abspath(os.path.expanduser(path))
  if config.space.startswith(CONFIG_A_PREFIX):
    path = config.space[len(CONFIG_A_PREFIX):]
    changes["space"] = CONFIG_A_PREFIX + os.path.abspath(
        os.path.expanduser(path))
  return config.replace(**changes)


def _check_run_directory(config, model_dir):
  """Compare the config with the one stored in model_dir, if any.

  Returns:
    True when the directory already contains a run (which is then resumed).
  """
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.exists(path):
    return False

  with open(path, encoding="utf-8") as stream:
    stored = presets.SearchConfig.from_json(json.load(stream))
  differences = presets.result_differences(stored, config)
  if differences:
    raise SearchError(
        f"{model_dir} contains a search with other settings, so it cannot be "
        "resumed with these. Use a new run directory, or rerun with the "
        f"stored settings ({model_dir}/config.json; the binary also writes "
        f"{model_dir}/flags.txt). Differences (stored -> requested):\n  "
        + "\n  ".join(differences))
  return True


def _data_config(config):
  return data_lib.DataConfig(
      dataset=config.dataset, data_dir=config.data_dir,
      download=config.download, split_mode=config.split_mode,
      train_portion=config.train_portion,
      train_fraction=config.train_fraction,
      val_fraction=config.val_fraction, image_size=config.image_size,
      augment=config.augment, batch_size=config.batch_size, seed=config.seed,
      skip_corrupt_images=config.skip_corrupt_images,
      max_train_examples=config.max_train_examples)


def build_search_model(config, num_classes, steps_per_epoch,
                       frozen_beta=None, space=None):
  """Build the network, the search model and its three optimizers.

  Call inside the strategy scope: the optimizers are built there.
  """
  if space is None:
    space, frozen_beta = resolve_space(config.space)

  # Layers take the dtype policy in force when they are built.
  previous_policy = keras.mixed_precision.global_policy()
  if config.mixed_precision:
    keras.mixed_precision.set_global_policy(MIXED_PRECISION_POLICY)
  try:
    network = supernet.SearchNetwork(
        num_classes, space, channels=config.channels, layers=config.layers,
        stem=config.stem, partial_channels=config.partial_channels,
        edge_normalization=config.edge_normalization)
  finally:
    keras.mixed_precision.set_global_policy(previous_policy)
  model = trainer.SearchModel(
      network, arch_update=config.arch_update,
      weight_decay=config.weight_decay,
      arch_weight_decay=config.arch_weight_decay, clip_norm=config.clip_norm,
      frozen_beta=frozen_beta,
      warmup_steps=config.warmup_epochs * steps_per_epoch,
      arch_update_every=config.arch_update_every, seed=config.seed)

  total_steps = max(1, steps_per_epoch * config.epochs)
  schedule = keras.optimizers.schedules.CosineDecay(
      config.learning_rate, decay_steps=total_steps,
      alpha=config.min_learning_rate / config.learning_rate)
  weight_optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum,
                                          name="weight_sgd")

  def adam(name):
    return keras.optimizers.Adam(
        config.arch_learning_rate, beta_1=config.arch_beta_1,
        beta_2=config.arch_beta_2, epsilon=1e-8, name=name)

  model.compile(weight_optimizer, adam("alpha_adam"), adam("beta_adam"))
  return model


def _validate(config):
  if config.epochs < 1:
    raise SearchError(f"epochs={config.epochs}; give at least 1.")
  if not 0 <= config.warmup_epochs < config.epochs:
    raise SearchError(
        f"warmup_epochs={config.warmup_epochs} must be at least 0 and below "
        f"epochs={config.epochs}, or the architecture never trains.")
  if config.batch_size < 1:
    raise SearchError(f"batch_size={config.batch_size}; give at least 1.")
  if config.learning_rate <= 0 or config.min_learning_rate < 0 or (
      config.min_learning_rate > config.learning_rate):
    raise SearchError(
        f"learning_rate={config.learning_rate} and min_learning_rate="
        f"{config.min_learning_rate}: need 0 <= min <= learning_rate, "
        "learning_rate > 0.")
  if config.channels % config.partial_channels:
    raise SearchError(
        f"channels={config.channels} is not divisible by partial_channels="
        f"{config.partial_channels}.")
  if config.arch_update_every < 1:
    raise SearchError(
        f"arch_update_every={config.arch_update_every}; give at least 1 "
        "(1 updates the architecture after every weight step).")
  if (config.space.startswith(CONFIG_A_PREFIX)
      and config.arch_update == trainer.JOINT):
    logging.warning("Config-A freezes beta; arch_update=joint then updates "
                    "alpha only.")


# Summaries.


def _entropy(probabilities):
  p = np.clip(probabilities, 1e-12, 1.0)
  return float(np.mean(-np.sum(p * np.log(p), axis=-1)))


def softmaxed_arch_weights(network):
  """Return the softmax of alpha and beta per edge, and of the edge weights
  per node, as numpy arrays by name."""
  result = {}
  for name, value in network.arch_numpy().items():
    if name.startswith("edge_weights"):
      parts = []
      start = 0
      for node in genotype_lib.INTERMEDIATE_NODES:
        row = value[start:start + node]
        parts.append(np.exp(row - row.max()) / np.exp(row - row.max()).sum())
        start += node
      result[name] = np.concatenate(parts)
    else:
      shifted = np.exp(value - value.max(axis=-1, keepdims=True))
      result[name] = shifted / shifted.sum(axis=-1, keepdims=True)
  return result


def _column_labels(space, name):
  if name.startswith("beta"):
    return list(space.activations.names)
  return [op if act is None else f"{op}/{act}"
          for op, act in space.alpha_candidates]


def genotype_parameter_count(genotype, space):
  """Return the parameters of the genotype's CIFAR retraining network.

  The network has 36 channels, 20 cells and 10 classes, and the count
  leaves out the auxiliary head, as the DARTS code counts it. A genotype
  that drifts towards parameter-free cells shows as a falling count.
  """
  network = networks.NetworkCIFAR(genotype, num_classes=10, channels=36,
                                  layers=20, auxiliary=False, space=space)
  return networks.count_params(network)


def _write_epoch_summaries(writer, network, genotype, step):
  """Write heatmaps, entropies, the skip count and the genotype as text."""
  weights = softmaxed_arch_weights(network)
  with writer.as_default(step=step):
    for name, value in weights.items():
      if value.ndim != 2:
        continue
      png = visualize.heatmap_png(
          value, visualize.edge_labels(),
          _column_labels(network.space, name), f"softmax({name})")
      tf.summary.image(name, tf.image.decode_png(png, channels=3)[None])
      tf.summary.scalar(f"entropy/{name}", _entropy(value))
    skips = sum(1 for e in genotype.normal if e.op == "skip_connect")
    tf.summary.scalar("skip_connect/normal", skips)
    tf.summary.scalar("genotype_params/cifar_36x20",
                      genotype_parameter_count(genotype, network.space))
    tf.summary.text("genotype", "```\n" + genotype.to_json_string() + "\n```")
  writer.flush()


# The loop.


def search_checkpoint(model, step_variable):
  """Return the tf.train.Checkpoint of a search: every variable it needs.

  The network's variables are listed explicitly: with Keras 3.15 on
  TensorFlow 2.21 a checkpoint of the network object tracks only the
  variables it owns directly, not those of layers kept in Python lists
  (the cells), so a resumed search would restart them from scratch. The
  list order is fixed by the network's structure, which config.json pins.
  """
  return tf.train.Checkpoint(
      network_variables=list(model.network.variables),
      weight_optimizer=model.weight_optimizer,
      alpha_optimizer=model.alpha_optimizer,
      beta_optimizer=model.beta_optimizer, step=step_variable)


def _make_train_function(model, strategy):

  @tf.function
  def train_step(batch):
    logs = strategy.run(model.train_step, args=(batch,))
    return {name: strategy.reduce(tf.distribute.ReduceOp.MEAN, value,
                                  axis=None)
            for name, value in logs.items()}

  return train_step


class _Progress:
  """A Keras progress bar, or log lines with rate and time left."""

  def __init__(self, steps_per_epoch, total_steps, batch_size, verbose):
    self.steps_per_epoch = steps_per_epoch
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.verbose = verbose
    self.bar = None
    self.start = time.time()
    self.start_step = None
    self.last_log = 0.0

  def epoch_begin(self, epoch, epochs, step_in_epoch):
    logging.info("Epoch %d/%d", epoch + 1, epochs)
    if self.verbose == 1:
      self.bar = keras.utils.Progbar(self.steps_per_epoch)
      if step_in_epoch:
        self.bar.update(step_in_epoch)

  def step_end(self, step, step_in_epoch, logs):
    if self.start_step is None:
      # Rates leave out the first step, which includes tracing.
      self.start_step = step
      self.start = time.time()
    if self.bar is not None:
      self.bar.update(step_in_epoch, [(k, float(v)) for k, v in logs.items()])
    now = time.time()
    if self.verbose != 1 and now - self.last_log > 30:
      self.last_log = now
      done = step - self.start_step
      rate = done / max(now - self.start, 1e-9)
      left = (self.total_steps - step) / rate if rate > 0 else float("nan")
      logging.info(
          "step %d/%d, %.1f images/s, %.0f s left, %s", step,
          self.total_steps, rate * self.batch_size, left,
          ", ".join(f"{k} {float(v):.4f}" for k, v in logs.items()))


def run_search(config: presets.SearchConfig, model_dir: str, *,
               checkpoint_every_steps: Optional[int] = None,
               keep_checkpoints: int = 3, strategy=None, verbose: int = 1,
               summary_every_steps: int = 10,
               before_start=None) -> SearchResult:
  """Run (or resume) an architecture search and write its run directory.

  Args:
    config: the resolved settings.
    model_dir: the run directory; an existing one is resumed.
    checkpoint_every_steps: also save a checkpoint every this many steps
      (always at the end of each epoch).
    keep_checkpoints: checkpoints kept on disk.
    strategy: a tf.distribute strategy (default: the current one).
    verbose: 1 shows a progress bar, 0 logs a line every 30 s.
    summary_every_steps: TensorBoard scalars every this many steps.
    before_start: called once the settings are accepted, before training
      (the binary writes its flagfile there).

  Returns:
    A SearchResult with the final genotype.

  Raises:
    SearchError: on contradictory settings, a run directory written with
      other settings, or a non-finite loss (the last good checkpoint
      stays).
  """
  config = normalize_config(config)
  _validate(config)
  # A deterministic run needs Grappler off (see the determinism module).
  with determinism.graph_optimizer(
      config.graph_optimizer and not config.deterministic):
    return _run_search(config, model_dir, strategy,
                       checkpoint_every_steps=checkpoint_every_steps,
                       keep_checkpoints=keep_checkpoints, verbose=verbose,
                       summary_every_steps=summary_every_steps,
                       before_start=before_start)


def _run_search(config, model_dir, strategy, *, checkpoint_every_steps,
                keep_checkpoints, verbose, summary_every_steps, before_start):
  strategy = strategy or tf.distribute.get_strategy()
  final_path = os.path.join(model_dir, GENOTYPE_FILE)
  chief_dir = model_dir
  if not distribute.is_chief(strategy):
    # Every worker saves checkpoints (the saving is collective), but only
    # the chief's go to model_dir; the others write a scratch copy.
    model_dir = distribute.worker_directory(chief_dir, strategy)
  resumed = _check_run_directory(config, model_dir)
  if os.path.exists(final_path):
    logging.info("The search in %s has finished; its genotype is %s.",
                 model_dir, final_path)
    return SearchResult(genotype_lib.load(final_path), model_dir, -1,
                        resumed=True, already_finished=True)

  if config.deterministic:
    determinism.enable_determinism()
  keras.utils.set_random_seed(config.seed)

  space, frozen_beta = resolve_space(config.space)
  data_config = _data_config(config)
  source_info = data_lib.build_search_data(data_config, start_step=0)
  steps_per_epoch = source_info.steps_per_epoch
  if not resumed:
    # Stored once the data has loaded, so a run that fails on its input
    # leaves no config behind to block a corrected rerun.
    write_text_atomic(os.path.join(model_dir, CONFIG_FILE),
                      config.to_json_string() + "\n")
  if before_start is not None:
    before_start()
  if source_info.skipped_images:
    logging.warning("Skipped %d corrupt images: %s",
                    len(source_info.skipped_images),
                    ", ".join(source_info.skipped_images[:10]))
  total_steps = steps_per_epoch * config.epochs

  with strategy.scope(), operations.synchronized_batch_norm(
      config.sync_batch_norm):
    model = build_search_model(config, source_info.num_classes,
                               steps_per_epoch, frozen_beta, space)
    step_variable = tf.Variable(0, dtype=tf.int64, trainable=False,
                                name="step")
  network = model.network
  checkpoint = search_checkpoint(model, step_variable)
  manager = tf.train.CheckpointManager(
      checkpoint, os.path.join(model_dir, "checkpoints"),
      max_to_keep=keep_checkpoints, step_counter=step_variable)
  if manager.latest_checkpoint:
    checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    logging.info("Resumed %s at step %d.", manager.latest_checkpoint,
                 int(step_variable.numpy()))
  start_step = int(step_variable.numpy())

  _write_json(os.path.join(model_dir, DATA_FILE), {
      "dataset": config.dataset,
      "class_names": list(source_info.class_names),
      "num_classes": source_info.num_classes,
      "image_size": source_info.image_size,
      "mean": [float(v) for v in source_info.mean],
      "std": [float(v) for v in source_info.std],
      "train_size": source_info.train_size,
      "val_size": source_info.val_size,
      "steps_per_epoch": steps_per_epoch,
      "skipped_images": list(source_info.skipped_images),
  })

  streams = (source_info.streams if start_step == 0 else
             source_info.streams_from(start_step))
  iterator = iter(strategy.experimental_distribute_dataset(streams))
  writers = {
      "train": tf.summary.create_file_writer(
          os.path.join(model_dir, "logs", "train")),
      "val": tf.summary.create_file_writer(
          os.path.join(model_dir, "logs", "val")),
  }
  progress = _Progress(steps_per_epoch, total_steps, config.batch_size,
                       verbose)
  # The step with and the step without the architecture updates (warm-up,
  # arch_update_every > 1), each traced at its first call. A tf.cond would
  # fail under MirroredStrategy, which cannot sum across replicas in a branch.
  train_functions = {}

  step = start_step
  while step < total_steps:
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    model.reset_metrics()
    progress.epoch_begin(epoch, config.epochs, step_in_epoch)

    for step_in_epoch in range(step_in_epoch, steps_per_epoch):
      enabled = model.arch_updates_due(step)
      model.arch_updates_enabled = enabled
      if enabled not in train_functions:
        train_functions[enabled] = _make_train_function(model, strategy)
      logs = train_functions[enabled](next(iterator))
      logs = {name: value.numpy() for name, value in logs.items()}
      if not np.isfinite(logs["loss"]) or (
          enabled and not np.isfinite(logs["arch_loss"])):
        raise SearchError(
            f"The loss became {logs['loss']} (arch_loss "
            f"{logs.get('arch_loss')}) at step {step + 1}; the search "
            "diverged. The last good checkpoint in "
            f"{manager.directory} is kept. Lower the learning rates or "
            "check the input data.")
      step += 1
      step_variable.assign(step)
      progress.step_end(step, step_in_epoch + 1, logs)

      if step % summary_every_steps == 0 or step_in_epoch + 1 == steps_per_epoch:
        _write_step_summaries(writers, model, logs, step)
      if checkpoint_every_steps and step % checkpoint_every_steps == 0:
        manager.save(checkpoint_number=step)

    manager.save(checkpoint_number=step)
    _end_epoch(model_dir, network, writers["train"], epoch, step)

  genotype = network.genotype()
  if model_dir != chief_dir:
    # A non-chief worker: its genotype equals the chief's, which the chief
    # writes. The scratch copy goes.
    shutil.rmtree(model_dir, ignore_errors=True)
    logging.info("Worker finished; the chief writes %s.", final_path)
    return SearchResult(genotype, chief_dir, step, resumed, False)
  _write_cell_drawings(model_dir, genotype)
  genotype.save(final_path)
  logging.info("Search finished: %s", final_path)
  return SearchResult(genotype, model_dir, step, resumed, False)


def _write_step_summaries(writers, model, logs, step):
  with writers["train"].as_default(step=step):
    tf.summary.scalar("loss", logs["loss"])
    tf.summary.scalar("accuracy", logs["accuracy"])
    for name, optimizer in (("weights", model.weight_optimizer),
                            ("alpha", model.alpha_optimizer),
                            ("beta", model.beta_optimizer)):
      tf.summary.scalar(f"learning_rate/{name}",
                        float(keras.ops.convert_to_numpy(
                            optimizer.learning_rate)))
  # Skip the validation scalars until an architecture update has run since
  # the metrics were reset, because the mean of no steps reads 0.
  if "arch_loss" in logs and int(model.arch_loss_tracker.count.numpy()):
    with writers["val"].as_default(step=step):
      tf.summary.scalar("loss", logs["arch_loss"])
      tf.summary.scalar("accuracy", logs["arch_accuracy"])


def _end_epoch(model_dir, network, writer, epoch, step):
  genotype = network.genotype()
  number = f"{epoch + 1:03d}"
  genotype.save(os.path.join(model_dir, "genotypes", f"epoch_{number}.json"))
  weights = softmaxed_arch_weights(network)
  _write_json(os.path.join(model_dir, "arch_weights", f"epoch_{number}.json"),
              {name: value.tolist() for name, value in weights.items()})
  _write_epoch_summaries(writer, network, genotype, step)
  logging.info("Epoch %d genotype: %s", epoch + 1,
               json.dumps(genotype.to_json()))


def _write_cell_drawings(model_dir, genotype):
  for cell in genotype_lib.CELL_TYPES:
    png = visualize.cell_png(getattr(genotype, cell),
                             getattr(genotype, f"{cell}_concat"),
                             f"{cell} cell")
    write_bytes_atomic(os.path.join(model_dir, f"{cell}_cell.png"), png)

"""Retrain a searched genotype from scratch.

  python -m train.retrain --preset=cpu_smoke --genotype=DARTS_V2 \
      --dataset=folder:../shared/data/cifar10 --model_dir=runs/retrain_smoke

A preset names a recipe; flags given explicitly override it. --genotype
takes a published name (DARTS_V2), a genotype JSON file or the run
directory of a finished search. The resolved flags are written to
MODEL_DIR/flags.txt, so `python -m train.retrain
--flagfile=MODEL_DIR/flags.txt` reruns (or resumes) the same retrain.
Running again on an existing MODEL_DIR resumes from its latest checkpoint.
Evaluate the result with `python -m train.evaluate --model_dir=MODEL_DIR`.
"""

import dataclasses
import os
import sys

from absl import app
from absl import flags
from absl import logging

from tf_adarts import retrain
from tf_adarts import search
from train import distribution_flags

# Help text per RetrainConfig field: what it sets, with its unit.
_HELP = {
    "genotype": "The architecture: a published genotype name (DARTS_V1, "
                "DARTS_V2, PC_DARTS_cifar, PC_DARTS_image, PDARTS), a "
                "genotype JSON file, or a search run directory (its "
                "genotype.json).",
    "activation_override": "An activation that replaces every searched "
                           "activation (e.g. relu or selu); unset keeps the "
                           "genotype's.",
    "network": "Network: cifar (NetworkCIFAR, 3x3 stem) or imagenet "
               "(NetworkImageNet, three stride-2 convolutions).",
    "channels": "Initial channels C (ignored when --max_flops is set).",
    "layers": "Cells; reduction cells at 1/3 and 2/3 of the depth.",
    "auxiliary": "Add the auxiliary head after the cell at 2/3 depth.",
    "max_flops": "FLOPs budget in millions of multiply-adds at image_size; "
                 "picks the widest network within it (600 for the ImageNet "
                 "mobile setting). Unset uses --channels.",
    "dataset": "Images: a TFDS name (cifar10, imagenet2012), folder:PATH "
               "(one subfolder per class under train/ and test/) or "
               "tfrecord:PATTERN.",
    "data_dir": "TFDS data directory (default: TFDS's own).",
    "download": "Let TFDS download a missing dataset.",
    "image_size": "Input height and width, in pixels.",
    "augment": "Training augmentation: cifar (pad 4, random crop, flip), "
               "imagenet (random resized crop, flip) or none.",
    "cutout": "Side of the cutout square, in pixels; 0 disables cutout.",
    "max_train_examples": "Train on a class-balanced subset of this many "
                          "images; unset uses the whole training split.",
    "validation_examples": "Hold out this many class-balanced images of the "
                           "training split from training, and evaluate on "
                           "them after the last epoch (and at each "
                           "--eval_every_epochs evaluation): validation_* "
                           "in result.json, TensorBoard logs/validation. 0 "
                           "holds out none.",
    "epochs": "Training epochs (one epoch: one pass over the training "
              "images).",
    "batch_size": "Global batch size, in images.",
    "learning_rate": "Peak SGD learning rate (per step).",
    "min_learning_rate": "Learning rate at the end of the cosine schedule.",
    "warmup_epochs": "Epochs of linear learning-rate warm-up from 0.",
    "momentum": "SGD momentum.",
    "weight_decay": "Coupled L2 weight decay (added to the gradient).",
    "clip_norm": "Global-norm clip of the gradients; 0 disables it.",
    "label_smoothing": "Label smoothing of the cross entropy, in [0, 1).",
    "auxiliary_weight": "Weight of the auxiliary head's loss.",
    "drop_path_rate": "Final drop path rate; it rises linearly from 0 over "
                      "the epochs.",
    "seed": "Seed of every random draw: initialization, subset, data order, "
            "augmentation, cutout, drop path, RReLU slopes.",
    "deterministic": "Use deterministic ops and turn TensorFlow's graph "
                     "optimizer (Grappler) off, so that two runs with one "
                     "seed, and a resumed run, end bit for bit alike.",
    "mixed_precision": "Compute in bfloat16; variables stay float32.",
    "sync_batch_norm": "Synchronized batch norm: with several replicas, "
                       "the batch statistics cover the global batch instead "
                       "of each replica's part.",
}

_PRESET = flags.DEFINE_enum(
    "preset", "cifar10", sorted(retrain.RETRAIN_PRESETS),
    "Recipe that gives every setting not set by another flag.")
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Run directory: checkpoints, logs, run_meta.json. An "
    "existing one is resumed.")
_CHECKPOINT_EVERY_STEPS = flags.DEFINE_integer(
    "checkpoint_every_steps", 200,
    "Also save a checkpoint every this many steps (one is always saved at "
    "the end of an epoch); 0 saves only at epoch ends.")
_KEEP_CHECKPOINTS = flags.DEFINE_integer(
    "keep_checkpoints", 3, "Checkpoints kept in MODEL_DIR/checkpoints.")
_VERBOSE = flags.DEFINE_integer(
    "verbose", 1, "1: a progress bar; 0: a log line every 30 s with "
    "images per second and the time left.")
_SUMMARY_EVERY_STEPS = flags.DEFINE_integer(
    "summary_every_steps", 10, "TensorBoard scalars every this many steps.")
_EVAL_EVERY_EPOCHS = flags.DEFINE_integer(
    "eval_every_epochs", 0, "Evaluate on the test split every this many "
    "epochs and after the last one (TensorBoard logs/test); 0 never.")

_RUN_FLAGS = ("model_dir", "checkpoint_every_steps", "keep_checkpoints",
              "verbose", "summary_every_steps", "eval_every_epochs")
_OPTIONAL_INTEGERS = ("max_train_examples",)
_OPTIONAL_FLOATS = ("max_flops",)


def _define_config_flags():
  """Define one flag per RetrainConfig field, unset by default."""
  for field in dataclasses.fields(retrain.RetrainConfig):
    help_text = _HELP[field.name]
    help_text += f" Default: the preset's (cifar10: {field.default!r})."
    if field.type in (bool, "bool"):
      flags.DEFINE_bool(field.name, None, help_text)
    elif field.type in (int, "int") or field.name in _OPTIONAL_INTEGERS:
      flags.DEFINE_integer(field.name, None, help_text)
    elif field.type in (float, "float") or field.name in _OPTIONAL_FLOATS:
      flags.DEFINE_float(field.name, None, help_text)
    else:
      flags.DEFINE_string(field.name, None, help_text)


_define_config_flags()
FLAGS = flags.FLAGS


def resolve_config():
  """Return the preset with every explicitly given flag applied on top."""
  config = retrain.get_preset(_PRESET.value)
  changes = {field.name: FLAGS[field.name].value
             for field in dataclasses.fields(retrain.RetrainConfig)
             if FLAGS[field.name].present}
  return distribution_flags.scale_learning_rates(config,
                                                 config.replace(**changes))


def flagfile_text(config):
  """Flags that rerun this retrain: the preset and every resolved value."""
  lines = [f"--preset={_PRESET.value}"]
  for field in dataclasses.fields(retrain.RetrainConfig):
    value = getattr(config, field.name)
    if value is None:
      continue
    if isinstance(value, bool):
      lines.append(f"--{field.name}" if value else f"--no{field.name}")
    else:
      lines.append(f"--{field.name}={value}")
  for name in _RUN_FLAGS:
    lines.append(f"--{name}={FLAGS[name].value}")
  lines.extend(distribution_flags.flagfile_lines())
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _MODEL_DIR.value:
    raise app.UsageError("--model_dir is required: the run directory.")
  # First: a multi-worker strategy must exist before any TensorFlow op.
  try:
    strategy = distribution_flags.strategy_from_flags()
  except (ValueError, RuntimeError) as error:
    raise app.UsageError(str(error)) from None
  try:
    config = retrain.normalize_config(resolve_config())
  except ValueError as error:
    raise app.UsageError(str(error)) from None

  model_dir = _MODEL_DIR.value
  try:
    result = retrain.run_retrain(
        config, model_dir,
        checkpoint_every_steps=_CHECKPOINT_EVERY_STEPS.value or None,
        keep_checkpoints=_KEEP_CHECKPOINTS.value, verbose=_VERBOSE.value,
        strategy=strategy,
        summary_every_steps=_SUMMARY_EVERY_STEPS.value,
        eval_every_epochs=_EVAL_EVERY_EPOCHS.value,
        before_start=lambda: search.write_text_atomic(
            os.path.join(model_dir, "flags.txt"), flagfile_text(config)))
  except (retrain.RetrainError, ValueError) as error:
    logging.error("%s", error)
    print(f"error: {error}", file=sys.stderr)
    return 1

  result_path = os.path.join(model_dir, retrain.RESULT_FILE)
  if result.already_finished:
    print(f"The retrain in {model_dir} has already finished; see "
          f"{result_path}.")
  else:
    print(f"Retrain finished after {result.steps} steps; metrics in "
          f"{result_path}.")
  return 0


if __name__ == "__main__":
  app.run(main)

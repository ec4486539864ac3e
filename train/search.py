"""Run a factorized differentiable architecture search.

  python -m train.search --preset=cpu_smoke \
      --dataset=folder:../shared/data/cifar10 --model_dir=runs/smoke

A preset names a published recipe; flags given explicitly override it. The
resolved flags are written to MODEL_DIR/flags.txt, so
`python -m train.search --flagfile=MODEL_DIR/flags.txt` reruns (or resumes)
the same search. Running again on an existing MODEL_DIR resumes it from its
latest checkpoint.
"""

import dataclasses
import os
import sys

from absl import app
from absl import flags

from tf_adarts import presets
from tf_adarts import search
from train import distribution_flags

# Help text per SearchConfig field: what it sets, with its unit.
_HELP = {
    "dataset": "Images: a TFDS name (cifar10, cifar100, imagenet2012), "
               "folder:PATH (one subfolder per class, optionally under "
               "train/ and test/) or tfrecord:PATTERN (tf.train.Example with "
               "image/encoded and image/class/label).",
    "data_dir": "TFDS data directory (default: TFDS's own).",
    "download": "Let TFDS download a missing dataset.",
    "split_mode": "How the training split is divided into the weight (train) "
                  "and architecture (val) streams: portion or fractions.",
    "train_portion": "portion mode: share of the training split used to "
                     "train the weights; the rest trains alpha and beta.",
    "train_fraction": "fractions mode: per-class share of the training split "
                      "used to train the weights.",
    "val_fraction": "fractions mode: disjoint per-class share used to train "
                    "alpha and beta.",
    "max_train_examples": "Use at most this many training images (a "
                          "class-balanced subset); unset uses all.",
    "image_size": "Input height and width, in pixels.",
    "augment": "Training augmentation: cifar (pad 4, random crop, flip), "
               "imagenet (random resized crop, flip) or none.",
    "skip_corrupt_images": "Skip images that fail to decode (they are "
                           "counted in the log) instead of stopping.",
    "space": "Search space: factorized, non_factorized, fixed:ACTIVATION "
             "(e.g. fixed:relu) or config_a:RUN_DIR (beta frozen to the final "
             "beta of the factorized search in RUN_DIR).",
    "channels": "Initial channels C of the supernet.",
    "layers": "Cells in the supernet; reduction cells at 1/3 and 2/3.",
    "stem": "Supernet stem: cifar (3x3 convolution) or imagenet (three "
            "stride-2 convolutions).",
    "partial_channels": "PC-DARTS partial channels K: 1/K of the channels "
                        "go through each mixed operation; 1 disables it.",
    "edge_normalization": "Add PC-DARTS edge-normalization weights.",
    "epochs": "Search epochs (one epoch: one pass over the weight stream).",
    "batch_size": "Global batch size of each stream, in images.",
    "learning_rate": "Initial SGD learning rate of the weights (cosine "
                     "schedule, per step).",
    "min_learning_rate": "Final SGD learning rate of the weights.",
    "momentum": "SGD momentum of the weights.",
    "weight_decay": "Coupled L2 weight decay of the weights (added to the "
                    "gradient).",
    "clip_norm": "Global-norm clip of the weight gradients.",
    "arch_learning_rate": "Adam learning rate of alpha and of beta.",
    "arch_beta_1": "Adam beta_1 of alpha and of beta.",
    "arch_beta_2": "Adam beta_2 of alpha and of beta.",
    "arch_weight_decay": "Coupled L2 weight decay of alpha and beta.",
    "arch_update": "sequential (weights, then alpha, then beta from a new "
                   "pass) or joint (alpha and beta from one pass).",
    "arch_update_every": "Update alpha and beta only after every N-th "
                         "weight step (N counts weight steps). 1, every "
                         "step, is the published method; larger values "
                         "are faster and deviate from it.",
    "warmup_epochs": "Epochs at the start that train only the weights.",
    "seed": "Seed of every random draw: initialization, split, data order, "
            "augmentation, RReLU slopes.",
    "deterministic": "Use deterministic ops and turn TensorFlow's graph "
                     "optimizer (Grappler) off, so that two runs with one "
                     "seed, and a resumed run, end bit for bit alike.",
    "graph_optimizer": "Run TensorFlow's graph optimizer (Grappler) on the "
                       "search step. Off, the first step of the C=16 "
                       "fixed:relu search network started about 10 s sooner "
                       "on a 2-core CPU, and later steps were no slower. "
                       "--deterministic keeps it off.",
    "mixed_precision": "Compute in bfloat16 (for GPUs and TPUs); alpha, "
                       "beta and their softmax stay float32.",
    "sync_batch_norm": "Synchronized batch norm: with several replicas, "
                       "the batch statistics cover the global batch instead "
                       "of each replica's part.",
}

_PRESET = flags.DEFINE_enum(
    "preset", "a_darts_cifar10", sorted(presets.SEARCH_PRESETS),
    "Recipe that gives every setting not set by another flag.")
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Run directory: checkpoints, logs, genotypes. An "
    "existing one is resumed.")
_CHECKPOINT_EVERY_STEPS = flags.DEFINE_integer(
    "checkpoint_every_steps", 100,
    "Also save a checkpoint every this many steps (one is always saved at "
    "the end of an epoch); 0 saves only at epoch ends.")
_KEEP_CHECKPOINTS = flags.DEFINE_integer(
    "keep_checkpoints", 3, "Checkpoints kept in MODEL_DIR/checkpoints.")
_VERBOSE = flags.DEFINE_integer(
    "verbose", 1, "1: a progress bar; 0: a log line every 30 s with "
    "images per second and the time left.")
_SUMMARY_EVERY_STEPS = flags.DEFINE_integer(
    "summary_every_steps", 10, "TensorBoard scalars every this many steps.")

_RUN_FLAGS = ("model_dir", "checkpoint_every_steps", "keep_checkpoints",
              "verbose", "summary_every_steps")


def _define_config_flags():
  """One flag per SearchConfig field; unset flags take the preset's value."""
  for field in dataclasses.fields(presets.SearchConfig):
    help_text = _HELP[field.name]
    default = field.default
    help_text += f" Default: the preset's (a_darts_cifar10: {default!r})."
    if field.type in (bool, "bool"):
      flags.DEFINE_bool(field.name, None, help_text)
    elif field.type in (int, "int") or field.name == "max_train_examples":
      flags.DEFINE_integer(field.name, None, help_text)
    elif field.type in (float, "float"):
      flags.DEFINE_float(field.name, None, help_text)
    else:
      flags.DEFINE_string(field.name, None, help_text)


_define_config_flags()
FLAGS = flags.FLAGS


def resolve_config():
  """The preset, with every explicitly given flag applied on top."""
  config = presets.get_preset(_PRESET.value)
  changes = {field.name: FLAGS[field.name].value
             for field in dataclasses.fields(presets.SearchConfig)
             if FLAGS[field.name].present}
  return distribution_flags.scale_learning_rates(config,
                                                 config.replace(**changes))


def flagfile_text(config):
  """Flags that rerun this search: the preset and every resolved value."""
  lines = [f"--preset={_PRESET.value}"]
  for field in dataclasses.fields(presets.SearchConfig):
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
    config = search.normalize_config(resolve_config())
  except (ValueError, search.SearchError) as error:
    raise app.UsageError(str(error)) from None

  model_dir = _MODEL_DIR.value
  try:
    result = search.run_search(
        config, model_dir,
        checkpoint_every_steps=_CHECKPOINT_EVERY_STEPS.value or None,
        keep_checkpoints=_KEEP_CHECKPOINTS.value, verbose=_VERBOSE.value,
        strategy=strategy,
        summary_every_steps=_SUMMARY_EVERY_STEPS.value,
        before_start=lambda: search.write_text_atomic(
            os.path.join(model_dir, "flags.txt"), flagfile_text(config)))
  except (search.SearchError, ValueError, KeyError) as error:
    message = error.args[0] if isinstance(error, KeyError) else error
    print(f"error: {message}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"Interrupted. Run the same command to resume {model_dir} from its "
          "latest checkpoint (saved every --checkpoint_every_steps steps and "
          "at each epoch end).", file=sys.stderr)
    return 130

  if result.already_finished:
    print(f"The search in {model_dir} has already finished; its genotype is "
          f"{os.path.join(model_dir, search.GENOTYPE_FILE)}.")
  else:
    print(f"Genotype written to {os.path.join(model_dir, search.GENOTYPE_FILE)}")
  return 0


if __name__ == "__main__":
  app.run(main)

"""Search, retrain, export and predict in one command.

  python -m train.pipeline --preset=cpu_smoke \
      --dataset=folder:../shared/data/cifar10 --work_dir=runs/pipeline

The preset names a search preset and a retrain preset (cpu_smoke: both
cpu_smoke; a_darts_cifar10: the published search, then the cifar10
retrain). WORK_DIR receives search/, retrain/, export/MODEL_NAME/VERSION
(a SavedModel for TF-Serving) and predictions.json. The same command on an
existing WORK_DIR resumes: each stage continues from its last checkpoint,
and finished stages are skipped.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from tf_adarts import pipeline
from tf_adarts import retrain
from tf_adarts import search
from train import distribution_flags

_PRESET = flags.DEFINE_enum(
    "preset", "cpu_smoke", sorted(pipeline.PIPELINE_PRESETS),
    "Recipe for both stages: the search preset and the retrain preset of "
    "the same name (a_darts_cifar10 retrains with the cifar10 recipe). "
    "Default: cpu_smoke.")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", None, "Work directory: search/, retrain/, export/ and "
    "predictions.json. An existing one is resumed. Required.")
_DATASET = flags.DEFINE_string(
    "dataset", None, "Images for both stages: a TFDS name (cifar10), "
    "folder:PATH (one subfolder per class under train/ and test/) or "
    "tfrecord:PATTERN. Default: the presets' (cifar10 through TFDS).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory. Default: TFDS's own.")
_DOWNLOAD = flags.DEFINE_bool(
    "download", None, "Let TFDS download a missing dataset. Default: the "
    "presets' (cpu_smoke: on).")
_SEED = flags.DEFINE_integer(
    "seed", None, "Seed of both stages. Default: the presets' (0).")
_DETERMINISTIC = flags.DEFINE_bool(
    "deterministic", None, "Reproducible runs: op determinism on and "
    "Grappler off. Default: off.")
_MODEL_NAME = flags.DEFINE_string(
    "model_name", "adarts", "Model name under WORK_DIR/export, as TF-Serving "
    "serves it. Default: adarts.")
_NUM_PREDICTIONS = flags.DEFINE_integer(
    "num_predictions", 10, "Test images predicted with the exported model at "
    "the end, taken class by class. Default: 10.")
_VERBOSE = flags.DEFINE_integer(
    "verbose", 1, "1: progress bars; 0: a log line every 30 s with images "
    "per second and the time left. Default: 1.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _WORK_DIR.value:
    raise app.UsageError("--work_dir is required: the work directory.")
  # First: a multi-worker strategy must exist before any TensorFlow op.
  try:
    strategy = distribution_flags.strategy_from_flags()
  except (ValueError, RuntimeError) as error:
    raise app.UsageError(str(error)) from None
  try:
    result = pipeline.run_pipeline(
        _PRESET.value, _WORK_DIR.value, dataset=_DATASET.value,
        data_dir=_DATA_DIR.value, download=_DOWNLOAD.value,
        seed=_SEED.value, deterministic=_DETERMINISTIC.value,
        model_name=_MODEL_NAME.value,
        num_predictions=_NUM_PREDICTIONS.value, strategy=strategy,
        verbose=_VERBOSE.value)
  except (pipeline.PipelineError, search.SearchError, retrain.RetrainError,
          ValueError) as error:
    logging.error("%s", error)
    print(f"error: {error}", file=sys.stderr)
    return 1

  if not result.export_dir:
    print("This worker's part of the pipeline is done; the chief exports.")
    return 0
  print(f"Test top-1 of the retrained network: "
        f"{result.test_metrics['top1']:.4f}")
  print(f"Exported model: {result.export_dir}")
  print(pipeline.format_predictions(result.predictions))
  return 0


if __name__ == "__main__":
  app.run(main)

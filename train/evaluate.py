"""Evaluate a retrain run on its test split.

  python -m train.evaluate --model_dir=runs/retrain_smoke

The network is rebuilt from MODEL_DIR/run_meta.json alone (no training
flags are needed), the latest checkpoint is restored, and top-1 and top-5
accuracy are printed and written to MODEL_DIR/eval.json.
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging

from tf_adarts import retrain

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Run directory written by python -m train.retrain.")
_SPLIT = flags.DEFINE_string(
    "split", "test", "Split to evaluate; a dataset without a test split "
    "uses its validation split.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Checkpoint prefix to restore (e.g. "
    "MODEL_DIR/checkpoints/ckpt-100); default: the latest one.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 256, "Evaluation batch size, in images.")
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples", None, "Evaluate only the first this many examples (a "
    "quick check); default: the whole split.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory, for TFDS datasets.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _MODEL_DIR.value:
    raise app.UsageError("--model_dir is required: the retrain run directory.")
  try:
    metrics = retrain.evaluate_run(
        _MODEL_DIR.value, split=_SPLIT.value, checkpoint=_CHECKPOINT.value,
        batch_size=_BATCH_SIZE.value, max_examples=_MAX_EXAMPLES.value,
        data_dir=_DATA_DIR.value)
  except (retrain.RetrainError, ValueError) as error:
    logging.error("%s", error)
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(f"top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  "
        f"({metrics['examples']} images of {metrics['split']}, step "
        f"{metrics['step']})")
  print(json.dumps(metrics, sort_keys=True))
  return 0


if __name__ == "__main__":
  app.run(main)

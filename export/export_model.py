"""Export a retrain run as a SavedModel for TF-Serving.

  python -m export.export_model --model_dir=runs/retrain_smoke \
      --export_base=exported_models --model_name=adarts

This writes EXPORT_BASE/MODEL_NAME/VERSION (the next version unless
--version is given) with the serving_default and predict_image_bytes
signatures, warm-up requests and export_meta.json, and adds the model to
EXPORT_BASE/models.config. tf_adarts/export.py describes the signatures.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from tf_adarts import export

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Run directory written by python -m train.retrain.")
_EXPORT_BASE = flags.DEFINE_string(
    "export_base", None, "Folder of exported models; the version is written "
    "to EXPORT_BASE/MODEL_NAME/VERSION.")
_MODEL_NAME = flags.DEFINE_string(
    "model_name", "adarts", "TF-Serving model name, also the folder under "
    "--export_base.")
_VERSION = flags.DEFINE_integer(
    "version", None, "Version number, at least 1; default: one more than "
    "the largest existing version (1 for the first export).", lower_bound=1)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Checkpoint prefix to export, absolute or relative "
    "to MODEL_DIR/checkpoints (e.g. ckpt-100); default: the latest one.")
_TOP_K = flags.DEFINE_integer(
    "top_k", 5, "Number of best classes each signature returns; capped at "
    "the number of classes.", lower_bound=1)
_RESIZE = flags.DEFINE_bool(
    "resize", False, "Accept images of any size and resize them inside the "
    "model with the evaluation transform; by default images must have the "
    "training resolution.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an existing version folder instead of "
    "stopping with an error.")
_WARMUP_IMAGES = flags.DEFINE_list(
    "warmup_images", None, "JPEG or PNG files for the warm-up requests, "
    "comma-separated; default: a few images of the run's evaluation split.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _MODEL_DIR.value:
    raise app.UsageError("--model_dir is required: the retrain run directory.")
  if not _EXPORT_BASE.value:
    raise app.UsageError(
        "--export_base is required: the folder of exported models.")
  try:
    version_dir = export.export_run(
        _MODEL_DIR.value, _EXPORT_BASE.value, _MODEL_NAME.value,
        version=_VERSION.value, checkpoint=_CHECKPOINT.value,
        top_k=_TOP_K.value, resize=_RESIZE.value, overwrite=_OVERWRITE.value,
        warmup_images=_WARMUP_IMAGES.value)
  except export.ExportError as error:
    logging.error("%s", error)
    print(f"error: {error}", file=sys.stderr)
    return 1
  meta = export.load_export_meta(version_dir)
  print(f"Exported {meta['checkpoint']} (step {meta['step']}) to "
        f"{version_dir}")
  print(f"Signatures: {export.IMAGES_SIGNATURE} (images uint8), "
        f"{export.IMAGE_BYTES_SIGNATURE} (image_bytes string); top "
        f"{meta['top_k']} of {meta['num_classes']} classes.")
  return 0


if __name__ == "__main__":
  app.run(main)

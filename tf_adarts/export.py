"""SavedModel export of a retrain run for TF-Serving, and predictions from it.

`export_run(model_dir, export_base, model_name)` writes

  EXPORT_BASE/MODEL_NAME/VERSION/
    saved_model.pb, variables/      the inference graph: no auxiliary head,
                                    no drop path, preprocessing included
    assets.extra/tf_serving_warmup_requests
                                    PredictionLog records that TF-Serving
                                    replays when it loads the version
    assets.extra/export_meta.json   genotype, dataset, class names, image
                                    size, normalization, accuracy, export
                                    time, version
  EXPORT_BASE/models.config         a ModelServerConfig (text format) for
                                    tensorflow_model_server
                                    --model_config_file, one entry per model
                                    exported under EXPORT_BASE

Signatures (tag "serve"), with k = min(top_k, number of classes):

  serving_default       images: uint8 [batch, H, W, 3], pixel values 0..255
  predict_image_bytes   image_bytes: string [batch], encoded JPEG or PNG files

Both return probabilities float32 [batch, classes], classes int64
[batch, k] (the top-k class ids, best first), class_names string [batch, k]
and scores float32 [batch, k] (the top-k probabilities). H and W are the
training resolution, unless the export was made with resize=True: then
images of any size are accepted and get the evaluation transform of the
training pipeline (a resize to H x W for CIFAR-style runs, a resize of the
shorter side and a center crop for ImageNet-style runs).
"""

import dataclasses
import datetime
import json
import os
import re
import shutil
import tempfile
from typing import Optional, Sequence, Union

from absl import logging
from google.protobuf import text_format
import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from tf_adarts import data as data_lib
from tf_adarts import retrain
from tf_adarts import retrain_data
from tf_adarts import search

IMAGES_SIGNATURE = "serving_default"
IMAGE_BYTES_SIGNATURE = "predict_image_bytes"
# The input key of each signature.
SIGNATURE_INPUTS = {IMAGES_SIGNATURE: "images",
                    IMAGE_BYTES_SIGNATURE: "image_bytes"}
OUTPUT_KEYS = ("probabilities", "classes", "class_names", "scores")

EXTRA_ASSETS_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
EXPORT_META_FILE = "export_meta.json"
MODELS_CONFIG_FILE = "models.config"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Images per warm-up request; TF-Serving replays every record once per load.
_WARMUP_IMAGES = 4
# The largest difference in probabilities allowed between the exported
# signatures and the in-memory network when the export is checked.
_CHECK_TOLERANCE = 1e-4
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# TF-Serving uses the model name in URLs and as a folder name.
_MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ExportError(ValueError):
  """An export or a prediction stopped on bad input."""


# Restoring the run.


@dataclasses.dataclass(eq=False)
class RestoredRun:
  """A retrain run's network with the weights of one checkpoint.

  Attributes:
    model_dir: the run directory.
    meta: the contents of its run_meta.json.
    network: the rebuilt NetworkCIFAR or NetworkImageNet.
    checkpoint: the checkpoint prefix that was restored.
    step: the training step stored in that checkpoint.
  """
  model_dir: str
  meta: dict
  network: keras.Model
  checkpoint: str
  step: int


def _resolve_checkpoint(model_dir: str, checkpoint: Optional[str]) -> str:
  """Return the checkpoint prefix to restore, the latest one by default."""
  checkpoint_dir = os.path.join(model_dir, "checkpoints")
  if checkpoint is None:
    latest = tf.train.latest_checkpoint(checkpoint_dir)
    if latest is None:
      raise ExportError(
          f"No checkpoint found in {checkpoint_dir}. Export a run that has "
          "trained for at least one epoch, or pass checkpoint= (--checkpoint) "
          "with a checkpoint prefix.")
    return latest

  candidates = [checkpoint, os.path.join(checkpoint_dir, checkpoint)]
  for candidate in candidates:
    if tf.io.gfile.exists(candidate + ".index"):
      return candidate
  state = tf.train.get_checkpoint_state(checkpoint_dir)
  available = list(state.all_model_checkpoint_paths) if state else []
  raise ExportError(
      f"Checkpoint {checkpoint!r} not found (no {checkpoint}.index). Give a "
      "checkpoint prefix such as MODEL_DIR/checkpoints/ckpt-100; the run "
      f"has {available or 'none'}.")


def restore_run(model_dir: str, checkpoint: Optional[str] = None
               ) -> RestoredRun:
  """Rebuild a retrain run's network and restore a checkpoint into it.

  Args:
    model_dir: the run directory written by `retrain.run_retrain`.
    checkpoint: a checkpoint prefix, absolute or relative to
      MODEL_DIR/checkpoints (e.g. "ckpt-100"); None for the latest one.

  Raises:
    ExportError: when run_meta.json or the checkpoint is missing, or the
      checkpoint does not match the network of run_meta.json.
  """
  meta_path = os.path.join(model_dir, retrain.META_FILE)
  if not os.path.isfile(meta_path):
    raise ExportError(
        f"{meta_path} not found, so {model_dir} is not a retrain run "
        "directory. Give the --model_dir of python -m train.retrain, which "
        "writes run_meta.json before training.")
  with open(meta_path, encoding="utf-8") as stream:
    meta = json.load(stream)
  checkpoint = _resolve_checkpoint(model_dir, checkpoint)

  network = retrain.network_from_meta(meta)
  step = tf.Variable(0, dtype=tf.int64, trainable=False)
  # The same checkpoint layout as retrain.run_retrain writes.
  items = retrain._network_items(network)  # pylint: disable=protected-access
  try:
    status = tf.train.Checkpoint(**items, step=step).restore(checkpoint)
    status.assert_existing_objects_matched().expect_partial()
  except (AssertionError, ValueError, tf.errors.OpError) as error:
    raise ExportError(
        f"Checkpoint {checkpoint} does not match the network described by "
        f"{meta_path}: {error}") from None
  logging.info("Restored %s (step %d) into a %s.", checkpoint,
               int(step.numpy()), type(network).__name__)
  return RestoredRun(model_dir, meta, network, checkpoint, int(step.numpy()))


# The inference graph.


def _check_pixel_shape(images, image_size):
  """Return `images` after checking in the graph that they are [b, H, W, 3].

  TF-Serving does not check a tensor's shape against the signature, so the
  graph does.
  """
  shape = tf.shape(images)
  padded = tf.concat([shape, tf.zeros([4], tf.int32)], axis=0)[:4]
  valid = tf.logical_and(
      tf.equal(tf.size(shape), 4),
      tf.reduce_all(tf.equal(padded[1:], [image_size, image_size, 3])))
  message = tf.strings.join([
      f"{IMAGES_SIGNATURE}: input {SIGNATURE_INPUTS[IMAGES_SIGNATURE]} has "
      "shape [",
      tf.strings.reduce_join(tf.strings.as_string(shape), separator=", "),
      f"], expected uint8 [batch, {image_size}, {image_size}, 3]. Resize the "
      f"images to {image_size}x{image_size} pixels, send the encoded files "
      f"to {IMAGE_BYTES_SIGNATURE}, or export with --resize."])
  with tf.control_dependencies([tf.debugging.Assert(valid, [message])]):
    return tf.identity(images)


def _decode_one(index, encoded, image_size):
  """Decode one JPEG or PNG to uint8 [height, width, 3], checking the format."""
  is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(_JPEG_MAGIC)),
                     _JPEG_MAGIC)
  is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_MAGIC)),
                    _PNG_MAGIC)
  name = tf.strings.join([
      f"{IMAGE_BYTES_SIGNATURE}: {SIGNATURE_INPUTS[IMAGE_BYTES_SIGNATURE]}[",
      tf.strings.as_string(index), "]"])
  format_message = tf.strings.join([
      name, " is not JPEG or PNG data (", tf.strings.as_string(
          tf.strings.length(encoded)), " bytes). Send the contents of a JPEG "
      "or PNG file, base64-encoded under the key b64 in a REST request."])
  with tf.control_dependencies([
      tf.debugging.Assert(tf.logical_or(is_jpeg, is_png), [format_message])]):
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  if image_size is None:
    return image

  height, width = tf.shape(image)[0], tf.shape(image)[1]
  size_message = tf.strings.join([
      name, " is a ", tf.strings.as_string(width), "x",
      tf.strings.as_string(height), f" image, expected {image_size}x"
      f"{image_size} pixels. Resize the image, or export with --resize."])
  valid = tf.logical_and(tf.equal(height, image_size),
                         tf.equal(width, image_size))
  with tf.control_dependencies([tf.debugging.Assert(valid, [size_message])]):
    image = tf.identity(image)
  image.set_shape([image_size, image_size, 3])
  return image


def build_serving_module(network: keras.Model, meta: dict, top_k: int = 5,
                         resize: bool = False) -> tuple:
  """Wrap a network and its preprocessing in a tf.Module with two signatures.

  Args:
    network: the retraining network; it is called with training=False, so
      the auxiliary head and drop path are off.
    meta: the run's run_meta.json contents: class_names, image_size,
      augment, mean and std (in [0, 1] pixel units).
    top_k: the number of classes returned, at most the number of classes.
    resize: accept images of any size and apply the evaluation transform.

  Returns:
    (module, signatures): the tf.Module to save, and a dict from signature
    name to concrete function, the `signatures` of tf.saved_model.save.
  """
  class_names = [str(name) for name in meta["class_names"]]
  k = min(top_k, len(class_names))
  image_size = int(meta["image_size"])
  augment = meta["augment"]
  mean = np.asarray(meta["mean"], np.float32)
  std = np.asarray(meta["std"], np.float32)

  def normalize(image):
    # The same arithmetic as data.preprocess_image without augmentation.
    image = tf.image.convert_image_dtype(image, tf.float32)
    return (image - tf.constant(mean)) / tf.constant(std)

  def eval_transform(image):
    return data_lib.preprocess_image(image, augment, image_size, mean, std,
                                     training=False)

  def predict(normalized):
    logits = tf.cast(network(normalized, training=False), tf.float32)
    probabilities = tf.nn.softmax(logits, axis=-1)
    scores, classes = tf.math.top_k(probabilities, k=k)
    classes = tf.cast(classes, tf.int64)
    return {"probabilities": probabilities, "classes": classes,
            "class_names": tf.gather(tf.constant(class_names), classes),
            "scores": scores}

  normalized_spec = tf.TensorSpec([image_size, image_size, 3], tf.float32)
  pixels_shape = [None, None, None, 3] if resize else [
      None, image_size, image_size, 3]

  @tf.function(input_signature=[tf.TensorSpec(
      pixels_shape, tf.uint8, name=SIGNATURE_INPUTS[IMAGES_SIGNATURE])])
  def serve_images(images):
    if resize:
      normalized = tf.map_fn(eval_transform, images,
                             fn_output_signature=normalized_spec)
    else:
      normalized = normalize(_check_pixel_shape(images, image_size))
    return predict(normalized)

  @tf.function(input_signature=[tf.TensorSpec(
      [None], tf.string, name=SIGNATURE_INPUTS[IMAGE_BYTES_SIGNATURE])])
  def serve_image_bytes(image_bytes):
    indices = tf.range(tf.shape(image_bytes, out_type=tf.int64)[0])

    def decode_and_transform(element):
      index, encoded = element
      image = _decode_one(index, encoded, None if resize else image_size)
      return eval_transform(image) if resize else normalize(image)

    normalized = tf.map_fn(decode_and_transform, (indices, image_bytes),
                           fn_output_signature=normalized_spec)
    return predict(normalized)

  module = tf.Module()
  # The network keeps its cells in Python lists, which tf.Module does not
  # track, so the variables are listed here for tf.saved_model.save. The
  # list contains the tf.Variables inside the Keras variables. Keras 3.15 saves
  # a tracked Keras variable as a second tf.Variable: the restore op fills
  # that copy while the functions read the original, so the TF1 loader (and
  # with it TF-Serving) finds the original uninitialized. The auxiliary head
  # is not called with training=False, so its variables are left out.
  head = getattr(network, "auxiliary_head", None)
  head_variables = {id(v) for v in head.variables} if head else set()
  module.network_variables = [variable.value for variable in
                              network.variables
                              if id(variable) not in head_variables]
  module.serve_images = serve_images
  module.serve_image_bytes = serve_image_bytes
  signatures = {
      IMAGES_SIGNATURE: serve_images.get_concrete_function(),
      IMAGE_BYTES_SIGNATURE: serve_image_bytes.get_concrete_function(),
  }
  return module, signatures


# Image files and warm-up requests.


def check_encoded_image(encoded: bytes, name: str) -> np.ndarray:
  """Decode a JPEG or PNG file's bytes to uint8 [height, width, 3].

  Args:
    encoded: the file contents.
    name: what to call the image in an error, e.g. its path.

  Raises:
    ExportError: when the bytes are not a decodable JPEG or PNG image.
  """
  if not (encoded.startswith(_JPEG_MAGIC) or encoded.startswith(_PNG_MAGIC)):
    raise ExportError(
        f"{name} is not a JPEG or PNG file (it starts with "
        f"{encoded[:8]!r}). Convert it to JPEG or PNG.")
  try:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  except tf.errors.InvalidArgumentError as error:
    raise ExportError(
        f"{name} could not be decoded: {error.message}. The file is "
        "truncated or corrupt; replace it.") from None
  return image.numpy()


def _read_image_file(path) -> bytes:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ExportError(f"Image file {path} not found.")
  with open(path, "rb") as stream:
    return stream.read()


def _fit_to_size(image: np.ndarray, image_size: int) -> np.ndarray:
  """Resize a uint8 image to image_size x image_size unless it has that size."""
  if image.shape[:2] == (image_size, image_size):
    return image
  resized = tf.image.resize(image, [image_size, image_size])
  return tf.cast(tf.round(tf.clip_by_value(resized, 0, 255)), tf.uint8).numpy()


def _default_warmup_images(meta: dict) -> list:
  """Return a few encoded images of the run's evaluation split.

  When the dataset cannot be opened here (for instance, a TFDS dataset on
  another machine), a generated PNG takes their place.
  """
  try:
    source = data_lib.load_source(meta["dataset"])
    split = retrain_data.find_eval_split(source, "test")
    examples = source.split_dataset(split).take(_WARMUP_IMAGES)
    images = [bytes(example["encoded"].numpy()) for example in examples]
  except (ValueError, OSError, tf.errors.OpError) as error:
    logging.warning(
        "Dataset %s could not be read (%s); the warm-up requests use a "
        "generated image.", meta["dataset"], error)
    images = []
  images = [image for image in images
            if image.startswith(_JPEG_MAGIC) or image.startswith(_PNG_MAGIC)]
  if images:
    return images

  size = int(meta["image_size"])
  ramp = np.linspace(0, 255, size, dtype=np.float32)
  pixels = np.stack(np.broadcast_arrays(
      ramp[:, None], ramp[None, :], ramp[::-1, None]), axis=-1)
  return [tf.io.encode_png(pixels.astype(np.uint8)).numpy()]


def build_warmup_requests(model_name: str, encoded_images: Sequence[bytes],
                          image_size: int, resize: bool) -> list:
  """Build PredictionLog records that exercise both signatures.

  Each signature gets a request with one image and, when there are more,
  one with all of them.

  Args:
    model_name: the model name in each request's model_spec.
    encoded_images: JPEG or PNG file contents.
    image_size: the training resolution H = W.
    resize: whether the export resizes; without it, images of another size
      are resized here first.

  Returns:
    A list of prediction_log_pb2.PredictionLog.
  """
  decoded = [check_encoded_image(encoded, f"warm-up image {position}")
             for position, encoded in enumerate(encoded_images)]
  pixels = np.stack([_fit_to_size(image, image_size) for image in decoded])
  if resize:
    encoded = list(encoded_images)
  else:
    encoded = [
        original if image.shape[:2] == (image_size, image_size)
        else tf.io.encode_png(fitted).numpy()
        for original, image, fitted in zip(encoded_images, decoded, pixels)]
  inputs = {IMAGES_SIGNATURE: pixels,
            IMAGE_BYTES_SIGNATURE: np.asarray(encoded, dtype=object)}

  logs = []
  for signature, values in inputs.items():
    batches = [values[:1]] + ([values] if len(values) > 1 else [])
    for batch in batches:
      request = predict_pb2.PredictRequest()
      request.model_spec.name = model_name
      request.model_spec.signature_name = signature
      request.inputs[SIGNATURE_INPUTS[signature]].CopyFrom(
          tf.make_tensor_proto(batch))
      logs.append(prediction_log_pb2.PredictionLog(
          predict_log=prediction_log_pb2.PredictLog(request=request)))
  return logs


def read_warmup_requests(export_dir: str) -> list:
  """Read the PredictionLog records of an export's warm-up file."""
  path = os.path.join(export_dir, EXTRA_ASSETS_DIR, WARMUP_FILE)
  return [prediction_log_pb2.PredictionLog.FromString(record.numpy())
          for record in tf.data.TFRecordDataset(path)]


def _write_warmup_requests(path: str, logs: Sequence) -> None:
  with tf.io.TFRecordWriter(path) as writer:
    for log in logs:
      writer.write(log.SerializeToString())


def _check_export(export_dir: str, signatures: dict, logs: Sequence) -> None:
  """Run every warm-up request on the written SavedModel and compare.

  Raises:
    ExportError: when a signature is missing or its probabilities differ
      from the in-memory functions' by more than _CHECK_TOLERANCE.
  """
  loaded = tf.saved_model.load(export_dir)
  for log in logs:
    request = log.predict_log.request
    signature = request.model_spec.signature_name
    if signature not in loaded.signatures:
      raise ExportError(
          f"The SavedModel written to {export_dir} lacks signature "
          f"{signature!r}; it has {sorted(loaded.signatures)}.")
    inputs = {key: tf.constant(tf.make_ndarray(proto))
              for key, proto in request.inputs.items()}
    written = loaded.signatures[signature](**inputs)
    expected = signatures[signature](**inputs)
    difference = float(np.max(np.abs(
        written["probabilities"].numpy() - expected["probabilities"].numpy())))
    if not difference <= _CHECK_TOLERANCE:
      raise ExportError(
          f"Signature {signature} of the SavedModel written to {export_dir} "
          f"differs from the restored network by {difference} in "
          "probability. The export is not usable; report this as a bug.")


# Versions and the model server configuration.


def check_model_name(model_name: str) -> None:
  """Raise ExportError unless model_name is usable as a TF-Serving name."""
  if not _MODEL_NAME_PATTERN.match(model_name or ""):
    raise ExportError(
        f"Invalid model name {model_name!r}. Use letters, digits, '.', '_' "
        "and '-', starting with a letter or digit (e.g. adarts).")


def list_versions(model_base: str) -> list:
  """Return the version numbers under a model's base path, sorted."""
  if not os.path.isdir(model_base):
    return []
  return sorted(int(name) for name in os.listdir(model_base)
                if name.isdigit() and os.path.isdir(
                    os.path.join(model_base, name)))


def next_version(model_base: str) -> int:
  """Return one more than the largest version under model_base, or 1."""
  versions = list_versions(model_base)
  return versions[-1] + 1 if versions else 1


def update_models_config(export_base: str, model_name: str) -> str:
  """Add or update the model's entry in EXPORT_BASE/models.config.

  Entries of other models in the file are kept. The base path is the
  absolute path of EXPORT_BASE/MODEL_NAME on this machine.

  Returns:
    The path of models.config.

  Raises:
    ExportError: when an existing models.config cannot be parsed.
  """
  path = os.path.join(export_base, MODELS_CONFIG_FILE)
  config = model_server_config_pb2.ModelServerConfig()
  if os.path.exists(path):
    with open(path, encoding="utf-8") as stream:
      try:
        text_format.Parse(stream.read(), config)
      except text_format.ParseError as error:
        raise ExportError(
            f"{path} is not a valid ModelServerConfig ({error}). Fix or "
            "delete it; the export rewrites it.") from None

  base_path = os.path.abspath(os.path.join(export_base, model_name))
  entries = config.model_config_list.config
  entry = next((entry for entry in entries if entry.name == model_name), None)
  if entry is None:
    entry = entries.add(name=model_name)
  entry.base_path = base_path
  entry.model_platform = "tensorflow"
  search.write_text_atomic(path, text_format.MessageToString(config))
  return path


def _read_eval_accuracy(model_dir: str, checkpoint: str) -> Optional[dict]:
  """Return eval.json's accuracy when it was measured on `checkpoint`."""
  path = os.path.join(model_dir, retrain.EVAL_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as stream:
    metrics = json.load(stream)
  evaluated = os.path.basename(str(metrics.get("checkpoint", "")))
  if evaluated != os.path.basename(checkpoint):
    logging.warning(
        "%s contains the accuracy of %s, not of the exported %s, so it is "
        "left out of %s. Run python -m train.evaluate --checkpoint=%s first "
        "to include it.", path, evaluated, checkpoint, EXPORT_META_FILE,
        checkpoint)
    return None
  return {name: metrics[name] for name in
          ("top1", "top5", "split", "examples") if name in metrics}


def _export_meta(run: RestoredRun, model_name: str, version: int, top_k: int,
                 resize: bool) -> dict:
  meta = run.meta
  num_classes = len(meta["class_names"])
  image_size = int(meta["image_size"])
  pixels_shape = [-1, -1, -1, 3] if resize else [-1, image_size, image_size,
                                                  3]
  return {
      "model_name": model_name,
      "version": version,
      "export_time": datetime.datetime.now(
          datetime.timezone.utc).isoformat(timespec="seconds"),
      "run_dir": os.path.abspath(run.model_dir),
      "checkpoint": os.path.abspath(run.checkpoint),
      "step": run.step,
      "dataset": meta["dataset"],
      "class_names": list(meta["class_names"]),
      "num_classes": num_classes,
      "image_size": image_size,
      "augment": meta["augment"],
      "mean": list(meta["mean"]),
      "std": list(meta["std"]),
      "genotype": meta["genotype"],
      "activation_override": meta.get("activation_override"),
      "network_class": meta.get("network_class"),
      "channels": meta.get("channels"),
      "layers": meta.get("layers"),
      "params": meta.get("params"),
      "flops": meta.get("flops"),
      "eval_accuracy": _read_eval_accuracy(run.model_dir, run.checkpoint),
      "top_k": min(top_k, num_classes),
      "resize": resize,
      "signatures": {
          IMAGES_SIGNATURE: {"inputs": {"images": {
              "dtype": "uint8", "shape": pixels_shape}}},
          IMAGE_BYTES_SIGNATURE: {"inputs": {"image_bytes": {
              "dtype": "string", "shape": [-1]}}},
      },
      "outputs": list(OUTPUT_KEYS),
      "tensorflow_version": tf.__version__,
      "keras_version": keras.__version__,
  }


def load_export_meta(export_dir: str) -> dict:
  """Return the contents of an export's assets.extra/export_meta.json."""
  path = os.path.join(export_dir, EXTRA_ASSETS_DIR, EXPORT_META_FILE)
  if not os.path.isfile(path):
    raise ExportError(
        f"{path} not found; give a version directory written by export_run, "
        "such as EXPORT_BASE/adarts/1.")
  with open(path, encoding="utf-8") as stream:
    return json.load(stream)


def _version_exists_error(version_dir: str) -> ExportError:
  return ExportError(
      f"{version_dir} already exists. Choose another version, leave the "
      "version unset for the next one, or pass overwrite=True (--overwrite) "
      "to replace it.")


def _publish(temp_dir: str, version_dir: str, overwrite: bool) -> None:
  """Rename the finished export into place, replacing an old one if allowed."""
  if not os.path.exists(version_dir):
    os.rename(temp_dir, version_dir)
    return
  if not overwrite:
    raise _version_exists_error(version_dir)
  old_dir = tempfile.mkdtemp(dir=os.path.dirname(version_dir),
                             prefix=f".old-{os.path.basename(version_dir)}-")
  os.rmdir(old_dir)
  os.rename(version_dir, old_dir)
  try:
    os.rename(temp_dir, version_dir)
  except OSError:
    os.rename(old_dir, version_dir)
    raise
  shutil.rmtree(old_dir, ignore_errors=True)


def export_run(model_dir: str, export_base: str, model_name: str, *,
               version: Optional[int] = None,
               checkpoint: Optional[str] = None, top_k: int = 5,
               resize: bool = False, overwrite: bool = False,
               warmup_images: Optional[Sequence[Union[str, bytes,
                                                      os.PathLike]]] = None
              ) -> str:
  """Export a retrain run as EXPORT_BASE/MODEL_NAME/VERSION for TF-Serving.

  The SavedModel is written to a temporary folder beside the version
  folder, checked by running the warm-up requests on it, and then renamed
  into place, so TF-Serving never loads a partly written version. On any
  error the temporary folder is removed and no version folder appears.

  Args:
    model_dir: the retrain run directory (run_meta.json and checkpoints/).
    export_base: the folder of exported models, the --model_base_path of
      tensorflow_model_server without the model name.
    model_name: the TF-Serving model name and its folder under export_base.
    version: the version number, at least 1; None for one more than the
      largest existing version (1 for the first export).
    checkpoint: a checkpoint prefix, absolute or relative to
      MODEL_DIR/checkpoints; None for the latest one.
    top_k: the number of best classes each signature returns; capped at the
      number of classes.
    resize: accept images of any size and resize them inside the model
      with the evaluation transform; by default images must have the
      training resolution.
    overwrite: replace an existing version folder instead of raising.
    warmup_images: JPEG or PNG files (paths or file contents) for the
      warm-up requests; None takes a few images of the run's evaluation
      split, or a generated image when the dataset cannot be read.

  Returns:
    The path of the version folder that was written.

  Raises:
    ExportError: on a missing run_meta.json or checkpoint, an existing
      version without overwrite, an invalid model name, version or top_k,
      or an unreadable warm-up image.
  """
  check_model_name(model_name)
  if top_k < 1:
    raise ExportError(f"top_k={top_k}; give at least 1 class.")
  if version is not None and (isinstance(version, bool) or
                              not isinstance(version, int) or version < 1):
    raise ExportError(
        f"version={version!r}; give a positive integer, or None for the next "
        "version.")

  model_base = os.path.join(export_base, model_name)
  if version is None:
    version = next_version(model_base)
  version_dir = os.path.join(model_base, str(version))
  if os.path.exists(version_dir) and not overwrite:
    raise _version_exists_error(version_dir)

  run = restore_run(model_dir, checkpoint)
  if warmup_images is None:
    encoded_images = _default_warmup_images(run.meta)
  else:
    encoded_images = []
    for image in warmup_images:
      if isinstance(image, bytes):
        encoded_images.append(image)
        continue
      encoded_images.append(_read_image_file(image))
      check_encoded_image(encoded_images[-1], os.fspath(image))
    if not encoded_images:
      raise ExportError(
          "warmup_images is empty; give at least one JPEG or PNG file, or "
          "None to use images of the run's dataset.")
  image_size = int(run.meta["image_size"])
  logs = build_warmup_requests(model_name, encoded_images[:_WARMUP_IMAGES],
                               image_size, resize)
  module, signatures = build_serving_module(run.network, run.meta, top_k,
                                            resize)

  os.makedirs(model_base, exist_ok=True)
  temp_dir = tempfile.mkdtemp(dir=model_base, prefix=f".tmp-{version}-")
  try:
    tf.saved_model.save(module, temp_dir, signatures=signatures)
    extra_dir = os.path.join(temp_dir, EXTRA_ASSETS_DIR)
    os.makedirs(extra_dir)
    _write_warmup_requests(os.path.join(extra_dir, WARMUP_FILE), logs)
    export_meta = _export_meta(run, model_name, version, top_k, resize)
    with open(os.path.join(extra_dir, EXPORT_META_FILE), "w",
              encoding="utf-8") as stream:
      json.dump(export_meta, stream, indent=2, sort_keys=True)
      stream.write("\n")
    _check_export(temp_dir, signatures, logs)
    os.chmod(temp_dir, 0o755)  # mkdtemp makes it readable by its owner only.
    _publish(temp_dir, version_dir, overwrite)
  except BaseException:
    shutil.rmtree(temp_dir, ignore_errors=True)
    raise

  config_path = update_models_config(export_base, model_name)
  logging.info("Exported %s (step %d) to %s; %s lists it.", run.checkpoint,
               run.step, version_dir, config_path)
  return version_dir


# Predictions from an export.


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The top-k classes of one image, best first."""
  path: str
  classes: tuple
  class_names: tuple
  scores: tuple


def format_prediction(prediction: Prediction) -> str:
  """Return "PATH: name 0.812, name 0.101, ..." for printing."""
  labels = ", ".join(f"{name} {score:.3f}" for name, score in
                     zip(prediction.class_names, prediction.scores))
  return f"{prediction.path}: {labels}"


def predictions_from_outputs(paths: Sequence[str], outputs: dict) -> list:
  """Turn signature outputs (arrays with a batch axis) into Predictions."""
  names = np.asarray(outputs["class_names"])
  return [
      Prediction(
          path=str(path),
          classes=tuple(int(c) for c in np.asarray(outputs["classes"])[row]),
          class_names=tuple(n.decode() if isinstance(n, bytes) else str(n)
                            for n in names[row]),
          scores=tuple(float(s) for s in np.asarray(outputs["scores"])[row]))
      for row, path in enumerate(paths)]


def collect_image_files(paths: Sequence[str]) -> list:
  """Expand folders into the JPEG and PNG files below them, sorted.

  Raises:
    ExportError: when a path does not exist or nothing is found.
  """
  files = []
  for path in paths:
    path = os.fspath(path)
    if os.path.isdir(path):
      found = sorted(
          os.path.join(folder, name)
          for folder, _, names in os.walk(path) for name in names
          if name.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        raise ExportError(
            f"Folder {path} contains no {', '.join(IMAGE_EXTENSIONS)} files.")
      files.extend(found)
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise ExportError(f"Image file or folder {path} not found.")
  if not files:
    raise ExportError("No image files given; pass files or folders.")
  return files


class ExportedModel:
  """An export loaded with tf.saved_model.load, for predictions in Python.

  Args:
    export_dir: a version folder written by export_run.

  Raises:
    ExportError: when export_dir contains no SavedModel.
  """

  def __init__(self, export_dir: str):
    if not tf.saved_model.contains_saved_model(export_dir):
      raise ExportError(
          f"{export_dir} contains no SavedModel; give a version folder written "
          "by export_run, such as EXPORT_BASE/adarts/1.")
    self.export_dir = export_dir
    self._loaded = tf.saved_model.load(export_dir)
    missing = set(SIGNATURE_INPUTS) - set(self._loaded.signatures)
    if missing:
      raise ExportError(
          f"{export_dir} lacks the signatures {sorted(missing)}; export it "
          "again with tf_adarts.export.export_run.")
    spec = self._loaded.signatures[IMAGES_SIGNATURE].structured_input_signature
    self.pixels_shape = tuple(
        spec[1][SIGNATURE_INPUTS[IMAGES_SIGNATURE]].shape.as_list())

  def predict_pixels(self, images) -> dict:
    """Run serving_default on uint8 images [batch, H, W, 3].

    Raises:
      ExportError: on another dtype or shape than the signature takes.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ExportError(
          f"images have dtype {images.dtype}, but {IMAGES_SIGNATURE} takes "
          "uint8 pixel values 0..255. Convert them, e.g. np.clip(np.round("
          "images * 255), 0, 255).astype(np.uint8) for values in [0, 1].")
    expected = self.pixels_shape
    matches = images.ndim == len(expected) and all(
        want is None or want == got for want, got in zip(expected,
                                                         images.shape))
    if not matches:
      expected_shape = ["batch" if dim is None else dim for dim in expected]
      raise ExportError(
          f"images have shape {list(images.shape)}, but {IMAGES_SIGNATURE} "
          f"takes {expected_shape}. Resize them, add a batch axis to a "
          "single image (images[None]), or export with --resize.")
    outputs = self._loaded.signatures[IMAGES_SIGNATURE](
        images=tf.constant(images))
    return {key: value.numpy() for key, value in outputs.items()}

  def predict_bytes(self, encoded: Sequence[bytes]) -> dict:
    """Run predict_image_bytes on the contents of JPEG or PNG files."""
    outputs = self._loaded.signatures[IMAGE_BYTES_SIGNATURE](
        image_bytes=tf.constant(list(encoded), dtype=tf.string))
    return {key: value.numpy() for key, value in outputs.items()}

  def predict_files(self, paths: Sequence[str],
                    signature: str = IMAGE_BYTES_SIGNATURE,
                    batch_size: int = 32) -> list:
    """Return the top-k Prediction of each JPEG or PNG file.

    Args:
      paths: image files.
      signature: predict_image_bytes sends the file contents;
        serving_default decodes the files here and sends the pixels.
      batch_size: images per signature call.

    Raises:
      ExportError: on an unknown signature, or a file that is missing, not
        JPEG or PNG, corrupt, or of the wrong size for the export.
    """
    if signature not in SIGNATURE_INPUTS:
      raise ExportError(
          f"Unknown signature {signature!r}; use one of "
          f"{sorted(SIGNATURE_INPUTS)}.")
    paths = [os.fspath(path) for path in paths]
    encoded = [_read_image_file(path) for path in paths]
    decoded = [check_encoded_image(data, path)
               for data, path in zip(encoded, paths)]
    if self.pixels_shape[1] is not None:
      size = self.pixels_shape[1:3]
      for path, image in zip(paths, decoded):
        if image.shape[:2] != size:
          raise ExportError(
              f"{path} is {image.shape[1]}x{image.shape[0]} pixels, but this "
              f"export takes {size[1]}x{size[0]}. Resize the image, or "
              "export with --resize.")

    predictions = []
    for start in range(0, len(paths), batch_size):
      batch = slice(start, start + batch_size)
      if signature == IMAGE_BYTES_SIGNATURE:
        outputs = self.predict_bytes(encoded[batch])
        predictions.extend(predictions_from_outputs(paths[batch], outputs))
        continue
      images = decoded[batch]
      if len({image.shape for image in images}) == 1:
        outputs = self.predict_pixels(np.stack(images))
        predictions.extend(predictions_from_outputs(paths[batch], outputs))
        continue
      # Images of different sizes cannot share a batch of pixels.
      for path, image in zip(paths[batch], images):
        outputs = self.predict_pixels(image[None])
        predictions.extend(predictions_from_outputs([path], outputs))
    return predictions


def predict_files(export_dir: str, paths: Sequence[str],
                  signature: str = IMAGE_BYTES_SIGNATURE) -> list:
  """Load an export and return the top-k Prediction of each image file."""
  return ExportedModel(export_dir).predict_files(paths, signature)

"""Send images to a running TF-Serving and print the top-k labels.

  python -m export.serving_client --images=photos/ --model_name=adarts
  python -m export.serving_client --images=a.jpg,b.png --protocol=grpc

--images takes JPEG or PNG files and folders (searched recursively). With
the predict_image_bytes signature (the default) the file contents are sent
as they are: base64-encoded in the REST body, as a string tensor over gRPC.
With serving_default the files are decoded here and the uint8 pixels are
sent, so they must already have the model's input size unless the model
was exported with --resize.

REST: POST http://HOST:REST_PORT/v1/models/NAME[/versions/V]:predict
gRPC: tensorflow.serving.PredictionService/Predict on HOST:GRPC_PORT
"""

import base64
import json
import sys
from typing import Optional, Sequence
import urllib.error
import urllib.request

from absl import app
from absl import flags
from absl import logging
import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tf_adarts import export

PROTOCOLS = ("rest", "grpc", "both")

_IMAGES = flags.DEFINE_list(
    "images", None, "JPEG or PNG files and folders to classify, "
    "comma-separated; folders are searched recursively.")
_HOST = flags.DEFINE_string("host", "localhost", "Host of TF-Serving.")
_REST_PORT = flags.DEFINE_integer(
    "rest_port", 8501, "Port of TF-Serving's REST API (--rest_api_port).")
_GRPC_PORT = flags.DEFINE_integer(
    "grpc_port", 8500, "Port of TF-Serving's gRPC API (--port).")
_PROTOCOL = flags.DEFINE_enum(
    "protocol", "rest", PROTOCOLS, "Send the request over REST, gRPC or "
    "both.")
_MODEL_NAME = flags.DEFINE_string(
    "model_name", "adarts", "Model name that TF-Serving serves.")
_MODEL_VERSION = flags.DEFINE_integer(
    "model_version", None, "Model version to query; default: the version "
    "TF-Serving serves (the latest).", lower_bound=0)
_SIGNATURE = flags.DEFINE_enum(
    "signature", export.IMAGE_BYTES_SIGNATURE, sorted(export.SIGNATURE_INPUTS),
    "Signature to call: predict_image_bytes sends the encoded files, "
    "serving_default sends decoded uint8 pixels.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 32, "Images per request.", lower_bound=1)
_TIMEOUT = flags.DEFINE_float(
    "timeout", 30.0, "Request timeout, in seconds.", lower_bound=0.0)


class ServingError(RuntimeError):
  """A request to TF-Serving failed."""


def _check_signature(signature_name: str) -> None:
  if signature_name not in export.SIGNATURE_INPUTS:
    raise ValueError(
        f"Unknown signature {signature_name!r}; use one of "
        f"{sorted(export.SIGNATURE_INPUTS)}.")


def _read_files(paths: Sequence[str]) -> list:
  contents = []
  for path in paths:
    with open(path, "rb") as stream:
      contents.append(stream.read())
  return contents


def _decode_pixels(paths: Sequence[str]) -> np.ndarray:
  """Decode image files to one uint8 batch [n, height, width, 3].

  Raises:
    ValueError: when the images do not all have one size.
  """
  images = [export.check_encoded_image(data, path)
            for data, path in zip(_read_files(paths), paths)]
  shapes = sorted({image.shape for image in images})
  if len(shapes) > 1:
    raise ValueError(
        f"The images have {len(shapes)} different sizes {shapes}, so their "
        "pixels cannot form one batch for serving_default. Send them one "
        f"size at a time, or use --signature={export.IMAGE_BYTES_SIGNATURE}.")
  return np.stack(images)


def build_rest_body(paths: Sequence[str],
                    signature_name: str = export.IMAGE_BYTES_SIGNATURE
                   ) -> dict:
  """Build the JSON body of a TF-Serving REST predict request.

  Uses the row format: one instance per image, keyed by the signature's
  input name. Encoded files go base64-encoded as {"b64": ...}; pixels go
  as nested lists of integers.

  Args:
    paths: JPEG or PNG files.
    signature_name: predict_image_bytes or serving_default.
  """
  _check_signature(signature_name)
  key = export.SIGNATURE_INPUTS[signature_name]
  if signature_name == export.IMAGE_BYTES_SIGNATURE:
    values = [{"b64": base64.b64encode(data).decode("ascii")}
              for data in _read_files(paths)]
  else:
    values = _decode_pixels(paths).tolist()
  return {"signature_name": signature_name,
          "instances": [{key: value} for value in values]}


def build_predict_request(paths: Sequence[str], model_name: str,
                          signature_name: str = export.IMAGE_BYTES_SIGNATURE,
                          version: Optional[int] = None
                         ) -> predict_pb2.PredictRequest:
  """Build a gRPC PredictRequest for image files.

  Args:
    paths: JPEG or PNG files.
    model_name: the model name that TF-Serving serves.
    signature_name: predict_image_bytes (a string tensor of the file
      contents) or serving_default (a uint8 tensor of decoded pixels).
    version: the model version; None for the one served by default.
  """
  _check_signature(signature_name)
  if signature_name == export.IMAGE_BYTES_SIGNATURE:
    values = np.asarray(_read_files(paths), dtype=object)
  else:
    values = _decode_pixels(paths)
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model_name
  request.model_spec.signature_name = signature_name
  if version is not None:
    request.model_spec.version.value = version
  request.inputs[export.SIGNATURE_INPUTS[signature_name]].CopyFrom(
      tf.make_tensor_proto(values))
  return request


def rest_url(host: str, port: int, model_name: str,
             version: Optional[int] = None) -> str:
  version_part = "" if version is None else f"/versions/{version}"
  return f"http://{host}:{port}/v1/models/{model_name}{version_part}:predict"


def parse_rest_response(paths: Sequence[str], response: dict) -> list:
  """Turn a REST predict response in the row format into Predictions."""
  if "error" in response:
    raise ServingError(f"TF-Serving returned an error: {response['error']}")
  rows = response.get("predictions")
  if not isinstance(rows, list) or len(rows) != len(paths):
    raise ServingError(
        f"Expected {len(paths)} predictions in the response, got "
        f"{json.dumps(response)[:200]}.")
  outputs = {key: [row[key] for row in rows]
             for key in ("classes", "class_names", "scores")}
  return export.predictions_from_outputs(paths, outputs)


def parse_predict_response(paths: Sequence[str], response) -> list:
  """Turn a gRPC PredictResponse into Predictions."""
  outputs = {key: tf.make_ndarray(response.outputs[key])
             for key in ("classes", "class_names", "scores")}
  return export.predictions_from_outputs(paths, outputs)


def predict_rest(paths: Sequence[str], host: str = "localhost",
                 port: int = 8501, model_name: str = "adarts",
                 signature_name: str = export.IMAGE_BYTES_SIGNATURE,
                 version: Optional[int] = None,
                 timeout: float = 30.0) -> list:
  """Classify image files through TF-Serving's REST API.

  Raises:
    ServingError: when the server cannot be reached or rejects the request.
  """
  url = rest_url(host, port, model_name, version)
  body = json.dumps(build_rest_body(paths, signature_name)).encode("utf-8")
  request = urllib.request.Request(
      url, data=body, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as reply:
      response = json.loads(reply.read().decode("utf-8"))
  except urllib.error.HTTPError as error:
    detail = error.read().decode("utf-8", errors="replace")
    raise ServingError(
        f"POST {url} failed with HTTP {error.code}: {detail}") from None
  except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
    raise ServingError(
        f"POST {url} failed: {getattr(error, 'reason', error)}. Check that "
        "TF-Serving runs there (--host, --rest_port).") from None
  return parse_rest_response(paths, response)


def predict_grpc(paths: Sequence[str], host: str = "localhost",
                 port: int = 8500, model_name: str = "adarts",
                 signature_name: str = export.IMAGE_BYTES_SIGNATURE,
                 version: Optional[int] = None,
                 timeout: float = 30.0) -> list:
  """Classify image files through TF-Serving's gRPC API.

  Raises:
    ServingError: when the server cannot be reached or rejects the request.
  """
  request = build_predict_request(paths, model_name, signature_name, version)
  address = f"{host}:{port}"
  with grpc.insecure_channel(address) as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
      response = stub.Predict(request, timeout=timeout)
    except grpc.RpcError as error:
      raise ServingError(
          f"gRPC Predict on {address} failed with {error.code().name}: "
          f"{error.details()}. Check that TF-Serving runs there (--host, "
          "--grpc_port).") from None
  return parse_predict_response(paths, response)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _IMAGES.value:
    raise app.UsageError("--images is required: image files or folders.")
  try:
    paths = export.collect_image_files(_IMAGES.value)
  except export.ExportError as error:
    raise app.UsageError(str(error)) from None

  protocols = ["rest", "grpc"] if _PROTOCOL.value == "both" else [
      _PROTOCOL.value]
  for protocol in protocols:
    predict = predict_rest if protocol == "rest" else predict_grpc
    port = _REST_PORT.value if protocol == "rest" else _GRPC_PORT.value
    predictions = []
    try:
      for start in range(0, len(paths), _BATCH_SIZE.value):
        predictions.extend(predict(
            paths[start:start + _BATCH_SIZE.value], _HOST.value, port,
            _MODEL_NAME.value, _SIGNATURE.value, _MODEL_VERSION.value,
            _TIMEOUT.value))
    except (ServingError, ValueError) as error:
      # ValueError includes export.ExportError: an unreadable image file.
      logging.error("%s", error)
      print(f"error: {error}", file=sys.stderr)
      return 1
    print(f"{protocol}: {len(predictions)} images, top "
          f"{len(predictions[0].classes)} classes")
    for prediction in predictions:
      print(export.format_prediction(prediction))
  return 0


if __name__ == "__main__":
  app.run(main)

"""The SavedModel export for TF-Serving and the serving client.

A `tiny` retrain of one epoch on 80 real CIFAR-10 images is exported once
for the module. The probabilities of both signatures are compared with the
Keras network on real CIFAR-10 test images. The TF-Serving contract is
checked without the server: the export is loaded with the TF1 loader into
a Session, as tensorflow_model_server loads it, and the inputs come from
the requests that the client code builds. The client's transport runs
against in-process REST and gRPC servers on the loopback interface that
return the predictions of that Session.
"""

import base64
import concurrent.futures
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

from google.protobuf import text_format
import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from conftest import REPO_ROOT, cifar10_dir, link_cifar10_subset
from export import serving_client
from tf_adarts import data as data_lib
from tf_adarts import export
from tf_adarts import retrain

_TRAIN_PER_CLASS = 8
_TEST_PER_CLASS = 4
# Test images per class sent to the signatures.
_IMAGES_PER_CLASS = 2
_TOLERANCE = 1e-5
_SIGNATURES = (export.IMAGES_SIGNATURE, export.IMAGE_BYTES_SIGNATURE)
# Reference probabilities closer than this are treated as tied, so their
# order may differ between two correct implementations.
_TIE_MARGIN = 1e-4


def _quiet_env():
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory):
  """A folder dataset of symbolic links to a few real CIFAR-10 images."""
  return link_cifar10_subset(tmp_path_factory.mktemp("cifar_small"),
                             {"train": _TRAIN_PER_CLASS,
                              "test": _TEST_PER_CLASS})


@pytest.fixture(scope="module")
def trained_run(small_cifar, tmp_path_factory):
  """A finished one-epoch tiny retrain with eval.json."""
  model_dir = tmp_path_factory.mktemp("retrain") / "run"
  config = retrain.get_preset("tiny").replace(
      dataset=f"folder:{small_cifar}", epochs=1)
  retrain.run_retrain(config, str(model_dir), verbose=0)
  retrain.evaluate_run(str(model_dir))
  return model_dir


@pytest.fixture(scope="module")
def export_base(trained_run, tmp_path_factory):
  return tmp_path_factory.mktemp("exported")


@pytest.fixture(scope="module")
def exported(trained_run, export_base):
  """The version folder of the module's one export, EXPORT_BASE/adarts/1."""
  return export.export_run(str(trained_run), str(export_base), "adarts")


@pytest.fixture(scope="module")
def jpeg_files():
  """Real CIFAR-10 test JPEGs, a few per class."""
  root = cifar10_dir() / "test"
  files = []
  for class_dir in sorted(root.iterdir()):
    files.extend(str(path) for path in
                 sorted(class_dir.glob("*.jpg"))[:_IMAGES_PER_CLASS])
  return files


def _decode_files(paths):
  return np.stack([tf.io.decode_jpeg(tf.io.read_file(path), channels=3).numpy()
                   for path in paths])


@pytest.fixture(scope="module")
def keras_model(trained_run):
  """The run's network and meta, restored as train.evaluate restores it."""
  meta = json.loads((trained_run / "run_meta.json").read_text())
  network = retrain.network_from_meta(meta)
  latest = tf.train.latest_checkpoint(str(trained_run / "checkpoints"))
  checkpoint = tf.train.Checkpoint(network_variables=list(network.variables))
  checkpoint.restore(latest).assert_existing_objects_matched().expect_partial()
  return network, meta


def _keras_probabilities(keras_model, pixels, augment=None):
  network, meta = keras_model
  images = tf.stack([
      data_lib.preprocess_image(image, augment or meta["augment"],
                                meta["image_size"], meta["mean"], meta["std"],
                                training=False)
      for image in tf.unstack(tf.constant(pixels))])
  return tf.nn.softmax(network(images, training=False)).numpy()


@pytest.fixture(scope="module")
def reference(keras_model, jpeg_files):
  """The Keras network's probabilities on the test files [n, classes]."""
  return _keras_probabilities(keras_model, _decode_files(jpeg_files))


def _assert_top_k(reference_probabilities, classes, class_names, scores,
                  all_names):
  """Check top-k outputs against reference probabilities."""
  k = classes.shape[1]
  ordered = -np.sort(-reference_probabilities, axis=1)
  np.testing.assert_allclose(
      np.take_along_axis(reference_probabilities, classes, axis=1),
      ordered[:, :k], atol=_TOLERANCE)
  np.testing.assert_allclose(scores, ordered[:, :k], atol=_TOLERANCE)

  # Ids must agree exactly on rows whose top k + 1 probabilities are apart.
  gaps = -np.diff(ordered[:, :k + 1], axis=1)
  distinct = np.all(gaps > _TIE_MARGIN, axis=1)
  assert distinct.sum() >= len(distinct) // 2, "too many tied rows to compare"
  expected_ids = np.argsort(-reference_probabilities, axis=1)[:, :k]
  np.testing.assert_array_equal(classes[distinct], expected_ids[distinct])

  names = [[all_names[i] for i in row] for row in classes]
  decoded = [[n.decode() if isinstance(n, bytes) else str(n) for n in row]
             for row in class_names]
  assert decoded == names


# Both signatures against the Keras network, in a fresh process.

_FRESH_PROCESS_SCRIPT = """
import json
import sys

import numpy as np
import tensorflow as tf

export_dir, paths, output = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
loaded = tf.saved_model.load(export_dir)
encoded = [tf.io.read_file(path) for path in paths]
pixels = tf.stack([tf.io.decode_jpeg(data, channels=3) for data in encoded])
inputs = {"serving_default": {"images": pixels},
          "predict_image_bytes": {"image_bytes": tf.stack(encoded)}}
results = {}
for name in inputs:
  for key, value in loaded.signatures[name](**inputs[name]).items():
    value = value.numpy()
    if value.dtype == object:
      value = np.char.decode(value.astype(bytes))
    results[name + "/" + key] = value
np.savez(output, **results)
"""


@pytest.fixture(scope="module")
def fresh_process_outputs(exported, jpeg_files, tmp_path_factory):
  output = tmp_path_factory.mktemp("fresh") / "outputs.npz"
  completed = subprocess.run(
      [sys.executable, "-c", _FRESH_PROCESS_SCRIPT, exported,
       json.dumps(jpeg_files), str(output)],
      capture_output=True, text=True, timeout=300, env=_quiet_env(),
      check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  with np.load(output) as stored:
    return {key: stored[key] for key in stored.files}


@pytest.mark.parametrize("signature", _SIGNATURES)
def test_fresh_process_probabilities_match_keras(fresh_process_outputs,
                                                 reference, signature):
  probabilities = fresh_process_outputs[f"{signature}/probabilities"]
  assert probabilities.dtype == np.float32
  np.testing.assert_allclose(probabilities, reference, atol=_TOLERANCE)


@pytest.mark.parametrize("signature", _SIGNATURES)
def test_fresh_process_top_k_matches_keras(fresh_process_outputs, reference,
                                           keras_model, signature):
  outputs = {key.split("/")[1]: value
             for key, value in fresh_process_outputs.items()
             if key.startswith(signature + "/")}
  assert outputs["classes"].dtype == np.int64
  assert outputs["classes"].shape == (len(reference), 5)
  _assert_top_k(reference, outputs["classes"], outputs["class_names"],
                outputs["scores"], keras_model[1]["class_names"])


def test_predict_files_matches_keras(exported, jpeg_files, reference,
                                     keras_model):
  for signature in _SIGNATURES:
    predictions = export.predict_files(exported, jpeg_files, signature)
    assert [p.path for p in predictions] == jpeg_files
    _assert_top_k(reference, np.array([p.classes for p in predictions]),
                  [p.class_names for p in predictions],
                  np.array([p.scores for p in predictions]),
                  keras_model[1]["class_names"])


# The TF-Serving contract, through the TF1 loader and a Session.


class SessionModel:
  """An export loaded into a TF1 Session and run by tensor names."""

  def __init__(self, export_dir):
    self.graph = tf.Graph()
    self.session = tf.compat.v1.Session(graph=self.graph)
    with self.graph.as_default():
      meta_graph = tf.compat.v1.saved_model.loader.load(
          self.session, [tf.compat.v1.saved_model.tag_constants.SERVING],
          export_dir)
    self.signature_defs = meta_graph.signature_def

  def run(self, signature_name, inputs):
    signature = self.signature_defs[signature_name]
    assert set(inputs) == set(signature.inputs), sorted(inputs)
    feeds = {signature.inputs[key].name: value
             for key, value in inputs.items()}
    fetches = {key: info.name for key, info in signature.outputs.items()}
    return self.session.run(fetches, feed_dict=feeds)


@pytest.fixture(scope="module")
def session_model(exported):
  model = SessionModel(exported)
  yield model
  model.session.close()


def _inputs_from_request(request):
  return {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}


def _inputs_from_rest_body(body, signature_def):
  """Decode a REST body in the row format as TF-Serving does."""
  inputs = {}
  for key in signature_def.inputs:
    values = [instance[key] for instance in body["instances"]]
    if all(isinstance(value, dict) and set(value) == {"b64"}
           for value in values):
      inputs[key] = np.array([base64.b64decode(value["b64"])
                              for value in values], dtype=object)
    else:
      dtype = tf.dtypes.as_dtype(signature_def.inputs[key].dtype)
      inputs[key] = np.asarray(values, dtype=dtype.as_numpy_dtype)
  return inputs


def test_signature_defs_list_inputs_and_outputs(session_model):
  defs = session_model.signature_defs
  assert set(_SIGNATURES) <= set(defs)
  assert set(defs[export.IMAGES_SIGNATURE].inputs) == {"images"}
  assert set(defs[export.IMAGE_BYTES_SIGNATURE].inputs) == {"image_bytes"}
  for signature in _SIGNATURES:
    assert set(defs[signature].outputs) == set(export.OUTPUT_KEYS), signature
    assert defs[signature].method_name == "tensorflow/serving/predict"


@pytest.mark.parametrize("signature", _SIGNATURES)
def test_session_runs_client_grpc_request(session_model, jpeg_files,
                                          reference, signature):
  request = serving_client.build_predict_request(jpeg_files, "adarts",
                                                 signature)
  outputs = session_model.run(request.model_spec.signature_name,
                              _inputs_from_request(request))
  np.testing.assert_allclose(outputs["probabilities"], reference,
                             atol=_TOLERANCE)


@pytest.mark.parametrize("signature", _SIGNATURES)
def test_session_runs_client_rest_body(session_model, jpeg_files, reference,
                                       signature):
  body = json.loads(json.dumps(serving_client.build_rest_body(jpeg_files,
                                                              signature)))
  signature_def = session_model.signature_defs[body["signature_name"]]
  outputs = session_model.run(body["signature_name"],
                              _inputs_from_rest_body(body, signature_def))
  np.testing.assert_allclose(outputs["probabilities"], reference,
                             atol=_TOLERANCE)


def test_rest_body_carries_file_bytes(jpeg_files):
  body = serving_client.build_rest_body(jpeg_files[:2])
  assert body["signature_name"] == export.IMAGE_BYTES_SIGNATURE
  assert len(body["instances"]) == 2
  with open(jpeg_files[1], "rb") as stream:
    expected = stream.read()
  sent = base64.b64decode(body["instances"][1]["image_bytes"]["b64"])
  assert sent == expected


def test_predict_request_model_spec(jpeg_files):
  request = serving_client.build_predict_request(
      jpeg_files[:3], "adarts", export.IMAGES_SIGNATURE, version=7)
  assert request.model_spec.name == "adarts"
  assert request.model_spec.signature_name == export.IMAGES_SIGNATURE
  assert request.model_spec.version.value == 7
  pixels = tf.make_ndarray(request.inputs["images"])
  assert pixels.dtype == np.uint8
  assert pixels.shape == (3, 32, 32, 3)


def test_client_rejects_mixed_sizes_for_pixels(tmp_path, jpeg_files):
  larger = tmp_path / "larger.png"
  larger.write_bytes(tf.io.encode_png(tf.zeros([40, 40, 3], tf.uint8)).numpy())
  with pytest.raises(ValueError, match="different sizes"):
    serving_client.build_rest_body([jpeg_files[0], str(larger)],
                                   export.IMAGES_SIGNATURE)


# Warm-up requests.


def test_warmup_records_cover_both_signatures(exported):
  logs = export.read_warmup_requests(exported)
  signatures = {log.predict_log.request.model_spec.signature_name
                for log in logs}
  assert signatures == set(_SIGNATURES)
  assert all(log.predict_log.request.model_spec.name == "adarts"
             for log in logs)


def test_warmup_records_parse_as_prediction_logs(exported):
  path = os.path.join(exported, "assets.extra", "tf_serving_warmup_requests")
  records = [record.numpy() for record in tf.data.TFRecordDataset(path)]
  assert records
  for record in records:
    log = prediction_log_pb2.PredictionLog.FromString(record)
    assert log.WhichOneof("log_type") == "predict_log"


def test_warmup_requests_run_in_session(exported, session_model):
  for log in export.read_warmup_requests(exported):
    request = log.predict_log.request
    inputs = _inputs_from_request(request)
    batch = len(next(iter(inputs.values())))
    outputs = session_model.run(request.model_spec.signature_name, inputs)
    assert outputs["probabilities"].shape == (batch, 10)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0,
                               atol=1e-5)


def test_given_warmup_images_are_used(trained_run, tmp_path, jpeg_files):
  version_dir = export.export_run(str(trained_run), str(tmp_path), "adarts",
                                  warmup_images=jpeg_files[:3])
  requests = [log.predict_log.request
              for log in export.read_warmup_requests(version_dir)]
  sent = [request.inputs["image_bytes"] for request in requests
          if request.model_spec.signature_name ==
          export.IMAGE_BYTES_SIGNATURE]
  with open(jpeg_files[2], "rb") as stream:
    expected = stream.read()
  assert expected in list(tf.make_ndarray(sent[-1]))


# Export metadata and the model server configuration.


def test_export_leaves_out_auxiliary_head(exported, keras_model):
  network = keras_model[0]
  assert network.auxiliary_head is not None
  saved = tf.train.list_variables(
      os.path.join(exported, "variables", "variables"))
  saved_values = [name for name, _ in saved if name.endswith("VARIABLE_VALUE")]
  expected = len(network.variables) - len(network.auxiliary_head.variables)
  assert len(saved_values) == expected


def test_export_meta_contents(exported, trained_run, keras_model):
  meta = export.load_export_meta(exported)
  run_meta = keras_model[1]
  evaluated = json.loads((trained_run / "eval.json").read_text())
  assert meta["version"] == 1
  assert meta["model_name"] == "adarts"
  assert meta["class_names"] == run_meta["class_names"]
  assert meta["image_size"] == 32
  assert meta["mean"] == run_meta["mean"]
  assert meta["std"] == run_meta["std"]
  assert meta["genotype"] == run_meta["genotype"]
  assert meta["dataset"] == run_meta["dataset"]
  assert meta["eval_accuracy"]["top1"] == evaluated["top1"]
  assert meta["export_time"].endswith("+00:00")


def _read_models_config(export_base):
  config = model_server_config_pb2.ModelServerConfig()
  text_format.Parse((export_base / "models.config").read_text(), config)
  return {entry.name: entry for entry in config.model_config_list.config}


def test_models_config_names_model(exported, export_base):
  entries = _read_models_config(export_base)
  assert entries["adarts"].base_path == str(export_base / "adarts")
  assert entries["adarts"].model_platform == "tensorflow"


# Versions.


def test_next_version_and_second_model(exported, trained_run, export_base):
  second = export.export_run(str(trained_run), str(export_base), "adarts")
  assert second == str(export_base / "adarts" / "2")
  assert os.path.isfile(os.path.join(second, "saved_model.pb"))
  assert export.load_export_meta(second)["version"] == 2

  export.export_run(str(trained_run), str(export_base), "other", version=3)
  entries = _read_models_config(export_base)
  assert sorted(entries) == ["adarts", "other"]
  assert entries["other"].base_path == str(export_base / "other")


def test_existing_version_rejected(exported, trained_run, export_base):
  with pytest.raises(export.ExportError) as raised:
    export.export_run(str(trained_run), str(export_base), "adarts", version=1)
  assert str(export_base / "adarts" / "1") in str(raised.value)
  assert "--overwrite" in str(raised.value)


def test_overwrite_replaces_version(trained_run, tmp_path):
  first = export.export_run(str(trained_run), str(tmp_path), "adarts")
  marker = os.path.join(first, "marker")
  with open(marker, "w", encoding="utf-8") as stream:
    stream.write("old export")
  again = export.export_run(str(trained_run), str(tmp_path), "adarts",
                            version=1, overwrite=True)
  assert again == first
  assert not os.path.exists(marker)
  assert os.path.isfile(os.path.join(again, "saved_model.pb"))
  assert sorted(os.listdir(tmp_path / "adarts")) == ["1"]


def _failing_save(*args, **kwargs):
  del args, kwargs
  raise RuntimeError("injected failure in tf.saved_model.save")


def test_failed_export_leaves_no_folder(trained_run, tmp_path, monkeypatch):
  monkeypatch.setattr(tf.saved_model, "save", _failing_save)
  with pytest.raises(RuntimeError, match="injected failure"):
    export.export_run(str(trained_run), str(tmp_path), "adarts")
  assert os.listdir(tmp_path / "adarts") == []
  assert not (tmp_path / "models.config").exists()


def test_failed_overwrite_keeps_old_version(exported, trained_run,
                                           export_base, monkeypatch):
  monkeypatch.setattr(tf.saved_model, "save", _failing_save)
  with pytest.raises(RuntimeError, match="injected failure"):
    export.export_run(str(trained_run), str(export_base), "adarts",
                      version=1, overwrite=True)
  assert os.path.isfile(os.path.join(exported, "saved_model.pb"))
  leftovers = [name for name in os.listdir(export_base / "adarts")
               if not name.isdigit()]
  assert leftovers == []


# Resizing inside the model.


def test_resize_export_matches_keras(trained_run, tmp_path, jpeg_files,
                                     keras_model):
  version_dir = export.export_run(str(trained_run), str(tmp_path), "adarts",
                                  resize=True)
  pixels = tf.cast(tf.round(tf.image.resize(_decode_files(jpeg_files),
                                            [40, 40])), tf.uint8).numpy()
  expected = _keras_probabilities(keras_model, pixels)
  model = export.ExportedModel(version_dir)
  from_pixels = model.predict_pixels(pixels)["probabilities"]
  np.testing.assert_allclose(from_pixels, expected, atol=_TOLERANCE)
  from_bytes = model.predict_bytes(
      [tf.io.encode_png(image).numpy() for image in pixels])["probabilities"]
  np.testing.assert_allclose(from_bytes, expected, atol=_TOLERANCE)


# Bad input.


def test_run_without_checkpoints_rejected(trained_run, tmp_path):
  shutil.copy(trained_run / "run_meta.json", tmp_path / "run_meta.json")
  with pytest.raises(export.ExportError, match="No checkpoint found"):
    export.export_run(str(tmp_path), str(tmp_path / "out"), "adarts")
  assert not (tmp_path / "out" / "adarts").exists()


def test_run_without_run_meta_rejected(tmp_path):
  with pytest.raises(export.ExportError, match="run_meta.json not found"):
    export.export_run(str(tmp_path), str(tmp_path / "out"), "adarts")


def test_unknown_checkpoint_rejected(trained_run, tmp_path):
  with pytest.raises(export.ExportError, match="ckpt-999") as raised:
    export.export_run(str(trained_run), str(tmp_path), "adarts",
                      checkpoint="ckpt-999")
  assert "ckpt-4" in str(raised.value)


@pytest.mark.parametrize("arguments, message", [
    ({"model_name": "bad/name"}, "Invalid model name"),
    ({"top_k": 0}, "top_k=0"),
    ({"version": 0}, "version=0"),
])
def test_invalid_settings_rejected(trained_run, tmp_path, arguments, message):
  arguments = dict({"model_name": "adarts"}, **arguments)
  model_name = arguments.pop("model_name")
  with pytest.raises(export.ExportError, match=message):
    export.export_run(str(trained_run), str(tmp_path), model_name,
                      **arguments)


@pytest.fixture(scope="module")
def loaded(exported):
  return tf.saved_model.load(exported)


def test_signature_rejects_wrong_image_shape(loaded):
  with pytest.raises(tf.errors.InvalidArgumentError) as raised:
    loaded.signatures[export.IMAGES_SIGNATURE](
        images=tf.zeros([2, 64, 64, 3], tf.uint8))
  assert "[2, 64, 64, 3]" in str(raised.value)
  assert "--resize" in str(raised.value)


def test_signature_rejects_wrong_dtype(loaded):
  with pytest.raises(tf.errors.InvalidArgumentError, match="uint8"):
    loaded.signatures[export.IMAGES_SIGNATURE](
        images=tf.zeros([2, 32, 32, 3], tf.float32))


def test_signature_rejects_undecodable_bytes(loaded, jpeg_files):
  with open(jpeg_files[0], "rb") as stream:
    valid = stream.read()
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"image_bytes\[1\] is not JPEG or PNG"):
    loaded.signatures[export.IMAGE_BYTES_SIGNATURE](
        image_bytes=tf.constant([valid, b"not an image"]))


def test_signature_rejects_truncated_jpeg(loaded, jpeg_files):
  with open(jpeg_files[0], "rb") as stream:
    truncated = stream.read()[:200]
  with pytest.raises(tf.errors.InvalidArgumentError, match="JPEG"):
    loaded.signatures[export.IMAGE_BYTES_SIGNATURE](
        image_bytes=tf.constant([truncated]))


def test_signature_rejects_wrong_image_size(loaded):
  encoded = tf.io.encode_png(tf.zeros([64, 48, 3], tf.uint8))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"image_bytes\[0\] is a 48x64 image"):
    loaded.signatures[export.IMAGE_BYTES_SIGNATURE](
        image_bytes=tf.stack([encoded]))


@pytest.fixture(scope="module")
def exported_model(exported):
  return export.ExportedModel(exported)


def test_predict_pixels_rejects_float(exported_model):
  with pytest.raises(export.ExportError, match="dtype float32"):
    exported_model.predict_pixels(np.zeros([1, 32, 32, 3], np.float32))


def test_predict_pixels_rejects_wrong_shape(exported_model):
  with pytest.raises(export.ExportError, match=r"shape \[1, 28, 28, 3\]"):
    exported_model.predict_pixels(np.zeros([1, 28, 28, 3], np.uint8))


def test_predict_files_names_corrupt_file(exported_model, tmp_path,
                                          jpeg_files):
  corrupt = tmp_path / "corrupt.jpg"
  with open(jpeg_files[0], "rb") as stream:
    corrupt.write_bytes(stream.read()[:200])
  with pytest.raises(export.ExportError, match="corrupt.jpg could not be"):
    exported_model.predict_files([jpeg_files[1], str(corrupt)])


def test_predict_files_names_non_image(exported_model, tmp_path):
  text = tmp_path / "notes.png"
  text.write_text("not an image")
  with pytest.raises(export.ExportError, match="notes.png is not a JPEG"):
    exported_model.predict_files([str(text)])


def test_predict_files_names_missing_file(exported_model, tmp_path):
  with pytest.raises(export.ExportError, match="missing.jpg not found"):
    exported_model.predict_files([str(tmp_path / "missing.jpg")])


# The client against loopback servers that run requests in the Session.


class _PredictionService(
    prediction_service_pb2_grpc.PredictionServiceServicer):
  """PredictionService/Predict, run by a SessionModel."""

  def __init__(self, model):
    self.model = model

  def Predict(self, request, context):  # pylint: disable=invalid-name
    try:
      outputs = self.model.run(request.model_spec.signature_name,
                               _inputs_from_request(request))
    except tf.errors.InvalidArgumentError as error:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
    response = predict_pb2.PredictResponse()
    response.model_spec.CopyFrom(request.model_spec)
    for key, value in outputs.items():
      response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    return response


def _rest_handler(model):

  class Handler(http.server.BaseHTTPRequestHandler):
    """POST /v1/models/adarts:predict, run by a SessionModel."""

    def do_POST(self):  # pylint: disable=invalid-name
      if self.path != "/v1/models/adarts:predict":
        self._reply(404, {"error": f"Servable not found for {self.path}"})
        return
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      signature_def = model.signature_defs[body["signature_name"]]
      outputs = model.run(body["signature_name"],
                          _inputs_from_rest_body(body, signature_def))
      rows = [{key: np.char.decode(value[row].astype(bytes)).tolist()
               if value.dtype == object else value[row].tolist()
               for key, value in outputs.items()}
              for row in range(len(body["instances"]))]
      self._reply(200, {"predictions": rows})

    def _reply(self, status, payload):
      data = json.dumps(payload).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def log_message(self, *args):
      del args

  return Handler


@pytest.fixture(scope="module")
def loopback_servers(session_model):
  """(rest_port, grpc_port) of servers on 127.0.0.1."""
  grpc_server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
      _PredictionService(session_model), grpc_server)
  grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
  grpc_server.start()
  rest_server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), _rest_handler(session_model))
  thread = threading.Thread(target=rest_server.serve_forever, daemon=True)
  thread.start()
  yield rest_server.server_address[1], grpc_port
  rest_server.shutdown()
  rest_server.server_close()
  grpc_server.stop(None)


@pytest.mark.parametrize("signature", _SIGNATURES)
def test_client_predicts_over_rest(loopback_servers, jpeg_files, reference,
                                   keras_model, signature):
  predictions = serving_client.predict_rest(
      jpeg_files, "127.0.0.1", loopback_servers[0], "adarts", signature)
  _assert_top_k(reference, np.array([p.classes for p in predictions]),
                [p.class_names for p in predictions],
                np.array([p.scores for p in predictions]),
                keras_model[1]["class_names"])


@pytest.mark.parametrize("signature", _SIGNATURES)
def test_client_predicts_over_grpc(loopback_servers, jpeg_files, reference,
                                   keras_model, signature):
  predictions = serving_client.predict_grpc(
      jpeg_files, "127.0.0.1", loopback_servers[1], "adarts", signature)
  _assert_top_k(reference, np.array([p.classes for p in predictions]),
                [p.class_names for p in predictions],
                np.array([p.scores for p in predictions]),
                keras_model[1]["class_names"])


def test_client_reports_unknown_model(loopback_servers, jpeg_files):
  with pytest.raises(serving_client.ServingError, match="HTTP 404"):
    serving_client.predict_rest(jpeg_files[:1], "127.0.0.1",
                                loopback_servers[0], "missing")


def test_client_reports_grpc_rejection(loopback_servers, tmp_path):
  image = tmp_path / "large.png"
  image.write_bytes(tf.io.encode_png(tf.zeros([40, 40, 3], tf.uint8)).numpy())
  with pytest.raises(serving_client.ServingError,
                     match="(?s)INVALID_ARGUMENT.*40x40"):
    serving_client.predict_grpc([str(image)], "127.0.0.1",
                                loopback_servers[1], "adarts")


def test_client_binary_prints_labels(loopback_servers, jpeg_files,
                                     reference, keras_model):
  folder = os.path.dirname(jpeg_files[0])
  completed = subprocess.run(
      [sys.executable, "-m", "export.serving_client", f"--images={folder}",
       "--host=127.0.0.1", f"--rest_port={loopback_servers[0]}",
       f"--grpc_port={loopback_servers[1]}", "--protocol=both",
       "--batch_size=4"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=_quiet_env(), check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  lines = completed.stdout.splitlines()
  expected_first = keras_model[1]["class_names"][int(np.argmax(reference[0]))]
  first_lines = [line for line in lines if line.startswith(jpeg_files[0])]
  assert len(first_lines) == 2, completed.stdout
  for line in first_lines:
    assert line.split(": ", 1)[1].startswith(expected_first + " "), line


# The export binary.


def test_export_binary_writes_both_signatures(trained_run, tmp_path):
  completed = subprocess.run(
      [sys.executable, "-m", "export.export_model",
       f"--model_dir={trained_run}", f"--export_base={tmp_path}",
       "--model_name=adarts"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=_quiet_env(), check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  version_dir = tmp_path / "adarts" / "1"
  assert (version_dir / "saved_model.pb").is_file()

  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  cli_output = subprocess.run(
      [cli, "show", "--all", "--dir", str(version_dir)],
      capture_output=True, text=True, timeout=300, env=_quiet_env(),
      check=False)
  assert cli_output.returncode == 0, cli_output.stderr[-3000:]
  for signature in _SIGNATURES:
    assert f"signature_def['{signature}']" in cli_output.stdout, signature


def test_export_binary_rejects_existing_version(exported, trained_run,
                                                export_base):
  completed = subprocess.run(
      [sys.executable, "-m", "export.export_model",
       f"--model_dir={trained_run}", f"--export_base={export_base}",
       "--version=1"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=_quiet_env(), check=False)
  assert completed.returncode == 1
  assert "--overwrite" in completed.stderr

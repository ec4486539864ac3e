"""Speed suite: search steps, the retraining step, inference, start-up, memory.

Runs each workload in a fresh child process, so that start-up and peak
resident memory belong to that workload alone. Start-up runs from
construction to the end of the first step, tracing and graph optimization
included. Then prints a markdown table with the ratios against the official
DARTS code's figures on the same 2-core machine and the targets, and writes
it into a marked section of docs/benchmarks.md, keeping the rest of the file.

  python -m benchmarks.run                  # every workload
  python -m benchmarks.run --quick          # reduced sizes, a smoke check
  python -m benchmarks.run --only=search_relu_c8,retrain_step --no_write

Every input is random: 32x32 images, 10 classes, float32, XLA off. A step
time is the median over the timed steps after the warm-up steps.
"""

import dataclasses
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

from absl import app
from absl import flags

from benchmarks import machine
from benchmarks import profiling

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_QUICK = flags.DEFINE_bool(
    "quick", False,
    "Smoke check: reduced network sizes, 1 to 2 warm-up and 2 timed steps, "
    "no large search and no non-factorized search; the results are not "
    "comparable with the official figures.")
_STEPS = flags.DEFINE_integer(
    "steps", None,
    "Timed steps per workload after the warm-up, overriding each "
    "workload's count (default: 6 for the small searches, 4 for the C=16 "
    "searches, 10 for the retraining step and inference; 2 with --quick).")
_ONLY = flags.DEFINE_list(
    "only", [],
    "Comma-separated workload names to run; default: all. A SavedModel "
    "workload brings the export workload with it. Unknown names are "
    "listed with the valid ones.")
_OUTPUT = flags.DEFINE_string(
    "output", os.path.join(_REPO_ROOT, "docs", "benchmarks.md"),
    "Markdown file whose marked section receives the results. Default: "
    "docs/benchmarks.md of this repository.")
_NO_WRITE = flags.DEFINE_bool(
    "no_write", False, "Print the table only; leave --output alone.")
_TIMEOUT = flags.DEFINE_integer(
    "workload_timeout", 900,
    "Seconds after which a workload's process is stopped and reported as "
    "timed out.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", None,
    "Also record TensorFlow profiler traces: after its timed steps, each "
    "workload runs --profile_steps more under the profiler into "
    "PROFILE_DIR/WORKLOAD (TensorBoard opens it with "
    "tensorboard-plugin-profile), and the report gains the costliest op types of each workload. The "
    "profiled steps are not part of the step times. Default: no "
    "profiling.")
_PROFILE_STEPS = flags.DEFINE_integer(
    "profile_steps", 2, "Steps recorded per workload with --profile_dir.")
_WORKER_SPEC = flags.DEFINE_string(
    "worker_spec", None, "Internal: the JSON workload that this child "
    "process runs.")
_RESULT_FILE = flags.DEFINE_string(
    "result_file", None, "Internal: where a child process writes its JSON "
    "result.")

SECTION_BEGIN = "<!-- benchmarks.run: begin -->"
SECTION_END = "<!-- benchmarks.run: end -->"

SEARCH = "search"
RETRAIN = "retrain"
INFER_KERAS = "infer_keras"
INFER_SAVED_MODEL = "infer_saved_model"
EXPORT = "export"

# The official DARTS code, measured by the project on the 2-core reference
# machine: PyTorch 2.13 CPU build, 2 threads, float32, random 32x32 inputs,
# median over 12 to 20 steps after 3 warm-up steps. Values are seconds per
# step or per batch, and peak memory in GB where it was taken.
_REFERENCE_SMALL_SEARCH = 4.98
_REFERENCE_LARGE_SEARCH = 25.8
_REFERENCE_LARGE_SEARCH_MEMORY = 10.6
_REFERENCE_RETRAIN = 2.85
_REFERENCE_RETRAIN_MEMORY = 3.0
_REFERENCE_INFER_64 = 1.85
# Two runs gave 57 and 84 ms; the targets use the faster one.
_REFERENCE_INFER_1 = 0.057


@dataclasses.dataclass(frozen=True)
class Workload:
  """One measured workload and the official figure it is compared with."""
  name: str
  kind: str
  description: str
  batch_size: int
  channels: int
  layers: int
  warmup_steps: int
  timed_steps: int
  space: str = "factorized"
  arch_update: str = "sequential"
  arch_update_every: int = 1
  partial_channels: int = 1
  edge_normalization: bool = False
  reference_seconds: Optional[float] = None  # Official DARTS, per step.
  reference_memory_gb: Optional[float] = None


def _search(name, description, channels, layers, batch_size, warmup, timed,
            reference=None, reference_memory=None, **settings):
  return Workload(name, SEARCH, description, batch_size, channels, layers,
                  warmup, timed, reference_seconds=reference,
                  reference_memory_gb=reference_memory, **settings)


def _search_family(suffix, channels, layers, batch_size, warmup, timed,
                   reference, reference_memory=None):
  """Build the workloads of the four compared search settings at one size."""
  size = f"C={channels}, {layers} cells, batch {batch_size}"
  return [
      _search(f"search_relu_{suffix}", f"search, fixed:relu, {size}",
              channels, layers, batch_size, warmup, timed, reference,
              reference_memory, space="fixed:relu"),
      _search(f"search_factorized_{suffix}",
              f"search, factorized, sequential, {size}", channels, layers,
              batch_size, warmup, timed, reference, reference_memory),
      _search(f"search_joint_{suffix}",
              f"search, factorized, joint, {size}", channels, layers,
              batch_size, warmup, timed, reference, reference_memory,
              arch_update="joint"),
      _search(f"search_pc4_{suffix}",
              f"search, factorized, partial channels K=4 and edge "
              f"normalization, {size}", channels, layers, batch_size, warmup,
              timed, reference, reference_memory, partial_channels=4,
              edge_normalization=True),
  ]


def _retrain_and_inference(channels, layers, batch_size, warmup, timed,
                           quick):
  size = f"DARTS_V2, C={channels}, {layers} cells"
  reference = {False: (_REFERENCE_RETRAIN, _REFERENCE_INFER_64,
                       _REFERENCE_INFER_1),
               True: (None, None, None)}[quick]
  return [
      Workload("retrain_step", RETRAIN,
               f"retraining step, {size}, auxiliary head, drop path 0.2, "
               f"batch {batch_size}", batch_size, channels, layers, warmup,
               timed, reference_seconds=reference[0],
               reference_memory_gb=None if quick else _REFERENCE_RETRAIN_MEMORY),
      Workload("export", EXPORT, f"SavedModel export, {size}", 1, channels,
               layers, 0, 0),
      Workload("infer_keras_b64", INFER_KERAS,
               f"inference, Keras model, {size}, batch 64", 64, channels,
               layers, warmup, timed, reference_seconds=reference[1]),
      Workload("infer_saved_model_b64", INFER_SAVED_MODEL,
               f"inference, SavedModel, {size}, batch 64", 64, channels,
               layers, warmup, timed, reference_seconds=reference[1]),
      Workload("infer_keras_b1", INFER_KERAS,
               f"inference, Keras model, {size}, batch 1", 1, channels,
               layers, warmup, timed, reference_seconds=reference[2]),
      Workload("infer_saved_model_b1", INFER_SAVED_MODEL,
               f"inference, SavedModel, {size}, batch 1", 1, channels,
               layers, warmup, timed, reference_seconds=reference[2]),
  ]


def workloads(quick):
  """Return the workloads of a full run, or of a --quick run, in run order.

  The step counts are chosen so that the full run takes under 30 minutes on
  the 2-core reference machine.
  """
  if quick:
    return [
        *_search_family("c4", 4, 2, 16, 1, 2, None),
        _search("search_every2_c4",
                "search, factorized, sequential, arch_update_every=2, C=4, "
                "2 cells, batch 16", 4, 2, 16, 2, 2, arch_update_every=2),
        *_retrain_and_inference(16, 8, 32, 1, 2, quick=True),
    ]
  return [
      *_search_family("c8", 8, 5, 32, 2, 6, _REFERENCE_SMALL_SEARCH),
      _search("search_every2_c8",
              "search, factorized, sequential, arch_update_every=2, C=8, "
              "5 cells, batch 32", 8, 5, 32, 2, 6, arch_update_every=2),
      _search("search_non_factorized_c8_b8",
              "search, non-factorized, sequential, C=8, 5 cells, batch 8",
              8, 5, 8, 2, 6, space="non_factorized"),
      _search("search_factorized_c8_b8",
              "search, factorized, sequential, C=8, 5 cells, batch 8",
              8, 5, 8, 2, 6),
      *_search_family("c16", 16, 8, 64, 2, 4, _REFERENCE_LARGE_SEARCH,
                      _REFERENCE_LARGE_SEARCH_MEMORY),
      *_retrain_and_inference(36, 20, 32, 2, 10, quick=False),
  ]


# The child process: one workload.


def _random_batch(tf, batch_size, seed, dtype="float32"):
  generator = tf.random.Generator.from_seed(seed)
  if dtype == "uint8":
    images = tf.cast(generator.uniform([batch_size, 32, 32, 3], 0, 256,
                                       tf.int32), tf.uint8)
  else:
    images = generator.normal([batch_size, 32, 32, 3])
  labels = generator.uniform([batch_size], 0, 10, tf.int32)
  return images, labels


def _time_steps(run_step, steps, start):
  """Run `run_step(index)` `steps` times; return (start-up, step times).

  `run_step` must return a numpy value, so that each timing ends when the
  step's computation has finished.
  """
  times = []
  startup = None
  for index in range(steps):
    begin = time.perf_counter()
    run_step(index)
    end = time.perf_counter()
    times.append(end - begin)
    if startup is None:
      startup = end - start
  return startup, times


def _run_search(spec, steps):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tf_adarts import presets  # pylint: disable=g-import-not-at-top
  from tf_adarts import search  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  config = presets.SearchConfig(
      space=spec.space, channels=spec.channels, layers=spec.layers,
      batch_size=spec.batch_size, partial_channels=spec.partial_channels,
      edge_normalization=spec.edge_normalization,
      arch_update=spec.arch_update,
      arch_update_every=spec.arch_update_every)
  # As run_search does: Grappler follows config.graph_optimizer (off by
  # default). The child process runs this workload only.
  tf.config.optimizer.set_experimental_options(
      {"disable_meta_optimizer": not config.graph_optimizer})
  model = search.build_search_model(config, num_classes=10,
                                    steps_per_epoch=1000)
  built = time.perf_counter() - start
  data = (_random_batch(tf, spec.batch_size, 1),
          _random_batch(tf, spec.batch_size, 2))

  # As the search job does: one traced step with and one without the
  # architecture updates, chosen per step.
  functions = {}
  trace_seconds = []

  def run_step(index):
    enabled = model.arch_updates_due(index)
    model.arch_updates_enabled = enabled
    if enabled not in functions:
      functions[enabled] = tf.function(model.train_step)
      begin = time.perf_counter()
      functions[enabled].get_concrete_function(data)
      trace_seconds.append(time.perf_counter() - begin)
    return functions[enabled](data)["loss"].numpy()

  startup, times = _time_steps(run_step, steps, start)
  return {"build_s": built, "startup_s": startup, "step_times_s": times,
          "trace_s": trace_seconds[0]}, run_step


def _retrain_network(spec):
  from tf_adarts import networks  # pylint: disable=g-import-not-at-top
  return networks.NetworkCIFAR("DARTS_V2", num_classes=10,
                               channels=spec.channels, layers=spec.layers,
                               auxiliary=True, drop_path_rate=0.2)


def _run_retrain(spec, steps):
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tf_adarts import retrain  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  network = _retrain_network(spec)
  optimizer = keras.optimizers.SGD(0.025, momentum=0.9)
  optimizer.build(network.trainable_variables)
  # The CIFAR-10 recipe: coupled decay 3e-4, clip 5, auxiliary weight 0.4.
  step = retrain.RetrainStep(network, optimizer, spec.batch_size,
                             weight_decay=3e-4, clip_norm=5.0,
                             label_smoothing=0.0, auxiliary_weight=0.4,
                             seed=0)
  built = time.perf_counter() - start
  train_function = tf.function(step.__call__)
  images, labels = _random_batch(tf, spec.batch_size, 1)

  def run_step(index):
    del index  # Every step trains on the same batch.
    return train_function(images, labels)["loss"].numpy()

  startup, times = _time_steps(run_step, steps, start)
  return {"build_s": built, "startup_s": startup, "step_times_s": times,
          "params": int(sum(v.numpy().size
                            for v in network.trainable_variables))}, run_step


_SERVING_META = {
    "class_names": [f"class_{k}" for k in range(10)],
    "image_size": 32,
    "augment": "cifar",
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.2470, 0.2435, 0.2616],
}


def _run_export(spec, export_dir):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tf_adarts import export  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  network = _retrain_network(spec)
  module, signatures = export.build_serving_module(network, _SERVING_META)
  tf.saved_model.save(module, export_dir, signatures=signatures)
  return {"build_s": time.perf_counter() - start, "startup_s": None,
          "step_times_s": []}, None


def _run_infer_keras(spec, steps):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  network = _retrain_network(spec)
  built = time.perf_counter() - start
  predict = tf.function(lambda images: network(images, training=False))
  images, _ = _random_batch(tf, spec.batch_size, 3)

  def run_step(index):
    del index  # Every batch is the same.
    return predict(images).numpy()

  startup, times = _time_steps(run_step, steps, start)
  return {"build_s": built, "startup_s": startup,
          "step_times_s": times}, run_step


def _run_infer_saved_model(spec, steps, export_dir):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tf_adarts import export  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
    raise FileNotFoundError(
        f"No SavedModel in {export_dir}: the 'export' workload failed or "
        "did not run before this one; see its output above.")
  start = time.perf_counter()
  serve = tf.saved_model.load(export_dir).signatures[export.IMAGES_SIGNATURE]
  built = time.perf_counter() - start
  input_name = export.SIGNATURE_INPUTS[export.IMAGES_SIGNATURE]
  images, _ = _random_batch(tf, spec.batch_size, 3, dtype="uint8")

  def run_step(index):
    del index  # Every batch is the same.
    return serve(**{input_name: images})["probabilities"].numpy()

  startup, times = _time_steps(run_step, steps, start)
  return {"build_s": built, "startup_s": startup,
          "step_times_s": times}, run_step


def _run_worker(spec_json, result_file):
  values = json.loads(spec_json)
  export_dir = values.pop("export_dir")
  profile_dir = values.pop("profile_dir")
  profile_steps = values.pop("profile_steps")
  spec = Workload(**values)
  steps = spec.warmup_steps + spec.timed_steps
  if spec.kind == SEARCH:
    result, run_step = _run_search(spec, steps)
  elif spec.kind == RETRAIN:
    result, run_step = _run_retrain(spec, steps)
  elif spec.kind == EXPORT:
    result, run_step = _run_export(spec, export_dir)
  elif spec.kind == INFER_KERAS:
    result, run_step = _run_infer_keras(spec, steps)
  elif spec.kind == INFER_SAVED_MODEL:
    result, run_step = _run_infer_saved_model(spec, steps, export_dir)
  else:
    raise ValueError(f"Unknown workload kind {spec.kind!r}.")

  if profile_dir and run_step is not None:
    # After the timed steps, so that the profiler's overhead stays out of
    # the step times. The step indices continue, which keeps the
    # arch_update_every pattern of the search.
    profiling.profile_steps(run_step, profile_steps, profile_dir,
                            first_index=steps)
    result["profile"] = [
        dataclasses.astuple(row)
        for row in profiling.summarize_trace(profile_dir, profile_steps)]
  with open(result_file, "w", encoding="utf-8") as stream:
    json.dump(result, stream)


# The parent process: run the children, collect, report.


@dataclasses.dataclass
class Result:
  """Measurements of one workload's child process."""
  workload: Workload
  status: str  # "ok", "failed" or "timed out".
  wall_s: float
  peak_memory_gb: Optional[float] = None
  build_s: Optional[float] = None
  startup_s: Optional[float] = None
  step_s: Optional[float] = None  # Median, per step.
  trace_s: Optional[float] = None  # Python tracing of a search's step.
  profile: Optional[list] = None  # (op type, s per step, share) rows.

  @property
  def throughput(self):
    """Images per second of the step (train images for a search)."""
    if not self.step_s:
      return None
    return self.workload.batch_size / self.step_s


def _median_step(spec, times):
  """Return the median time per step over the timed steps.

  With arch_update_every=N the steps alternate between N kinds, so the
  median is taken over groups of N consecutive steps and divided by N.
  """
  timed = times[spec.warmup_steps:]
  group = spec.arch_update_every if spec.kind == SEARCH else 1
  if not timed:
    return None
  usable = len(timed) - len(timed) % group or len(timed)
  sums = sorted(sum(timed[k:k + group]) / group
                for k in range(0, usable, group))
  middle = len(sums) // 2
  if len(sums) % 2:
    return sums[middle]
  return (sums[middle - 1] + sums[middle]) / 2


def _run_child(spec, export_dir, log_dir, timeout, profile_dir=None,
               profile_steps=2):
  """Run one workload in a fresh process; return its Result."""
  result_file = os.path.join(log_dir, f"{spec.name}.json")
  log_file = os.path.join(log_dir, f"{spec.name}.log")
  values = dataclasses.asdict(spec)
  values["export_dir"] = export_dir
  values["profile_dir"] = (os.path.join(profile_dir, spec.name)
                           if profile_dir else None)
  values["profile_steps"] = profile_steps
  command = [sys.executable, "-m", "benchmarks.run",
             f"--worker_spec={json.dumps(values)}",
             f"--result_file={result_file}"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

  begin = time.perf_counter()
  with open(log_file, "w", encoding="utf-8") as log:
    process = subprocess.Popen(command, cwd=_REPO_ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    status, usage = _wait_with_timeout(process, timeout)
  wall = time.perf_counter() - begin

  # ru_maxrss of this one child, in KiB on Linux.
  peak = usage.ru_maxrss * 1024 / 1e9 if usage else None
  if status != "ok" or not os.path.isfile(result_file):
    with open(log_file, encoding="utf-8", errors="replace") as log:
      tail = log.read()[-3000:]
    print(f"{spec.name}: {status or 'failed'}; last output:\n{tail}",
          file=sys.stderr)
    return Result(spec, status if status != "ok" else "failed", wall, peak)

  with open(result_file, encoding="utf-8") as stream:
    measured = json.load(stream)
  return Result(spec, "ok", wall, peak, measured["build_s"],
                measured["startup_s"],
                _median_step(spec, measured["step_times_s"]),
                measured.get("trace_s"), measured.get("profile"))


def _wait_with_timeout(process, timeout):
  """Wait for `process` with os.wait4, which returns its own rusage.

  Returns:
    (status, rusage): status is "ok", "failed" or "timed out".
  """
  deadline = time.monotonic() + timeout
  while True:
    pid, wait_status, usage = os.wait4(process.pid, os.WNOHANG)
    if pid:
      process.returncode = os.waitstatus_to_exitcode(wait_status)
      return ("ok" if process.returncode == 0 else "failed"), usage
    if time.monotonic() > deadline:
      process.send_signal(signal.SIGKILL)
      _, wait_status, usage = os.wait4(process.pid, 0)
      process.returncode = os.waitstatus_to_exitcode(wait_status)
      return "timed out", usage
    time.sleep(0.2)


# The report.


def _seconds(value):
  if value is None:
    return "-"
  if value < 0.1:
    return f"{value * 1000:.1f} ms"
  return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def _number(value, digits=1):
  return "-" if value is None else f"{value:.{digits}f}"


def _result_row(result):
  spec = result.workload
  if result.status != "ok":
    return (f"| `{spec.name}` | {spec.description} | {result.status} "
            f"after {result.wall_s:.0f} s | - | - | - | - | - |")
  if spec.kind == EXPORT:
    return (f"| `{spec.name}` | {spec.description} | build and save "
            f"{_seconds(result.build_s)} | - | - | "
            f"{_number(result.peak_memory_gb, 2)} | - | - |")
  reference = "-"
  ratio = "-"
  if spec.reference_seconds:
    reference_rate = spec.batch_size / spec.reference_seconds
    reference = (f"{_seconds(spec.reference_seconds)}, "
                 f"{reference_rate:.1f} images/s")
    ratio = f"{spec.reference_seconds / result.step_s:.2f}x"
  return (f"| `{spec.name}` | {spec.description} | "
          f"{_seconds(result.startup_s)} | {_seconds(result.step_s)} | "
          f"{_number(result.throughput)} | "
          f"{_number(result.peak_memory_gb, 2)} | {reference} | {ratio} |")


def _verdict(value, limit, at_least):
  if value is None:
    return "not measured"
  met = value >= limit if at_least else value <= limit
  return "met" if met else "not met"


def _target_rows(results):
  """Rows of the target table, for the targets whose workloads ran."""
  by_name = {r.workload.name: r for r in results if r.status == "ok"}
  rows = []

  def add(target, figure, value, limit, at_least):
    rows.append(f"| {target} | {figure} | "
                f"{_verdict(value, limit, at_least)} |")

  for suffix, size in (("c8", "C=8, 5 cells, batch 32"),
                       ("c16", "C=16, 8 cells, batch 64")):
    relu = by_name.get(f"search_relu_{suffix}")
    if relu and relu.workload.reference_seconds:
      ratio = relu.workload.reference_seconds / relu.step_s
      add(f"fixed:relu search, {size}: at least 5x the official "
          "throughput", f"{relu.throughput:.1f} images/s, {ratio:.2f}x",
          ratio, 5.0, True)
    for name, label, limit in (("joint", "joint", 1.10),
                               ("factorized", "sequential", 1.45)):
      other = by_name.get(f"search_{name}_{suffix}")
      if relu and other:
        ratio = other.step_s / relu.step_s
        add(f"factorized {label} / fixed:relu step time, {size}: at most "
            f"{limit:.2f}", f"{ratio:.2f} ({_seconds(other.step_s)} / "
            f"{_seconds(relu.step_s)})", ratio, limit, False)

  for name in ("search_relu_c16", "search_factorized_c16",
               "search_joint_c16", "search_pc4_c16"):
    result = by_name.get(name)
    if result:
      add(f"start-up to the first finished step, `{name}`: at most 30 s",
          _seconds(result.startup_s), result.startup_s, 30.0, False)
  relu = by_name.get("search_relu_c16")
  if relu and relu.peak_memory_gb:
    limit = 0.7 * _REFERENCE_LARGE_SEARCH_MEMORY
    add(f"peak memory, fixed:relu search at C=16, 8 cells, batch 64: at "
        f"most {limit:.2f} GB (0.7x)", f"{relu.peak_memory_gb:.2f} GB",
        relu.peak_memory_gb, limit, False)

  retrain = by_name.get("retrain_step")
  if retrain and retrain.workload.reference_seconds:
    ratio = retrain.workload.reference_seconds / retrain.step_s
    add("retraining step: at least 2x the official throughput",
        f"{retrain.throughput:.1f} images/s, {ratio:.2f}x", ratio, 2.0, True)
  saved_64 = by_name.get("infer_saved_model_b64")
  if saved_64 and saved_64.workload.reference_seconds:
    ratio = saved_64.workload.reference_seconds / saved_64.step_s
    add("SavedModel inference, batch 64: at least 3x the official "
        "throughput", f"{saved_64.throughput:.1f} images/s, {ratio:.2f}x",
        ratio, 3.0, True)
  saved_1 = by_name.get("infer_saved_model_b1")
  if saved_1 and saved_1.workload.reference_seconds:
    add("SavedModel inference, batch 1: at most 23 ms",
        _seconds(saved_1.step_s), saved_1.step_s, 0.023, False)
  return rows


def _comparison_rows(results):
  """Step-time ratios of the settings that trade fidelity or space size."""
  by_name = {r.workload.name: r for r in results if r.status == "ok"}
  pairs = [
      ("search_joint_c8", "search_factorized_c8",
       "arch_update=joint / sequential"),
      ("search_every2_c8", "search_factorized_c8",
       "arch_update_every=2 / every step"),
      ("search_pc4_c8", "search_factorized_c8",
       "partial channels K=4 / all channels"),
      ("search_joint_c16", "search_factorized_c16",
       "arch_update=joint / sequential"),
      ("search_pc4_c16", "search_factorized_c16",
       "partial channels K=4 / all channels"),
      ("search_non_factorized_c8_b8", "search_factorized_c8_b8",
       "non-factorized / factorized"),
      ("search_every2_c4", "search_factorized_c4",
       "arch_update_every=2 / every step"),
      ("search_joint_c4", "search_factorized_c4",
       "arch_update=joint / sequential"),
  ]
  rows = []
  for name, base, label in pairs:
    if name in by_name and base in by_name:
      result, reference = by_name[name], by_name[base]
      rows.append(
          f"| {label} | `{name}` / `{base}` | "
          f"{result.step_s / reference.step_s:.2f} | "
          f"{result.startup_s / reference.startup_s:.2f} |")
  return rows


def _profile_lines(results):
  """Return the per-workload tables of the costliest op types."""
  lines = []
  for result in results:
    if not result.profile:
      continue
    lines += [f"`{result.workload.name}`"
              + (f" (Python tracing of the first step: "
                 f"{result.trace_s:.1f} s of the {result.startup_s:.1f} s "
                 "start-up)" if result.trace_s else "") + ":", "",
              "| op type | kernel time per step | share |",
              "|---|---|---|"]
    lines += [f"| {op_type} | {_seconds(seconds)} | {100 * share:.1f}% |"
              for op_type, seconds, share in result.profile]
    lines.append("")
  return lines


def render(results, command, quick, total_s):
  """Return the markdown section: machine, command, results, targets."""
  step_counts = sorted({(r.workload.warmup_steps, r.workload.timed_steps)
                        for r in results if r.workload.kind != EXPORT})
  counts = "; ".join(f"{w} warm-up + {t} timed" for w, t in step_counts)
  lines = [
      SECTION_BEGIN,
      "",
      "Written by `python -m benchmarks.run`; a rerun replaces this "
      "section.",
      "",
      f"Command: `{command}`. Measured on "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
      f"in {total_s / 60:.1f} min.",
      "",
      f"Machine: {machine.describe()}",
      "",
      f"Steps per workload: {counts}. A step time is the median over the "
      "timed steps (with arch_update_every=2, over pairs of steps, "
      "halved). Start-up runs from constructing the network to the "
      "end of the first step (for a SavedModel: from loading it). Peak "
      "memory is the child process's maximum resident set size. Inputs "
      "are random 32x32 images and 10 classes; float32; XLA off.",
      "",
  ]

  if quick:
    lines += [
        "**Quick run** (`--quick`): reduced sizes and 2 timed steps, "
        "a smoke check only. The figures are not comparable with the "
        "official DARTS code and no target is judged.",
        "",
    ]

  lines += [
      "| workload | what | start-up | step | images/s | peak memory (GB) "
      "| official DARTS | speed-up |",
      "|---|---|---|---|---|---|---|---|",
      *(_result_row(r) for r in results),
      "",
  ]

  comparisons = _comparison_rows(results)
  if comparisons:
    lines += ["| setting | workloads | step time ratio | start-up ratio |",
              "|---|---|---|---|", *comparisons, ""]

  targets = [] if quick else _target_rows(results)
  if targets:
    lines += ["| target | measured | status |", "|---|---|---|", *targets, ""]

  profiles = _profile_lines(results)
  if profiles:
    lines += ["Where the time goes: kernel time per op type, summed over "
              "threads, from TensorFlow profiler traces of "
              f"{_PROFILE_STEPS.value} extra steps per workload "
              "(`--profile_dir`).", "", *profiles]

  lines.append(SECTION_END)
  return "\n".join(lines) + "\n"


def write_section(path, section):
  """Replace the marked section of `path`, or append it when absent."""
  text = ""
  if os.path.exists(path):
    with open(path, encoding="utf-8") as stream:
      text = stream.read()
  pattern = re.compile(re.escape(SECTION_BEGIN) + r".*?" +
                       re.escape(SECTION_END) + r"\n?", re.DOTALL)
  if pattern.search(text):
    text = pattern.sub(lambda match: section, text, count=1)
  else:
    text = text.rstrip("\n") + "\n\n## The benchmark suite\n\n" + section
  with open(path, "w", encoding="utf-8") as stream:
    stream.write(text)


def _select(all_workloads, only, steps):
  names = [w.name for w in all_workloads]
  unknown = sorted(set(only) - set(names))
  if unknown:
    raise app.UsageError(
        f"--only names unknown workloads {unknown}; valid names: "
        f"{', '.join(names)}.")
  if steps is not None and steps < 1:
    raise app.UsageError(f"--steps={steps}; give at least 1 timed step.")
  wanted = set(only or names)
  if any(w.kind == INFER_SAVED_MODEL and w.name in wanted
         for w in all_workloads):
    # The SavedModel workloads load what the export workload writes.
    wanted |= {w.name for w in all_workloads if w.kind == EXPORT}
  selected = [w for w in all_workloads if w.name in wanted]
  if steps is not None:
    selected = [dataclasses.replace(w, timed_steps=steps)
                if w.kind != EXPORT else w for w in selected]
  return selected


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
  if _WORKER_SPEC.value:
    _run_worker(_WORKER_SPEC.value, _RESULT_FILE.value)
    return

  selected = _select(workloads(_QUICK.value), _ONLY.value, _STEPS.value)
  command = " ".join(["python -m benchmarks.run",
                      *(shlex.quote(a) for a in sys.argv[1:])])
  if _PROFILE_STEPS.value < 1:
    raise app.UsageError(
        f"--profile_steps={_PROFILE_STEPS.value}; give at least 1 step.")
  # Children run in the repository root.
  profile_dir = (os.path.abspath(_PROFILE_DIR.value) if _PROFILE_DIR.value
                 else None)
  begin = time.perf_counter()
  results = []
  with tempfile.TemporaryDirectory(prefix="tf_adarts_bench_") as work_dir:
    export_dir = os.path.join(work_dir, "saved_model")
    for spec in selected:
      print(f"[{time.strftime('%H:%M:%S')}] {spec.name}: {spec.description}",
            flush=True)
      result = _run_child(spec, export_dir, work_dir, _TIMEOUT.value,
                          profile_dir, _PROFILE_STEPS.value)
      print(f"  {result.status}; start-up {_seconds(result.startup_s)}, "
            f"step {_seconds(result.step_s)}, peak "
            f"{_number(result.peak_memory_gb, 2)} GB, wall "
            f"{result.wall_s:.0f} s", flush=True)
      results.append(result)

  section = render(results, command, _QUICK.value,
                   time.perf_counter() - begin)
  print(section)
  if profile_dir:
    print(f"Profiler traces: {profile_dir}/WORKLOAD/plugins/profile; open "
          f"them with `tensorboard --logdir={profile_dir}` and the "
          "tensorboard-plugin-profile package.")
  if not _NO_WRITE.value:
    write_section(_OUTPUT.value, section)
    print(f"Wrote the section to {_OUTPUT.value}.")


if __name__ == "__main__":
  app.run(main)

"""Choosing a tf.distribute strategy for the training binaries.

`make_strategy(name)` turns the `--strategy` flag into a strategy:

  auto          MirroredStrategy over the visible GPUs when there are two or
                more, otherwise the default strategy (one device)
  mirrored      MirroredStrategy over `devices` (default: every GPU, or
                every logical CPU when there is no GPU)
  multi_worker  MultiWorkerMirroredStrategy, configured by TF_CONFIG
  one_device    OneDeviceStrategy on `devices[0]` (default: the first GPU,
                else the CPU)
  tpu           TPUStrategy on the TPU that TPUClusterResolver finds

`split_cpu(n)` divides the CPU into n logical devices, so MirroredStrategy
can run n replicas without GPUs. It must run before TensorFlow initializes
its devices, that is before the first op.

Batch sizes in the configs are global: each replica receives
batch_size / num_replicas examples, and the losses are averaged over the
global batch.
"""

import json
import os
from typing import Optional, Sequence

from absl import logging
import tensorflow as tf

STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device", "tpu")


def split_cpu(count: int) -> None:
  """Split the first CPU into `count` logical devices (count >= 1).

  Raises:
    ValueError: when count < 1.
    RuntimeError: when TensorFlow has already initialized its devices.
  """
  if count < 1:
    raise ValueError(f"cpu_devices={count} is invalid; give 1 or more.")
  cpus = tf.config.list_physical_devices("CPU")
  configured = tf.config.get_logical_device_configuration(cpus[0])
  if configured is not None and len(configured) == count:
    return
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
  except RuntimeError as error:
    raise RuntimeError(
        f"cannot split the CPU into {count} devices: TensorFlow has already "
        "initialized its devices. Call split_cpu before the first "
        "TensorFlow op.") from error


def make_strategy(name: str = "auto",
                  devices: Optional[Sequence[str]] = None
                  ) -> tf.distribute.Strategy:
  """Return the strategy that `name` (one of STRATEGIES) selects.

  Args:
    name: the `--strategy` value.
    devices: device names for mirrored and one_device, e.g. ["/gpu:0",
      "/gpu:1"]; None picks them as described in the module doc.

  Raises:
    ValueError: on an unknown name, devices given to a strategy that takes
      none, or multi_worker without TF_CONFIG.
  """
  if name not in STRATEGIES:
    raise ValueError(
        f"Unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}.")
  if devices and name not in ("mirrored", "one_device"):
    raise ValueError(
        f"devices={list(devices)} applies only to the mirrored and "
        f"one_device strategies, not {name!r}.")
  if name == "multi_worker":
    # Before anything that initializes TensorFlow's devices: collective
    # ops must be configured at program start.
    if "TF_CONFIG" not in os.environ:
      raise ValueError(
          "strategy='multi_worker' needs the TF_CONFIG environment variable "
          "(cluster and task of this worker); see the README's multi-worker "
          "section.")
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    logging.info("Distribution: MultiWorkerMirroredStrategy (%s) with %d "
                 "replicas in sync.", describe_tf_config(),
                 strategy.num_replicas_in_sync)
    return strategy

  gpus = tf.config.list_logical_devices("GPU")
  if name == "auto":
    if len(gpus) > 1:
      strategy = tf.distribute.MirroredStrategy()
    else:
      strategy = tf.distribute.get_strategy()
  elif name == "mirrored":
    if not devices:
      devices = [d.name for d in gpus] or [
          d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(list(devices))
  elif name == "one_device":
    if devices:
      device = devices[0]
    elif gpus:
      device = "/gpu:0"
    else:
      device = "/cpu:0"
    strategy = tf.distribute.OneDeviceStrategy(device)
  else:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    strategy = tf.distribute.TPUStrategy(resolver)

  logging.info("Distribution: %s with %d replicas in sync.",
               type(strategy).__name__, strategy.num_replicas_in_sync)
  return strategy


def per_replica_batch_size(global_batch_size: int,
                           strategy: tf.distribute.Strategy) -> int:
  """Return the batch of one replica; the global batch must divide evenly.

  Raises:
    ValueError: when global_batch_size is not a multiple of the replicas.
  """
  replicas = strategy.num_replicas_in_sync
  if global_batch_size % replicas:
    raise ValueError(
        f"batch_size={global_batch_size} does not divide among {replicas} "
        f"replicas; use a multiple of {replicas}.")
  return global_batch_size // replicas


def is_chief(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
  """Return whether this process writes the run's shared outputs.

  In a multi-worker cluster the chief is the "chief" task, or worker 0 when
  the cluster has none. Only the chief writes genotypes, summaries and the
  final files. A single-process run is always its own chief.
  """
  strategy = strategy or tf.distribute.get_strategy()
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type == "chief":
    return True
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return task_type == "worker" and task_id == 0 and not has_chief


def worker_directory(model_dir: str,
                     strategy: Optional[tf.distribute.Strategy] = None) -> str:
  """Return where this worker writes its checkpoints.

  The chief writes into `model_dir`. Every other worker writes into a
  directory of its own under model_dir/.workers/ and deletes it at the end.
  Multi-worker checkpointing needs this because every worker saves, while
  only the chief's copy is kept.
  """
  if is_chief(strategy):
    return model_dir
  resolver = (strategy or tf.distribute.get_strategy()).cluster_resolver
  return os.path.join(model_dir, ".workers",
                      f"{resolver.task_type}_{resolver.task_id}")


def describe_tf_config() -> str:
  """Return TF_CONFIG's task as "TYPE:INDEX of N workers", or ""."""
  raw = os.environ.get("TF_CONFIG")
  if not raw:
    return ""
  config = json.loads(raw)
  task = config.get("task", {})
  workers = sum(len(v) for v in config.get("cluster", {}).values())
  return f"{task.get('type')}:{task.get('index')} of {workers} workers"

"""The distribution flags that every training binary shares.

  --strategy=auto|mirrored|multi_worker|one_device|tpu
  --devices=/gpu:0,/gpu:1     (mirrored and one_device)
  --cpu_devices=N             split the CPU into N logical devices

Batch-size flags stay global batch sizes: each replica receives
batch_size / replicas images.
"""

from absl import flags
from absl import logging

from tf_adarts import distribute

STRATEGY = flags.DEFINE_enum(
    "strategy", "auto", list(distribute.STRATEGIES),
    "tf.distribute strategy: auto (MirroredStrategy on 2 or more GPUs, else "
    "one device), mirrored (over --devices, default every GPU, or every "
    "logical CPU without GPUs), multi_worker (MultiWorkerMirroredStrategy "
    "from TF_CONFIG), one_device or tpu. Default: auto.")
DEVICES = flags.DEFINE_list(
    "devices", None, "Comma-separated devices for --strategy=mirrored or "
    "one_device, e.g. /gpu:0,/gpu:1. Default: see --strategy.")
CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Split the CPU into this many logical devices, so "
    "that --strategy=mirrored runs that many replicas without GPUs. "
    "Default: unset (one CPU device).", lower_bound=1)

SCALE_LR_WITH_BATCH = flags.DEFINE_bool(
    "scale_lr_with_batch", False, "Scale the preset's weight learning rates "
    "linearly with --batch_size over the preset's batch size (the linear "
    "scaling rule; alpha and beta keep theirs). An explicit "
    "--learning_rate is kept as given. Default: off.")


def scale_learning_rates(preset, config):
  """Apply --scale_lr_with_batch to a resolved config of a preset.

  Args:
    preset: the preset's config, which gives the reference batch size.
    config: the preset with the flags applied.
  """
  if (not SCALE_LR_WITH_BATCH.value or flags.FLAGS["learning_rate"].present
      or config.batch_size == preset.batch_size):
    return config
  factor = config.batch_size / preset.batch_size
  logging.info("Scaling the learning rates by %g (batch %d over the "
               "preset's %d).", factor, config.batch_size, preset.batch_size)
  return config.replace(learning_rate=config.learning_rate * factor,
                        min_learning_rate=config.min_learning_rate * factor)


def strategy_from_flags():
  """Split the CPU if asked, then return the strategy the flags select."""
  if CPU_DEVICES.value:
    distribute.split_cpu(CPU_DEVICES.value)
  strategy = distribute.make_strategy(STRATEGY.value, DEVICES.value)
  logging.info("Using %d replica(s); batch sizes are global.",
               strategy.num_replicas_in_sync)
  return strategy


def flagfile_lines():
  """Return the distribution flags as flagfile lines (unset ones left out)."""
  lines = [f"--strategy={STRATEGY.value}"]
  if DEVICES.value:
    lines.append(f"--devices={','.join(DEVICES.value)}")
  if CPU_DEVICES.value:
    lines.append(f"--cpu_devices={CPU_DEVICES.value}")
  if SCALE_LR_WITH_BATCH.value:
    lines.append("--scale_lr_with_batch")
  return lines

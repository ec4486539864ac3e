"""Kernel time per op type, read from TensorFlow profiler traces.

`profile_steps` records a few steps with `tf.profiler.experimental` into a
log directory that TensorBoard opens as it is, with the
tensorboard-plugin-profile package installed.
`summarize_trace` reads the recorded XPlane file back and sums the time of
the executed kernels per op type, so a report can show which kernels
dominate without opening TensorBoard.

On the CPU the times are thread times: kernels that run in parallel on
several threads each count in full, so the shares compare kernels with one
another and are not fractions of the step's wall time.

NOTE: only host planes are summed. On a GPU the device kernels sit in
other planes of the trace; open it in TensorBoard to see them.
"""

import collections
import dataclasses
import glob
import os

# Host events that wrap kernels (executor, function runs, thread pools)
# rather than being kernels; kernel events are named "op_name:OpType".
_FRAMEWORK_PREFIXES = ("EagerLocalExecute", "EagerKernelExecute")


@dataclasses.dataclass(frozen=True)
class OpTime:
  """The summed kernel time of one op type."""
  op_type: str
  seconds_per_step: float
  share: float  # Of all kernel time in the trace, 0 to 1.


def profile_steps(run_step, steps, log_dir, first_index=0):
  """Run `run_step(index)` `steps` times under the TensorFlow profiler.

  Args:
    run_step: runs one step; must block until the step has finished.
    steps: steps to record.
    log_dir: where the trace goes (log_dir/plugins/profile/RUN/).
    first_index: the index passed to the first recorded step.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.profiler.experimental.start(log_dir)
  try:
    for index in range(first_index, first_index + steps):
      run_step(index)
  finally:
    tf.profiler.experimental.stop()


def _kernel_type(event_name):
  if "::" in event_name or ":" not in event_name:
    return None
  if event_name.startswith(_FRAMEWORK_PREFIXES):
    return None
  op_type = event_name.rsplit(":", 1)[1].strip()
  return op_type or None


def summarize_trace(log_dir, steps, top=10):
  """Sum the kernel time per op type in the newest trace under `log_dir`.

  Args:
    log_dir: the directory given to `profile_steps`.
    steps: the steps the trace holds, to give times per step.
    top: op types to return, the costliest first; the rest are summed
      into one "(other)" row.

  Returns:
    A list of OpTime.

  Raises:
    FileNotFoundError: when `log_dir` contains no trace.
  """
  # The XPlane proto ships inside the TensorFlow wheel (2.21).
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top

  paths = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*",
                                        "*.xplane.pb")), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(
        f"No profiler trace (*.xplane.pb) under {log_dir}/plugins/profile; "
        "record one with profile_steps first.")
  space = xplane_pb2.XSpace()
  with open(paths[-1], "rb") as stream:
    space.ParseFromString(stream.read())

  totals = collections.Counter()
  for plane in space.planes:
    if not plane.name.startswith("/host:"):
      continue
    names = plane.event_metadata
    for line in plane.lines:
      for event in line.events:
        op_type = _kernel_type(names[event.metadata_id].name)
        if op_type:
          totals[op_type] += event.duration_ps
  everything = sum(totals.values())
  if not everything:
    return []
  ranked = totals.most_common()
  rows = [OpTime(op_type, picoseconds / 1e12 / steps, picoseconds / everything)
          for op_type, picoseconds in ranked[:top]]
  rest = sum(picoseconds for _, picoseconds in ranked[top:])
  if rest:
    rows.append(OpTime("(other)", rest / 1e12 / steps, rest / everything))
  return rows

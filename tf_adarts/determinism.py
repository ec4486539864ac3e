"""Run-to-run reproducible execution for `--deterministic` runs.

Op determinism alone (tf.config.experimental.enable_op_determinism) does not
make the supernet's gradients reproducible on this project's reference CPU
(TensorFlow 2.21 with oneDNN). Measured on the cpu_smoke network (8
channels, 5 cells, factorized space):

- With Grappler, TensorFlow's graph optimizer, on, the gradients of alpha
  and beta differed by up to 1e-8 between two calls of one traced step in
  one process, and between processes even with one inter-op thread. Over a
  32-step search the difference grew until two runs derived different
  genotypes.
- With Grappler off, both in-process repeats and separate processes agree
  bit for bit. The step is no slower (3.0 s against 3.05 s at batch 32).
- The first step also comes 11 s sooner (29 s against 40 s), because
  Grappler spends that time on a graph of thousands of small nodes.

So a deterministic run turns both switches. The settings apply to the whole
process, so call this before the first traced function runs.
"""

import contextlib

import tensorflow as tf


def enable_determinism() -> None:
  """Make every later traced step reproducible from its inputs and seed."""
  tf.config.experimental.enable_op_determinism()
  tf.config.optimizer.set_experimental_options(
      {"disable_meta_optimizer": True})


def is_enabled() -> bool:
  """Return whether the settings of `enable_determinism` are in effect."""
  options = tf.config.optimizer.get_experimental_options()
  return (tf.config.experimental.is_op_determinism_enabled()
          and bool(options.get("disable_meta_optimizer")))


@contextlib.contextmanager
def graph_optimizer(enabled: bool):
  """Turn Grappler on or off inside the block, then restore the setting.

  A traced function uses the setting in effect when it runs, so run the
  functions that should have it inside the block. Searches turn Grappler off by
  default. Measured on the 2-core reference machine with benchmarks/run.py's
  search step at C = 16, 8 cells, batch 64, in CPU time:

  - fixed:relu: the first call took 28 s instead of 38 s, and later steps
    13.7 s against 14.1 s;
  - factorized: the first call took 85 s against 82 s, and later steps
    31.0 s against 33.0 s.
  """
  previous = tf.config.optimizer.get_experimental_options().get(
      "disable_meta_optimizer", False)
  tf.config.optimizer.set_experimental_options(
      {"disable_meta_optimizer": not enabled})
  try:
    yield
  finally:
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": previous})

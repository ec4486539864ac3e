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

"""Bit-for-bit reproducibility of the tri-level step under `deterministic`.

The tiny preset (4 channels) repeated exactly even before Grappler was
turned off; at 8 channels, the width of cpu_smoke, it did not. So this test
runs an 8-channel factorized supernet, in two fresh processes at once
(determinism settings are process-wide).
"""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Three tri-level steps from one seed, run twice in the process from the
# same restored start (weights, optimizer states and step count). Prints
# the final alpha and beta.
_SCRIPT = r"""
import json
import numpy as np
import tensorflow as tf
import keras
from tf_adarts import determinism, search_space, supernet, trainer

determinism.enable_determinism()
keras.utils.set_random_seed(0)
network = supernet.SearchNetwork(
    10, search_space.factorized_space(), channels=8, layers=3)
model = trainer.SearchModel(network, seed=0)
model.compile()
rng = np.random.default_rng(0)
images = tf.constant(rng.normal(size=(16, 32, 32, 3)), tf.float32)
labels = tf.constant(rng.integers(0, 10, 16), tf.int32)
step = tf.function(model.train_step)
state = list(network.variables)
for optimizer in (model.weight_optimizer, model.alpha_optimizer,
                  model.beta_optimizer):
  state += list(optimizer.variables)
start = [v.numpy() for v in state]
runs = []
for _ in range(2):
  for v, value in zip(state, start):
    v.assign(value)
  for _ in range(3):
    step(((images, labels), (images, labels)))
  runs.append({name: v.numpy().tolist()
               for name, v in network.arch_variables.items()})
print("RESULT " + json.dumps({"repeat_equal": runs[0] == runs[1],
                              "arch": runs[0]}))
"""


def _start():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.Popen([sys.executable, "-c", _SCRIPT], cwd=REPO_ROOT,
                          env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _result(process):
  stdout, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stderr[-3000:]
  line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_deterministic_step_repeats_exactly():
  processes = [_start(), _start()]
  first, second = [_result(p) for p in processes]
  assert first["repeat_equal"], "a repeat inside one process differed"
  assert second["repeat_equal"], "a repeat inside one process differed"
  assert set(first["arch"]) >= {"alpha_normal", "alpha_reduce",
                                "beta_normal", "beta_reduce"}
  for name, value in first["arch"].items():
    assert value == second["arch"][name], f"{name} differs between processes"


@pytest.mark.parametrize("enabled", [False, True])
def test_graph_optimizer_block_restores_setting(enabled):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tf_adarts import determinism  # pylint: disable=g-import-not-at-top

  def grappler_disabled():
    return bool(tf.config.optimizer.get_experimental_options().get(
        "disable_meta_optimizer", False))

  before = grappler_disabled()
  with determinism.graph_optimizer(enabled):
    assert grappler_disabled() == (not enabled)
  assert grappler_disabled() == before

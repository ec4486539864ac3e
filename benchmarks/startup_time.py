"""Time from constructing a supernet to the end of its first search step.

Measures, in a fresh process, the wall time of: building the search network
and the search model, compiling it (three optimizers), and one tri-level
step through keras.Model.fit on random 32x32 images, then the mean time of
the following steps. Tracing and graph optimization, not arithmetic,
dominate the first number.

  python -m benchmarks.startup_time --channels=4 --layers=2 --batch_size=32
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import keras
import tensorflow as tf

from tf_adarts import hardware
from tf_adarts import search_space
from tf_adarts import supernet
from tf_adarts import trainer

_CHANNELS = flags.DEFINE_integer("channels", 4, "Initial channels C.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Cells in the supernet.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 32, "Images per batch, in the train and the val stream.")
_SPACE = flags.DEFINE_string(
    "space", "factorized",
    "Search space: factorized, non_factorized or fixed:ACTIVATION.")
_STEPS = flags.DEFINE_integer(
    "steps", 4, "Steps to run; the ones after the first give the step time.")


def main(argv):
  del argv
  images = tf.random.normal([_BATCH_SIZE.value, 32, 32, 3])
  labels = tf.random.uniform([_BATCH_SIZE.value], 0, 10, tf.int32)
  data = tf.data.Dataset.from_tensors(
      ((images, labels), (images, labels))).repeat(_STEPS.value)

  step_ends = []

  class StepTimer(keras.callbacks.Callback):

    def on_train_batch_end(self, batch, logs=None):
      step_ends.append(time.perf_counter())

  start = time.perf_counter()
  network = supernet.SearchNetwork(
      10, search_space.get_space(_SPACE.value), channels=_CHANNELS.value,
      layers=_LAYERS.value)
  model = trainer.SearchModel(network)
  model.compile()
  built = time.perf_counter()
  model.fit(data, epochs=1, verbose=0, callbacks=[StepTimer()])

  first = step_ends[0] - start
  later = ((step_ends[-1] - step_ends[0]) / (len(step_ends) - 1)
           if len(step_ends) > 1 else float("nan"))
  print(f"machine: {hardware.cpu_model()}, "
        f"{os.cpu_count()} cores; TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}")
  print(f"supernet C={_CHANNELS.value}, {_LAYERS.value} cells, "
        f"{_SPACE.value}, batch {_BATCH_SIZE.value}")
  print(f"construct and compile: {built - start:.1f} s")
  print(f"construct to end of first tri-level step: {first:.1f} s")
  print(f"later steps: {later:.2f} s per step")


if __name__ == "__main__":
  app.run(main)

"""The machine and software versions that benchmark reports name."""

import os
import platform
import re

from tf_adarts import hardware


def describe():
  """Return one line: CPU model, cores, memory and the library versions."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  memory = ""
  try:
    with open("/proc/meminfo", encoding="utf-8") as meminfo:
      kib = int(re.search(r"MemTotal:\s+(\d+)", meminfo.read()).group(1))
    memory = f", {kib / 2**20:.0f} GiB"
  except (OSError, AttributeError):
    pass
  return (f"{hardware.cpu_model()}, {os.cpu_count()} cores{memory}. "
          f"Python {platform.python_version()}, TensorFlow {tf.__version__}, "
          f"Keras {keras.__version__}.")

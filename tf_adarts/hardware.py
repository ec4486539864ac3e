"""Names of the hardware that timings and search costs were measured on."""

import platform


def cpu_model() -> str:
  """Return the CPU model name from /proc/cpuinfo, or the platform's name."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown CPU"

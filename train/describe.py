"""Print the size and cost of a genotype's retraining network.

  python -m train.describe --genotype=DARTS_V2 --dataset=cifar10
  python -m train.describe --genotype=runs/smoke --format=json

Builds the network without loading any data, counts its parameters (as the
DARTS code counts them: the auxiliary head excluded) and its multiply-adds,
and draws its two cells to PNG.
"""

import json
import os
import sys

from absl import app
from absl import flags

from tf_adarts import flops as flops_lib
from tf_adarts import genotype as genotype_lib
from tf_adarts import networks
from tf_adarts import visualize

# Input size, classes, network class and default width and depth.
_DATASETS = {
    "cifar10": (32, 10, networks.NetworkCIFAR, 36, 20),
    "cifar100": (32, 100, networks.NetworkCIFAR, 36, 20),
    "imagenet2012": (224, 1000, networks.NetworkImageNet, 48, 14),
}

_GENOTYPE = flags.DEFINE_string(
    "genotype", "DARTS_V2",
    "A published genotype name (e.g. DARTS_V2), a genotype JSON file, or a "
    "search run directory (its genotype.json).")
_DATASET = flags.DEFINE_enum(
    "dataset", "cifar10", sorted(_DATASETS),
    "Sets the input size, the class count and the network: cifar10 and "
    "cifar100 (32x32, 36 channels, 20 cells), imagenet2012 (224x224, 48 "
    "channels, 14 cells).")
_INIT_CHANNELS = flags.DEFINE_integer(
    "init_channels", None, "Initial channels C (default: the dataset's).")
_LAYERS = flags.DEFINE_integer(
    "layers", None, "Cells (default: the dataset's).")
_FORMAT = flags.DEFINE_enum(
    "format", "text", ["text", "json"],
    "text: a short report; json: one line with params, params_with_aux, "
    "flops (multiply-adds), init_channels and layers.")
_DRAW_DIR = flags.DEFINE_string(
    "draw_dir", None,
    "Folder for normal_cell.png and reduce_cell.png (default: no drawings).")


def load_genotype(value):
  """Read a genotype from a published name, a JSON file or a run directory."""
  if os.path.isdir(value):
    path = os.path.join(value, "genotype.json")
    if not os.path.exists(path):
      raise ValueError(
          f"--genotype={value} is a folder without genotype.json; give a "
          "finished search run directory, a JSON file or a published name.")
    value = path
  return genotype_lib.get_genotype(value)


def describe(genotype, dataset, init_channels=None, layers=None):
  """Return the counts of a genotype's retraining network, as a dict."""
  image_size, num_classes, network_class, channels, depth = _DATASETS[dataset]
  channels = init_channels or channels
  depth = layers or depth
  network = network_class(genotype, num_classes=num_classes,
                          channels=channels, layers=depth, auxiliary=True)
  return {
      "params": networks.count_params(network),
      "params_with_aux": networks.count_params(network,
                                               include_auxiliary=True),
      "flops": flops_lib.count_flops(network, image_size),
      "init_channels": channels,
      "layers": depth,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    genotype = load_genotype(_GENOTYPE.value)
    counts = describe(genotype, _DATASET.value, _INIT_CHANNELS.value,
                      _LAYERS.value)
  except (ValueError, KeyError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1

  if _DRAW_DIR.value:
    os.makedirs(_DRAW_DIR.value, exist_ok=True)
    for cell in genotype_lib.CELL_TYPES:
      png = visualize.cell_png(getattr(genotype, cell),
                               getattr(genotype, f"{cell}_concat"),
                               f"{cell} cell")
      with open(os.path.join(_DRAW_DIR.value, f"{cell}_cell.png"),
                "wb") as stream:
        stream.write(png)

  if _FORMAT.value == "json":
    print(json.dumps(counts))
    return
  print(f"genotype: {_GENOTYPE.value}")
  print(f"network: {_DATASET.value}, {counts['init_channels']} initial "
        f"channels, {counts['layers']} cells")
  print(f"parameters: {counts['params']:,} "
        f"({counts['params'] / 1e6:.2f} M; {counts['params_with_aux']:,} "
        "with the auxiliary head)")
  print(f"multiply-adds: {counts['flops']:,} ({counts['flops'] / 1e6:.0f} M)")
  if _DRAW_DIR.value:
    print(f"cells drawn in {_DRAW_DIR.value}")


if __name__ == "__main__":
  app.run(main)

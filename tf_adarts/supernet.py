"""The search network (supernet) and its architecture variables.

The network owns one set of architecture weights per cell type, created once
as named variables: alpha_normal and alpha_reduce (operator weights),
beta_normal and beta_reduce (activation weights, factorized spaces only),
and edge_weights_normal and edge_weights_reduce (PC-DARTS edge
normalization, when enabled). All start as 1e-3 times a standard normal.
Reach them with `arch_variable(name)` or the `alpha_variables`,
`beta_variables` and `weight_variables` groups, never by position.
"""

import collections

import keras
import tensorflow as tf

from tf_adarts import cells as cells_lib
from tf_adarts import operations
from tf_adarts import search_space as search_space_lib

CIFAR_STEM = "cifar"
IMAGENET_STEM = "imagenet"


def reduction_layers(layers):
  """Indices of the reduction cells: at 1/3 and 2/3 of the depth."""
  return (layers // 3, 2 * layers // 3)


class SearchNetwork(keras.Model):
  """The supernet: stem, search cells, global pooling and a classifier.

  Args:
    num_classes: classifier outputs.
    space: the `SearchSpace` (default: factorized).
    channels: initial channels C (16 for the published CIFAR-10 search).
    layers: cells (8 published); reductions at layers // 3 and
      2 * layers // 3, where channels double.
    steps: intermediate nodes per cell.
    multiplier: intermediate nodes concatenated into a cell's output.
    stem_multiplier: the CIFAR stem outputs stem_multiplier * C channels.
    stem: "cifar" (3x3 convolution and BN) or "imagenet" (the PC-DARTS
      ImageNet stem: three stride-2 3x3 convolutions, 1/8 resolution).
    partial_channels: K of PC-DARTS (1 disables partial channels).
    edge_normalization: add PC-DARTS edge weights per cell type.
    input_channels: image channels.
  """

  def __init__(self, num_classes, space=None, channels=16, layers=8, steps=4,
               multiplier=4, stem_multiplier=3, stem=CIFAR_STEM,
               partial_channels=1, edge_normalization=False,
               input_channels=3, name="supernet", **kwargs):
    super().__init__(name=name, **kwargs)
    self.space = space or search_space_lib.factorized_space()
    self.num_classes = num_classes
    self.channels = channels
    self.num_layers = layers
    self.steps = steps
    self.multiplier = multiplier
    self.stem_type = stem
    self.partial_channels = partial_channels
    self.edge_normalization = edge_normalization

    prev_prev, prev, reduction_prev = self._build_stem(
        stem, input_channels, channels, stem_multiplier)
    self.cells = []
    cell_channels = channels
    for index in range(layers):
      reduction = index in reduction_layers(layers)
      if reduction:
        cell_channels *= 2
      self.cells.append(cells_lib.SearchCell(
          self.space, prev_prev, prev, cell_channels, reduction,
          reduction_prev, partial_channels, steps, multiplier,
          name=f"cell_{index}"))
      reduction_prev = reduction
      prev_prev, prev = prev, multiplier * cell_channels

    self.classifier = operations.Classifier(prev, num_classes,
                                            name="classifier")
    self._create_arch_variables()
    self._number_random_layers()
    self.built = True

  def _number_random_layers(self):
    """Give every layer with random draws its own noise salt."""
    salt = 0
    for layer in self._flatten_layers(include_self=False, recursive=True):
      if hasattr(layer, "noise_salt"):
        salt += 1
        layer.noise_salt = salt

  def _build_stem(self, stem, input_channels, channels, stem_multiplier):
    """Create the stem layers; return (prev_prev, prev, reduction_prev)."""
    if stem == CIFAR_STEM:
      width = stem_multiplier * channels
      self.stem = [operations.ConvBN(input_channels, width, 3, 1,
                                     name="stem")]
      self.stem1 = []
      return width, width, False

    if stem == IMAGENET_STEM:
      self.stem = [
          operations.ConvBN(input_channels, channels // 2, 3, 2,
                            name="stem0_a"),
          operations.ConvBN(channels // 2, channels, 3, 2, relu_before=True,
                            name="stem0_b"),
      ]
      self.stem1 = [operations.ConvBN(channels, channels, 3, 2,
                                      relu_before=True, name="stem1")]
      return channels, channels, True

    raise ValueError(
        f"Unknown stem {stem!r}; use {CIFAR_STEM!r} or {IMAGENET_STEM!r}.")

  def _create_arch_variables(self):
    num_edges = len(cells_lib.cell_edges(self.steps))
    init = keras.initializers.RandomNormal(stddev=1e-3)
    self._arch = collections.OrderedDict()

    def create(name, columns):
      shape = (num_edges, columns) if columns else (num_edges,)
      # autocast=False: alpha, beta and their softmax stay float32 under
      # mixed precision.
      self._arch[name] = self.add_weight(name=name, shape=shape,
                                         initializer=init, autocast=False)

    for cell_type in ("normal", "reduce"):
      create(f"alpha_{cell_type}", self.space.num_alpha_columns)
    if self.space.has_beta:
      for cell_type in ("normal", "reduce"):
        create(f"beta_{cell_type}", self.space.num_beta_columns)
    if self.edge_normalization:
      for cell_type in ("normal", "reduce"):
        create(f"edge_weights_{cell_type}", None)

  @property
  def arch_variables(self):
    """The architecture variables by name (an ordered dict)."""
    return collections.OrderedDict(self._arch)

  def arch_variable(self, name):
    """Return the architecture variable called `name`."""
    try:
      return self._arch[name]
    except KeyError:
      raise KeyError(
          f"No architecture variable {name!r}; this network has "
          f"{', '.join(self._arch)}.") from None

  @property
  def alpha_variables(self):
    """Operator weights, and edge weights when enabled: one optimizer."""
    return [v for name, v in self._arch.items() if not name.startswith("beta")]

  @property
  def beta_variables(self):
    """Activation weights (empty unless the space is factorized)."""
    return [v for name, v in self._arch.items() if name.startswith("beta")]

  @property
  def weight_variables(self):
    """Trainable network weights: every trainable variable but alpha and
    beta."""
    arch_ids = {id(v) for v in self._arch.values()}
    return [v for v in self.trainable_variables if id(v) not in arch_ids]

  def arch_numpy(self):
    """Return the current architecture weights as numpy arrays, by name."""
    return collections.OrderedDict(
        (name, v.numpy()) for name, v in self._arch.items())

  def cell_weights(self, cell_type):
    """Softmaxed architecture weights of one cell type, split by source."""
    alpha = tf.nn.softmax(self._arch[f"alpha_{cell_type}"])
    beta = self._arch.get(f"beta_{cell_type}")
    if beta is not None:
      beta = tf.nn.softmax(beta)
    edges = self._arch.get(f"edge_weights_{cell_type}")
    if edges is not None:
      edges = cells_lib.normalize_edge_weights(edges, self.steps)
    return (cells_lib.split_by_source(alpha, self.steps),
            cells_lib.split_by_source(beta, self.steps),
            cells_lib.split_by_source(edges, self.steps))

  def call(self, images, training=None):
    x = images
    for layer in self.stem:
      x = layer(x, training=training)
    s0 = x
    s1 = x
    for layer in self.stem1:
      s1 = layer(s1, training=training)

    # The softmax of each cell type is computed once per pass.
    weights = {cell_type: self.cell_weights(cell_type)
               for cell_type in ("normal", "reduce")}
    for cell in self.cells:
      cell_weights = weights["reduce" if cell.reduction else "normal"]
      s0, s1 = s1, cell(s0, s1, *cell_weights, training=training)
    return self.classifier(s1)

  def genotype(self):
    """Derive the genotype from the current architecture weights."""
    from tf_adarts import genotype as genotype_lib  # pylint: disable=g-import-not-at-top
    arrays = self.arch_numpy()
    return genotype_lib.derive_genotype(
        arrays["alpha_normal"], arrays["alpha_reduce"],
        arrays.get("beta_normal"), arrays.get("beta_reduce"),
        arrays.get("edge_weights_normal"), arrays.get("edge_weights_reduce"),
        space=self.space)

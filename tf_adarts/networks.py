"""Retraining networks built from a genotype, as in the public DARTS code.

`NetworkCIFAR` and `NetworkImageNet` stack discrete cells whose edges are
the genotype's entries. A parametric operator on an edge is preceded by the
edge's searched activation (`GenotypeEntry.activation`); a non-parametric
operator takes the node output as it is. Batch norm learns a scale and an
offset everywhere (affine), and the pools have no batch norm, as in DARTS's
retraining networks. The structure follows quark0/darts cnn/model.py: cell
preprocessing, reductions at layers // 3 and 2 * layers // 3 with doubled
channels, the auxiliary heads, the ImageNet stems and drop path.

Call contract of both networks:
  network(images, training=False) returns float32 logits [batch, classes].
  network(images, training=True) returns (logits, aux_logits) when the
  network has an auxiliary head, else logits. The auxiliary head reads the
  output of cell 2 * layers // 3.

Every layer creates its weights in its constructor, so a network is built
as soon as it is constructed and counting parameters needs no forward pass.
"""

import math
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tf_adarts import activations
from tf_adarts import genotype as genotype_lib
from tf_adarts import operations
from tf_adarts import search_space as search_space_lib

AUXILIARY_CHANNELS = 128
AUXILIARY_FEATURES = 768


def reduction_layers(layers: int) -> tuple:
  """Return the indices of the reduction cells: layers // 3, 2 * layers // 3."""
  return (layers // 3, 2 * layers // 3)


def drop_path_schedule(final_rate: float, epoch: int, epochs: int) -> float:
  """Return the drop path rate of an epoch: final_rate * epoch / epochs.

  This is DARTS's linear schedule. The rate is 0 in the first epoch
  (epoch 0) and reaches final_rate * (epochs - 1) / epochs in the last.

  Args:
    final_rate: the rate the schedule approaches, in [0, 1).
    epoch: the 0-based epoch about to start, in [0, epochs].
    epochs: the number of training epochs, at least 1.

  Raises:
    ValueError: on a rate outside [0, 1) or an epoch outside [0, epochs].
  """
  _check_drop_path_rate(final_rate)
  if epochs < 1:
    raise ValueError(f"epochs must be at least 1, got {epochs}.")
  if not 0 <= epoch <= epochs:
    raise ValueError(
        f"epoch {epoch} is outside 0..{epochs}. Pass the 0-based epoch that "
        "is about to start.")
  return final_rate * epoch / epochs


def _check_drop_path_rate(rate: float) -> None:
  if not 0.0 <= rate < 1.0:
    raise ValueError(
        f"Invalid drop path rate {rate}. Expected a probability in [0, 1), "
        "for instance 0.2 as DARTS used on CIFAR-10.")


def _uniform_init(fan_in: int):
  # PyTorch's default initialisation of convolutions and linear layers.
  bound = 1.0 / math.sqrt(fan_in)
  return keras.initializers.RandomUniform(-bound, bound)


def drop_path(x, rate, seed=None):
  """Zero whole examples of `x` with probability `rate`, scale the rest.

  Each example is kept with probability 1 - rate and then multiplied by
  1 / (1 - rate), so the expected output equals the input. At rate 0 every
  example is kept and the output equals the input exactly.

  Args:
    x: [batch, ...].
    rate: a float32 scalar tensor in [0, 1).
    seed: an int64 tensor of shape [2] for a stateless draw, or None for a
      stateful one.
  """
  shape = tf.concat([tf.shape(x)[:1], tf.ones([x.shape.rank - 1], tf.int32)],
                    axis=0)
  if seed is None:
    draws = tf.random.uniform(shape)
  else:
    draws = tf.random.stateless_uniform(shape, seed)
  keep = 1.0 - tf.cast(rate, tf.float32)
  scale = tf.cast(draws < keep, tf.float32) / keep
  return x * tf.cast(scale, x.dtype)


class Edge(keras.layers.Layer):
  """One kept edge of a cell: the searched activation, then the operator.

  Args:
    entry: the `GenotypeEntry`. Its activation is applied before a
      parametric operator and ignored on a non-parametric one.
    channels: channels of the cell's nodes.
    stride: 2 on the edges that leave the input nodes of a reduction cell.
    space: the `SearchSpace` whose candidates build the layers.
  """

  def __init__(self, entry, channels, stride, space, **kwargs):
    super().__init__(**kwargs)
    candidate = space.operators.get(entry.op)
    if candidate.zero:
      raise ValueError(
          f"Operator {entry.op!r} outputs zeros and cannot be a kept edge. "
          "Derive the genotype again or edit the entry.")
    self.op_name = entry.op
    self.activation_name = entry.activation if candidate.parametric else None

    self.activation = None
    if self.activation_name is not None:
      factory = space.activations.get(self.activation_name).factory
      self.activation = factory(channels, 1, name=self.activation_name)
    self.op = candidate.factory(channels, stride, 1, True, False,
                                name=entry.op)

    # DARTS never drops an identity edge (skip_connect at stride 1).
    self.drops_path = not isinstance(self.op, operations.Identity)
    # Set by the network; distinguishes this edge's draws under one seed.
    self.noise_salt = 0
    self.built = True

  def call(self, x, training=None, drop_path_rate=None, seed=None):
    if self.activation is not None:
      x = self.activation(x, training=training)
    y = self.op(x, training=training)

    if training and self.drops_path and drop_path_rate is not None:
      edge_seed = None
      if seed is not None:
        edge_seed = tf.random.experimental.stateless_fold_in(
            tf.cast(seed, tf.int64), self.noise_salt)
      y = drop_path(y, drop_path_rate, edge_seed)
    return y


class Cell(keras.layers.Layer):
  """A discrete normal or reduction cell.

  Node k + 2 sums the edges of entries 2k and 2k + 1, and the output
  concatenates the genotype's concat nodes.

  Args:
    entries: the cell's 8 `GenotypeEntry`s, in node order.
    concat: the nodes concatenated into the output.
    prev_prev_channels: channels of the output two cells back.
    prev_channels: channels of the previous cell's output.
    channels: channels of each node.
    reduction: halve the resolution (stride 2 on edges from nodes 0 and 1).
    reduction_prev: the previous cell halved the resolution, so the input
      from two cells back goes through a factorized reduce.
    space: the `SearchSpace` whose candidates build the edges.
  """

  def __init__(self, entries, concat, prev_prev_channels, prev_channels,
               channels, reduction, reduction_prev, space, **kwargs):
    super().__init__(**kwargs)
    self.reduction = reduction
    self.reduction_prev = reduction_prev
    self.inputs_of_edges = tuple(entry.input for entry in entries)
    self.concat = tuple(concat)
    self.multiplier = len(self.concat)

    if reduction_prev:
      self.preprocess0 = operations.FactorizedReduce(
          prev_prev_channels, channels, affine=True, name="preprocess0")
    else:
      self.preprocess0 = operations.ReLUConvBN(
          prev_prev_channels, channels, 1, 1, affine=True, name="preprocess0")
    self.preprocess1 = operations.ReLUConvBN(
        prev_channels, channels, 1, 1, affine=True, name="preprocess1")

    self.edges = []
    for position, entry in enumerate(entries):
      stride = 2 if reduction and entry.input < 2 else 1
      self.edges.append(Edge(entry, channels, stride, space,
                             name=f"edge_{position}"))
    self.built = True

  def call(self, s0, s1, training=None, drop_path_rate=None, seed=None):
    states = [self.preprocess0(s0, training=training),
              self.preprocess1(s1, training=training)]
    for first in range(0, len(self.edges), 2):
      outputs = [
          self.edges[k](states[self.inputs_of_edges[k]], training=training,
                        drop_path_rate=drop_path_rate, seed=seed)
          for k in (first, first + 1)]
      states.append(outputs[0] + outputs[1])
    return tf.concat([states[node] for node in self.concat], axis=-1)


class AuxiliaryHead(keras.layers.Layer):
  """The DARTS auxiliary classifier.

  ReLU, 5x5 average pooling without padding, 1x1 convolution to 128
  channels, BN, ReLU, 2x2 convolution to 768 channels, optional BN, ReLU,
  linear. The pooling and the 2x2 convolution must reduce the input to 1x1:
  8x8 inputs with pool stride 3 (CIFAR), 7x7 with pool stride 2 (ImageNet).

  Args:
    in_channels: channels of the input.
    num_classes: outputs.
    pool_stride: 3 on CIFAR, 2 on ImageNet.
    batch_norm: batch norm after the 2x2 convolution. DARTS's ImageNet head
      omits it, and the published ImageNet models were trained without it.
  """

  def __init__(self, in_channels, num_classes, pool_stride, batch_norm=True,
               **kwargs):
    super().__init__(**kwargs)
    self.pool_stride = pool_stride
    self.reduce = operations.ConvBN(in_channels, AUXILIARY_CHANNELS, 1,
                                    name="conv_1")
    self.kernel = self.add_weight(
        name="conv_2_kernel",
        shape=(2, 2, AUXILIARY_CHANNELS, AUXILIARY_FEATURES),
        initializer=_uniform_init(4 * AUXILIARY_CHANNELS))
    self.bn = (operations.BatchNorm(AUXILIARY_FEATURES, name="bn_2")
               if batch_norm else None)
    self.classifier = operations.Classifier(AUXILIARY_FEATURES, num_classes,
                                            name="classifier")
    self.built = True

  def call(self, x, training=None):
    x = tf.nn.avg_pool2d(tf.nn.relu(x), 5, self.pool_stride, "VALID")
    x = tf.nn.relu(self.reduce(x, training=training))
    x = tf.nn.conv2d(x, self.kernel.value, 1, "VALID")
    if self.bn is not None:
      x = self.bn(x, training=training)
    x = tf.nn.relu(x)

    if tuple(x.shape[1:3]) != (1, 1):
      raise ValueError(
          f"The auxiliary head reduced its input to {tuple(x.shape[1:3])} "
          "instead of 1x1. It expects the output of cell 2 * layers // 3 at "
          "8x8 (CIFAR, 32x32 images) or 7x7 (ImageNet, 224x224 images); "
          "build the network with auxiliary=False for other image sizes.")
    return self.classifier(x)


class _RetrainNetwork(keras.Model):
  """Cells, auxiliary head, classifier and drop path shared by both networks.

  Subclasses create `stem0` (the layers from the images to s0) and `stem1`
  (the layers from s0 to s1, empty when s1 is s0) before calling
  `_build_cells`.
  """

  def __init__(self, genotype, num_classes, channels, layers, auxiliary,
               drop_path_rate, activation_override, space, **kwargs):
    super().__init__(**kwargs)
    self.space = space or search_space_lib.factorized_space()
    self.genotype = _effective_genotype(genotype, activation_override,
                                        self.space)
    self.num_classes = num_classes
    self.channels = channels
    self.num_layers = layers
    self.auxiliary = auxiliary
    self.activation_override = activation_override

    _check_drop_path_rate(drop_path_rate)
    # The rate is read inside the traced call, so assigning it (for
    # instance from DropPathScheduler) needs no retrace.
    self.drop_path_rate = self.add_weight(
        name="drop_path_rate", shape=(),
        initializer=keras.initializers.Constant(drop_path_rate),
        trainable=False, autocast=False, dtype="float32")

  def _build_cells(self, prev_prev, prev, reduction_prev, auxiliary_head):
    """Create the cells, the auxiliary head and the classifier.

    Args:
      prev_prev: channels of s0.
      prev: channels of s1.
      reduction_prev: whether s0 has twice the resolution of s1.
      auxiliary_head: builds the head from the channels it reads.
    """
    self.auxiliary_index = 2 * self.num_layers // 3
    self.cells = []
    cell_channels = self.channels
    for index in range(self.num_layers):
      reduction = index in reduction_layers(self.num_layers)
      if reduction:
        cell_channels *= 2
      cell_type = "reduce" if reduction else "normal"
      cell = Cell(getattr(self.genotype, cell_type),
                  getattr(self.genotype, f"{cell_type}_concat"), prev_prev,
                  prev, cell_channels, reduction, reduction_prev, self.space,
                  name=f"cell_{index}")
      self.cells.append(cell)
      reduction_prev = reduction
      prev_prev, prev = prev, cell.multiplier * cell_channels
      if index == self.auxiliary_index and self.auxiliary:
        self.auxiliary_head = auxiliary_head(prev)

    if not self.auxiliary:
      self.auxiliary_head = None
    self.classifier = operations.Classifier(prev, self.num_classes,
                                            name="classifier")
    self._number_random_layers()
    self.built = True

  def _number_random_layers(self):
    """Give every layer that draws random numbers its own noise salt."""
    salt = 0
    for layer in self._flatten_layers(include_self=False, recursive=True):
      if hasattr(layer, "noise_salt"):
        salt += 1
        layer.noise_salt = salt

  def set_drop_path_rate(self, rate: float) -> None:
    """Set the drop path rate used by later training calls."""
    _check_drop_path_rate(rate)
    self.drop_path_rate.assign(rate)

  def call(self, images, training=None, seed=None):
    """Run the network. The module docstring describes the outputs.

    Args:
      images: [batch, height, width, input_channels].
      training: batch statistics, drop path, RReLU draws and the auxiliary
        output are on only when true.
      seed: an int32 or int64 tensor of shape [2]. When given, drop path
        and the RReLU slopes draw with stateless ops from it, each layer
        folding in its own salt, so a pass is reproducible from the seed.
        Fold the replica id into it under a distribution strategy. When
        None, the seed of an enclosing `activations.noise_seed` block is
        used, and without one the draws are stateful.
    """
    if seed is None:
      seed = activations.current_noise_seed()
    if seed is None:
      return self._forward(images, training, None)
    with activations.noise_seed(seed):
      return self._forward(images, training, seed)

  def _forward(self, images, training, seed):
    training = bool(training)
    s0 = images
    for layer in self.stem0:
      s0 = layer(s0, training=training)
    s1 = s0
    for layer in self.stem1:
      s1 = layer(s1, training=training)

    rate = self.drop_path_rate.value if training else None
    aux_logits = None
    for index, cell in enumerate(self.cells):
      s0, s1 = s1, cell(s0, s1, training=training, drop_path_rate=rate,
                        seed=seed)
      if index == self.auxiliary_index and training and self.auxiliary:
        aux_logits = self.auxiliary_head(s1, training=training)

    logits = self.classifier(s1)
    if aux_logits is not None:
      return logits, aux_logits
    return logits


def _effective_genotype(genotype, activation_override, space):
  """Return the genotype with the override applied, validated in `space`.

  Raises:
    ValueError: when the override is not an activation of `space`, or the
      genotype is invalid in `space` (for instance a parametric entry
      without an activation and no override).
  """
  genotype = genotype_lib.get_genotype(genotype, space)
  if activation_override is not None:
    if activation_override not in space.activations.names:
      raise ValueError(
          f"Unknown activation_override {activation_override!r}. Expected "
          f"one of {', '.join(space.activations.names)}.")
    genotype = genotype.with_activation(activation_override, space)
  genotype.validate(space)
  return genotype


class NetworkCIFAR(_RetrainNetwork):
  """The DARTS CIFAR retraining network.

  Stem: 3x3 convolution to 3 * channels and BN. Then `layers` cells,
  reductions at layers // 3 and 2 * layers // 3, an auxiliary head after
  cell 2 * layers // 3 (8x8 at 32x32 images), global average pooling and a
  linear classifier.

  Args:
    genotype: a `Genotype`, a published genotype's name or a JSON path.
    num_classes: classifier outputs.
    channels: initial channels C (36 in the DARTS CIFAR-10 recipe).
    layers: cells (20 in the DARTS CIFAR-10 recipe).
    auxiliary: add the auxiliary head.
    drop_path_rate: the initial drop path rate, in [0, 1).
    activation_override: an activation name that replaces every searched
      activation, or None to keep the genotype's.
    input_channels: image channels.
    space: the `SearchSpace` that defines the operators and activations;
      defaults to the factorized space.
  """

  def __init__(self, genotype, num_classes=10, channels=36, layers=20,
               auxiliary=True, drop_path_rate=0.0, activation_override=None,
               input_channels=3, space=None, name="network_cifar", **kwargs):
    super().__init__(genotype, num_classes, channels, layers, auxiliary,
                     drop_path_rate, activation_override, space, name=name,
                     **kwargs)
    stem_channels = 3 * channels
    self.stem0 = [operations.ConvBN(input_channels, stem_channels, 3, 1,
                                    name="stem")]
    self.stem1 = []

    def auxiliary_head(in_channels):
      return AuxiliaryHead(in_channels, num_classes, pool_stride=3,
                           batch_norm=True, name="auxiliary_head")

    self._build_cells(stem_channels, stem_channels, False, auxiliary_head)


class NetworkImageNet(_RetrainNetwork):
  """The DARTS ImageNet retraining network (mobile setting at 224x224).

  stem0: 3x3 stride-2 convolution to channels / 2, BN, ReLU, 3x3 stride-2
  convolution to channels, BN. stem1: ReLU, 3x3 stride-2 convolution, BN.
  The first cell takes s0 = stem0 output and s1 = stem1 output, so its
  first input goes through a factorized reduce. The auxiliary head reads
  cell 2 * layers // 3 (7x7 at 224x224) and has no BN after its 2x2
  convolution, as in DARTS. Global average pooling (7x7 at 224x224), linear
  classifier.

  Args:
    genotype: a `Genotype`, a published genotype's name or a JSON path.
    num_classes: classifier outputs.
    channels: initial channels C, even (48 in the DARTS ImageNet recipe).
    layers: cells (14 in the DARTS ImageNet recipe).
    auxiliary: add the auxiliary head.
    drop_path_rate: the initial drop path rate, in [0, 1).
    activation_override: an activation name that replaces every searched
      activation, or None to keep the genotype's.
    input_channels: image channels.
    space: the `SearchSpace` that defines the operators and activations;
      defaults to the factorized space.
  """

  def __init__(self, genotype, num_classes=1000, channels=48, layers=14,
               auxiliary=True, drop_path_rate=0.0, activation_override=None,
               input_channels=3, space=None, name="network_imagenet",
               **kwargs):
    if channels % 2:
      raise ValueError(
          f"NetworkImageNet needs an even channel count, got {channels}: the "
          "first cell's factorized reduce splits the channels in two halves.")
    super().__init__(genotype, num_classes, channels, layers, auxiliary,
                     drop_path_rate, activation_override, space, name=name,
                     **kwargs)
    self.stem0 = [
        operations.ConvBN(input_channels, channels // 2, 3, 2,
                          name="stem0_a"),
        operations.ConvBN(channels // 2, channels, 3, 2, relu_before=True,
                          name="stem0_b"),
    ]
    self.stem1 = [operations.ConvBN(channels, channels, 3, 2,
                                    relu_before=True, name="stem1")]

    def auxiliary_head(in_channels):
      return AuxiliaryHead(in_channels, num_classes, pool_stride=2,
                           batch_norm=False, name="auxiliary_head")

    self._build_cells(channels, channels, True, auxiliary_head)


class DropPathScheduler(keras.callbacks.Callback):
  """Set a network's drop path rate at the start of every epoch.

  The rate follows `drop_path_schedule`: final_rate * epoch / epochs.

  Args:
    network: a `NetworkCIFAR` or `NetworkImageNet`.
    final_rate: the rate the schedule approaches, in [0, 1).
    epochs: the number of training epochs.
  """

  def __init__(self, network, final_rate: float, epochs: int):
    super().__init__()
    drop_path_schedule(final_rate, 0, epochs)
    self.network = network
    self.final_rate = final_rate
    self.epochs = epochs

  def on_epoch_begin(self, epoch, logs=None):
    self.network.set_drop_path_rate(
        drop_path_schedule(self.final_rate, epoch, self.epochs))


def count_params(network, include_auxiliary: bool = False) -> int:
  """Count the trainable weights of a network, as DARTS counts them.

  The DARTS code's `count_parameters_in_MB` sums every parameter whose name
  does not contain "auxiliary": convolution kernels, the batch norms' scales
  and offsets, and the classifier's kernel and bias. This function skips the
  auxiliary head's weights by identity instead of by name. Running statistics and the
  drop path rate are not trainable and are not counted.

  Args:
    network: a retraining network (any Keras layer works).
    include_auxiliary: count the auxiliary head too.
  """
  excluded = set()
  if not include_auxiliary:
    head = getattr(network, "auxiliary_head", None)
    if head is not None:
      excluded = {id(w) for w in head.trainable_weights}
  return int(sum(np.prod(w.shape) for w in network.trainable_weights
                 if id(w) not in excluded))

"""Multiply-add counts of the retraining networks, from their layer shapes.

Convention: one multiply-add (MAC) per weight per output position, counted
for convolutions (depthwise, pointwise and dense kernels alike) and for the
linear classifier. Batch norm, activations, pooling, additions, biases and
drop path count nothing, and the auxiliary head is excluded because it runs
only in training. The count is exact for this convention and one image.

NOTE: the published DARTS-family ImageNet figures (DARTS 574M, PC-DARTS
597M) were counted under other conventions, so these counts do not
reproduce them: at 48 channels, 224x224, DARTS_V2 counts 529.9M here and
PC_DARTS_image 581.6M.
"""

import inspect
import math
from typing import Callable

from tf_adarts import activations
from tf_adarts import networks
from tf_adarts import operations


def _image_size(image_size) -> tuple:
  if isinstance(image_size, int):
    return (image_size, image_size)
  height, width = image_size
  return (int(height), int(width))


def _conv_output(size: tuple, kernel: int, stride: int, padding: int,
                 dilation: int = 1) -> tuple:
  return tuple((s + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
               for s in size)


def _positions(size: tuple) -> int:
  return size[0] * size[1]


def _conv_macs(kernel, output_size: tuple) -> int:
  """MACs of a convolution kernel [k, k, in per group, out] or depthwise
  [k, k, channels, 1] at `output_size`."""
  return _positions(output_size) * math.prod(kernel.shape)


def _layer_macs(layer, size: tuple) -> tuple:
  """Return (MACs, output size) of one layer of a retraining network.

  Raises:
    TypeError: for a layer type that this module cannot count.
  """
  if isinstance(layer, (operations.ConvBN, operations.ReLUConvBN)):
    out = _conv_output(size, layer.kernel.shape[0], layer.stride,
                       layer.padding)
    return _conv_macs(layer.kernel, out), out

  if isinstance(layer, operations.FactorizedReduce):
    # The second convolution reads the input shifted by one pixel.
    out_1 = _conv_output(size, 1, 2, 0)
    out_2 = _conv_output(tuple(s - 1 for s in size), 1, 2, 0)
    macs = (_conv_macs(layer.kernel_1, out_1)
            + _conv_macs(layer.kernel_2, out_2))
    return macs, out_1

  if isinstance(layer, operations.SepConv):
    k = layer.depthwise_1.shape[0]
    out = _conv_output(size, k, layer.stride, (k - 1) // 2)
    macs = sum(_conv_macs(kernel, out) for kernel in (
        layer.depthwise_1, layer.pointwise_1, layer.depthwise_2,
        layer.pointwise_2))
    return macs, out

  if isinstance(layer, operations.DilConv):
    k = layer.depthwise.shape[0]
    out = _conv_output(size, k, layer.stride, (k - 1) // 2 * layer.dilation,
                       layer.dilation)
    macs = (_conv_macs(layer.depthwise, out)
            + _conv_macs(layer.pointwise, out))
    return macs, out

  if isinstance(layer, operations.Pool):
    return 0, _conv_output(size, 3, layer.stride, 1)

  if isinstance(layer, (operations.Identity, activations.EdgeActivation)):
    return 0, size

  if isinstance(layer, operations.Classifier):
    return math.prod(layer.kernel.shape), (1, 1)

  raise TypeError(
      f"count_flops cannot count layer {layer.name!r} of type "
      f"{type(layer).__name__}. It counts the layers of tf_adarts.operations "
      "and tf_adarts.activations; add a rule to flops._layer_macs for new "
      "operators.")


def _edge_macs(edge, size: tuple) -> tuple:
  macs = 0
  if edge.activation is not None:
    macs, size = _layer_macs(edge.activation, size)
  op_macs, size = _layer_macs(edge.op, size)
  return macs + op_macs, size


def _cell_macs(cell, size_0: tuple, size_1: tuple) -> tuple:
  """Return (MACs, output size) of a cell given the sizes of s0 and s1."""
  macs_0, state_0 = _layer_macs(cell.preprocess0, size_0)
  macs_1, state_1 = _layer_macs(cell.preprocess1, size_1)
  if state_0 != state_1:
    raise ValueError(
        f"Cell {cell.name!r} receives inputs of {state_0} and {state_1} "
        "after preprocessing; use an image size divisible by 4 (CIFAR) or "
        "32 (ImageNet) so that every reduction halves it exactly.")

  macs = macs_0 + macs_1
  states = [state_0, state_1]
  for first in range(0, len(cell.edges), 2):
    node_size = None
    for k in (first, first + 1):
      edge_macs, node_size = _edge_macs(
          cell.edges[k], states[cell.inputs_of_edges[k]])
      macs += edge_macs
    states.append(node_size)
  return macs, states[-1]


def count_flops(network, image_size) -> int:
  """Count the multiply-adds of one image through a retraining network.

  See the module docstring for the convention: convolutions and the linear
  classifier, auxiliary head excluded. The count follows from the layers'
  kernel shapes and strides, so nothing is run.

  Args:
    network: a `networks.NetworkCIFAR` or `networks.NetworkImageNet`.
    image_size: the input height and width, an int or (height, width).

  Returns:
    The multiply-add count (divide by 1e6 for the "M FLOPs" of papers).
  """
  size = _image_size(image_size)
  macs = 0
  for layer in network.stem0:
    layer_macs, size = _layer_macs(layer, size)
    macs += layer_macs
  size_0 = size
  for layer in network.stem1:
    layer_macs, size = _layer_macs(layer, size)
    macs += layer_macs
  size_1 = size

  for cell in network.cells:
    cell_macs, size = _cell_macs(cell, size_0, size_1)
    macs += cell_macs
    size_0, size_1 = size_1, size

  classifier_macs, _ = _layer_macs(network.classifier, size_1)
  return macs + classifier_macs


def _largest_satisfying(predicate: Callable[[int], bool], start: int,
                        step: int) -> int:
  """Return the largest multiple of `step` for which `predicate` holds.

  `predicate` must be monotone: true up to some value and false above it.
  The search gallops from `start` in doubling steps until it brackets that
  value, then bisects the bracket.

  Raises:
    ValueError: when the predicate fails at `step` itself.
  """
  low = max(step, start // step * step)
  delta = step
  if predicate(low):
    while predicate(low + delta):
      low += delta
      delta *= 2
    high = low + delta
  else:
    high = low
    while True:
      if high == step:
        raise ValueError(f"The predicate fails at the smallest value {step}.")
      low = max(step, high - delta)
      if predicate(low):
        break
      high = low
      delta *= 2

  # Here predicate(low) is true and predicate(high) is false.
  while high - low > step:
    middle = low + (high - low) // step // 2 * step
    if predicate(middle):
      low = middle
    else:
      high = middle
  return low


def channels_for_max_flops(genotype, max_mflops: float,
                           network_class=networks.NetworkImageNet,
                           image_size=224, multiple_of: int = 2,
                           **network_kwargs) -> int:
  """Find the largest initial channel count within a FLOPs budget.

  This is the ImageNet mobile setting's rule (at most 600M multiply-adds at
  224x224): the result C is the largest multiple of `multiple_of` for which
  count_flops(network with C channels) <= max_mflops * 1e6. FLOPs grow
  with C, so the search builds a network for O(log C) candidates, each
  without its auxiliary head. A full ImageNet network takes a few seconds
  to build.

  Args:
    genotype: a `Genotype` or a published genotype's name.
    max_mflops: the budget in millions of multiply-adds.
    network_class: `networks.NetworkImageNet` or `networks.NetworkCIFAR`.
    image_size: the input size the FLOPs are counted at.
    multiple_of: the channel counts considered are multiples of this. The
      default 2 keeps NetworkImageNet's factorized reduce valid.
    **network_kwargs: other arguments of `network_class` (for instance
      layers or num_classes); not `channels` or `auxiliary`.

  Raises:
    ValueError: when even `multiple_of` channels exceed the budget.
  """
  for reserved in ("channels", "auxiliary"):
    if reserved in network_kwargs:
      raise ValueError(
          f"channels_for_max_flops sets {reserved!r} itself; remove it from "
          "the network arguments.")
  if multiple_of < 1:
    raise ValueError(f"multiple_of must be at least 1, got {multiple_of}.")

  limit = max_mflops * 1e6
  counts = {}

  def flops_at(channels: int) -> int:
    if channels not in counts:
      network = network_class(genotype, channels=channels, auxiliary=False,
                              **network_kwargs)
      counts[channels] = count_flops(network, image_size)
    return counts[channels]

  # FLOPs grow about as C squared, so one count at the class's default
  # channel count gives a close first guess.
  reference = _default_channels(network_class)
  guess = round(reference * math.sqrt(limit / flops_at(reference)))
  try:
    return _largest_satisfying(lambda c: flops_at(c) <= limit, guess,
                               multiple_of)
  except ValueError:
    raise ValueError(
        f"Even {multiple_of} channels need {flops_at(multiple_of) / 1e6:.1f}M "
        f"multiply-adds, over the budget of {max_mflops}M; raise max_mflops "
        "or lower layers.") from None


def _default_channels(network_class) -> int:
  return inspect.signature(network_class).parameters["channels"].default

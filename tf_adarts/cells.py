"""The search cell: a DAG of two input nodes and four intermediate nodes.

Intermediate node j (2 <= j < 2 + steps) sums one mixed operation from every
earlier node, so a cell with four steps has 2 + 3 + 4 + 5 = 14 edges. Edges
are numbered in the DARTS order: node 2 from inputs 0 and 1, node 3 from 0,
1 and 2, and so on. The architecture weights have one row per edge in that
order. The cell's output concatenates the intermediate nodes.

The edges leaving one node share a `MixedOp`, so a cell runs five edge
groups (one per source node) instead of fourteen edges; a node is complete
once every earlier node has been processed.
"""

import keras
import tensorflow as tf

from tf_adarts import mixed_ops
from tf_adarts import operations


def cell_edges(steps=4):
  """Return the (source, target) node pairs of a cell, in DARTS order."""
  return tuple((i, j) for j in range(2, 2 + steps) for i in range(j))


def edge_index(source, target, steps=4):
  """Row of edge (source -> target) in the architecture weights."""
  return cell_edges(steps).index((source, target))


def edges_by_source(steps=4):
  """For each source node, its targets and their edge rows."""
  edges = cell_edges(steps)
  groups = []
  for source in range(1 + steps):
    targets = tuple(j for (i, j) in edges if i == source)
    rows = tuple(edges.index((source, j)) for j in targets)
    groups.append((targets, rows))
  return tuple(groups)


def normalize_edge_weights(edge_weights, steps=4):
  """Softmax of the edge weights over the incoming edges of each node."""
  parts = []
  start = 0
  for node in range(2, 2 + steps):
    parts.append(tf.nn.softmax(edge_weights[start:start + node]))
    start += node
  return tf.concat(parts, axis=0)


def split_by_source(weights, steps=4):
  """Per source node, the rows of `weights` for the edges it feeds."""
  if weights is None:
    return [None] * (1 + steps)
  return [tf.gather(weights, rows) for _, rows in edges_by_source(steps)]


class SearchCell(keras.layers.Layer):
  """A normal or reduction cell of the search network.

  Args:
    space: the `SearchSpace`.
    prev_prev_channels: channels of the output two cells back.
    prev_channels: channels of the previous cell's output.
    channels: channels of each node in this cell.
    reduction: whether this cell halves the resolution (edges from the two
      input nodes use stride 2).
    reduction_prev: whether the previous cell was a reduction cell (the
      input from two cells back is then reduced by a factorized reduce).
    partial_channels: K of PC-DARTS (1: every channel is searched).
    steps: intermediate nodes.
    multiplier: intermediate nodes concatenated into the output.

  Call arguments (per source node, as made by `split_by_source`):
    op_weights: softmax of alpha rows.
    activation_weights: softmax of beta rows, or Nones.
    edge_weights: normalized edge weights, or Nones.
  """

  def __init__(self, space, prev_prev_channels, prev_channels, channels,
               reduction, reduction_prev, partial_channels=1, steps=4,
               multiplier=4, **kwargs):
    super().__init__(**kwargs)
    self.reduction = reduction
    self.steps = steps
    self.multiplier = multiplier

    if reduction_prev:
      self.preprocess0 = operations.FactorizedReduce(
          prev_prev_channels, channels, affine=False, name="preprocess0")
    else:
      self.preprocess0 = operations.ReLUConvBN(
          prev_prev_channels, channels, 1, 1, affine=False,
          name="preprocess0")
    self.preprocess1 = operations.ReLUConvBN(
        prev_channels, channels, 1, 1, affine=False, name="preprocess1")

    self._groups = edges_by_source(steps)
    self.mixed_ops = []
    for source, (targets, _) in enumerate(self._groups):
      stride = 2 if reduction and source < 2 else 1
      self.mixed_ops.append(mixed_ops.MixedOp(
          space, channels, stride, num_edges=len(targets),
          partial_channels=partial_channels, name=f"mixed_from_{source}"))
    self.built = True

  def call(self, s0, s1, op_weights, activation_weights, edge_weights,
           training=None):
    states = [self.preprocess0(s0, training=training),
              self.preprocess1(s1, training=training)]
    incoming = {j: [] for j in range(2, 2 + self.steps)}

    for source, (targets, _) in enumerate(self._groups):
      if source >= 2:
        states.append(tf.add_n(incoming.pop(source)))

      outputs = self.mixed_ops[source](
          states[source], op_weights[source], activation_weights[source],
          training=training)
      if edge_weights[source] is not None:
        outputs = mixed_ops.weight_edges(outputs,
                                         edge_weights[source][:, None])

      for target, y in zip(targets, tf.unstack(outputs, axis=3)):
        incoming[target].append(y)

    states.append(tf.add_n(incoming.pop(2 + self.steps - 1)))
    return tf.concat(states[-self.multiplier:], axis=-1)

"""Mixed operations: the weighted sum of every candidate on an edge.

A `MixedOp` serves all edges that leave one node of a cell (1 to 4 edges
with 4 intermediate nodes). They share their input, so the candidates that
depend only on the input (pools, identity, stateless activations) are
computed once for all of them, and each per-edge weight lives in a
channel block of one edge-batched layer (see `operations`). The layer does
not own the architecture weights: the caller passes their softmax in, so the
search network can keep alpha and beta as distinct variable groups.

For edge e with operator weights a = softmax(alpha_e) and activation weights
b = softmax(beta_e):

- factorized: sigma(x) = sum_k b[k] * act_k(x), computed once per edge and
  shared by the parametric operators; f(x) = sum_o a[o] * o(sigma(x)) over
  parametric o plus sum_o a[o] * o(x) over the others;
- non-factorized: f(x) = sum_o a[o] * o(x) over the non-parametric operators
  plus sum_(p,k) a[p,k] * p(act_k(x)) over every (operator, activation) pair;
- fixed: sigma(x) = act(x) for the one fixed activation.

The zero operator (`none`) contributes nothing and is never computed.

Partial channels (PC-DARTS, K > 1): only the first channels / K channels go
through the mixed operation; the rest bypass it (max-pooled 2x2 at stride 2),
the two parts are concatenated and the channels shuffled in K groups.
"""

import keras
import tensorflow as tf

from tf_adarts import search_space as search_space_lib


@tf.custom_gradient
def weight_edges(blocks, weights):
  """Multiply each edge's block of `blocks` by that edge's weight.

  Args:
    blocks: [batch, height, width, num_edges, channels], or with 1 in place
      of num_edges for an output that the edges share.
    weights: [num_edges, 1], the architecture weight of each edge.

  Returns:
    blocks * weights, broadcast over the edges.

  The product is the plain broadcast product. Only the gradient of the
  weights differs from TensorFlow's: TensorFlow sums over the batch,
  height, width and channel axes in one reduction, whose CPU kernel took
  28 ms for a 64 x 32 x 32 x 4 x 16 input. Summing over the channels
  first and then over the leading axes took 3 to 4 ms (TensorFlow 2.21,
  2 cores).
  """
  products = blocks * tf.cast(weights, blocks.dtype)

  def gradient(upstream):
    blocks_gradient = upstream * tf.cast(weights, upstream.dtype)
    if blocks.shape[3] == 1 and upstream.shape[3] != 1:
      # A shared output was broadcast over the edges.
      blocks_gradient = tf.reduce_sum(blocks_gradient, axis=3, keepdims=True)
    per_edge = tf.reduce_sum(
        tf.reduce_sum(upstream * blocks, axis=-1), axis=[0, 1, 2])
    weights_gradient = tf.reshape(tf.cast(per_edge, weights.dtype),
                                  tf.shape(weights))
    return blocks_gradient, weights_gradient

  return products, gradient


def channel_shuffle(x, groups):
  """Shuffle the last axis of x in `groups` groups (PC-DARTS).

  Channel g * (c / groups) + i of the input becomes channel i * groups + g.
  """
  inner = list(x.shape[1:-1])
  channels = x.shape[-1]
  y = tf.reshape(x, [-1] + inner + [groups, channels // groups])
  rank = len(inner) + 3
  y = tf.transpose(y, list(range(rank - 2)) + [rank - 1, rank - 2])
  return tf.reshape(y, [-1] + inner + [channels])


class MixedOp(keras.layers.Layer):
  """Mixed operations of the edges leaving one node.

  Args:
    space: the `SearchSpace`.
    channels: channels of the node output and of each edge output.
    stride: 1, or 2 for edges that leave a reduction cell's inputs.
    num_edges: number of edges served.
    partial_channels: K of PC-DARTS; 1 sends every channel through.
    affine: learn scale and offset in the batch norms (False in the search
      network, as in DARTS).
    pool_batch_norm: batch norm after the pools (True in the search network).

  Call arguments:
    x: the node output, [batch, height, width, channels].
    op_weights: softmax of the alpha rows of the served edges,
      [num_edges, space.num_alpha_columns].
    activation_weights: softmax of the beta rows,
      [num_edges, space.num_beta_columns]; factorized spaces only.

  Returns:
    [batch, height / stride, width / stride, num_edges, channels]: the output
    of each edge.
  """

  def __init__(self, space, channels, stride=1, num_edges=1,
               partial_channels=1, affine=False, pool_batch_norm=True,
               **kwargs):
    super().__init__(**kwargs)
    if channels % partial_channels:
      raise ValueError(
          f"Channels ({channels}) must be divisible by partial_channels "
          f"({partial_channels}); choose K that divides the cell width.")
    self.space = space
    self.channels = channels
    self.stride = stride
    self.num_edges = num_edges
    self.partial_channels = partial_channels
    self.op_channels = channels // partial_channels

    self._build_activations()
    self._build_operators(affine, pool_batch_norm)
    self.built = True

  def _build_activations(self):
    space = self.space
    if space.kind == search_space_lib.FIXED:
      candidates = [space.activations.get(space.fixed_activation)]
    else:
      candidates = list(space.activations)
    self.activation_layers = [
        c.factory(self.op_channels, self.num_edges, name=f"act_{c.name}")
        for c in candidates]

  def _build_operators(self, affine, pool_batch_norm):
    # The non-factorized space applies each parametric operator to every
    # activation: the (activation, edge) pairs become the layer's edges.
    num_activations = len(self.space.activations)
    parametric_edges = (num_activations * self.num_edges
                        if self.space.kind == search_space_lib.NON_FACTORIZED
                        else self.num_edges)
    self.operator_layers = []
    self._operator_candidates = []
    for candidate in self.space.operators:
      if candidate.zero:
        continue
      edges = parametric_edges if candidate.parametric else self.num_edges
      layer = candidate.factory(
          self.op_channels, self.stride, num_edges=edges, affine=affine,
          pool_batch_norm=pool_batch_norm, name=f"op_{candidate.name}")
      self.operator_layers.append(layer)
      self._operator_candidates.append(candidate)

    # The alpha column(s) of each built operator.
    columns = {}
    for column, (op, activation) in enumerate(self.space.alpha_candidates):
      columns.setdefault(op, []).append(column)
    self._operator_columns = [columns[c.name]
                              for c in self._operator_candidates]

  def _edge_major(self, y, channels):
    """Reshape [b, h, w, e * c] (or a shared [b, h, w, c]) to 5-D."""
    edges = y.shape[-1] // channels
    return tf.reshape(y, [-1, y.shape[1], y.shape[2], edges, channels])

  def _per_edge(self, y):
    """Tile an output shared by the edges to one block per edge."""
    if y.shape[-1] == self.op_channels and self.num_edges > 1:
      return tf.tile(y, [1, 1, 1, self.num_edges])
    return y

  def _activation_mixture(self, x, activation_weights, training):
    """sigma(x) for each edge, [b, h, w, num_edges * channels]."""
    outputs = [layer(x, training=training)
               for layer in self.activation_layers]
    if self.space.kind == search_space_lib.FIXED:
      return self._per_edge(outputs[0])

    # A multiply-add per activation, not an einsum: the gradient of an
    # einsum over the activations was not reproducible between runs on
    # this CPU (oneDNN, TensorFlow 2.21), even with op determinism on.
    mixture = None
    for k, y in enumerate(outputs):
      term = weight_edges(self._edge_major(y, self.op_channels),
                          activation_weights[:, k:k + 1])
      mixture = term if mixture is None else mixture + term

    return tf.reshape(mixture, [-1, x.shape[1], x.shape[2],
                                self.num_edges * self.op_channels])

  def _all_activations(self, x, training):
    """Apply every activation to x for every edge, activation-major."""
    outputs = [self._per_edge(layer(x, training=training))
               for layer in self.activation_layers]
    return tf.concat(outputs, axis=-1)

  def _mix(self, x, op_weights, activation_weights, training):
    if self.space.kind == search_space_lib.NON_FACTORIZED:
      activated = self._all_activations(x, training)
    else:
      activated = self._activation_mixture(x, activation_weights, training)

    total = None
    for layer, candidate, columns in zip(
        self.operator_layers, self._operator_candidates,
        self._operator_columns):
      y = layer(activated if candidate.parametric else x, training=training)
      if len(columns) == 1:
        term = weight_edges(self._edge_major(y, self.op_channels),
                            op_weights[:, columns[0]:columns[0] + 1])
      else:
        # One output block per (activation, edge), weighted by its own
        # combined-candidate column and summed over the activations.
        blocks = tf.reshape(
            y, [-1, y.shape[1], y.shape[2], len(columns), self.num_edges,
                self.op_channels])
        weights = tf.gather(op_weights, columns, axis=1)
        term = tf.einsum("nhwaec,ea->nhwec", blocks, weights)
      total = term if total is None else total + term

    if total is None:
      # Only the zero operator: the edges output zeros at the edge's stride.
      height = (x.shape[1] - 1) // self.stride + 1
      width = (x.shape[2] - 1) // self.stride + 1
      total = tf.zeros(tf.stack([tf.shape(x)[0], height, width,
                                 self.num_edges, self.op_channels]), x.dtype)
    return total

  def call(self, x, op_weights, activation_weights=None, training=None):
    if self.partial_channels == 1:
      return self._mix(x, op_weights, activation_weights, training)

    # tf.split's gradient is one concat. The gradient of a strided slice
    # is slow on the CPU (see operations.subsample).
    active, bypass = tf.split(
        x, [self.op_channels, x.shape[-1] - self.op_channels], axis=-1)
    if self.stride > 1:
      bypass = tf.nn.max_pool2d(bypass, 2, 2, "VALID")

    mixed = self._mix(active, op_weights, activation_weights, training)
    bypass = tf.tile(tf.expand_dims(bypass, -2), [1, 1, 1, self.num_edges, 1])
    return channel_shuffle(tf.concat([mixed, bypass], axis=-1),
                           self.partial_channels)

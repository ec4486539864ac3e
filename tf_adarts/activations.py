"""Candidate activations of the activation group, as edge-batched Keras layers.

Every layer here serves the edges that leave one node of a cell at once.
Its input is the node's output, [batch, height, width, channels]. An
activation without per-edge state returns one output shared by all of
those edges, with the input's shape. An activation whose edges own
learnable or random state (PReLU slopes, the Swish scalar, RReLU draws in
training) returns one block of `channels` per edge, edge-major:
[batch, height, width, num_edges * channels]. Callers tell the two apart by
the output's channel count. The mixed operation broadcasts shared outputs itself, so the
stateless activations run once per node instead of once per edge.

Defaults follow PyTorch's, which the published models used: LeakyReLU slope
0.01, PReLU slope 0.25 per channel, RReLU slopes in [1/8, 1/3], ELU and CELU
alpha 1.0.
"""

import contextlib
import threading
from typing import Callable

import keras
import tensorflow as tf

# The seed of the random activations in the pass being traced, if any. It
# is kept per thread because MirroredStrategy traces each replica's pass in
# its own thread. A shared value leaked one replica's graph tensor into
# later traces.
_state = threading.local()


def current_noise_seed():
  """Return the seed of the enclosing `noise_seed` block, or None."""
  return getattr(_state, "noise_seed", None)


@contextlib.contextmanager
def noise_seed(seed):
  """Seed the random activations called inside the block.

  Within the block every RReLU draws its training slopes with stateless ops
  from `seed` (an int32 or int64 tensor of shape [2]) folded with the
  layer's own `noise_salt`, so a pass is reproducible from the seed alone:
  a resumed run draws what an uninterrupted run would. Outside any block the
  draws are stateful (tf.random.uniform). The block applies to the calling
  thread only.
  """
  previous = current_noise_seed()
  _state.noise_seed = seed
  try:
    yield
  finally:
    _state.noise_seed = previous


class EdgeActivation(keras.layers.Layer):
  """Base class of the edge-batched activations.

  Args:
    channels: channels of one edge's input.
    num_edges: edges served by this layer.
  """

  per_edge = False

  def __init__(self, channels: int, num_edges: int = 1, **kwargs):
    super().__init__(**kwargs)
    self.channels = channels
    self.num_edges = num_edges

  def _finish_build(self):
    # Weights are created from the known channel count, so no eager call is
    # needed to build the layer (building by a traced call is slow).
    self.built = True

  def _edge_major(self, x):
    """Reshape [b, h, w, c] to [b, h, w, 1, c] for broadcasting over edges."""
    return tf.expand_dims(x, axis=-2)

  def _flatten_edges(self, y, x):
    """Reshape [b, h, w, e, c] back to [b, h, w, e * c]."""
    height, width = x.shape[1], x.shape[2]
    return tf.reshape(y, [-1, height, width, self.num_edges * self.channels])

  def get_config(self):
    config = super().get_config()
    config.update(channels=self.channels, num_edges=self.num_edges)
    return config


class Elementwise(EdgeActivation):
  """A stateless activation given as an elementwise function."""

  def __init__(self, fn: Callable[[tf.Tensor], tf.Tensor], channels: int,
               num_edges: int = 1, **kwargs):
    super().__init__(channels, num_edges, **kwargs)
    self.fn = fn
    self._finish_build()

  def call(self, x, training=None):
    return self.fn(x)


def elementwise(fn: Callable[[tf.Tensor], tf.Tensor]):
  """Return a layer factory for a stateless elementwise activation.

  This is the form a new activation takes when it is registered in a search
  space, for instance `space.with_activation("softplus",
  elementwise(tf.nn.softplus))`.
  """

  def factory(channels: int, num_edges: int = 1, name=None):
    return Elementwise(fn, channels, num_edges, name=name)

  return factory


def celu(x, alpha: float = 1.0):
  """CELU: max(0, x) + min(0, alpha * (exp(x / alpha) - 1))."""
  return tf.nn.relu(x) + tf.minimum(alpha * tf.math.expm1(x / alpha), 0.0)


class PReLU(EdgeActivation):
  """PReLU with a learnable negative slope per channel and per edge."""

  per_edge = True

  def __init__(self, channels, num_edges=1, initial_slope=0.25, **kwargs):
    super().__init__(channels, num_edges, **kwargs)
    self.initial_slope = initial_slope
    self.slope = self.add_weight(
        name="slope", shape=(num_edges, channels),
        initializer=keras.initializers.Constant(initial_slope))
    self._finish_build()

  def call(self, x, training=None):
    positive = tf.nn.relu(x)
    negative = x - positive
    y = self._edge_major(positive) + self._edge_major(negative) * self.slope
    return self._flatten_edges(y, x)


class RReLU(EdgeActivation):
  """Randomized leaky ReLU.

  In training each element of each edge draws its negative slope uniformly
  from [lower, upper], so the output is per edge. In inference the slope is
  the fixed mean (lower + upper) / 2, and the output is shared by the edges.
  """

  per_edge = True  # In training; see call().

  def __init__(self, channels, num_edges=1, lower=1.0 / 8.0, upper=1.0 / 3.0,
               **kwargs):
    super().__init__(channels, num_edges, **kwargs)
    self.lower = lower
    self.upper = upper
    # Distinguishes this layer's draws from the other RReLUs' under one
    # noise seed; the search network numbers its RReLUs.
    self.noise_salt = 0
    self._finish_build()

  def call(self, x, training=None):
    positive = tf.nn.relu(x)
    negative = x - positive
    if not training:
      slope = 0.5 * (self.lower + self.upper)
      return positive + slope * negative

    x_edges = self._edge_major(negative)
    shape = tf.concat(
        [tf.shape(x)[:3], [self.num_edges, self.channels]], axis=0)
    seed_value = current_noise_seed()
    if seed_value is None:
      slope = tf.random.uniform(shape, self.lower, self.upper, dtype=x.dtype)
    else:
      seed = tf.random.experimental.stateless_fold_in(
          tf.cast(seed_value, tf.int64), self.noise_salt)
      slope = tf.random.stateless_uniform(shape, seed, self.lower,
                                          self.upper, dtype=x.dtype)
    y = self._edge_major(positive) + x_edges * slope
    return self._flatten_edges(y, x)


class Swish(EdgeActivation):
  """Swish x * sigmoid(b * x) with a learnable scalar b per edge."""

  per_edge = True

  def __init__(self, channels, num_edges=1, initial_beta=1.0, **kwargs):
    super().__init__(channels, num_edges, **kwargs)
    self.initial_beta = initial_beta
    self.scale = self.add_weight(
        name="scale", shape=(num_edges, 1),
        initializer=keras.initializers.Constant(initial_beta))
    self._finish_build()

  def call(self, x, training=None):
    x_edges = self._edge_major(x)
    y = x_edges * tf.sigmoid(self.scale * x_edges)
    return self._flatten_edges(y, x)


def _leaky_relu(x):
  # PyTorch's default slope; Keras's LeakyReLU defaults to 0.3.
  return tf.nn.leaky_relu(x, alpha=0.01)


def _prelu_factory(channels, num_edges=1, name=None):
  return PReLU(channels, num_edges, name=name)


def _rrelu_factory(channels, num_edges=1, name=None):
  return RReLU(channels, num_edges, name=name)


def _swish_factory(channels, num_edges=1, name=None):
  return Swish(channels, num_edges, name=name)


# The nine activations of the method, in the order of the activation group.
ACTIVATION_FACTORIES = (
    ("relu", elementwise(tf.nn.relu)),
    ("relu6", elementwise(tf.nn.relu6)),
    ("leaky_relu", elementwise(_leaky_relu)),
    ("prelu", _prelu_factory),
    ("rrelu", _rrelu_factory),
    ("elu", elementwise(tf.nn.elu)),
    ("celu", elementwise(celu)),
    ("selu", elementwise(tf.nn.selu)),
    ("swish", _swish_factory),
)

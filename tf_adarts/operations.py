"""The DARTS operations in NHWC, as lean edge-batched Keras layers.

A cell's edges that leave the same node run in one layer: per-edge weights
are stacked along the channel axis, edge-major, so that a layer serving E
edges of C channels works on [batch, height, width, E * C] tensors. Depthwise
convolutions and batch norm are per channel anyway, and a pointwise
convolution becomes a grouped 1x1 convolution with one group per edge. With
E = 1 every layer is the plain single-edge operation, which the retraining
networks use.

Conventions of the public DARTS code (PyTorch) that are kept here:
- symmetric padding of (k - 1) / 2 * dilation pixels, also at stride 2,
  where TensorFlow's "same" padding would shift the sampling grid;
- pools pad one pixel; average pooling does not count the padding;
- batch norm with epsilon 1e-5 and running-statistics momentum 0.1
  (Keras momentum 0.9);
- convolution weights drawn uniformly from +-1 / sqrt(fan_in), PyTorch's
  default initialisation, and convolutions without bias.

Each batch norm is one FusedBatchNormV3 op that also computes the new running
statistics. This keeps the graph small, and graph size, not arithmetic,
dominates the time to trace a supernet.
"""

import contextlib
import math

import keras
import tensorflow as tf

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: weight of the new batch statistics.

# Whether batch norms built now synchronize their batch statistics across
# replicas; see `synchronized_batch_norm`.
_sync_batch_norm = False


@contextlib.contextmanager
def synchronized_batch_norm(enabled: bool = True):
  """Build the batch norms created inside the block as synchronized ones.

  A synchronized batch norm computes its training-time mean and variance
  over the global batch (all replicas) instead of each replica's part, so
  that N replicas compute what one device computes on the whole batch.
  Outside a multi-replica strategy it is the plain batch norm.
  """
  global _sync_batch_norm
  previous = _sync_batch_norm
  _sync_batch_norm = enabled
  try:
    yield
  finally:
    _sync_batch_norm = previous


def _uniform_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return keras.initializers.RandomUniform(-bound, bound)


class Op(keras.layers.Layer):
  """Base class: layers that create their weights in __init__.

  Shapes follow from the channel counts alone, so every layer is built at
  construction and no eager call is needed before training.
  """

  def _finish_build(self):
    self.built = True


class BatchNorm(Op):
  """Batch normalization over the last axis, as one fused op.

  Args:
    channels: size of the last axis.
    affine: learn a scale and an offset (the search network uses none).
    momentum: weight of the batch statistics in the running averages
      (PyTorch's convention; 0.1 there is Keras's 0.9).
    epsilon: added to the variance.
  """

  def __init__(self, channels, affine=True, momentum=BN_MOMENTUM,
               epsilon=BN_EPSILON, **kwargs):
    super().__init__(**kwargs)
    self.channels = channels
    self.affine = affine
    self.momentum = momentum
    self.epsilon = epsilon
    self.synchronized = _sync_batch_norm
    if affine:
      # Batch norm's scale, offset and statistics stay float32 under mixed
      # precision, as FusedBatchNormV3 expects.
      self.gamma = self.add_weight(name="gamma", shape=(channels,),
                                   initializer="ones", autocast=False)
      self.beta = self.add_weight(name="beta", shape=(channels,),
                                  initializer="zeros", autocast=False)
    # The running statistics are synchronized on read, as in tf.keras's
    # batch norm. Under a distribution strategy each replica updates its own
    # copy without a cross-replica call, so the update also works inside a
    # nested tf.function. A read outside the replicas averages the copies.
    with keras.name_scope(self.name, caller=self):
      self.moving_mean = keras.Variable(
          keras.initializers.Zeros(), shape=(channels,), trainable=False,
          aggregation="mean", synchronization="on_read", autocast=False,
          name="moving_mean")
      self.moving_variance = keras.Variable(
          keras.initializers.Ones(), shape=(channels,), trainable=False,
          aggregation="mean", synchronization="on_read", autocast=False,
          name="moving_variance")
    self._finish_build()

  def call(self, x, training=None):
    if self.affine:
      scale, offset = self.gamma.value, self.beta.value
    else:
      scale = tf.ones([self.channels], tf.float32)
      offset = tf.zeros([self.channels], tf.float32)

    if not training:
      y, *_ = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=scale, offset=offset, mean=self.moving_mean.value,
          variance=self.moving_variance.value, epsilon=self.epsilon,
          data_format="NHWC", is_training=False)
      return y

    context = tf.distribute.get_replica_context()
    if (self.synchronized and context is not None
        and context.num_replicas_in_sync > 1):
      return self._synchronized_call(x, scale, offset, context)

    # With exponential_avg_factor the op returns the updated running
    # averages (the variance with Bessel's correction, as PyTorch keeps it).
    y, new_mean, new_variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=self.moving_mean.value,
        variance=self.moving_variance.value, epsilon=self.epsilon,
        exponential_avg_factor=self.momentum, data_format="NHWC",
        is_training=True)
    self.moving_mean.assign(new_mean)
    self.moving_variance.assign(new_variance)
    return y

  def _synchronized_call(self, x, scale, offset, context):
    """Normalize with the mean and variance of the global batch.

    Two all-reduces: the sums give the mean, then the squared deviations
    from it give the variance (more accurate than E[x^2] - E[x]^2).
    """
    values = tf.cast(x, tf.float32)
    axes = [0, 1, 2]
    local_count = tf.cast(tf.reduce_prod(tf.shape(values)[:3]), tf.float32)
    sums = context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.concat([tf.reduce_sum(values, axes), [local_count]], axis=0))
    count = sums[-1]
    mean = sums[:-1] / count
    squares = context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.reduce_sum(tf.square(values - mean), axes))
    variance = squares / count
    y = tf.nn.batch_normalization(values, mean, variance, offset, scale,
                                  self.epsilon)

    unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
    self.moving_mean.assign(
        (1.0 - self.momentum) * self.moving_mean.value
        + self.momentum * tf.stop_gradient(mean))
    self.moving_variance.assign(
        (1.0 - self.momentum) * self.moving_variance.value
        + self.momentum * tf.stop_gradient(unbiased))
    return tf.cast(y, x.dtype)


def depthwise_conv(x, kernel, stride=1, dilation=1):
  """Depthwise convolution with DARTS's symmetric padding.

  Args:
    x: [batch, height, width, channels].
    kernel: [k, k, channels, 1].
    stride: 1 or 2.
    dilation: 1 or 2.
  """
  k = kernel.shape[0]
  pad = (k - 1) // 2 * dilation

  if stride > 1 and dilation > 1:
    # TensorFlow rejects stride and dilation together. With stride equal to
    # dilation and an even padding, the taps of each output only touch every
    # stride-th input pixel, so subsampling the padded input and running an
    # undilated stride-1 convolution gives the same output.
    if stride != dilation or pad % stride:
      raise ValueError(
          f"Unsupported depthwise convolution: stride {stride} with dilation "
          f"{dilation} and kernel {k}; stride must equal dilation.")
    x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    x = subsample(x, stride)
    return tf.raw_ops.DepthwiseConv2dNative(
        input=x, filter=kernel, strides=[1, 1, 1, 1], padding="VALID")

  if stride == 1:
    # At stride 1 "same" padding is the symmetric one for odd kernels.
    return tf.raw_ops.DepthwiseConv2dNative(
        input=x, filter=kernel, strides=[1, 1, 1, 1], padding="SAME",
        dilations=[1, dilation, dilation, 1])

  # Explicit padding is avoided: the registered gradient of
  # DepthwiseConv2dNative drops it (TensorFlow 2.21).
  x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
  return tf.raw_ops.DepthwiseConv2dNative(
      input=x, filter=kernel, strides=[1, stride, stride, 1],
      padding="VALID")


def pointwise_conv(x, kernel, stride=1):
  """1x1 convolution; grouped (one group per edge) when kernel is narrower."""
  return tf.nn.conv2d(x, kernel, stride, "VALID")


def conv_padding(kernel_size, stride):
  """Return the tf.nn.conv2d padding of (kernel_size - 1) // 2 on each side.

  "VALID" and "SAME" are used where they pad as much: a 1x1 kernel, or an
  odd kernel at stride 1. TensorFlow 2.21 ran the gradients of
  convolutions with explicit padding on its plain CPU kernels, not
  oneDNN's. In the DARTS_V2 retraining step those gradients took about a
  sixth of the kernel time.
  """
  pad = (kernel_size - 1) // 2
  if kernel_size == 1:
    return "VALID"
  if stride == 1 and kernel_size % 2:
    return "SAME"
  return [[0, 0], [pad, pad], [pad, pad], [0, 0]]


class ReLUConvBN(Op):
  """ReLU, k x k convolution, batch norm: the cell input preprocessing."""

  def __init__(self, in_channels, out_channels, kernel_size=1, stride=1,
               affine=True, **kwargs):
    super().__init__(**kwargs)
    self.stride = stride
    self.padding = (kernel_size - 1) // 2
    self.kernel = self.add_weight(
        name="kernel", shape=(kernel_size, kernel_size, in_channels,
                              out_channels),
        initializer=_uniform_init(kernel_size * kernel_size * in_channels))
    self.bn = BatchNorm(out_channels, affine=affine, name="bn")
    self._finish_build()

  def call(self, x, training=None):
    x = tf.nn.relu(x)
    x = tf.nn.conv2d(x, self.kernel.value, self.stride,
                     conv_padding(self.kernel.shape[0], self.stride))
    return self.bn(x, training=training)


class FactorizedReduce(Op):
  """Halve the resolution with two offset 1x1 stride-2 convolutions.

  ReLU, then one 1x1 stride-2 convolution on the input and one on the input
  shifted by one pixel, each to half the output channels, concatenated, then
  batch norm. With num_edges > 1 the input is shared and each edge has its
  own convolutions; the output is edge-major.
  """

  def __init__(self, in_channels, out_channels, affine=True, num_edges=1,
               **kwargs):
    super().__init__(**kwargs)
    if out_channels % 2:
      raise ValueError(
          f"FactorizedReduce needs an even output channel count, got "
          f"{out_channels}.")
    self.num_edges = num_edges
    self.out_channels = out_channels
    half = out_channels // 2
    init = _uniform_init(in_channels)
    self.kernel_1 = self.add_weight(
        name="kernel_1", shape=(1, 1, in_channels, num_edges * half),
        initializer=init)
    self.kernel_2 = self.add_weight(
        name="kernel_2", shape=(1, 1, in_channels, num_edges * half),
        initializer=init)
    self.bn = BatchNorm(num_edges * out_channels, affine=affine, name="bn")
    self._finish_build()

  def call(self, x, training=None):
    x = tf.nn.relu(x)
    y1 = tf.nn.conv2d(x, self.kernel_1.value, 2, "VALID")
    # tf.slice, not x[:, 1:, 1:]: the gradient of Slice is a Pad, which
    # ran 7x faster on the CPU than StridedSliceGrad (TensorFlow 2.21).
    shifted = tf.slice(x, [0, 1, 1, 0], [-1, -1, -1, -1])
    y2 = tf.nn.conv2d(shifted, self.kernel_2.value, 2, "VALID")

    if self.num_edges == 1:
      y = tf.concat([y1, y2], axis=-1)
    else:
      height, width = y1.shape[1], y1.shape[2]
      half = self.out_channels // 2
      y1 = tf.reshape(y1, [-1, height, width, self.num_edges, half])
      y2 = tf.reshape(y2, [-1, height, width, self.num_edges, half])
      y = tf.reshape(tf.concat([y1, y2], axis=-1),
                     [-1, height, width, self.num_edges * self.out_channels])
    return self.bn(y, training=training)


class SepConv(Op):
  """Separable convolution applied twice, as in DARTS.

  depthwise k x k (stride s) -> pointwise -> BN -> ReLU -> depthwise k x k ->
  pointwise -> BN. The searched activation that precedes it is applied by the
  caller; the inner ReLU stays a ReLU.
  """

  def __init__(self, channels, kernel_size, stride=1, affine=True,
               num_edges=1, **kwargs):
    super().__init__(**kwargs)
    self.stride = stride
    width = num_edges * channels
    k = kernel_size
    depthwise_init = _uniform_init(k * k)
    pointwise_init = _uniform_init(channels)
    self.depthwise_1 = self.add_weight(
        name="depthwise_1", shape=(k, k, width, 1), initializer=depthwise_init)
    self.pointwise_1 = self.add_weight(
        name="pointwise_1", shape=(1, 1, channels, width),
        initializer=pointwise_init)
    self.bn_1 = BatchNorm(width, affine=affine, name="bn_1")
    self.depthwise_2 = self.add_weight(
        name="depthwise_2", shape=(k, k, width, 1), initializer=depthwise_init)
    self.pointwise_2 = self.add_weight(
        name="pointwise_2", shape=(1, 1, channels, width),
        initializer=pointwise_init)
    self.bn_2 = BatchNorm(width, affine=affine, name="bn_2")
    self._finish_build()

  def call(self, x, training=None):
    x = depthwise_conv(x, self.depthwise_1.value, self.stride)
    x = pointwise_conv(x, self.pointwise_1.value)
    x = tf.nn.relu(self.bn_1(x, training=training))
    x = depthwise_conv(x, self.depthwise_2.value)
    x = pointwise_conv(x, self.pointwise_2.value)
    return self.bn_2(x, training=training)


class DilConv(Op):
  """Dilated depthwise k x k (stride s) -> pointwise -> BN."""

  def __init__(self, channels, kernel_size, stride=1, dilation=2,
               affine=True, num_edges=1, **kwargs):
    super().__init__(**kwargs)
    self.stride = stride
    self.dilation = dilation
    width = num_edges * channels
    k = kernel_size
    self.depthwise = self.add_weight(
        name="depthwise", shape=(k, k, width, 1),
        initializer=_uniform_init(k * k))
    self.pointwise = self.add_weight(
        name="pointwise", shape=(1, 1, channels, width),
        initializer=_uniform_init(channels))
    self.bn = BatchNorm(width, affine=affine, name="bn")
    self._finish_build()

  def call(self, x, training=None):
    x = depthwise_conv(x, self.depthwise.value, self.stride, self.dilation)
    x = pointwise_conv(x, self.pointwise.value)
    return self.bn(x, training=training)


def subsample(x, stride):
  """Keep every stride-th row and column of x, [b, h, w, c], from the first.

  When stride divides the height and width this is a reshape and a slice:
  their gradients (a reshape and a pad) ran 7x faster on the CPU than the
  gradient of x[:, ::stride, ::stride] (TensorFlow 2.21).
  """
  if stride == 1:
    return x
  height, width, channels = x.shape[1], x.shape[2], x.shape[3]
  if (height is None or width is None or channels is None
      or height % stride or width % stride):
    return x[:, ::stride, ::stride, :]
  blocks = tf.reshape(x, [-1, height // stride, stride, width // stride,
                          stride * channels])
  first = tf.slice(blocks, [0, 0, 0, 0, 0], [-1, -1, 1, -1, channels])
  return tf.reshape(first, [-1, height // stride, width // stride, channels])


class Pool(Op):
  """3x3 max or average pooling with one pixel of padding, optional BN.

  Pooling is computed at stride 1 with "same" padding and then subsampled.
  At stride 1, TensorFlow's "same" padding is the symmetric one-pixel
  padding, ignored by max and not counted by average. Subsampling keeps the
  windows centred on even pixels, as PyTorch's stride-2 pools with padding 1
  do.
  """

  def __init__(self, kind, channels, stride=1, batch_norm=True, affine=False,
               **kwargs):
    super().__init__(**kwargs)
    if kind not in ("max", "avg"):
      raise ValueError(f"Unknown pooling {kind!r}; use 'max' or 'avg'.")
    self.kind = kind
    self.stride = stride
    self.bn = (BatchNorm(channels, affine=affine, name="bn")
               if batch_norm else None)
    self._finish_build()

  def call(self, x, training=None):
    pool = tf.nn.max_pool2d if self.kind == "max" else tf.nn.avg_pool2d
    y = subsample(pool(x, 3, 1, "SAME"), self.stride)
    if self.bn is not None:
      y = self.bn(y, training=training)
    return y


class Identity(Op):

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._finish_build()

  def call(self, x, training=None):
    return x


# Operator factories. Each takes (channels, stride, num_edges, affine,
# pool_batch_norm, name) and returns a layer. Non-parametric operators take
# the node output [b, h, w, channels]. They return either an output shared
# by all edges (same channel count) or an edge-major one. Parametric
# operators take the edge-major activation mixture
# [b, h, w, num_edges * channels].


def none_factory(channels, stride=1, num_edges=1, affine=False,
                 pool_batch_norm=True, name=None):
  """`none` outputs zeros; mixed operations skip it, so it has no layer."""
  return None


def max_pool_factory(channels, stride=1, num_edges=1, affine=False,
                     pool_batch_norm=True, name=None):
  return Pool("max", channels, stride, pool_batch_norm, affine, name=name)


def avg_pool_factory(channels, stride=1, num_edges=1, affine=False,
                     pool_batch_norm=True, name=None):
  return Pool("avg", channels, stride, pool_batch_norm, affine, name=name)


def skip_connect_factory(channels, stride=1, num_edges=1, affine=False,
                         pool_batch_norm=True, name=None):
  if stride == 1:
    return Identity(name=name)
  return FactorizedReduce(channels, channels, affine, num_edges, name=name)


def _sep_conv_factory(kernel_size):

  def factory(channels, stride=1, num_edges=1, affine=False,
              pool_batch_norm=True, name=None):
    return SepConv(channels, kernel_size, stride, affine, num_edges,
                   name=name)

  return factory


def _dil_conv_factory(kernel_size):

  def factory(channels, stride=1, num_edges=1, affine=False,
              pool_batch_norm=True, name=None):
    return DilConv(channels, kernel_size, stride, 2, affine, num_edges,
                   name=name)

  return factory


# (name, factory, parametric, zero) in the DARTS order. `parametric` marks
# the operators that take the searched activation; `zero` marks `none`.
OPERATOR_FACTORIES = (
    ("none", none_factory, False, True),
    ("max_pool_3x3", max_pool_factory, False, False),
    ("avg_pool_3x3", avg_pool_factory, False, False),
    ("skip_connect", skip_connect_factory, False, False),
    ("sep_conv_3x3", _sep_conv_factory(3), True, False),
    ("sep_conv_5x5", _sep_conv_factory(5), True, False),
    ("dil_conv_3x3", _dil_conv_factory(3), True, False),
    ("dil_conv_5x5", _dil_conv_factory(5), True, False),
)


class ConvBN(Op):
  """k x k convolution with symmetric padding, then batch norm; the stems."""

  def __init__(self, in_channels, out_channels, kernel_size=3, stride=1,
               affine=True, relu_before=False, **kwargs):
    super().__init__(**kwargs)
    self.stride = stride
    self.padding = (kernel_size - 1) // 2
    self.relu_before = relu_before
    self.kernel = self.add_weight(
        name="kernel", shape=(kernel_size, kernel_size, in_channels,
                              out_channels),
        initializer=_uniform_init(kernel_size * kernel_size * in_channels))
    self.bn = BatchNorm(out_channels, affine=affine, name="bn")
    self._finish_build()

  def call(self, x, training=None):
    if self.relu_before:
      x = tf.nn.relu(x)
    x = tf.nn.conv2d(x, self.kernel.value, self.stride,
                     conv_padding(self.kernel.shape[0], self.stride))
    return self.bn(x, training=training)


class Classifier(Op):
  """Global average pooling and a linear layer with bias (the logits)."""

  def __init__(self, in_channels, num_classes, **kwargs):
    super().__init__(**kwargs)
    init = _uniform_init(in_channels)
    self.kernel = self.add_weight(name="kernel",
                                  shape=(in_channels, num_classes),
                                  initializer=init)
    self.bias = self.add_weight(name="bias", shape=(num_classes,),
                                initializer=init)
    self._finish_build()

  def call(self, x):
    pooled = tf.reduce_mean(x, axis=[1, 2])
    logits = tf.matmul(pooled, self.kernel.value) + self.bias.value
    # Logits in float32, also under mixed precision, for a stable loss.
    return tf.cast(logits, tf.float32)

"""Activations, DARTS operations and mixed operations against their
definitions."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from tf_adarts import activations
from tf_adarts import mixed_ops
from tf_adarts import operations
from tf_adarts import search_space

ATOL = 1e-5


def _input(shape=(2, 8, 8, 4), seed=0):
  return tf.constant(np.random.default_rng(seed).normal(size=shape),
                     tf.float32)


def _activation(name, channels=4, num_edges=1):
  space = search_space.factorized_space()
  return space.activations.get(name).factory(channels, num_edges)


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


# Activations.


def test_leaky_relu_slope_is_pytorch_default():
  y = _activation("leaky_relu")(tf.constant([[[[-1.0, 2.0, -3.0, 0.5]]]]))
  np.testing.assert_allclose(y.numpy().ravel(), [-0.01, 2.0, -0.03, 0.5])


def test_prelu_slope_per_channel_and_edge():
  layer = _activation("prelu", channels=4, num_edges=3)
  assert tuple(layer.slope.shape) == (3, 4)
  np.testing.assert_allclose(layer.slope.numpy(), 0.25)


def test_prelu_output_per_edge():
  layer = _activation("prelu", channels=4, num_edges=2)
  layer.slope.assign([[0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]])
  x = _input()
  y = layer(x).numpy()
  xn = x.numpy()
  np.testing.assert_allclose(
      y[..., :4], np.where(xn > 0, xn, xn * [0.1, 0.2, 0.3, 0.4]), atol=ATOL)
  np.testing.assert_allclose(y[..., 4:], xn, atol=ATOL)


def test_rrelu_inference_uses_mean_slope():
  y = _activation("rrelu")(tf.constant([[[[-1.0, 2.0, -3.0, 0.5]]]]),
                           training=False)
  slope = (1 / 8 + 1 / 3) / 2
  np.testing.assert_allclose(y.numpy().ravel(),
                             [-slope, 2.0, -3 * slope, 0.5], rtol=1e-6)


def test_rrelu_training_slopes_in_range():
  x = -tf.ones([4, 8, 8, 4])
  y = _activation("rrelu", num_edges=2)(x, training=True).numpy()
  slopes = -y
  assert y.shape == (4, 8, 8, 8)
  assert slopes.min() >= 1 / 8
  assert slopes.max() <= 1 / 3
  assert np.unique(slopes).size > 100


def test_swish_scale_is_learnable_scalar():
  layer = _activation("swish", num_edges=3)
  assert tuple(layer.scale.shape) == (3, 1)
  assert [w.name for w in layer.trainable_weights] == ["scale"]
  x = _input()
  layer.scale.assign([[1.0], [2.0], [0.5]])
  y = layer(x).numpy()
  xn = x.numpy()
  for e, b in enumerate([1.0, 2.0, 0.5]):
    np.testing.assert_allclose(y[..., 4 * e:4 * e + 4],
                               xn / (1 + np.exp(-b * xn)), atol=ATOL)


def test_celu_alpha_configurable():
  x = tf.constant([-1.0, 1.0])
  np.testing.assert_allclose(activations.celu(x, alpha=2.0).numpy(),
                             [2 * (np.exp(-0.5) - 1), 1.0], rtol=1e-6)


def test_selu_standard_constants():
  y = _activation("selu")(tf.constant([[[[-1.0, 1.0, 0.0, 2.0]]]])).numpy()
  scale, alpha = 1.0507009873554805, 1.6732632423543772
  np.testing.assert_allclose(
      y.ravel(), [scale * alpha * (np.exp(-1) - 1), scale, 0.0, 2 * scale],
      rtol=1e-6)


# Operations.


def _numpy_pool(x, kind, stride):
  """3x3 pooling with one pixel of padding, PyTorch's semantics."""
  n, h, w, c = x.shape
  out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
  y = np.zeros((n, out_h, out_w, c), np.float32)
  for i in range(out_h):
    for j in range(out_w):
      r0, c0 = i * stride - 1, j * stride - 1
      window = x[:, max(r0, 0):r0 + 3, max(c0, 0):c0 + 3, :]
      y[:, i, j] = (window.max(axis=(1, 2)) if kind == "max"
                    else window.mean(axis=(1, 2)))
  return y


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("stride,size", [(1, 8), (2, 8), (2, 7)])
def test_pool_matches_pytorch_padding(kind, stride, size):
  x = _input((2, size, size, 3))
  layer = operations.Pool(kind, 3, stride, batch_norm=False)
  np.testing.assert_allclose(layer(x).numpy(),
                             _numpy_pool(x.numpy(), kind, stride), atol=ATOL)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_dilated_stride_two_equals_subsampled(kernel_size):
  x = _input((2, 8, 8, 3))
  kernel = _input((kernel_size, kernel_size, 3, 1), seed=1)
  strided = operations.depthwise_conv(x, kernel, stride=2, dilation=2)
  full = operations.depthwise_conv(x, kernel, stride=1, dilation=2)
  np.testing.assert_allclose(strided.numpy(), full.numpy()[:, ::2, ::2],
                             atol=ATOL)


def test_stride_two_padding_symmetric():
  # A 3x3 kernel that picks the top-left tap reads pixel (2i - 1, 2j - 1),
  # as PyTorch's padding of one pixel on each side does.
  x = _input((1, 8, 8, 1))
  kernel = np.zeros((3, 3, 1, 1), np.float32)
  kernel[0, 0] = 1.0
  y = operations.depthwise_conv(x, tf.constant(kernel), stride=2).numpy()
  padded = np.pad(x.numpy(), ((0, 0), (1, 1), (1, 1), (0, 0)))
  np.testing.assert_allclose(y, padded[:, 0:8:2, 0:8:2], atol=ATOL)


def test_batch_norm_running_statistics():
  layer = operations.BatchNorm(3, affine=False)
  x = _input((4, 5, 5, 3)) * 2.0 + 1.0
  y = layer(x, training=True).numpy()
  xn = x.numpy().reshape(-1, 3)
  expected = (x.numpy() - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5)
  np.testing.assert_allclose(y, expected, atol=1e-4)
  np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * xn.mean(0),
                             atol=1e-5)
  np.testing.assert_allclose(layer.moving_variance.numpy(),
                             0.9 + 0.1 * xn.var(0, ddof=1), atol=1e-4)


def test_search_batch_norm_has_no_weights():
  assert not operations.BatchNorm(4, affine=False).trainable_weights


def test_none_is_stride_aware_zero():
  space = search_space.factorized_space()
  assert space.operators.get("none").zero
  layer = mixed_ops.MixedOp(space.without_operators(
      *space.operators.names[1:]), 4, stride=2)
  assert not layer.operator_layers


def test_factorized_reduce_halves_resolution():
  layer = operations.FactorizedReduce(4, 6)
  assert layer(_input((2, 8, 8, 4))).shape == (2, 4, 4, 6)


@pytest.mark.parametrize("num_edges", [1, 2])
def test_factorized_reduce_reads_both_pixel_offsets(num_edges):
  layer = operations.FactorizedReduce(4, 6, num_edges=num_edges)
  x = _input((2, 8, 8, 4))
  relu = np.maximum(x.numpy(), 0.0)
  first = relu[:, 0::2, 0::2] @ layer.kernel_1.numpy()[0, 0]
  second = relu[:, 1::2, 1::2] @ layer.kernel_2.numpy()[0, 0]
  halves = [np.split(half, num_edges, axis=-1) for half in (first, second)]
  expected = np.concatenate(
      [np.concatenate([a, b], axis=-1) for a, b in zip(*halves)], axis=-1)
  # Fresh running statistics: mean 0, variance 1.
  expected /= np.sqrt(1.0 + operations.BN_EPSILON)
  np.testing.assert_allclose(layer(x, training=False).numpy(), expected,
                             atol=ATOL)


@pytest.mark.parametrize("size", [8, 7])
def test_subsample_equals_strided_slice(size):
  x = _input((2, size, size, 3))
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    fast = operations.subsample(x, 2)
    reference = x[:, ::2, ::2, :]
  np.testing.assert_array_equal(fast.numpy(), reference.numpy())
  upstream = _input(reference.shape, seed=1)
  np.testing.assert_array_equal(
      tape.gradient(fast, x, output_gradients=upstream).numpy(),
      tape.gradient(reference, x, output_gradients=upstream).numpy())


# Mixed operations.


def _deterministic_factorized_space():
  # RReLU draws random slopes in training; everything else is deterministic.
  return search_space.factorized_space().without_activations("rrelu")


def _random_weights(space, num_edges, seed=0):
  rng = np.random.default_rng(seed)
  a = _softmax(rng.normal(size=(num_edges, space.num_alpha_columns)))
  b = (_softmax(rng.normal(size=(num_edges, space.num_beta_columns)))
       if space.has_beta else None)
  to_tensor = lambda v: None if v is None else tf.constant(v, tf.float32)
  return to_tensor(a), to_tensor(b)


@pytest.mark.parametrize("stride", [1, 2])
def test_factorized_edge_equals_formula(stride):
  space = search_space.factorized_space()
  layer = mixed_ops.MixedOp(space, 4, stride=stride, num_edges=1)
  x = _input()
  a, b = _random_weights(space, 1)
  y = layer(x, a, b, training=False)[:, :, :, 0].numpy()

  acts = [act(x, training=False) for act in layer.activation_layers]
  sigma = sum(b[0, k] * acts[k] for k in range(len(acts)))
  expected = 0.0
  for op_layer, candidate in zip(layer.operator_layers,
                                 layer._operator_candidates):
    column = space.operators.index(candidate.name)
    source = sigma if candidate.parametric else x
    expected += a[0, column] * op_layer(source, training=False)
  np.testing.assert_allclose(y, expected.numpy(), atol=ATOL)


def _counting_space(space, counts):
  """The space with every activation wrapped to count its calls."""

  def wrap(candidate):

    def factory(channels, num_edges=1, name=None):
      layer = candidate.factory(channels, num_edges, name=name)
      call = layer.call

      def counted(*args, **kwargs):
        counts[candidate.name] = counts.get(candidate.name, 0) + 1
        return call(*args, **kwargs)

      layer.call = counted
      return layer

    return dataclasses.replace(candidate, factory=factory)

  group = dataclasses.replace(
      space.activations, candidates=tuple(wrap(c) for c in space.activations))
  return dataclasses.replace(space, activations=group)


@pytest.mark.parametrize("num_edges", [1, 4])
def test_each_activation_runs_once_per_edge_group(num_edges):
  counts = {}
  space = _counting_space(search_space.factorized_space(), counts)
  layer = mixed_ops.MixedOp(space, 4, num_edges=num_edges)
  a, b = _random_weights(space, num_edges)
  layer(_input(), a, b, training=True)
  assert counts == {name: 1 for name in space.activations.names}


def test_non_factorized_edge_has_40_candidates():
  space = search_space.non_factorized_space()
  layer = mixed_ops.MixedOp(space, 4, num_edges=1)
  assert space.num_alpha_columns == 40
  assert len(layer.activation_layers) == 9
  assert sum(len(c) for c in layer._operator_columns) == 40 - 1


def _copy_block(source_weights, target_layer, block, num_blocks):
  """Copy channel block `block` of an edge-batched layer's weights into a
  single-edge layer with the same structure."""
  for src, dst in zip(source_weights, target_layer.weights):
    value = src.numpy()
    axis = {4: 2 if value.shape[-1] == 1 else 3, 2: 0, 1: 0}[value.ndim]
    if value.shape != tuple(dst.shape):
      value = np.split(value, num_blocks, axis=axis)[block]
    dst.assign(value)


def test_non_factorized_edge_equals_formula():
  space = search_space.non_factorized_space().without_activations("rrelu")
  layer = mixed_ops.MixedOp(space, 4, num_edges=1)
  x = _input()
  a, _ = _random_weights(space, 1)
  y = layer(x, a, training=True)[:, :, :, 0].numpy()

  num_acts = len(space.activations)
  acts = [act(x, training=True) for act in layer.activation_layers]
  expected = 0.0
  for op_layer, candidate in zip(layer.operator_layers,
                                 layer._operator_candidates):
    if not candidate.parametric:
      column = space.alpha_candidates.index((candidate.name, None))
      expected += a[0, column] * op_layer(x, training=True)
      continue
    for k, act_name in enumerate(space.activations.names):
      single = space.operators.get(candidate.name).factory(4, 1)
      _copy_block(op_layer.weights, single, k, num_acts)
      column = 4 + num_acts * space.parametric_operators.index(
          candidate.name) + k
      assert space.alpha_candidates[column] == (candidate.name, act_name)
      expected += a[0, column] * single(acts[k], training=True)
  np.testing.assert_allclose(y, expected.numpy(), atol=ATOL)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("partial_channels", [1, 2])
def test_batched_edges_equal_single_edges(stride, partial_channels):
  space = _deterministic_factorized_space()
  num_edges = 3
  batched = mixed_ops.MixedOp(space, 8, stride, num_edges,
                              partial_channels=partial_channels)
  x = _input((2, 8, 8, 8))
  a, b = _random_weights(space, num_edges)
  y = batched(x, a, b, training=True).numpy()

  for e in range(num_edges):
    single = mixed_ops.MixedOp(space, 8, stride, 1,
                               partial_channels=partial_channels)
    for src, dst in zip(batched.operator_layers + batched.activation_layers,
                        single.operator_layers + single.activation_layers):
      _copy_block(src.weights, dst, e, num_edges)
    y_single = single(x, a[e:e + 1], b[e:e + 1], training=True).numpy()
    np.testing.assert_allclose(y[:, :, :, e], y_single[:, :, :, 0],
                               atol=1e-4)


def test_partial_channels_bypass_and_shuffle():
  space = search_space.factorized_space().without_operators(
      *search_space.factorized_space().operators.names[1:])
  layer = mixed_ops.MixedOp(space, 8, stride=1, num_edges=2,
                            partial_channels=4)
  x = _input((1, 4, 4, 8))
  a = tf.ones([2, 1])
  b = tf.ones([2, len(space.activations)]) / len(space.activations)
  y = layer(x, a, b).numpy()
  # With only `none`, the searched quarter is zero and the bypassed channels
  # 2..7 land at shuffled positions: channel g * 2 + i goes to i * 4 + g.
  xn = x.numpy()
  for e in range(2):
    for g in range(4):
      for i in range(2):
        expected = 0.0 if g == 0 else xn[..., g * 2 + i]
        np.testing.assert_allclose(y[:, :, :, e, i * 4 + g], expected)


def test_fixed_space_runs_one_activation():
  space = search_space.get_space("fixed:elu")
  layer = mixed_ops.MixedOp(space, 4, num_edges=2)
  assert [l.name for l in layer.activation_layers] == ["act_elu"]
  a, _ = _random_weights(space, 2)
  assert layer(_input(), a).shape == (2, 8, 8, 2, 4)


@pytest.mark.parametrize("block_edges", [3, 1])
def test_weight_edges_gradients_match_broadcast_product(block_edges):
  blocks = _input((2, 4, 4, block_edges, 5))
  weights = tf.constant([[0.2], [0.5], [0.3]])
  upstream = _input((2, 4, 4, 3, 5), seed=1)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([blocks, weights])
    fast = mixed_ops.weight_edges(blocks, weights)
    reference = blocks * weights
  np.testing.assert_allclose(fast.numpy(), reference.numpy(), atol=ATOL)
  fast_gradients = tape.gradient(fast, [blocks, weights],
                                 output_gradients=upstream)
  reference_gradients = tape.gradient(reference, [blocks, weights],
                                      output_gradients=upstream)
  for fast_gradient, reference_gradient in zip(fast_gradients,
                                               reference_gradients):
    np.testing.assert_allclose(fast_gradient.numpy(),
                               reference_gradient.numpy(), atol=1e-4)

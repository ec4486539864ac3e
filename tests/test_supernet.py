"""The search network: architecture variables, shapes, gradient coverage."""

import numpy as np
import pytest
import tensorflow as tf

from tf_adarts import search_space
from tf_adarts import supernet


def _network(space_name="factorized", **kwargs):
  kwargs.setdefault("channels", 4)
  kwargs.setdefault("layers", 3)
  return supernet.SearchNetwork(10, search_space.get_space(space_name),
                                **kwargs)


def _arch_size(network):
  return sum(int(np.prod(v.shape)) for v in network.arch_variables.values())


def test_factorized_arch_parameter_count():
  assert _arch_size(_network()) == 2 * 14 * 8 + 2 * 14 * 9


def test_non_factorized_arch_parameter_count():
  assert _arch_size(_network("non_factorized")) == 2 * 14 * 40


def test_edge_normalization_adds_28():
  plain = _arch_size(_network())
  assert _arch_size(_network(edge_normalization=True)) == plain + 2 * 14


def test_fixed_space_has_no_beta_variables():
  network = _network("fixed:relu")
  assert network.beta_variables == []
  assert list(network.arch_variables) == ["alpha_normal", "alpha_reduce"]


def test_arch_variables_named_groups():
  network = _network(edge_normalization=True)
  names = lambda vs: [v.name for v in vs]
  assert names(network.alpha_variables) == [
      "alpha_normal", "alpha_reduce", "edge_weights_normal",
      "edge_weights_reduce"]
  assert names(network.beta_variables) == ["beta_normal", "beta_reduce"]
  assert network.arch_variable("beta_reduce") is network.beta_variables[1]


def test_weight_group_excludes_arch_variables():
  network = _network()
  arch = {id(v) for v in network.arch_variables.values()}
  weights = network.weight_variables
  assert not arch & {id(v) for v in weights}
  assert len(weights) + len(arch) == len(network.trainable_variables)


def test_unknown_arch_variable_named_in_error():
  with pytest.raises(KeyError, match="beta_normal"):
    _network("fixed:relu").arch_variable("beta_normal")


def test_arch_initialised_small_normal():
  values = np.concatenate([
      v.numpy().ravel()
      for v in _network("non_factorized").arch_variables.values()])
  assert 0.7e-3 < values.std() < 1.3e-3
  assert abs(values.mean()) < 2e-4


def test_reduction_cells_at_thirds():
  network = _network(layers=8)
  assert [c.reduction for c in network.cells] == [
      False, False, True, False, False, True, False, False]


def test_cifar_output_shape():
  network = _network()
  assert network(tf.zeros([2, 32, 32, 3])).shape == (2, 10)


def test_imagenet_stem_output_shape():
  network = _network(stem="imagenet", channels=8)
  assert network(tf.zeros([2, 64, 64, 3]), training=True).shape == (2, 10)


def test_unknown_stem_rejected():
  with pytest.raises(ValueError, match="'tiny'"):
    _network(stem="tiny")


def test_partial_channels_must_divide_width():
  with pytest.raises(ValueError, match="divisible"):
    _network(channels=6, partial_channels=4)


def _gradients(network, variables, seed=0):
  rng = np.random.default_rng(seed)
  images = tf.constant(rng.normal(size=(8, 16, 16, 3)), tf.float32)
  labels = tf.constant(rng.integers(0, 10, size=8), tf.int32)
  with tf.GradientTape() as tape:
    logits = network(images, training=True)
    loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True))
  return tape.gradient(loss, variables)


@pytest.fixture(scope="module")
def pc_network():
  return _network(partial_channels=2, edge_normalization=True)


def test_loss_reaches_every_weight(pc_network):
  variables = pc_network.weight_variables
  gradients = _gradients(pc_network, variables)
  unreached = [v.path for v, g in zip(variables, gradients)
               if g is None or not np.any(g.numpy())]
  assert unreached == []


def test_loss_reaches_every_arch_entry(pc_network):
  variables = pc_network.alpha_variables + pc_network.beta_variables
  gradients = _gradients(pc_network, variables)
  for variable, gradient in zip(variables, gradients):
    assert gradient is not None, variable.name
    zero_entries = int(np.sum(gradient.numpy() == 0))
    assert zero_entries == 0, f"{variable.name}: {zero_entries} zero entries"

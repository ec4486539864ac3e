"""Short searches through keras.Model.fit: real CIFAR-10 images, and a space
with a tenth activation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import load_cifar10_images
from tf_adarts import activations
from tf_adarts import genotype as genotype_lib
from tf_adarts import search_space
from tf_adarts import supernet
from tf_adarts import trainer

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def _pair_dataset(images, labels, batch_size):
  half = len(images) // 2
  split = lambda lo, hi: tf.data.Dataset.from_tensor_slices(
      (images[lo:hi], labels[lo:hi])).batch(batch_size, drop_remainder=True)
  return tf.data.Dataset.zip((split(0, half), split(half, 2 * half)))


def _arch_snapshot(network):
  return {name: value.copy() for name, value in network.arch_numpy().items()}


@pytest.mark.slow
def test_search_on_real_cifar10():
  images, labels = load_cifar10_images("train", count=512)
  images = (images - CIFAR10_MEAN) / CIFAR10_STD
  keras.utils.set_random_seed(0)
  network = supernet.SearchNetwork(10, channels=8, layers=5)
  model = trainer.SearchModel(network)
  model.compile(*trainer.cifar_search_optimizers(steps_per_epoch=8,
                                                 epochs=1))
  before = _arch_snapshot(network)

  history = model.fit(_pair_dataset(images, labels, 32), epochs=1, verbose=0)

  after = _arch_snapshot(network)
  for name in ("alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce"):
    assert not np.array_equal(before[name], after[name]), name
  assert np.isfinite(history.history["loss"][-1])
  assert np.isfinite(history.history["arch_loss"][-1])

  genotype = model.genotype()
  genotype.validate()
  assert genotype_lib.Genotype.from_json(genotype.to_json()) == genotype
  activations_used = {e.activation for e in genotype.normal + genotype.reduce
                      if e.activation is not None}
  assert activations_used <= set(network.space.activations.names)


@pytest.mark.slow
def test_search_with_tenth_activation():
  space = search_space.factorized_space().with_activation(
      "softplus", activations.elementwise(tf.nn.softplus))
  network = supernet.SearchNetwork(10, space, channels=4, layers=3)
  assert tuple(network.arch_variable("beta_normal").shape) == (14, 10)
  model = trainer.SearchModel(network)
  model.compile()

  # Make softplus the strongest activation everywhere, then check the search
  # runs with it and the genotype carries it.
  for name in ("beta_normal", "beta_reduce"):
    value = np.zeros((14, 10), np.float32)
    value[:, 9] = 5.0
    network.arch_variable(name).assign(value)
  before = _arch_snapshot(network)

  rng = np.random.default_rng(0)
  images = rng.normal(size=(64, 16, 16, 3)).astype(np.float32)
  labels = rng.integers(0, 10, size=64).astype(np.int32)
  model.fit(_pair_dataset(images, labels, 8), epochs=1, verbose=0)

  after = _arch_snapshot(network)
  assert not np.array_equal(before["beta_normal"], after["beta_normal"])
  genotype = model.genotype()
  genotype.validate(space)
  parametric = [e for e in genotype.normal + genotype.reduce
                if e.activation is not None]
  assert parametric
  assert {e.activation for e in parametric} == {"softplus"}

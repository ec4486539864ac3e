"""Tests of tf_adarts.networks and tf_adarts.flops: the retraining networks."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from tf_adarts import activations
from tf_adarts import flops
from tf_adarts import genotype as genotype_lib
from tf_adarts import networks
from tf_adarts import operations
from tf_adarts import search_space

# Exact trainable weights of every published genotype, auxiliary head
# excluded, as DARTS's count_parameters_in_MB counts them: CIFAR-10 with
# 36 channels and 20 cells, ImageNet with 48 channels, 14 cells and 1,000
# classes. DARTS_V2 on CIFAR-10 is the 3.349342 MB that the DARTS code logs,
# and on ImageNet the 4.718752 MB of its ImageNet model.
PARAM_COUNTS = {
    "DARTS_V1": {"cifar10": 3_169_414, "imagenet": 4_510_432},
    "DARTS_V2": {"cifar10": 3_349_342, "imagenet": 4_718_752},
    "PC_DARTS_cifar": {"cifar10": 3_634_678, "imagenet": 5_270_560},
    "PC_DARTS_image": {"cifar10": 3_721_510, "imagenet": 5_342_464},
    "PDARTS": {"cifar10": 3_433_798, "imagenet": 4_944_352},
}

# Multiply-adds of the same networks (flops.count_flops), at 32x32 and
# 224x224. They pin the counting convention, which is not the papers'.
FLOP_COUNTS = {
    "DARTS_V1": {"cifar10": 500_987_520, "imagenet": 505_864_704},
    "DARTS_V2": {"cifar10": 528_359_040, "imagenet": 529_911_552},
    "PC_DARTS_cifar": {"cifar10": 556_670_592, "imagenet": 571_137_408},
    "PC_DARTS_image": {"cifar10": 570_466_944, "imagenet": 581_627_328},
    "PDARTS": {"cifar10": 532_174_464, "imagenet": 542_819_328},
}

IMAGE_SIZES = {"cifar10": 32, "imagenet": 224}


@functools.lru_cache(maxsize=None)
def published_network(name, dataset):
  """Build a published genotype's full-size network once per test session."""
  if dataset == "cifar10":
    return networks.NetworkCIFAR(name, num_classes=10, channels=36, layers=20)
  return networks.NetworkImageNet(name, num_classes=1000, channels=48,
                                  layers=14)


def small_cifar(genotype="DARTS_V2", **kwargs):
  arguments = dict(channels=8, layers=5)
  arguments.update(kwargs)
  return networks.NetworkCIFAR(genotype, **arguments)


def traced_macs(network, image_size):
  """Count multiply-adds by walking the ops of a traced inference call."""
  call = tf.function(lambda images: network(images, training=False))
  graph = call.get_concrete_function(
      tf.TensorSpec([1, image_size, image_size, 3], tf.float32)).graph
  macs = 0
  for op in graph.get_operations():
    if op.type in ("Conv2D", "DepthwiseConv2dNative"):
      output = op.outputs[0].shape
      kernel = op.inputs[1].shape
      macs += output[1] * output[2] * int(np.prod(kernel))
    elif op.type == "MatMul":
      rows, inner = op.inputs[0].shape
      macs += rows * inner * op.inputs[1].shape[1]
  return macs


# Parameter counts.


def test_darts_v2_cifar_param_count():
  network = published_network("DARTS_V2", "cifar10")
  assert networks.count_params(network) == 3_349_342


def test_cifar_auxiliary_head_param_count():
  network = published_network("DARTS_V2", "cifar10")
  # The head reads 4 * 144 = 576 channels: 1x1 conv to 128, BN, 2x2 conv
  # to 768, BN, linear to 10 classes with bias.
  head = 576 * 128 + 2 * 128 + 4 * 128 * 768 + 2 * 768 + 768 * 10 + 10
  total = networks.count_params(network, include_auxiliary=True)
  assert total - networks.count_params(network) == head


@pytest.mark.parametrize("name", sorted(genotype_lib.PUBLISHED))
@pytest.mark.parametrize("dataset", ["cifar10", "imagenet"])
def test_published_param_count(name, dataset):
  network = published_network(name, dataset)
  assert networks.count_params(network) == PARAM_COUNTS[name][dataset]


@pytest.mark.parametrize("name", sorted(genotype_lib.PUBLISHED))
@pytest.mark.parametrize("dataset", ["cifar10", "imagenet"])
def test_published_flop_count(name, dataset):
  network = published_network(name, dataset)
  count = flops.count_flops(network, IMAGE_SIZES[dataset])
  assert count == FLOP_COUNTS[name][dataset]


def test_every_published_genotype_counted():
  missing = set(genotype_lib.PUBLISHED) - set(PARAM_COUNTS)
  assert not missing, f"Add {sorted(missing)} to PARAM_COUNTS."
  missing = set(genotype_lib.PUBLISHED) - set(FLOP_COUNTS)
  assert not missing, f"Add {sorted(missing)} to FLOP_COUNTS."


def test_count_params_skips_statistics():
  network = small_cifar(auxiliary=False)
  trainable = sum(int(np.prod(w.shape)) for w in network.trainable_weights)
  assert networks.count_params(network) == trainable
  trainable_ids = {id(w) for w in network.trainable_weights}
  assert id(network.drop_path_rate) not in trainable_ids


# FLOPs.


def test_flops_counted_by_hand():
  # One reduction cell (channels 4, doubled to 8) on 8x8 images. The DARTS_V2
  # reduction cell has only pools and identities, so the stem, the two 1x1
  # preprocessing convolutions and the classifier are all that count.
  network = networks.NetworkCIFAR("DARTS_V2", channels=4, layers=1,
                                  auxiliary=False)
  stem = 8 * 8 * 3 * 3 * 3 * 12
  preprocess = 2 * 8 * 8 * 12 * 8
  classifier = 32 * 10
  assert flops.count_flops(network, 8) == stem + preprocess + classifier


def test_sep_conv_flops_by_hand():
  reduce = [("sep_conv_3x3", 0), ("max_pool_3x3", 1),
            ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2),
            ("skip_connect", 2), ("max_pool_3x3", 1)]
  genotype = genotype_lib.Genotype.from_pairs(
      [(e.op, e.input) for e in genotype_lib.DARTS_V2.normal], reduce)
  network = networks.NetworkCIFAR(genotype, channels=4, layers=1,
                                  auxiliary=False)
  # Stride 2 on 8x8 gives 4x4 = 16 positions, two depthwise 3x3 and two
  # pointwise 8 -> 8 convolutions.
  sep_conv = 2 * (16 * 9 * 8 + 16 * 8 * 8)
  others = 8 * 8 * 3 * 3 * 3 * 12 + 2 * 8 * 8 * 12 * 8 + 32 * 10
  assert flops.count_flops(network, 8) == others + sep_conv


@pytest.mark.parametrize("name", ["PDARTS", "PC_DARTS_image"])
def test_cifar_flops_match_traced_graph(name):
  network = small_cifar(name, auxiliary=False)
  assert flops.count_flops(network, 32) == traced_macs(network, 32)


def test_imagenet_flops_match_traced_graph():
  network = networks.NetworkImageNet("PC_DARTS_image", channels=8, layers=5,
                                     auxiliary=False)
  assert flops.count_flops(network, 224) == traced_macs(network, 224)


def test_max_flops_rule():
  settings = dict(network_class=networks.NetworkCIFAR, image_size=16,
                  layers=3)
  channels = flops.channels_for_max_flops("DARTS_V2", 2.0, **settings)

  def count(c):
    network = networks.NetworkCIFAR("DARTS_V2", channels=c, layers=3,
                                    auxiliary=False)
    return flops.count_flops(network, 16)

  assert channels % 2 == 0
  assert count(channels) <= 2_000_000
  assert count(channels + 2) > 2_000_000


def test_max_flops_too_small_raises():
  with pytest.raises(ValueError, match="over the budget"):
    flops.channels_for_max_flops("DARTS_V2", 0.001,
                                 network_class=networks.NetworkCIFAR,
                                 image_size=16, layers=3)


# Drop path.


def test_drop_path_off_at_rate_zero():
  x = tf.random.normal([8, 4, 4, 3])
  y = networks.drop_path(x, tf.constant(0.0), seed=tf.constant([1, 2]))
  np.testing.assert_array_equal(y.numpy(), x.numpy())


def test_drop_path_zeroes_whole_examples():
  x = tf.ones([64, 2, 2, 3])
  y = networks.drop_path(x, tf.constant(0.5), seed=tf.constant([3, 4]))
  per_example = np.unique(y.numpy().reshape(64, -1), axis=1)
  assert per_example.shape[1] == 1
  assert set(np.unique(per_example)) == {0.0, 2.0}


def test_network_drop_path_off_at_rate_zero():
  network = small_cifar(auxiliary=False)
  x = tf.random.normal([4, 32, 32, 3], seed=0)
  first = network(x, training=True, seed=tf.constant([0, 1]))
  second = network(x, training=True, seed=tf.constant([5, 6]))
  np.testing.assert_array_equal(first.numpy(), second.numpy())


def test_network_drop_path_active_in_training():
  network = small_cifar(auxiliary=False, drop_path_rate=0.5)
  x = tf.random.normal([4, 32, 32, 3], seed=0)
  first = network(x, training=True, seed=tf.constant([0, 1]))
  second = network(x, training=True, seed=tf.constant([5, 6]))
  assert not np.allclose(first.numpy(), second.numpy())


def test_rate_change_reaches_traced_call():
  network = small_cifar(auxiliary=False)
  call = tf.function(
      lambda images, seed: network(images, training=True, seed=seed))
  x = tf.random.normal([4, 32, 32, 3], seed=0)
  seeds = (tf.constant([0, 1]), tf.constant([5, 6]))
  at_zero = [call(x, seed).numpy() for seed in seeds]
  network.set_drop_path_rate(0.9)
  at_high = [call(x, seed).numpy() for seed in seeds]
  np.testing.assert_array_equal(at_zero[0], at_zero[1])
  assert not np.allclose(at_high[0], at_high[1])
  assert call.experimental_get_tracing_count() == 1


def test_drop_path_seed_reproducible():
  network = small_cifar(auxiliary=False, drop_path_rate=0.5)
  x = tf.random.normal([4, 32, 32, 3], seed=0)
  first = network(x, training=True, seed=tf.constant([7, 8]))
  second = network(x, training=True, seed=tf.constant([7, 8]))
  np.testing.assert_array_equal(first.numpy(), second.numpy())


def test_drop_path_schedule_linear():
  rates = [networks.drop_path_schedule(0.2, epoch, 600)
           for epoch in (0, 150, 300, 450, 600)]
  np.testing.assert_allclose(rates, [0.0, 0.05, 0.1, 0.15, 0.2])


def test_drop_path_schedule_rejects_rate_one():
  with pytest.raises(ValueError, match="drop path rate"):
    networks.drop_path_schedule(1.0, 0, 10)


def test_drop_path_scheduler_sets_rate():
  network = small_cifar(auxiliary=False)
  scheduler = networks.DropPathScheduler(network, 0.4, epochs=10)
  scheduler.on_epoch_begin(5)
  assert float(network.drop_path_rate.numpy()) == pytest.approx(0.2)


def test_identity_edges_never_dropped():
  network = small_cifar(auxiliary=False)
  edges = [edge for cell in network.cells for edge in cell.edges]
  identity = [e for e in edges if isinstance(e.op, operations.Identity)]
  others = [e for e in edges if not isinstance(e.op, operations.Identity)]
  assert identity
  assert not any(edge.drops_path for edge in identity)
  assert all(edge.drops_path for edge in others)


def test_identity_edge_output_kept_at_high_rate():
  entry = genotype_lib.GenotypeEntry("skip_connect", None, 0)
  space = search_space.factorized_space()
  edge = networks.Edge(entry, 4, 1, space)
  x = tf.random.normal([32, 4, 4, 4])
  y = edge(x, training=True, drop_path_rate=tf.constant(0.9))
  np.testing.assert_array_equal(y.numpy(), x.numpy())


def test_no_drop_path_at_inference():
  network = small_cifar(auxiliary=False)
  x = tf.random.normal([4, 32, 32, 3], seed=0)
  without = network(x, training=False)
  network.set_drop_path_rate(0.9)
  with_rate = network(x, training=False)
  np.testing.assert_array_equal(with_rate.numpy(), without.numpy())


# Activations.


def mixed_activation_genotype():
  """DARTS_V2 with a different activation on each parametric edge."""
  names = ["selu", "prelu", "swish", "rrelu", "elu", "celu", "relu6",
           "leaky_relu"]
  cells = {}
  for cell in ("normal", "reduce"):
    entries = []
    for position, entry in enumerate(getattr(genotype_lib.DARTS_V2, cell)):
      if entry.activation is not None:
        entry = genotype_lib.GenotypeEntry(entry.op, names[position],
                                           entry.input)
      entries.append(entry)
    cells[cell] = entries
  return genotype_lib.Genotype(cells["normal"], (2, 3, 4, 5), cells["reduce"],
                               (2, 3, 4, 5))


def edge_activations(network):
  return [edge.activation_name for cell in network.cells
          for edge in cell.edges]


def test_searched_activations_used():
  genotype = mixed_activation_genotype()
  network = small_cifar(genotype, auxiliary=False)
  for cell in network.cells:
    entries = genotype.reduce if cell.reduction else genotype.normal
    assert ([edge.activation_name for edge in cell.edges]
            == [entry.activation for entry in entries])


def test_searched_prelu_is_prelu_layer():
  network = small_cifar(mixed_activation_genotype(), auxiliary=False)
  edge = network.cells[0].edges[1]
  assert isinstance(edge.activation, activations.PReLU)


def test_override_replaces_every_activation():
  network = small_cifar(mixed_activation_genotype(), auxiliary=False,
                        activation_override="elu")
  parametric = [name for name in edge_activations(network) if name]
  assert parametric
  assert set(parametric) == {"elu"}


def test_override_keeps_nonparametric_bare():
  network = small_cifar(auxiliary=False, activation_override="selu")
  for cell in network.cells:
    for edge in cell.edges:
      if edge.op_name in ("max_pool_3x3", "skip_connect"):
        assert edge.activation is None


def test_override_keeps_weight_shapes():
  plain = small_cifar(auxiliary=False)
  overridden = small_cifar(auxiliary=False, activation_override="selu")
  assert ([w.shape for w in overridden.weights]
          == [w.shape for w in plain.weights])


def test_unknown_override_raises():
  with pytest.raises(ValueError, match="activation_override"):
    small_cifar(auxiliary=False, activation_override="gelu")


def test_missing_activation_raises():
  genotype = genotype_lib.DARTS_V2.with_activation(None)
  with pytest.raises(ValueError, match="null on parametric"):
    small_cifar(genotype, auxiliary=False)


# Outputs.


def test_cifar_training_returns_auxiliary_logits():
  network = small_cifar()
  logits, aux_logits = network(tf.zeros([2, 32, 32, 3]), training=True)
  assert logits.shape == (2, 10)
  assert aux_logits.shape == (2, 10)
  assert aux_logits.dtype == tf.float32


def test_cifar_inference_returns_logits():
  network = small_cifar()
  logits = network(tf.zeros([2, 32, 32, 3]), training=False)
  assert logits.shape == (2, 10)
  assert logits.dtype == tf.float32


def test_imagenet_output_shape():
  network = networks.NetworkImageNet("DARTS_V2", channels=8, layers=5)
  logits, aux_logits = network(tf.zeros([1, 224, 224, 3]), training=True)
  assert logits.shape == (1, 1000)
  assert aux_logits.shape == (1, 1000)


def test_imagenet_auxiliary_head_has_no_second_bn():
  network = networks.NetworkImageNet("DARTS_V2", channels=8, layers=5)
  assert network.auxiliary_head.bn is None


def test_imagenet_odd_channels_raise():
  with pytest.raises(ValueError, match="even channel count"):
    networks.NetworkImageNet("DARTS_V2", channels=9, layers=5)


def test_every_weight_gets_gradient():
  network = small_cifar(mixed_activation_genotype(), drop_path_rate=0.2)
  with tf.GradientTape() as tape:
    logits, aux_logits = network(tf.random.normal([2, 32, 32, 3], seed=0),
                                 training=True, seed=tf.constant([1, 2]))
    loss = tf.reduce_sum(logits) + 0.4 * tf.reduce_sum(aux_logits)
  gradients = tape.gradient(loss, network.trainable_weights)
  missing = [w.path for w, g in zip(network.trainable_weights, gradients)
             if g is None]
  assert not missing

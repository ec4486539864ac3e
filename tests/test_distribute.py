"""Two replicas against one: the same global batches give the same result.

Two logical CPU devices stand in for two GPUs. The spaces and settings have
no random operators (no RReLU, no drop path), whose draws differ with the
replica count by design. Batch norm is synchronized, gradient clipping is
active (a small clip norm) and weight decay is on.
"""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import (REPO_ROOT, link_cifar10_subset, load_cifar10_images,
                      two_replica_strategy)
from tf_adarts import activations
from tf_adarts import distribute
from tf_adarts import genotype as genotype_lib
from tf_adarts import operations
from tf_adarts import presets
from tf_adarts import retrain
from tf_adarts import search
from tf_adarts import search_space
from tf_adarts import supernet
from tf_adarts import trainer

_GLOBAL_BATCH = 8
_STEPS = 5


def _batches(count, seed):
  images, labels = load_cifar10_images("train", count=count, seed=seed)
  return images, labels


def _search_model(strategy):
  with strategy.scope(), operations.synchronized_batch_norm():
    keras.utils.set_random_seed(0)
    network = supernet.SearchNetwork(
        10, search_space.get_space("fixed:relu"), channels=4, layers=2)
    model = trainer.SearchModel(network, clip_norm=0.01, weight_decay=3e-4,
                                seed=0)
    model.compile()
  return model


def _copy_variables(source, target):
  for a, b in zip(source, target):
    b.assign(a.numpy())


def _run_search_steps(model, strategy, train, val):
  dataset = tf.data.Dataset.from_tensor_slices((train, val)).batch(
      _GLOBAL_BATCH).take(_STEPS)
  if strategy.num_replicas_in_sync == 1:
    step = tf.function(model.train_step)
    for batch in dataset:
      step(batch)
    return

  @tf.function
  def distributed_step(batch):
    strategy.run(model.train_step, args=(batch,))

  for batch in strategy.experimental_distribute_dataset(dataset):
    distributed_step(batch)


@pytest.fixture(scope="module")
def search_pair():
  """One SearchModel trained on one device and one on two replicas."""
  images, labels = _batches(4 * _GLOBAL_BATCH * _STEPS // 2, seed=3)
  half = len(images) // 2
  train = (images[:half], labels[:half])
  val = (images[half:], labels[half:])

  single = _search_model(tf.distribute.get_strategy())
  strategy = two_replica_strategy()
  mirrored = _search_model(strategy)
  _copy_variables(single.network.variables, mirrored.network.variables)

  _run_search_steps(single, tf.distribute.get_strategy(), train, val)
  _run_search_steps(mirrored, strategy, train, val)
  return single, mirrored, strategy


@pytest.mark.slow
def test_search_two_replicas_match_one(search_pair):
  single, mirrored, _ = search_pair
  assert int(single.weight_optimizer.iterations.numpy()) == _STEPS
  assert int(mirrored.weight_optimizer.iterations.numpy()) == _STEPS
  for name, variable in single.network.arch_variables.items():
    np.testing.assert_allclose(
        mirrored.network.arch_variable(name).numpy(), variable.numpy(),
        atol=1e-5, err_msg=name)
  for a, b in zip(single.network.weight_variables,
                  mirrored.network.weight_variables):
    np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5,
                               err_msg=a.path)


@pytest.mark.slow
def test_search_alpha_moved(search_pair):
  # Guards the test above against comparing two untrained networks.
  single, _, _ = search_pair
  alpha = single.network.arch_variable("alpha_normal").numpy()
  assert np.max(np.abs(alpha - alpha.mean())) > 0


@pytest.mark.slow
def test_replica_alpha_copies_agree(search_pair):
  _, mirrored, strategy = search_pair
  for name, variable in mirrored.network.arch_variables.items():
    copies = strategy.experimental_local_results(variable.value)
    assert len(copies) == 2
    np.testing.assert_array_equal(copies[0].numpy(), copies[1].numpy(),
                                  err_msg=name)


@pytest.mark.slow
def test_synchronized_statistics_match(search_pair):
  single, mirrored, strategy = search_pair
  means = [v for v in single.network.variables if "moving_mean" in v.path]
  mirrored_means = [v for v in mirrored.network.variables
                    if "moving_mean" in v.path]
  assert means
  for a, b in zip(means, mirrored_means):
    copies = strategy.experimental_local_results(b.value)
    np.testing.assert_allclose(copies[0].numpy(), a.numpy(), atol=1e-5)
    np.testing.assert_allclose(copies[1].numpy(), a.numpy(), atol=1e-5)


def _retrain_step(strategy):
  genotype = genotype_lib.DARTS_V2
  with strategy.scope(), operations.synchronized_batch_norm():
    keras.utils.set_random_seed(0)
    network = retrain.build_network(genotype, "cifar", 10, channels=4,
                                    layers=3, auxiliary=False)
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    optimizer.build(network.trainable_variables)
  step = retrain.RetrainStep(network, optimizer, _GLOBAL_BATCH,
                             weight_decay=3e-4, clip_norm=0.01,
                             label_smoothing=0.0, auxiliary_weight=0.0,
                             seed=0)
  return network, step


@pytest.mark.slow
def test_retrain_two_replicas_match_one():
  images, labels = _batches(_GLOBAL_BATCH * _STEPS, seed=4)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(
      _GLOBAL_BATCH)

  single_network, single_step = _retrain_step(tf.distribute.get_strategy())
  strategy = two_replica_strategy()
  network, step = _retrain_step(strategy)
  _copy_variables(single_network.variables, network.variables)

  single_function = tf.function(single_step)
  for batch_images, batch_labels in dataset:
    single_function(batch_images, batch_labels)
  train_function = retrain._make_train_function(step, strategy)  # pylint: disable=protected-access
  for batch in strategy.experimental_distribute_dataset(dataset):
    train_function(batch)

  start = [v for v in single_network.trainable_variables]
  assert int(single_step.optimizer.iterations.numpy()) == _STEPS
  assert int(step.optimizer.iterations.numpy()) == _STEPS
  for a, b in zip(start, network.trainable_variables):
    np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5,
                               err_msg=a.path)


def test_strategy_names_checked():
  assert distribute.make_strategy("auto").num_replicas_in_sync == 1
  with pytest.raises(ValueError, match="Unknown strategy 'bogus'"):
    distribute.make_strategy("bogus")
  with pytest.raises(ValueError, match="devices"):
    distribute.make_strategy("auto", devices=["/cpu:0"])


def test_batch_divides_among_replicas():
  strategy = two_replica_strategy()
  assert distribute.per_replica_batch_size(64, strategy) == 32
  with pytest.raises(ValueError, match="batch_size=63"):
    distribute.per_replica_batch_size(63, strategy)


# Checkpoints across replica counts.


def _checkpointed_state(model):
  step = tf.Variable(0, dtype=tf.int64, trainable=False)
  checkpoint = search.search_checkpoint(model, step)
  variables = list(model.network.variables)
  for optimizer in (model.weight_optimizer, model.alpha_optimizer,
                    model.beta_optimizer):
    variables += list(optimizer.variables)
  return checkpoint, variables


def _fill_randomly(variables, seed):
  rng = np.random.default_rng(seed)
  for variable in variables:
    value = rng.normal(size=variable.shape).astype(variable.dtype)
    variable.assign(value)


@pytest.mark.parametrize("written_by,read_by", [("two", "one"),
                                                ("one", "two")])
def test_checkpoint_across_replica_counts(written_by, read_by, tmp_path):
  strategies = {"one": tf.distribute.get_strategy(),
                "two": two_replica_strategy()}
  writer = _search_model(strategies[written_by])
  reader = _search_model(strategies[read_by])
  writer_checkpoint, writer_variables = _checkpointed_state(writer)
  reader_checkpoint, reader_variables = _checkpointed_state(reader)
  _fill_randomly(writer_variables, seed=7)

  path = writer_checkpoint.write(str(tmp_path / "ckpt"))
  reader_checkpoint.read(path).assert_existing_objects_matched()

  assert len(reader_variables) == len(writer_variables)
  for a, b in zip(writer_variables, reader_variables):
    np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=a.path)


# Two worker processes.


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def _final_genotype_line(stderr):
  lines = [line for line in stderr.splitlines()
           if "Epoch 2 genotype:" in line]
  assert lines, stderr[-3000:]
  return lines[-1].split("genotype:", 1)[1].strip()


@pytest.mark.slow
def test_multi_worker_search(tmp_path):
  data_root = link_cifar10_subset(tmp_path / "cifar_small", {"train": 13})
  model_dir = tmp_path / "run"
  ports = _free_ports(2)
  cluster = {"worker": [f"localhost:{port}" for port in ports]}
  processes = []
  for index in range(2):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": index}}))
    processes.append(subprocess.Popen(
        [sys.executable, "-m", "train.search", "--preset=tiny",
         f"--dataset=folder:{data_root}", f"--model_dir={model_dir}",
         "--strategy=multi_worker", "--verbose=0"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=600))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()

  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  chief_genotype = _final_genotype_line(outputs[0][1])
  worker_genotype = _final_genotype_line(outputs[1][1])
  assert chief_genotype == worker_genotype
  stored = genotype_lib.load(str(model_dir / "genotype.json"))
  assert stored == genotype_lib.Genotype.from_json(chief_genotype)
  assert "Worker finished" in outputs[1][1]
  assert not (model_dir / ".workers").exists() or not any(
      (model_dir / ".workers").iterdir())


@pytest.mark.slow
def test_search_binary_two_cpu_devices(tmp_path):
  data_root = link_cifar10_subset(tmp_path / "cifar_small", {"train": 13})
  model_dir = tmp_path / "run"
  completed = subprocess.run(
      [sys.executable, "-m", "train.search", "--preset=tiny",
       f"--dataset=folder:{data_root}", f"--model_dir={model_dir}",
       "--strategy=mirrored", "--cpu_devices=2", "--batch_size=32", "--scale_lr_with_batch", "--verbose=0"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
      check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "MirroredStrategy with 2 replicas" in completed.stderr
  assert (model_dir / "genotype.json").exists()

  config = json.loads((model_dir / "config.json").read_text())
  preset = presets.get_preset("tiny")
  assert config["learning_rate"] == pytest.approx(
      preset.learning_rate * 32 / preset.batch_size)
  flag_lines = (model_dir / "flags.txt").read_text().splitlines()
  assert "--strategy=mirrored" in flag_lines
  assert "--cpu_devices=2" in flag_lines


def test_noise_seed_stays_in_replica_threads():
  strategy = two_replica_strategy()
  layer = activations.RReLU(channels=4)
  images = tf.random.stateless_normal([2, 3, 3, 4], seed=[0, 1])

  @tf.function
  def run():
    def replica_pass():
      with activations.noise_seed(tf.constant([5, 6])):
        # A cross-replica call makes both threads enter the block before
        # either leaves it, as a synchronized batch norm does.
        total = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, images)
        return layer(total, training=True)
    return strategy.run(replica_pass)

  run()
  assert activations.current_noise_seed() is None
  # An eager call afterwards must not find a seed tensor of the traced graph.
  assert layer(images, training=True).shape == images.shape

"""The tri-level step: update isolation, update order, decay and clipping,
Keras fit, custom loops and MirroredStrategy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import two_replica_strategy
from tf_adarts import search_space
from tf_adarts import supernet
from tf_adarts import trainer


def _space():
  # RReLU draws random slopes in training; the other activations are
  # deterministic, so gradients can be recomputed by hand.
  return search_space.factorized_space().without_activations("rrelu")


def _batch(seed, size=8, image_size=16):
  rng = np.random.default_rng(seed)
  images = tf.constant(rng.normal(size=(size, image_size, image_size, 3)),
                       tf.float32)
  labels = tf.constant(rng.integers(0, 10, size=size), tf.int32)
  return images, labels


def _model(space=None, alpha_optimizer=None, beta_optimizer=None, **kwargs):
  network = supernet.SearchNetwork(10, space or _space(), channels=4,
                                   layers=3)
  model = trainer.SearchModel(network, **kwargs)
  model.compile(alpha_optimizer=alpha_optimizer,
                beta_optimizer=beta_optimizer)
  return model


def _snapshot(variables):
  return [v.numpy().copy() for v in variables]


def _changed(before, variables):
  return any(not np.array_equal(b, v.numpy())
             for b, v in zip(before, variables))


@pytest.fixture(scope="module")
def model():
  return _model()


def _groups(model):
  network = model.network
  return {"weights": network.weight_variables,
          "alpha": network.alpha_variables,
          "beta": network.beta_variables}


@pytest.mark.parametrize("step,changes", [
    ("weight_step", "weights"), ("alpha_step", "alpha"),
    ("beta_step", "beta")])
def test_step_changes_only_its_group(model, step, changes):
  groups = _groups(model)
  before = {name: _snapshot(vs) for name, vs in groups.items()}
  getattr(model, step)(*_batch(1))
  for name, variables in groups.items():
    assert _changed(before[name], variables) == (name == changes), name


def _hand_gradient(model, images, labels, variables):
  with tf.GradientTape() as tape:
    logits = model.network(images, training=True)
    loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True))
  return [g.numpy() for g in tape.gradient(loss, variables)]


def _assign(variables, values):
  for variable, value in zip(variables, values):
    variable.assign(value)


@pytest.fixture(scope="module")
def ordered_step():
  """One tri-level step with plain SGD (learning rate 1, no decay) on alpha
  and beta, so the applied gradients can be read off the updates."""
  model = _model(alpha_optimizer=keras.optimizers.SGD(1.0),
                 beta_optimizer=keras.optimizers.SGD(1.0),
                 arch_weight_decay=0.0)
  network = model.network
  train, val = _batch(2), _batch(3)
  state = {"w0": _snapshot(network.weight_variables),
           "a0": _snapshot(network.alpha_variables),
           "b0": _snapshot(network.beta_variables)}
  model.train_step((train, val))
  state.update(w1=_snapshot(network.weight_variables),
               a1=_snapshot(network.alpha_variables),
               b1=_snapshot(network.beta_variables))
  return model, val, state


def test_alpha_gradient_at_updated_weights(ordered_step):
  model, val, s = ordered_step
  network = model.network
  applied = [a0 - a1 for a0, a1 in zip(s["a0"], s["a1"])]

  _assign(network.alpha_variables, s["a0"])
  _assign(network.beta_variables, s["b0"])
  expected = _hand_gradient(model, *val, network.alpha_variables)
  for got, want in zip(applied, expected):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-7)

  # At the old weights the gradient differs: the check can fail.
  _assign(network.weight_variables, s["w0"])
  stale = _hand_gradient(model, *val, network.alpha_variables)
  assert not np.allclose(applied[1], stale[1], rtol=1e-3, atol=1e-7)
  _assign(network.weight_variables, s["w1"])


def test_beta_gradient_at_updated_alpha(ordered_step):
  model, val, s = ordered_step
  network = model.network
  applied = [b0 - b1 for b0, b1 in zip(s["b0"], s["b1"])]

  _assign(network.alpha_variables, s["a1"])
  _assign(network.beta_variables, s["b0"])
  expected = _hand_gradient(model, *val, network.beta_variables)
  for got, want in zip(applied, expected):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-7)

  # With the old alpha the gradient differs.
  _assign(network.alpha_variables, s["a0"])
  stale = _hand_gradient(model, *val, network.beta_variables)
  assert not np.allclose(applied[0], stale[0], rtol=1e-3, atol=1e-7)


def test_clip_then_coupled_decay():
  variable = keras.Variable(np.array([1.0, -2.0], np.float32))
  optimizer = keras.optimizers.SGD(1.0)
  optimizer.build([variable])
  model = trainer.SearchModel.__new__(trainer.SearchModel)
  gradient = tf.constant([30.0, 40.0])  # global norm 50
  model._apply(optimizer, [gradient], [variable], decay=0.1, clip_norm=5.0)
  # v - (clip(g) + decay * v) = [1, -2] - ([3, 4] + [0.1, -0.2])
  np.testing.assert_allclose(variable.numpy(), [-2.1, -5.8], rtol=1e-6)


def test_joint_update_changes_alpha_and_beta():
  model = _model(arch_update="joint")
  groups = _groups(model)
  before = {name: _snapshot(vs) for name, vs in groups.items()}
  model.train_step((_batch(4), _batch(5)))
  for name, variables in groups.items():
    assert _changed(before[name], variables), name


def test_unknown_arch_update_rejected():
  network = supernet.SearchNetwork(10, channels=4, layers=3)
  with pytest.raises(ValueError, match="'bilevel'"):
    trainer.SearchModel(network, arch_update="bilevel")


def test_frozen_beta_stays_fixed():
  network = supernet.SearchNetwork(10, _space(), channels=4, layers=3)
  values = {name: np.full((14, 8), k + 0.5, np.float32)
            for k, name in enumerate(("beta_normal", "beta_reduce"))}
  model = trainer.SearchModel(network, frozen_beta=values)
  model.compile()
  alpha_before = _snapshot(network.alpha_variables)
  model.train_step((_batch(6), _batch(7)))
  np.testing.assert_array_equal(network.beta_variables[0].numpy(), 0.5)
  np.testing.assert_array_equal(network.beta_variables[1].numpy(), 1.5)
  assert _changed(alpha_before, network.alpha_variables)


def test_frozen_beta_shape_checked():
  network = supernet.SearchNetwork(10, _space(), channels=4, layers=3)
  with pytest.raises(ValueError, match=r"beta_normal has shape \(14, 9\)"):
    trainer.SearchModel(network, frozen_beta={
        "beta_normal": np.zeros((14, 9)), "beta_reduce": np.zeros((14, 8))})


def test_compile_rejects_loss():
  network = supernet.SearchNetwork(10, channels=4, layers=3)
  with pytest.raises(ValueError, match="'loss'"):
    trainer.SearchModel(network).compile(loss="mse")


def test_test_step_evaluates_val_batch(model):
  train, val = _batch(8), _batch(9)
  model.loss_tracker.reset_state()
  model.accuracy_tracker.reset_state()
  logs = model.test_step((train, val))
  logits = model.network(val[0], training=False)
  expected = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
      val[1], logits, from_logits=True))
  np.testing.assert_allclose(logs["loss"].numpy(), expected.numpy(),
                             rtol=1e-5)


def _pair_dataset(steps, batch=8, seed=10):
  train, val = _batch(seed, size=batch * steps), _batch(seed + 1,
                                                        size=batch * steps)
  return tf.data.Dataset.zip(
      (tf.data.Dataset.from_tensor_slices(train).batch(batch),
       tf.data.Dataset.from_tensor_slices(val).batch(batch)))


@pytest.mark.slow
def test_fit_with_warmup_trains_weights_first():
  model = _model(warmup_steps=2)
  alpha = model.network.alpha_variables
  before = _snapshot(alpha)
  model.fit(_pair_dataset(2), epochs=1, verbose=0)
  assert not _changed(before, alpha)
  assert int(model.weight_optimizer.iterations.numpy()) == 2
  model.fit(_pair_dataset(1), epochs=1, verbose=0)
  assert _changed(before, alpha)


class _UpdateRecorder(keras.callbacks.Callback):
  """Record, for each step of fit, which variable groups it changed."""

  def __init__(self, model):
    super().__init__()
    self.groups = _groups(model)
    self.changed = {name: [] for name in self.groups}
    self._before = {}

  def on_train_batch_begin(self, batch, logs=None):
    self._before = {name: _snapshot(variables)
                    for name, variables in self.groups.items()}

  def on_train_batch_end(self, batch, logs=None):
    for name, variables in self.groups.items():
      self.changed[name].append(_changed(self._before[name], variables))


def _static_pairs(steps):
  # A fixed batch shape, so fit reuses the pass the fixture already traced.
  return tf.data.Dataset.from_tensors((_batch(20), _batch(21))).repeat(steps)


@pytest.mark.slow
def test_fit_updates_architecture_every_step_by_default(model):
  recorder = _UpdateRecorder(model)
  model.fit(_static_pairs(2), epochs=1, verbose=0, callbacks=[recorder])
  assert recorder.changed["weights"] == [True, True]
  assert recorder.changed["alpha"] == [True, True]
  assert recorder.changed["beta"] == [True, True]


@pytest.mark.slow
def test_fit_updates_architecture_every_second_step(model):
  start = int(model.weight_optimizer.iterations.numpy())
  recorder = _UpdateRecorder(model)
  model.arch_update_every = 2
  try:
    history = model.fit(_static_pairs(4), epochs=1, verbose=0,
                        callbacks=[recorder])
  finally:
    model.arch_update_every = 1

  expected = [(start + k) % 2 == 0 for k in range(4)]
  assert recorder.changed["weights"] == [True] * 4
  assert recorder.changed["alpha"] == expected
  assert recorder.changed["beta"] == expected
  # arch_loss averages the two steps that updated alpha, not all four.
  assert int(model.arch_loss_tracker.count.numpy()) == 2
  assert np.isfinite(history.history["arch_loss"][-1])


def test_arch_updates_due_schedule(model):
  scheduled = trainer.SearchModel(model.network, warmup_steps=3,
                                  arch_update_every=2)
  due = [scheduled.arch_updates_due(step) for step in range(8)]
  assert due == [False, False, False, False, True, False, True, False]


@pytest.mark.parametrize("every", [0, -1, 1.5, "2"])
def test_invalid_arch_update_every_rejected(model, every):
  with pytest.raises(ValueError, match=f"arch_update_every={every!r}"):
    trainer.SearchModel(model.network, arch_update_every=every)


@pytest.mark.slow
def test_train_step_in_tf_function():
  model = _model(space=search_space.get_space("fixed:relu"))
  step = tf.function(model.train_step)
  before = _snapshot(model.network.alpha_variables)
  logs = step((_batch(12), _batch(13)))
  assert np.isfinite(logs["loss"].numpy())
  assert _changed(before, model.network.alpha_variables)


@pytest.mark.slow
def test_fit_under_mirrored_strategy():
  strategy = two_replica_strategy()
  with strategy.scope():
    model = _model(space=search_space.get_space("fixed:relu"))
  history = model.fit(_pair_dataset(2, batch=8), epochs=1, verbose=0)
  assert np.isfinite(history.history["loss"][-1])

  for variable in model.network.alpha_variables:
    replicas = strategy.experimental_local_results(variable.value)
    assert len(replicas) == 2
    np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())


@pytest.mark.slow
def test_custom_loop_with_strategy_run():
  strategy = two_replica_strategy()
  with strategy.scope():
    model = _model(space=search_space.get_space("fixed:relu"))
  dataset = strategy.experimental_distribute_dataset(_pair_dataset(2))

  @tf.function
  def distributed_step(data):
    logs = strategy.run(model.train_step, args=(data,))
    return strategy.reduce(tf.distribute.ReduceOp.MEAN, logs["loss"],
                           axis=None)

  before = _snapshot(model.network.alpha_variables)
  for data in dataset:
    loss = distributed_step(data)
  assert np.isfinite(loss.numpy())
  assert int(model.weight_optimizer.iterations.numpy()) == 2
  assert _changed(before, model.network.alpha_variables)
  for variable in model.network.beta_variables + model.network.alpha_variables:
    replicas = strategy.experimental_local_results(variable.value)
    np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())


def test_mixed_precision_keeps_arch_float32():
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = _model()
  finally:
    keras.mixed_precision.set_global_policy(previous)
  logs = model.train_step((_batch(14), _batch(15)))
  assert np.isfinite(logs["loss"].numpy())
  for variable in model.network.arch_variables.values():
    assert variable.dtype == "float32", variable.name
  assert model.network(_batch(16)[0]).dtype == tf.float32

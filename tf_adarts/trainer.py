"""The tri-level search step as a Keras model.

`SearchModel.train_step` takes a (train batch, validation batch) pair and
updates, in this order:

1. the network weights w, with SGD on the training loss;
2. alpha (and the PC-DARTS edge weights), with Adam on the validation loss
   at the new w;
3. beta, with Adam on the validation loss at the new w and the new alpha,
   from a fresh forward pass.

This is the first-order form. `arch_update="joint"` instead takes alpha and
beta from one validation pass: cheaper, but not the method's ordering.
`arch_update_every=N` runs the architecture updates only after every N-th
weight step, another deviation from the method, which updates alpha and
beta after every weight step.

Weight decay is coupled, as in the PyTorch recipes the published results
used: `decay * v` is added to the gradient before the update. (Keras 3's
`weight_decay` optimizer argument is decoupled and gives other results, so
leave it unset.) The weight gradients are clipped by their global norm.
Under a distribution strategy the gradients are summed across replicas
before clipping and decay, so every replica applies the same update and
alpha and beta stay identical on all of them.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_adarts import activations

SEQUENTIAL = "sequential"
JOINT = "joint"


def cifar_search_optimizers(steps_per_epoch, epochs=25, learning_rate=0.05,
                            min_learning_rate=0.001, arch_learning_rate=6e-4):
  """Create the optimizers of the published CIFAR-10 search.

  SGD with momentum 0.9 and a cosine schedule from `learning_rate` to
  `min_learning_rate` for the weights; Adam with betas (0.5, 0.999) and
  epsilon 1e-8 (PyTorch's) for alpha and for beta.

  Returns:
    (weight_optimizer, alpha_optimizer, beta_optimizer).
  """
  schedule = keras.optimizers.schedules.CosineDecay(
      learning_rate, decay_steps=max(1, steps_per_epoch * epochs),
      alpha=min_learning_rate / learning_rate)
  weights = keras.optimizers.SGD(schedule, momentum=0.9, name="weight_sgd")
  alpha = keras.optimizers.Adam(arch_learning_rate, beta_1=0.5, beta_2=0.999,
                                epsilon=1e-8, name="alpha_adam")
  beta = keras.optimizers.Adam(arch_learning_rate, beta_1=0.5, beta_2=0.999,
                               epsilon=1e-8, name="beta_adam")
  return weights, alpha, beta


def apply_coupled_gradients(optimizer, gradients, variables, decay,
                            clip_norm=None):
  """Sum across replicas, clip by global norm, add decay * v, then apply.

  The gradients are divided by the replica count before the optimizer sees
  them, because Keras's optimizers sum across replicas again, so every
  replica applies the same update. A variable outside the loss's graph
  (alpha_normal in a network whose cells are all reduction cells) has no
  gradient and is left alone.
  """
  pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
  if not pairs:
    return
  gradients = [g for g, _ in pairs]
  variables = [v for _, v in pairs]
  replicas = _num_replicas()
  context = tf.distribute.get_replica_context()
  if replicas > 1 and context is not None:
    gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
  if clip_norm:
    gradients, _ = tf.clip_by_global_norm(gradients, clip_norm)
  if decay:
    gradients = [g + decay * v for g, v in zip(gradients, variables)]
  if replicas > 1:
    gradients = [g / replicas for g in gradients]
  optimizer.apply_gradients(zip(gradients, variables))


def _num_replicas():
  return tf.distribute.get_strategy().num_replicas_in_sync


class SearchModel(keras.Model):
  """Runs the tri-level architecture search on a `SearchNetwork`.

  Args:
    network: the `SearchNetwork`; it owns alpha and beta.
    arch_update: "sequential" (weights, then alpha, then beta from a new
      pass) or "joint" (alpha and beta from one validation pass).
    weight_decay: coupled L2 decay of the network weights (3e-4 published).
    arch_weight_decay: coupled L2 decay of alpha and beta (1e-3 published).
    clip_norm: global-norm clip of the weight gradients (5 published);
      None disables it.
    frozen_beta: None, or a dict {"beta_normal": array, "beta_reduce":
      array} that fixes beta to the given raw values for the whole search
      (Config-A: activations taken from an earlier factorized search).
    warmup_steps: steps during which only the weights train.
    arch_update_every: run the architecture updates only after the weight
      steps whose 0-based index is a multiple of this (1, every step, is
      the published method). `fit` and `search.run_search` apply it; a
      custom loop sets `arch_updates_enabled` from `arch_updates_due`.
    seed: when set, the random activations (RReLU) of each pass draw from
      stateless ops seeded by (seed, step, pass, replica), so a resumed
      search repeats an uninterrupted one; None draws statefully.

  Compile with `compile(weight_optimizer, alpha_optimizer, beta_optimizer)`;
  fit on a dataset of ((train_images, train_labels), (val_images,
  val_labels)) pairs.
  """

  def __init__(self, network, arch_update=SEQUENTIAL, weight_decay=3e-4,
               arch_weight_decay=1e-3, clip_norm=5.0, frozen_beta=None,
               warmup_steps=0, arch_update_every=1, seed=None,
               name="search_model", **kwargs):
    super().__init__(name=name, **kwargs)
    if arch_update not in (SEQUENTIAL, JOINT):
      raise ValueError(
          f"Unknown arch_update {arch_update!r}; use {SEQUENTIAL!r} or "
          f"{JOINT!r}.")
    if (not isinstance(arch_update_every, (int, np.integer))
        or isinstance(arch_update_every, bool) or arch_update_every < 1):
      raise ValueError(
          f"arch_update_every={arch_update_every!r} is invalid; give a "
          "whole number of weight steps, at least 1 (1 updates the "
          "architecture after every weight step).")
    self.network = network
    self.arch_update = arch_update
    self.weight_decay = weight_decay
    self.arch_weight_decay = arch_weight_decay
    self.clip_norm = clip_norm
    self.warmup_steps = int(warmup_steps)
    self.arch_update_every = int(arch_update_every)
    self.seed = seed
    self.beta_frozen = frozen_beta is not None
    if frozen_beta is not None:
      self.set_beta(frozen_beta)

    self.loss_tracker = keras.metrics.Mean(name="loss")
    self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(
        name="accuracy")
    self.arch_loss_tracker = keras.metrics.Mean(name="arch_loss")
    self.arch_accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(
        name="arch_accuracy")
    # Whether the traced train step includes the architecture updates;
    # switched off during warm-up and between every arch_update_every-th
    # step (see `fit`).
    self.arch_updates_enabled = True
    self._traced_pass = None
    self.built = True

  # Variables and architecture.

  def set_beta(self, values):
    """Assign raw beta values, e.g. from an earlier search's genotype run."""
    for name in ("beta_normal", "beta_reduce"):
      if name not in values:
        raise ValueError(
            f"frozen beta is missing {name!r}; give both beta_normal and "
            "beta_reduce.")
      variable = self.network.arch_variable(name)
      value = np.asarray(values[name], dtype=np.float32)
      if value.shape != tuple(variable.shape):
        raise ValueError(
            f"frozen {name} has shape {value.shape}; expected "
            f"{tuple(variable.shape)} (14 edges x activations).")
      variable.assign(value)

  def genotype(self):
    """Derive the genotype from the current alpha and beta."""
    return self.network.genotype()

  def arch_updates_due(self, step):
    """Return whether the architecture updates follow weight step `step`.

    Args:
      step: the 0-based index of the weight step, which is the weight
        optimizer's `iterations` before that step.

    Returns:
      True past the warm-up on every `arch_update_every`-th step.
    """
    return step >= self.warmup_steps and step % self.arch_update_every == 0

  # Keras plumbing.

  def call(self, images, training=None):
    return self.network(images, training=training)

  @property
  def metrics(self):
    return [self.loss_tracker, self.accuracy_tracker,
            self.arch_loss_tracker, self.arch_accuracy_tracker]

  def compile(self, weight_optimizer=None, alpha_optimizer=None,
              beta_optimizer=None, **kwargs):
    """Set the three optimizers and build their variables.

    The optimizers are built here, inside the current strategy scope: an
    optimizer built lazily inside the replica function fails under
    MirroredStrategy. Pass no loss or metrics: they are computed inside
    train_step. Defaults are `cifar_search_optimizers(1)`.
    """
    for key in ("loss", "metrics", "optimizer"):
      if kwargs.get(key) is not None:
        raise ValueError(
            f"SearchModel.compile() takes no {key!r}: give "
            "weight_optimizer, alpha_optimizer and beta_optimizer.")
    kwargs.setdefault("jit_compile", False)  # XLA is slower on CPU here.
    defaults = cifar_search_optimizers(1)
    self.weight_optimizer = weight_optimizer or defaults[0]
    self.alpha_optimizer = alpha_optimizer or defaults[1]
    self.beta_optimizer = beta_optimizer or defaults[2]
    super().compile(optimizer=self.weight_optimizer, **kwargs)

    self.weight_optimizer.build(self.network.weight_variables)
    self.alpha_optimizer.build(self.network.alpha_variables)
    if self.network.beta_variables:
      self.beta_optimizer.build(self.network.beta_variables)

  # The three updates.

  def _loss(self, images, labels, training=True):
    logits = self.network(images, training=training)
    per_example = keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True)
    # Averaged over the global batch: the gradients are summed over replicas.
    return tf.nn.compute_average_loss(per_example), logits

  def _apply(self, optimizer, gradients, variables, decay, clip_norm=None):
    apply_coupled_gradients(optimizer, gradients, variables, decay, clip_norm)

  def _forward_backward(self, images, labels, noise_seed):
    """Loss, logits and the gradient of every trainable network variable."""
    variables = self.network.trainable_variables
    with tf.GradientTape() as tape:
      with activations.noise_seed(noise_seed):
        loss, logits = self._loss(images, labels)
    return loss, logits, tape.gradient(loss, variables)

  def _noise_seed(self, pass_index):
    """The stateless seed of one pass: (seed, step, pass, replica)."""
    if self.seed is None:
      return None
    step = tf.cast(self.weight_optimizer.iterations, tf.int64)
    seed = tf.stack([tf.constant(self.seed, tf.int64), 3 * step + pass_index])
    context = tf.distribute.get_replica_context()
    if context is not None:
      seed = tf.random.experimental.stateless_fold_in(
          seed, context.replica_id_in_sync_group)
    return seed

  def _gradients(self, images, labels, variables, pass_index=0):
    """Run one forward and backward pass and return the gradients of `variables`.

    All three updates share one traced pass, so the network is traced once
    instead of three times (tracing, not arithmetic, dominates the start-up
    time). The pass returns the gradient of every variable and each update
    keeps its own group; TensorFlow's graph optimizer removes the gradients
    that an update leaves unused once it inlines the call.
    """
    if self._traced_pass is None:
      self._traced_pass = (self._forward_backward
                           if self._synchronizes_across_replicas()
                           else tf.function(self._forward_backward))
    loss, logits, gradients = self._traced_pass(
        images, labels, self._noise_seed(pass_index))
    position = {id(v): k
                for k, v in enumerate(self.network.trainable_variables)}
    return loss, logits, [gradients[position[id(v)]] for v in variables]

  def _synchronizes_across_replicas(self):
    """Return whether a pass all-reduces inside the network (sync BN).

    A cross-replica call cannot run inside a nested tf.function under
    MirroredStrategy, so such a network's pass is traced inline, once per
    update, at the cost of a longer start-up.
    """
    if _num_replicas() == 1:
      return False
    return any(getattr(layer, "synchronized", False)
               for layer in self.network._flatten_layers())  # pylint: disable=protected-access

  def weight_step(self, images, labels):
    """Take one SGD step of the network weights on a training batch."""
    variables = self.network.weight_variables
    loss, logits, gradients = self._gradients(images, labels, variables)
    self._apply(self.weight_optimizer, gradients, variables,
                self.weight_decay, self.clip_norm)
    return loss, logits

  def alpha_step(self, images, labels):
    """Take one Adam step of alpha on a validation batch."""
    variables = self.network.alpha_variables
    loss, logits, gradients = self._gradients(images, labels, variables,
                                              pass_index=1)
    self._apply(self.alpha_optimizer, gradients, variables,
                self.arch_weight_decay)
    return loss, logits

  def beta_step(self, images, labels):
    """Take one Adam step of beta on a validation batch (a fresh pass)."""
    variables = self.network.beta_variables
    loss, logits, gradients = self._gradients(images, labels, variables,
                                              pass_index=2)
    self._apply(self.beta_optimizer, gradients, variables,
                self.arch_weight_decay)
    return loss, logits

  def joint_arch_step(self, images, labels):
    """Update alpha and beta from one validation pass."""
    alphas = self.network.alpha_variables
    betas = self.network.beta_variables if self._beta_trains else []
    loss, logits, gradients = self._gradients(images, labels,
                                              alphas + betas, pass_index=1)
    self._apply(self.alpha_optimizer, gradients[:len(alphas)], alphas,
                self.arch_weight_decay)
    if betas:
      self._apply(self.beta_optimizer, gradients[len(alphas):], betas,
                  self.arch_weight_decay)
    return loss, logits

  @property
  def _beta_trains(self):
    return bool(self.network.beta_variables) and not self.beta_frozen

  def train_step(self, data):
    (train_images, train_labels), (val_images, val_labels) = data

    loss, logits = self.weight_step(train_images, train_labels)
    self.loss_tracker.update_state(loss * _num_replicas())
    self.accuracy_tracker.update_state(train_labels, logits)

    if self.arch_updates_enabled:
      if self.arch_update == JOINT:
        arch_loss, arch_logits = self.joint_arch_step(val_images, val_labels)
      else:
        arch_loss, arch_logits = self.alpha_step(val_images, val_labels)
        if self._beta_trains:
          self.beta_step(val_images, val_labels)
      self.arch_loss_tracker.update_state(arch_loss * _num_replicas())
      self.arch_accuracy_tracker.update_state(val_labels, arch_logits)

    return {m.name: m.result() for m in self.metrics}

  def test_step(self, data):
    """Evaluate on the validation batch of a (train, val) pair, or on an
    (images, labels) batch."""
    if isinstance(data[0], (tuple, list)):
      data = data[1]
    images, labels = data[0], data[1]
    loss, logits = self._loss(images, labels, training=False)
    self.loss_tracker.update_state(loss * _num_replicas())
    self.accuracy_tracker.update_state(labels, logits)
    return {"loss": self.loss_tracker.result(),
            "accuracy": self.accuracy_tracker.result()}

  def fit(self, *args, callbacks=None, **kwargs):
    """keras.Model.fit, with the architecture schedule added to the
    callbacks."""
    # The (train, val) streams are datasets that shuffle themselves; Keras's
    # default shuffle=True would only warn that it ignores them.
    kwargs.setdefault("shuffle", False)
    # Added even without a warm-up and with arch_update_every=1, because an
    # earlier fit may have left the variant without the updates in place.
    callbacks = list(callbacks or []) + [ArchitectureSchedule()]
    return super().fit(*args, callbacks=callbacks, **kwargs)


class ArchitectureSchedule(keras.callbacks.Callback):
  """Switch the architecture updates on or off before each step of `fit`.

  They are off during the warm-up and after the weight steps that
  `SearchModel.arch_updates_due` rejects. A `tf.cond` around the updates
  would fail under MirroredStrategy, which cannot sum gradients across
  replicas inside a conditional branch, so the train step is traced in two
  variants instead, with and without the updates, each at most once per
  `fit`, and the callback selects one before each step.
  """

  def __init__(self):
    super().__init__()
    self._functions = {}

  def on_train_begin(self, logs=None):
    model = self.model
    if model.arch_update_every > 1 and model.steps_per_execution > 1:
      raise ValueError(
          f"arch_update_every={model.arch_update_every} needs "
          f"steps_per_execution=1 in compile(), not "
          f"{model.steps_per_execution}: the schedule switches the train "
          "step between steps.")
    # Keras made the train function before this call, for the flag in force.
    self._functions = {model.arch_updates_enabled: model.train_function}
    self._select()

  def on_train_batch_begin(self, batch, logs=None):
    self._select()

  def _select(self):
    model = self.model
    step = int(model.weight_optimizer.iterations.numpy())
    enabled = model.arch_updates_due(step)
    if enabled == model.arch_updates_enabled:
      return

    # The functions trace lazily, at their first call, so the flag must be
    # set before that call.
    model.arch_updates_enabled = enabled
    if enabled in self._functions:
      model.train_function = self._functions[enabled]
    else:
      model.make_train_function(force=True)
      self._functions[enabled] = model.train_function

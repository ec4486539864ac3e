"""Studies driven by keras-tuner: the ablation grid, random search, retraining.

A study tests whether the factorized search beats simpler choices on a
dataset. Each trial is a keras-tuner trial, so trials are recorded, resumable
and comparable, and each trial records its search cost, genotype, parameter
and FLOP counts, and validation and test accuracy.

- `ablation`: the A-DARTS authors' ablation grid of 14 configurations.
  They are the factorized search, a search with each of the nine
  activations fixed, Config-A, the factorized genotype retrained with
  every activation replaced by ReLU and by SELU, and the non-factorized
  search. One trial runs per configuration and repeat (seed).
- `random_search`: genotypes sampled uniformly from the factorized space
  through keras-tuner hyperparameters, each retrained with the same budget
  as the searched genotypes.
- `retrain_hparams`: Hyperband over the retraining hyperparameters
  (learning rate, weight decay, drop path rate, auxiliary weight) of one
  genotype.

The project directory (`project_dir`):

  study.json                  the resolved settings; a rerun must match them
  STUDY/                      keras-tuner's state: oracle.json, tuner0.json,
                              trial_ID/trial.json
  runs/CONFIGURATION/seed_S/  ablation: search/, retrain/, search_cost.json,
                              trial_record.json
  runs/STUDY/trial_ID/      random_search and retrain_hparams: retrain/,
                              trial_record.json (and genotype.json)
  trials.csv                  one row per finished trial
  results.md, results.csv     the table: one row per configuration (ablation)
                              or per trial (the other studies)
  accuracy_vs_cost.png        ablation: test accuracy against search cost
  accuracy_by_trial.png       other studies: accuracy of each trial

Running the same study again on the same directory resumes it: finished
trials are kept, and a trial that was interrupted runs again, with its
search and retrain resuming from their own checkpoints.
"""

import collections
import csv
import dataclasses
import datetime
import gc
import io
import itertools
import json
import math
import os
import resource
import time
from typing import Callable, Optional

from absl import logging
import keras
import keras_tuner
from keras_tuner.engine import base_tuner
from keras_tuner.engine import trial as trial_lib
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
from tensorflow.python.framework import ops as tf_ops  # pylint: disable=g-direct-tensorflow-import,g-import-not-at-top

from tf_adarts import data as data_lib  # pylint: disable=g-import-not-at-top
from tf_adarts import genotype as genotype_lib  # pylint: disable=g-import-not-at-top
from tf_adarts import hardware  # pylint: disable=g-import-not-at-top
from tf_adarts import presets  # pylint: disable=g-import-not-at-top
from tf_adarts import retrain as retrain_lib  # pylint: disable=g-import-not-at-top
from tf_adarts import retrain_data  # pylint: disable=g-import-not-at-top
from tf_adarts import search  # pylint: disable=g-import-not-at-top
from tf_adarts import search_space  # pylint: disable=g-import-not-at-top

ABLATION = "ablation"
RANDOM_SEARCH = "random_search"
RETRAIN_HPARAMS = "retrain_hparams"
STUDIES = (ABLATION, RANDOM_SEARCH, RETRAIN_HPARAMS)

# keras-tuner's objective: top-1 on the examples that the retrain holds out
# of the training split. The test split is never used to choose.
OBJECTIVE = "validation_top1"

STUDY_FILE = "study.json"
RUNS_DIR = "runs"
RECORD_FILE = "trial_record.json"
SEARCH_COST_FILE = "search_cost.json"
TRIALS_CSV = "trials.csv"
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
COST_PLOT = "accuracy_vs_cost.png"
TRIAL_PLOT = "accuracy_by_trial.png"
# The registry names that tf.custom_gradient gives its gradient functions.
_CUSTOM_GRADIENT_PREFIX = "CustomGradient-"

# The retraining hyperparameters that retrain_hparams tunes, with their
# ranges: (name, min, max, log scale).
RETRAIN_HPARAM_RANGES = (
    ("learning_rate", 0.005, 0.2, True),
    ("weight_decay", 1e-5, 1e-3, True),
    ("drop_path_rate", 0.0, 0.5, False),
    ("auxiliary_weight", 0.0, 1.0, False),
)


class StudyError(ValueError):
  """A study that cannot run as configured."""


# The ablation grid.


@dataclasses.dataclass(frozen=True)
class Configuration:
  """One row of the ablation grid: how the genotype is searched and retrained.

  Attributes:
    name: the stable id used in flags, paths and tables, e.g. "fixed_relu".
    label: the row label, "search -> retrain", as the A-DARTS authors'
      ablation table labels it.
    space: the search space: a `--space` value, or "config_a" for the
      factorized space with beta frozen to the same seed's factorized search.
    activation_override: the activation that replaces every searched
      activation in the retrain, or None to keep the searched ones.
    reuses_factorized_search: whether the genotype comes from the same
      seed's factorized search instead of a search of its own.
  """
  name: str
  label: str
  space: str
  activation_override: Optional[str] = None
  reuses_factorized_search: bool = False


# Activation names as the A-DARTS authors' table writes them.
ACTIVATION_LABELS = {
    "relu": "ReLU", "relu6": "ReLU6", "leaky_relu": "LeakyReLU",
    "prelu": "PReLU", "rrelu": "RReLU", "elu": "ELU", "celu": "CELU",
    "selu": "SELU", "swish": "Swish",
}
FACTORIZED = "factorized"
CONFIG_A = "config_a"


def _ablation_configurations() -> tuple:
  """Return the 14 rows in table order, the factorized search first."""
  rows = [Configuration(FACTORIZED, "factorized -> factorized", FACTORIZED)]
  for activation in search_space.default_activations().names:
    label = ACTIVATION_LABELS[activation]
    rows.append(Configuration(f"fixed_{activation}", f"{label} -> {label}",
                              f"fixed:{activation}"))
  rows.append(Configuration(CONFIG_A, "Config-A", CONFIG_A))
  for activation in ("relu", "selu"):
    rows.append(Configuration(
        f"factorized_all_{activation}",
        f"factorized -> all {ACTIVATION_LABELS[activation]}", FACTORIZED,
        activation_override=activation, reuses_factorized_search=True))
  rows.append(Configuration("non_factorized",
                            "non-factorized -> non-factorized",
                            "non_factorized"))
  return tuple(rows)


ABLATION_CONFIGURATIONS = _ablation_configurations()
CONFIGURATIONS_BY_NAME = {c.name: c for c in ABLATION_CONFIGURATIONS}


def get_configuration(name: str) -> Configuration:
  """Return the ablation configuration called `name`."""
  try:
    return CONFIGURATIONS_BY_NAME[name]
  except KeyError:
    raise StudyError(
        f"Unknown configuration {name!r}; use one of "
        f"{', '.join(CONFIGURATIONS_BY_NAME)}.") from None


# Presets.


@dataclasses.dataclass(frozen=True)
class StudyPreset:
  """The budgets of a study: one search and one retrain recipe, and counts.

  Attributes:
    search: the search recipe of every ablation configuration; its space is
      replaced per configuration.
    retrain: the retrain recipe of every trial of every study.
    repeats: ablation trials per configuration, with seeds seed,
      seed + 1, ...
    test_examples: the test images evaluated per trial (the first ones of
      the split, see `retrain.evaluate_run`); None evaluates all of them.
    random_trials: random_search trials.
    hyperband_max_epochs: retrain_hparams: the largest epoch budget of a
      Hyperband trial.
    hyperband_factor: retrain_hparams: Hyperband's reduction factor.
  """
  search: presets.SearchConfig
  retrain: retrain_lib.RetrainConfig
  repeats: int
  test_examples: Optional[int]
  random_trials: int
  hyperband_max_epochs: int
  hyperband_factor: int = 3


STUDY_PRESETS = {
    # The published budgets: the A-DARTS CIFAR-10 search and the 600-epoch
    # CIFAR-10 retrain, three seeds per configuration. The retrain holds
    # out 5,000 of the 50,000 training images for the validation accuracy
    # that keras-tuner ranks trials by (the published retrain trains on all
    # 50,000; --validation_examples=0 restores that).
    "paper": StudyPreset(
        search=presets.get_preset("a_darts_cifar10"),
        retrain=retrain_lib.get_preset("cifar10").replace(
            validation_examples=5000),
        repeats=3, test_examples=None, random_trials=10,
        hyperband_max_epochs=600, hyperband_factor=10),
    # Sized so that the 14-row ablation finishes within an hour on 2 CPU
    # cores. Each search trains a 5-cell, 8-channel supernet for 1 epoch
    # on 512 images. Each retrain trains 8 cells of 16 channels for 1
    # epoch on 2,000 images, with 500 more held out for validation, and
    # the whole test split is evaluated.
    "cpu_smoke": StudyPreset(
        search=presets.get_preset("cpu_smoke").replace(
            max_train_examples=512, epochs=1, batch_size=32, download=False),
        retrain=retrain_lib.get_preset("cpu_smoke").replace(
            channels=16, layers=8, max_train_examples=2000, epochs=1,
            batch_size=64, validation_examples=500),
        repeats=1, test_examples=None, random_trials=4,
        hyperband_max_epochs=3),
    # The smallest study, for tests.
    "tiny": StudyPreset(
        search=presets.get_preset("tiny").replace(epochs=1),
        retrain=retrain_lib.get_preset("tiny").replace(
            epochs=1, validation_examples=20),
        repeats=1, test_examples=None, random_trials=3,
        hyperband_max_epochs=2, hyperband_factor=2),
}


def get_preset(name: str) -> StudyPreset:
  """Return the study preset called `name`."""
  try:
    return STUDY_PRESETS[name]
  except KeyError:
    raise StudyError(
        f"Unknown study preset {name!r}; use one of "
        f"{', '.join(sorted(STUDY_PRESETS))}.") from None


# Settings.


@dataclasses.dataclass(frozen=True)
class StudySettings:
  """Every setting of one study, as stored in PROJECT_DIR/study.json.

  Attributes:
    study: ablation, random_search or retrain_hparams.
    preset: the preset the budgets came from (informational).
    search: the search recipe (ablation); its space is set per
      configuration and its seed per repeat.
    retrain: the retrain recipe; genotype, activation override and seed are
      set per trial.
    seed: the first seed; ablation repeat k uses seed + k, and the other
      studies seed their oracle and every retrain with it.
    repeats: ablation trials per configuration.
    configurations: the ablation configurations to run, in table order.
    test_examples: test images per trial; None evaluates the whole split.
    max_trials: random_search: trials; retrain_hparams: a cap on Hyperband's
      trials (None runs every trial of its brackets).
    genotype: retrain_hparams: a published name, genotype JSON file or
      search run directory.
    hyperband_max_epochs: retrain_hparams: the largest epoch budget.
    hyperband_factor: retrain_hparams: Hyperband's reduction factor.
    hyperband_iterations: retrain_hparams: Hyperband iterations.
  """
  study: str
  preset: str
  search: presets.SearchConfig
  retrain: retrain_lib.RetrainConfig
  seed: int = 0
  repeats: int = 1
  configurations: tuple = tuple(c.name for c in ABLATION_CONFIGURATIONS)
  test_examples: Optional[int] = None
  max_trials: Optional[int] = None
  genotype: Optional[str] = None
  hyperband_max_epochs: int = 3
  hyperband_factor: int = 3
  hyperband_iterations: int = 1

  def to_json(self) -> dict:
    values = dataclasses.asdict(self)
    values["search"] = self.search.to_json()
    values["retrain"] = self.retrain.to_json()
    values["configurations"] = list(self.configurations)
    return values

  @classmethod
  def from_json(cls, values: dict) -> "StudySettings":
    values = dict(values)
    values["search"] = presets.SearchConfig.from_json(values["search"])
    values["retrain"] = retrain_lib.RetrainConfig.from_json(values["retrain"])
    values["configurations"] = tuple(values["configurations"])
    return cls(**values)


# Settings that may change between runs of one project: they add or limit
# trials, or do not change what a trial computes.
_NON_RESULT_SETTINGS = frozenset(
    {"preset", "repeats", "configurations", "max_trials"})


def make_settings(study: str, preset: str = "cpu_smoke", *,
                  dataset: Optional[str] = None,
                  data_dir: Optional[str] = None,
                  download: Optional[bool] = None,
                  search_changes: Optional[dict] = None,
                  retrain_changes: Optional[dict] = None,
                  **changes) -> StudySettings:
  """Resolve a study's settings from a preset and explicit changes.

  Args:
    study: one of STUDIES.
    preset: a key of STUDY_PRESETS.
    dataset, data_dir, download: set on both the search and the retrain;
      None keeps the preset's.
    search_changes: SearchConfig fields to override, e.g. {"epochs": 2}.
    retrain_changes: RetrainConfig fields to override.
    **changes: StudySettings fields to override (seed, repeats,
      configurations, test_examples, max_trials, genotype, hyperband_*);
      None values keep the preset's.

  Raises:
    StudyError: on an unknown study, preset, configuration or setting, or
      an invalid value.
  """
  if study not in STUDIES:
    raise StudyError(
        f"Unknown study {study!r}; use one of {', '.join(STUDIES)}.")
  chosen = get_preset(preset)
  data_changes = {key: value for key, value in (
      ("dataset", dataset), ("data_dir", data_dir), ("download", download))
                  if value is not None}
  try:
    search_config = search.normalize_config(chosen.search.replace(
        **data_changes, **(search_changes or {})))
    retrain_config = retrain_lib.normalize_config(chosen.retrain.replace(
        **data_changes, **(retrain_changes or {})))
  except (ValueError, search.SearchError) as error:
    raise StudyError(str(error)) from None

  values = {
      "repeats": chosen.repeats,
      "test_examples": chosen.test_examples,
      "max_trials": chosen.random_trials if study == RANDOM_SEARCH else None,
      "hyperband_max_epochs": chosen.hyperband_max_epochs,
      "hyperband_factor": chosen.hyperband_factor,
  }
  known = {f.name for f in dataclasses.fields(StudySettings)}
  unknown = sorted(set(changes) - known)
  if unknown:
    raise StudyError(f"Unknown study settings {unknown}; known: "
                     f"{', '.join(sorted(known))}.")
  values.update({k: v for k, v in changes.items() if v is not None})
  if values.get("test_examples") == 0:
    values["test_examples"] = None  # 0 requests the whole test split.
  if "configurations" in values:
    values["configurations"] = _ordered_configurations(
        values["configurations"])
  if values.get("genotype"):
    values["genotype"] = _absolute_genotype(values["genotype"])
  settings = StudySettings(study=study, preset=preset, search=search_config,
                           retrain=retrain_config, **values)
  validate_settings(settings)
  return settings


def _ordered_configurations(names) -> tuple:
  """Return the named configurations in table order, each once."""
  if isinstance(names, str):
    names = [n for n in names.split(",") if n.strip()]
  names = [n.strip() for n in names]
  if not names:
    raise StudyError("No configuration given; name at least one of "
                     f"{', '.join(CONFIGURATIONS_BY_NAME)}.")
  for name in names:
    get_configuration(name)
  return tuple(c.name for c in ABLATION_CONFIGURATIONS if c.name in names)


def _absolute_genotype(value: str) -> str:
  if (value not in genotype_lib.PUBLISHED
      and os.path.exists(os.path.expanduser(value))):
    return os.path.abspath(os.path.expanduser(value))
  return value


def validate_settings(settings: StudySettings) -> None:
  """Raise StudyError on settings that cannot run.

  Checks counts, the genotype of retrain_hparams, and that the studies that
  rank trials hold out validation examples. The dataset is checked by
  `check_dataset`, which reads it.
  """
  if settings.repeats < 1:
    raise StudyError(f"repeats={settings.repeats}; give at least 1.")
  if settings.test_examples is not None and settings.test_examples < 1:
    raise StudyError(
        f"test_examples={settings.test_examples}; give at least 1, or None "
        "for the whole test split.")
  if settings.max_trials is not None and settings.max_trials < 1:
    raise StudyError(f"max_trials={settings.max_trials}; give at least 1.")
  if settings.study == RANDOM_SEARCH and settings.max_trials is None:
    raise StudyError("random_search needs max_trials, the number of "
                     "genotypes to sample.")
  if settings.hyperband_max_epochs < 1:
    raise StudyError(f"hyperband_max_epochs={settings.hyperband_max_epochs};"
                     " give at least 1.")
  if settings.hyperband_factor < 2:
    raise StudyError(f"hyperband_factor={settings.hyperband_factor}; give "
                     "at least 2.")
  if settings.hyperband_iterations < 1:
    raise StudyError(f"hyperband_iterations={settings.hyperband_iterations};"
                     " give at least 1.")
  for name in settings.configurations:
    get_configuration(name)

  if settings.study == RETRAIN_HPARAMS:
    if not settings.genotype:
      raise StudyError(
          "retrain_hparams needs a genotype: a published name (e.g. "
          "DARTS_V2), a genotype JSON file or a search run directory.")
    try:
      retrain_lib.resolve_genotype(settings.genotype)
    except retrain_lib.RetrainError as error:
      raise StudyError(str(error)) from None
  if (settings.study in (RANDOM_SEARCH, RETRAIN_HPARAMS)
      and not settings.retrain.validation_examples):
    raise StudyError(
        f"{settings.study} ranks trials by validation accuracy, so the "
        "retrain must hold out validation examples; give "
        "validation_examples of at least 1 (e.g. 500).")


def check_dataset(settings: StudySettings) -> None:
  """Open the dataset once, so that a missing one fails before any trial.

  Raises:
    StudyError: naming the dataset when it cannot be opened or has no test
      or validation split.
  """
  config = settings.retrain
  try:
    source = data_lib.load_source(config.dataset, data_dir=config.data_dir,
                                  download=config.download)
    retrain_data.find_eval_split(source, "test")
  except (ValueError, OSError) as error:
    raise StudyError(f"--dataset={config.dataset}: {error}") from None


def check_project(settings: StudySettings, project_dir: str) -> bool:
  """Compare the settings with those stored in the project, if any.

  Returns:
    True when the project already contains this study (it is resumed).

  Raises:
    StudyError: when the project contains another study, or this study
      with settings that change what a trial computes.
  """
  path = os.path.join(project_dir, STUDY_FILE)
  if not os.path.exists(path):
    for other in STUDIES:
      if other != settings.study and os.path.isdir(
          os.path.join(project_dir, other)):
        raise StudyError(
            f"{project_dir} contains the {other} study; use another "
            f"--project_dir for the {settings.study} study.")
    return False

  with open(path, encoding="utf-8") as stream:
    stored = StudySettings.from_json(json.load(stream))
  if stored.study != settings.study:
    raise StudyError(
        f"{project_dir} contains the {stored.study} study; use another "
        f"--project_dir for the {settings.study} study.")
  differences = settings_differences(stored, settings)
  if differences:
    raise StudyError(
        f"{project_dir} contains this study with other settings, so its trials "
        "would not be comparable. Use a new --project_dir, or rerun with "
        f"the stored settings ({path}; the binary also writes "
        f"{project_dir}/flags.txt). Differences (stored -> requested):\n  "
        + "\n  ".join(differences))
  return True


def settings_differences(stored: StudySettings,
                         requested: StudySettings) -> list:
  """List the settings that differ and change what a trial computes."""
  lines = [f"search.{line}" for line in presets.result_differences(
      stored.search, requested.search)]
  lines += [f"retrain.{line}" for line in retrain_lib.result_differences(
      stored.retrain, requested.retrain)]
  for field in dataclasses.fields(StudySettings):
    if field.name in _NON_RESULT_SETTINGS or field.name in (
        "search", "retrain"):
      continue
    old = getattr(stored, field.name)
    new = getattr(requested, field.name)
    if old != new:
      lines.append(f"{field.name}: {old!r} -> {new!r}")
  return lines


# Random genotypes.


def genotype_from_hyperparameters(hp: keras_tuner.HyperParameters
                                  ) -> genotype_lib.Genotype:
  """Declare the random-search space in `hp` and return its current genotype.

  For each cell and intermediate node j, `CELL/node_J/inputs` picks two
  distinct earlier nodes (e.g. "0,2"), and for each of the node's two
  edges K, `CELL/node_J/edge_K/op` picks an operator of the factorized space
  other than `none`. Only when that operator is parametric,
  `CELL/node_J/edge_K/activation` picks one of the activations. The genotype
  therefore follows the rule that derivation follows: two inputs per node
  from distinct earlier nodes.

  Called on an empty HyperParameters, it declares the space and returns
  the genotype of the default values. Called on a trial's hyperparameters,
  it returns that trial's genotype.

  Raises:
    ValueError: when the values do not form a valid factorized genotype.
  """
  space = search_space.factorized_space()
  operators = [c.name for c in space.operators if not c.zero]
  parametric = list(space.parametric_operators)
  activations = list(space.activations.names)

  cells = {}
  for cell in genotype_lib.CELL_TYPES:
    entries = []
    for node in genotype_lib.INTERMEDIATE_NODES:
      pairs = [f"{a},{b}" for a, b in itertools.combinations(range(node), 2)]
      inputs = hp.Choice(f"{cell}/node_{node}/inputs", pairs)
      for edge, input_node in enumerate(int(v) for v in inputs.split(",")):
        prefix = f"{cell}/node_{node}/edge_{edge}"
        op = hp.Choice(f"{prefix}/op", operators)
        with hp.conditional_scope(f"{prefix}/op", parametric):
          activation = hp.Choice(f"{prefix}/activation", activations)
        if op not in parametric:
          activation = None
        entries.append(genotype_lib.GenotypeEntry(op, activation, input_node))
    cells[cell] = tuple(entries)

  genotype = genotype_lib.Genotype(
      cells["normal"], genotype_lib.DEFAULT_CONCAT, cells["reduce"],
      genotype_lib.DEFAULT_CONCAT)
  genotype.validate(space)
  return genotype


def genotype_space() -> keras_tuner.HyperParameters:
  """Return the space that genotype_from_hyperparameters declares."""
  hp = keras_tuner.HyperParameters()
  genotype_from_hyperparameters(hp)
  return hp


def retrain_hparam_space() -> keras_tuner.HyperParameters:
  """Return the retrain_hparams space: RETRAIN_HPARAM_RANGES as Floats."""
  hp = keras_tuner.HyperParameters()
  for name, low, high, log in RETRAIN_HPARAM_RANGES:
    hp.Float(name, low, high, sampling="log" if log else "linear")
  return hp


# Oracles and the tuner.


def _oracle_seed(seed: int) -> int:
  # keras-tuner's Oracle draws a random seed when given 0 (it tests
  # `seed or random.randint(...)`), so seed 0 must not reach it.
  return seed + 1


def _objective():
  return keras_tuner.Objective(OBJECTIVE, direction="max")


class AblationOracle(keras_tuner.Oracle):
  """Hands out a fixed list of (configuration, repeat) trials in order.

  A plan item that already has a trial in the project (finished or not) is
  skipped, so a rerun with more repeats or configurations adds only the
  missing trials. keras-tuner itself hands an interrupted trial out again
  before asking for new ones.
  """

  def __init__(self, plan, seed=0):
    super().__init__(objective=_objective(), max_trials=None,
                     seed=_oracle_seed(seed))
    self.plan = list(plan)

  def populate_space(self, trial_id):
    keys_with_trials = {_plan_key(t.hyperparameters.values)
                        for t in self.trials.values()}
    for item in self.plan:
      if _plan_key(item) not in keys_with_trials:
        return {"status": trial_lib.TrialStatus.RUNNING,
                "values": dict(item)}
    return {"status": trial_lib.TrialStatus.STOPPED,
            "values": None}


def _plan_key(values):
  return (values.get("configuration"), values.get("repeat"))


class _StudyTuner(base_tuner.BaseTuner):
  """Runs each trial with a function; no Keras model of its own."""

  def __init__(self, oracle, project_dir, study, run_one):
    self._run_one = run_one
    super().__init__(oracle, hypermodel=None, directory=project_dir,
                     project_name=study, overwrite=False)

  def run_trial(self, trial):  # pylint: disable=arguments-differ
    return self._run_one(trial)


class _TrialStopped(keras_tuner.errors.FatalError):
  """Carries an error out of keras-tuner, which would record it and go on."""

  def __init__(self, error):
    super().__init__(str(error))
    self.error = error


# Small utilities.


def _write_json(path, value):
  search.write_text_atomic(
      path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def _read_json(path):
  with open(path, encoding="utf-8") as stream:
    return json.load(stream)


def resident_memory_mib() -> Optional[float]:
  """Return this process's resident memory in MiB (Linux), else None."""
  try:
    with open("/proc/self/status", encoding="ascii") as stream:
      for line in stream:
        if line.startswith("VmRSS:"):
          return round(int(line.split()[1]) / 1024, 1)
  except OSError:
    pass
  return None


def _peak_memory_mib() -> float:
  # ru_maxrss is in KiB on Linux.
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def describe_device(strategy=None) -> str:
  """Describe the devices a trial trains on, e.g. "1 x NVIDIA H200".

  With GPUs, it lists as many as the strategy has replicas (one under the
  default strategy). Without, it names the CPU model and the cores this
  process may use.
  """
  replicas = strategy.num_replicas_in_sync if strategy is not None else 1
  if tf.config.list_logical_devices("TPU"):
    return f"TPU ({replicas} cores)"
  gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    names = collections.Counter()
    for gpu in gpus[:max(1, replicas)]:
      details = tf.config.experimental.get_device_details(gpu)
      names[details.get("device_name", gpu.name)] += 1
    return ", ".join(f"{count} x {name}" for name, count in names.items())
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count()
  return f"CPU: {hardware.cpu_model()} ({cores} cores)"


def last_scalar(log_dir: str, tag: str) -> Optional[float]:
  """Return the last value of a TensorBoard scalar in log_dir, or None."""
  if not os.path.isdir(log_dir):
    return None
  files = sorted(name for name in os.listdir(log_dir)
                 if name.startswith("events.out.tfevents."))
  value = None
  for name in files:
    try:
      for event in tf.compat.v1.train.summary_iterator(
          os.path.join(log_dir, name)):
        for item in event.summary.value:
          if item.tag != tag:
            continue
          if item.HasField("tensor"):
            value = float(tf.make_ndarray(item.tensor))
          else:
            value = float(item.simple_value)
    except tf.errors.DataLossError:
      # The last record of a file that a killed run was writing.
      continue
  return value


def _custom_gradient_names() -> set:
  """Return the names of the gradient functions that tf.custom_gradient added.

  NOTE: with TensorFlow 2.21, each trace of ReplicaContext.all_reduce (which
  the training steps call to sum gradients over replicas) registers a
  gradient function in TensorFlow's global gradient registry and never
  removes it. The function keeps its whole traced graph alive, about 400
  MiB per trial of the tiny preset. This reads the private registry, and
  returns an empty set where a TensorFlow version lacks it.
  """
  registry = getattr(getattr(tf_ops, "_gradient_registry", None),
                     "_registry", None)
  if not isinstance(registry, dict):
    return set()
  return {name for name in registry
          if name.startswith(_CUSTOM_GRADIENT_PREFIX)}


def _release_memory(gradients_before: set) -> None:
  """Drop what the finished trial built.

  Args:
    gradients_before: `_custom_gradient_names()` before the trial; the
      gradient functions registered since then belong to the trial's graphs,
      which nothing differentiates again, and are removed.
  """
  keras.backend.clear_session()
  registry = tf_ops._gradient_registry._registry  # pylint: disable=protected-access
  for name in _custom_gradient_names() - gradients_before:
    del registry[name]
  gc.collect()


# One trial: search, retrain, test.


@dataclasses.dataclass
class _SearchOutcome:
  run_dir: str
  genotype: genotype_lib.Genotype
  seconds: Optional[float]
  device: str
  resumed: bool
  validation_top1: Optional[float]


def _run_or_reuse_search(config, run_dir, cost_path, strategy, verbose,
                         device):
  """Run (or resume, or reuse) a search and return its genotype and cost.

  The wall time of the session that finishes the search is written to
  cost_path. A search that was already finished takes its cost from there.
  NOTE: a search interrupted and resumed counts only the time of its last
  session, so its cost is an underestimate (recorded as resumed).
  """
  start = time.time()
  result = search.run_search(config, run_dir, strategy=strategy,
                             verbose=verbose)
  seconds = round(time.time() - start, 1)
  if result.already_finished and os.path.exists(cost_path):
    cost = _read_json(cost_path)
  elif result.already_finished:
    cost = {"seconds": None, "device": device, "resumed": True}
  else:
    cost = {"seconds": seconds, "device": device, "resumed": result.resumed}
    _write_json(cost_path, cost)
  return _SearchOutcome(
      run_dir=run_dir, genotype=result.genotype, seconds=cost["seconds"],
      device=cost["device"], resumed=cost["resumed"],
      validation_top1=last_scalar(os.path.join(run_dir, "logs", "val"),
                                  "accuracy"))


def retrain_and_test(config: retrain_lib.RetrainConfig, run_dir: str,
                     test_examples: Optional[int], strategy=None,
                     verbose: int = 0) -> dict:
  """Retrain a genotype, evaluate it on the test split, return the metrics.

  Returns:
    params_m and flops_m of the network (millions), validation_top1,
    validation_top5, validation_loss and validation_examples (None when the
    retrain held out no examples), test_top1, test_top5, test_examples,
    retrain_seconds, retrain_resumed.
  """
  result = retrain_lib.run_retrain(config, run_dir, strategy=strategy,
                                   verbose=verbose)
  metrics = result.metrics
  meta = _read_json(os.path.join(run_dir, retrain_lib.META_FILE))
  test = retrain_lib.evaluate_run(run_dir, "test", max_examples=test_examples,
                                  data_dir=config.data_dir)
  return {
      "params_m": meta["params"] / 1e6,
      "flops_m": meta["flops"] / 1e6,
      "validation_top1": metrics.get("validation_top1"),
      "validation_top5": metrics.get("validation_top5"),
      "validation_loss": metrics.get("validation_loss"),
      "validation_examples": metrics.get("validation_examples"),
      "test_top1": test["top1"],
      "test_top5": test["top5"],
      "test_examples": test["examples"],
      "retrain_seconds": metrics.get("seconds_this_session"),
      "retrain_resumed": result.resumed,
  }


def _run_dir(project_dir, configuration, seed):
  return os.path.join(project_dir, RUNS_DIR, configuration, f"seed_{seed}")


def _search_config(settings, configuration, seed, project_dir):
  space = configuration.space
  if space == CONFIG_A:
    factorized_search = os.path.join(
        _run_dir(project_dir, FACTORIZED, seed), "search")
    space = search.CONFIG_A_PREFIX + factorized_search
  return search.normalize_config(settings.search.replace(space=space,
                                                         seed=seed))


def _ablation_search(settings, configuration, seed, project_dir, strategy,
                     verbose, device):
  """Return the _SearchOutcome that a configuration retrains.

  Config-A and the factorized_all_* rows need the same seed's factorized
  search. When it has not run yet, it runs first, into its own path, so
  that the factorized trial finds it finished.
  """
  factorized = get_configuration(FACTORIZED)
  factorized_dir = _run_dir(project_dir, FACTORIZED, seed)
  if configuration.space == CONFIG_A or configuration.reuses_factorized_search:
    factorized_outcome = _run_or_reuse_search(
        _search_config(settings, factorized, seed, project_dir),
        os.path.join(factorized_dir, "search"),
        os.path.join(factorized_dir, SEARCH_COST_FILE), strategy, verbose,
        device)
    if configuration.reuses_factorized_search:
      return factorized_outcome

  run_dir = _run_dir(project_dir, configuration.name, seed)
  return _run_or_reuse_search(
      _search_config(settings, configuration, seed, project_dir),
      os.path.join(run_dir, "search"), os.path.join(run_dir, SEARCH_COST_FILE),
      strategy, verbose, device)


def _run_ablation_trial(settings, project_dir, trial, strategy, verbose,
                        on_event):
  values = trial.hyperparameters.values
  configuration = get_configuration(values["configuration"])
  seed = int(values["seed"])
  run_dir = _run_dir(project_dir, configuration.name, seed)
  device = describe_device(strategy)

  outcome = _ablation_search(settings, configuration, seed, project_dir,
                             strategy, verbose, device)
  details = {"trial_id": trial.trial_id, "configuration": configuration.name,
             "seed": seed, "search_dir": outcome.run_dir}
  _notify(on_event, "search_finished", details)

  retrained = outcome.genotype
  if configuration.activation_override:
    retrained = retrained.with_activation(configuration.activation_override)
  retrain_config = settings.retrain.replace(
      genotype=outcome.run_dir,
      activation_override=configuration.activation_override, seed=seed)
  metrics = retrain_and_test(retrain_config, os.path.join(run_dir, "retrain"),
                             settings.test_examples, strategy, verbose)
  searched = (get_configuration(FACTORIZED)
              if configuration.reuses_factorized_search else configuration)
  search_config = _search_config(settings, searched, seed, project_dir)
  return dict(
      metrics, study=ABLATION, trial_id=trial.trial_id,
      configuration=configuration.name, label=configuration.label,
      repeat=int(values["repeat"]), seed=seed,
      search_space=search_config.space, search_dir=outcome.run_dir,
      search_batch_size=search_config.batch_size,
      search_seconds=outcome.seconds, search_device=outcome.device,
      search_resumed=outcome.resumed,
      search_validation_top1=outcome.validation_top1, device=device,
      activation_override=configuration.activation_override,
      searched_genotype=outcome.genotype.to_json(),
      genotype=retrained.to_json(),
      retrain_dir=os.path.join(run_dir, "retrain"))


def _run_random_trial(settings, project_dir, trial, strategy, verbose,
                      on_event):
  del on_event
  genotype = genotype_from_hyperparameters(trial.hyperparameters.copy())
  run_dir = os.path.join(project_dir, RUNS_DIR, RANDOM_SEARCH,
                         f"trial_{trial.trial_id}")
  genotype_path = os.path.join(run_dir, search.GENOTYPE_FILE)
  genotype.save(genotype_path)
  retrain_config = settings.retrain.replace(genotype=genotype_path,
                                            seed=settings.seed)
  metrics = retrain_and_test(retrain_config, os.path.join(run_dir, "retrain"),
                             settings.test_examples, strategy, verbose)
  return dict(
      metrics, study=RANDOM_SEARCH, trial_id=trial.trial_id,
      configuration="random", label=f"random genotype {trial.trial_id}",
      repeat=0, seed=settings.seed, search_space=FACTORIZED,
      search_seconds=0.0, search_resumed=False, search_validation_top1=None,
      device=describe_device(strategy), activation_override=None,
      genotype=genotype.to_json(), retrain_dir=os.path.join(run_dir,
                                                            "retrain"))


def _run_hparam_trial(settings, project_dir, trial, strategy, verbose,
                      on_event):
  """Retrain the genotype from scratch for the trial's Hyperband budget.

  Hyperband here does not inherit weights from the trial it promotes
  ("tuner/trial_id"). Each trial trains its own network for "tuner/epochs"
  epochs with a full cosine schedule. An interrupted trial therefore
  resumes from its own checkpoints, and no result depends on another
  trial's files. This costs more epochs than warm-started Hyperband.
  """
  del on_event
  values = trial.hyperparameters.values
  hparams = {name: float(values[name])
             for name, _, _, _ in RETRAIN_HPARAM_RANGES}
  epochs = int(values["tuner/epochs"])
  run_dir = os.path.join(project_dir, RUNS_DIR, RETRAIN_HPARAMS,
                         f"trial_{trial.trial_id}")
  retrain_config = settings.retrain.replace(
      genotype=settings.genotype, seed=settings.seed, epochs=epochs,
      **hparams)
  metrics = retrain_and_test(retrain_config, os.path.join(run_dir, "retrain"),
                             settings.test_examples, strategy, verbose)
  genotype = retrain_lib.resolve_genotype(settings.genotype)
  return dict(
      metrics, **hparams, study=RETRAIN_HPARAMS, trial_id=trial.trial_id,
      configuration="retrain_hparams",
      label=f"trial {trial.trial_id} ({_epochs_text(epochs)})", repeat=0,
      seed=settings.seed, epochs=epochs,
      hyperband_bracket=values.get("tuner/bracket"),
      hyperband_round=values.get("tuner/round"), search_space=None,
      search_seconds=None, search_resumed=False, search_validation_top1=None,
      device=describe_device(strategy), activation_override=None,
      genotype=genotype.to_json(), retrain_dir=os.path.join(run_dir,
                                                            "retrain"))


_TRIAL_RUNNERS = {
    ABLATION: _run_ablation_trial,
    RANDOM_SEARCH: _run_random_trial,
    RETRAIN_HPARAMS: _run_hparam_trial,
}


def record_path(project_dir: str, study: str, values: dict,
                trial_id: str) -> str:
  """Return where the record of a trial is written."""
  if study == ABLATION:
    return os.path.join(_run_dir(project_dir, values["configuration"],
                                 int(values["seed"])), RECORD_FILE)
  return os.path.join(project_dir, RUNS_DIR, study, f"trial_{trial_id}",
                      RECORD_FILE)


def _notify(on_event, event, details):
  if on_event is not None:
    on_event(event, details)


def _tuner_metrics(record):
  """Return the numeric fields of a record that keras-tuner stores."""
  names = (OBJECTIVE, "validation_top5", "test_top1", "test_top5",
           "params_m", "flops_m", "search_seconds", "retrain_seconds",
           "rss_mib")
  metrics = {name: float(record[name]) for name in names
             if isinstance(record.get(name), (int, float))}
  if OBJECTIVE not in metrics:
    # NOTE: only a retrain with validation_examples=0 gets here (the
    # ablation allows it). keras-tuner needs the objective, and -inf ranks
    # such a trial last without claiming an accuracy.
    metrics[OBJECTIVE] = float("-inf")
  return metrics


class _Progress:
  """Log lines per trial: number, configuration, elapsed time, time left."""

  def __init__(self, total):
    self.total = total
    self.start = time.time()
    self.durations = []

  def begin(self, done, description):
    elapsed = time.time() - self.start
    if self.durations:
      mean = sum(self.durations) / len(self.durations)
      left = f"about {_minutes(mean * (self.total - done))} left"
    else:
      left = "time left unknown until a trial finishes"
    logging.info("Trial %d of %s: %s. Elapsed %s, %s.", done + 1,
                 self.total if self.total else "?", description,
                 _minutes(elapsed), left)

  def end(self, seconds):
    self.durations.append(seconds)


def _epochs_text(epochs):
  return "1 epoch" if epochs == 1 else f"{epochs} epochs"


def _minutes(seconds):
  return f"{seconds / 60:.1f} min"


def _describe_trial(study, values):
  if study == ABLATION:
    return (f"{values['configuration']} "
            f"({get_configuration(values['configuration']).label}), "
            f"seed {values['seed']}")
  if study == RETRAIN_HPARAMS:
    hparams = ", ".join(f"{name} {values[name]:.3g}"
                        for name, _, _, _ in RETRAIN_HPARAM_RANGES)
    return f"{_epochs_text(values['tuner/epochs'])}, {hparams}"
  return "a random genotype"


# The study.


@dataclasses.dataclass
class StudyResult:
  """The finished trials of a study and the files written from them."""
  project_dir: str
  records: list
  files: dict
  table: str


def ablation_plan(settings: StudySettings) -> list:
  """Return the ablation's trials in run order, without running them.

  One item per (configuration, repeat): {"configuration", "repeat",
  "seed"}. Configurations follow table order, so every repeat of the
  factorized search runs before Config-A and the factorized_all_* rows
  that reuse it.
  """
  return [{"configuration": name, "repeat": repeat,
           "seed": settings.seed + repeat}
          for name in _ordered_configurations(settings.configurations)
          for repeat in range(settings.repeats)]


def hyperband_trial_count(max_epochs: int, factor: int,
                          iterations: int = 1) -> tuple:
  """Return (trials, epochs) of Hyperband with these settings.

  The counts follow keras-tuner 1.4.8's HyperbandOracle bracket sizes.
  """
  oracle = keras_tuner.oracles.HyperbandOracle(
      objective=_objective(), max_epochs=max_epochs, factor=factor)
  trials = epochs = 0
  for bracket in range(oracle._get_num_brackets()):  # pylint: disable=protected-access
    for round_number in range(bracket + 1):
      size = oracle._get_size(bracket, round_number)  # pylint: disable=protected-access
      trials += size
      epochs += size * oracle._get_epochs(bracket, round_number)  # pylint: disable=protected-access
  return trials * iterations, epochs * iterations


def _make_oracle(settings):
  if settings.study == ABLATION:
    return AblationOracle(ablation_plan(settings), seed=settings.seed)
  if settings.study == RANDOM_SEARCH:
    return keras_tuner.oracles.RandomSearchOracle(
        objective=_objective(), max_trials=settings.max_trials,
        seed=_oracle_seed(settings.seed), hyperparameters=genotype_space(),
        allow_new_entries=False, tune_new_entries=False)
  oracle = keras_tuner.oracles.HyperbandOracle(
      objective=_objective(), max_epochs=settings.hyperband_max_epochs,
      factor=settings.hyperband_factor,
      hyperband_iterations=settings.hyperband_iterations,
      seed=_oracle_seed(settings.seed),
      hyperparameters=retrain_hparam_space(), allow_new_entries=False,
      tune_new_entries=False)
  # Oracle.create_trial stops once this many trials exist; HyperbandOracle
  # does not take the argument itself.
  oracle.max_trials = settings.max_trials
  return oracle


def _counts_towards_plan(settings, values):
  if settings.study != ABLATION:
    return True
  return _plan_key(values) in {_plan_key(item)
                               for item in ablation_plan(settings)}


def _planned_trials(settings):
  if settings.study == ABLATION:
    return len(ablation_plan(settings))
  if settings.study == RANDOM_SEARCH:
    return settings.max_trials
  trials, _ = hyperband_trial_count(settings.hyperband_max_epochs,
                                    settings.hyperband_factor,
                                    settings.hyperband_iterations)
  return min(trials, settings.max_trials or trials)


def run_study(settings: StudySettings, project_dir: str, *, strategy=None,
              verbose: int = 0,
              on_event: Optional[Callable[[str, dict], None]] = None,
              before_start: Optional[Callable[[], None]] = None
              ) -> StudyResult:
  """Run (or resume) a study and write its results.

  Args:
    settings: from `make_settings`.
    project_dir: the project directory; an existing one is resumed.
    strategy: the tf.distribute strategy of the searches and retrains
      (default: the current one).
    verbose: 1 shows progress bars in searches and retrains, 0 logs a line
      every 30 s.
    on_event: called as on_event(event, details) with "search_finished"
      (ablation, before the retrain) and "trial_finished" (after the trial
      record is written); details name the trial. An exception it raises
      stops the study as an interruption would.
    before_start: called once the settings and the dataset are accepted,
      before the first trial (the binary writes its flagfile there).

  Returns:
    A StudyResult with every finished trial's record.

  Raises:
    StudyError: on settings that cannot run, a missing dataset, or a
      project directory that contains another study or other settings.
    search.SearchError, retrain.RetrainError: from a trial; the study
      stops, and a rerun retries that trial.
  """
  validate_settings(settings)
  project_dir = os.path.abspath(project_dir)
  resumed = check_project(settings, project_dir)
  check_dataset(settings)
  os.makedirs(project_dir, exist_ok=True)
  if not resumed:
    _write_json(os.path.join(project_dir, STUDY_FILE), settings.to_json())
  if before_start is not None:
    before_start()
  if settings.study == RETRAIN_HPARAMS:
    trials, epochs = hyperband_trial_count(settings.hyperband_max_epochs,
                                           settings.hyperband_factor,
                                           settings.hyperband_iterations)
    logging.info("Hyperband with max_epochs=%d, factor=%d: %d trials, %d "
                 "training epochs in all%s.", settings.hyperband_max_epochs,
                 settings.hyperband_factor, trials, epochs,
                 f" (capped at {settings.max_trials} trials)"
                 if settings.max_trials else "")

  progress = _Progress(_planned_trials(settings))
  runner = _TRIAL_RUNNERS[settings.study]

  def run_one(trial):
    values = trial.hyperparameters.values
    done = sum(1 for t in tuner.oracle.trials.values()
               if t.status == trial_lib.TrialStatus.COMPLETED
               and _counts_towards_plan(settings, t.hyperparameters.values))
    progress.begin(done, _describe_trial(settings.study, values))
    start = time.time()
    path = record_path(project_dir, settings.study, values, trial.trial_id)
    gradients_before = _custom_gradient_names()
    try:
      if os.path.exists(path):
        # The trial finished its work before the study stopped.
        record = _read_json(path)
        logging.info("Trial %s finished before; its record is %s.",
                     trial.trial_id, path)
      else:
        record = runner(settings, project_dir, trial, strategy, verbose,
                        on_event)
        _release_memory(gradients_before)
        record.update(rss_mib=resident_memory_mib(),
                      peak_rss_mib=_peak_memory_mib(),
                      finished_at=datetime.datetime.now().isoformat(
                          timespec="seconds"))
        _write_json(path, record)
      _notify(on_event, "trial_finished",
              {"trial_id": trial.trial_id, "record": path})
    except Exception as error:  # pylint: disable=broad-except
      logging.error("Trial %s (%s) failed: %s. Rerun the same command to "
                    "retry it; finished trials are kept.", trial.trial_id,
                    _describe_trial(settings.study, values), error)
      raise _TrialStopped(error) from error
    finally:
      _release_memory(gradients_before)
    progress.end(time.time() - start)
    logging.info("Trial %s done in %s: test top-1 %.4f, resident memory "
                 "%s MiB.", trial.trial_id, _minutes(time.time() - start),
                 record["test_top1"], record.get("rss_mib"))
    return _tuner_metrics(record)

  tuner = _StudyTuner(_make_oracle(settings), project_dir, settings.study,
                      run_one)
  tuner.oracle.verbose = 0
  # Saved before the first trial, so that a study stopped during its first
  # trial reloads it (keras-tuner reloads only when tuner0.json exists).
  tuner.save()
  try:
    tuner.search()
  except _TrialStopped as stopped:
    raise stopped.error from None

  result = write_results(settings.study, project_dir, tuner.oracle)
  logging.info("Results: %s", ", ".join(result.files.values()))
  return result


# Results.


def finished_records(study: str, project_dir: str, oracle) -> list:
  """Return the records of the oracle's completed trials, in trial order."""
  records = []
  trials = sorted(oracle.trials.values(), key=lambda t: int(t.trial_id))
  for trial in trials:
    if trial.status != trial_lib.TrialStatus.COMPLETED:
      continue
    path = record_path(project_dir, study, trial.hyperparameters.values,
                       trial.trial_id)
    if os.path.exists(path):
      records.append(_read_json(path))
  return records


_TRIAL_COLUMNS = (
    "trial_id", "configuration", "label", "repeat", "seed", "search_space",
    "activation_override", "search_seconds", "search_device",
    "search_resumed",
    "search_validation_top1", "device", "params_m", "flops_m",
    "validation_top1", "validation_top5", "validation_loss",
    "validation_examples", "test_top1", "test_top5", "test_examples",
    "retrain_seconds", "retrain_resumed", "rss_mib", "peak_rss_mib",
    "finished_at", "genotype")
_HPARAM_COLUMNS = ("epochs", "hyperband_bracket", "hyperband_round") + tuple(
    name for name, _, _, _ in RETRAIN_HPARAM_RANGES)


def _csv_text(rows, columns):
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(columns),
                          extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({key: _csv_value(row.get(key)) for key in columns})
  return buffer.getvalue()


def _csv_value(value):
  if value is None:
    return ""
  if isinstance(value, (dict, list)):
    return json.dumps(value, sort_keys=True)
  return value


def _mean_std(values):
  """Return (mean, sample std or None, count) of the values that are set."""
  values = [float(v) for v in values if v is not None]
  if not values:
    return None, None, 0
  mean = float(np.mean(values))
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return mean, std, len(values)


def summarize_configurations(records: list) -> list:
  """Return one summary row per configuration, in table order.

  Each row: configuration, label, repeats, test_error_mean and
  test_error_std (%), test_top1_mean (%), validation_top1_mean (%),
  params_m_mean, flops_m_mean, search_seconds_mean, and device (where the
  searches ran). Standard deviations are sample standard deviations over
  repeats (None for one).
  """
  by_name = collections.defaultdict(list)
  for record in records:
    by_name[record["configuration"]].append(record)
  order = [c.name for c in ABLATION_CONFIGURATIONS]
  names = sorted(by_name, key=lambda n: order.index(n) if n in order
                 else len(order))
  rows = []
  for name in names:
    group = by_name[name]
    error, error_std, _ = _mean_std(
        [100.0 * (1.0 - r["test_top1"]) for r in group])
    validation, _, _ = _mean_std(
        [None if r.get("validation_top1") is None
         else 100.0 * r["validation_top1"] for r in group])
    rows.append({
        "configuration": name,
        "label": group[0]["label"],
        "repeats": len(group),
        "test_error_mean": error,
        "test_error_std": error_std,
        "test_top1_mean": None if error is None else 100.0 - error,
        "validation_top1_mean": validation,
        "params_m_mean": _mean_std([r["params_m"] for r in group])[0],
        "flops_m_mean": _mean_std([r["flops_m"] for r in group])[0],
        "search_seconds_mean": _mean_std(
            [r.get("search_seconds") for r in group])[0],
        # The device that the search cost was measured on.
        "device": "; ".join(sorted({r.get("search_device") or r["device"]
                                    for r in group})),
    })
  return rows


def _number(value, digits=2):
  return "-" if value is None else f"{value:.{digits}f}"


def _error_text(row):
  text = _number(row["test_error_mean"])
  if row["test_error_std"] is not None:
    text += f" ± {row['test_error_std']:.2f}"
  return text


_SUMMARY_COLUMNS = (
    "configuration", "label", "repeats", "test_error_mean", "test_error_std",
    "validation_top1_mean", "params_m_mean", "flops_m_mean",
    "search_seconds_mean", "device")


def ablation_table(rows: list) -> str:
  """Return the summary rows as a markdown table, one row per configuration."""
  lines = [
      "| search -> retrain | test error (%) | validation top-1 (%) | "
      "params (M) | FLOPs (M) | search cost (s) | repeats | device |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    lines.append(
        f"| {row['label']} | {_error_text(row)} | "
        f"{_number(row['validation_top1_mean'])} | "
        f"{_number(row['params_m_mean'], 3)} | "
        f"{_number(row['flops_m_mean'], 1)} | "
        f"{_number(row['search_seconds_mean'], 0)} | {row['repeats']} | "
        f"{row['device']} |")
  return "\n".join(lines) + "\n"


def _best_record(records):
  ranked = [r for r in records if r.get("validation_top1") is not None]
  if not ranked:
    return None
  return max(ranked, key=lambda r: r["validation_top1"])


def trials_table(records: list, extra_columns=()) -> str:
  """Return one markdown row per trial and the best trial by validation."""
  header = ["trial", *extra_columns, "validation top-1 (%)",
            "test error (%)", "params (M)", "FLOPs (M)", "retrain (s)"]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for record in records:
    cells = [record["trial_id"]]
    cells += [_format_cell(record.get(column)) for column in extra_columns]
    validation = record.get("validation_top1")
    cells += [_number(None if validation is None else 100.0 * validation),
              _number(100.0 * (1.0 - record["test_top1"])),
              _number(record["params_m"], 3), _number(record["flops_m"], 1),
              _number(record.get("retrain_seconds"), 0)]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  best = _best_record(records)
  lines.append("")
  if best is None:
    lines.append("No trial recorded a validation accuracy, so none is "
                 "ranked best.")
  else:
    lines.append(
        f"Best trial by validation top-1: {best['trial_id']} "
        f"({100.0 * best['validation_top1']:.2f}% validation, "
        f"{100.0 * (1.0 - best['test_top1']):.2f}% test error). Its "
        f"genotype: `{json.dumps(best['genotype'])}`")
  return "\n".join(lines) + "\n"


def _format_cell(value):
  if isinstance(value, float):
    return f"{value:.3g}"
  return "-" if value is None else str(value)


def _plot_accuracy_vs_cost(rows):
  figure, axes = plt.subplots(figsize=(7.5, 5.0))
  for row in rows:
    if row["test_top1_mean"] is None:
      continue
    cost = row["search_seconds_mean"] or 0.0
    axes.errorbar(cost, row["test_top1_mean"],
                  yerr=row["test_error_std"] or 0.0, fmt="o", capsize=3)
    axes.annotate(row["label"], (cost, row["test_top1_mean"]), fontsize=7,
                  textcoords="offset points", xytext=(4, 3))
  axes.set_xlabel("search cost (s, wall time)")
  axes.set_ylabel("test top-1 (%), mean ± std over repeats")
  axes.set_title("Ablation: test accuracy against search cost")
  axes.grid(True, alpha=0.3)
  return _png(figure)


def _plot_accuracy_by_trial(records, title):
  figure, axes = plt.subplots(figsize=(7.5, 4.5))
  ids = [r["trial_id"] for r in records]
  positions = np.arange(len(records))
  axes.plot(positions, [100.0 * r["test_top1"] for r in records], "o",
            label="test top-1")
  validation = [None if r.get("validation_top1") is None
                else 100.0 * r["validation_top1"] for r in records]
  if any(v is not None for v in validation):
    axes.plot(positions, [np.nan if v is None else v for v in validation],
              "s", label="validation top-1")
    best_so_far = np.fmax.accumulate(
        [-np.inf if v is None else v for v in validation])
    axes.step(positions, np.where(np.isfinite(best_so_far), best_so_far,
                                  np.nan),
              where="post", label="best validation so far")
  axes.set_xticks(positions, ids, rotation=90, fontsize=7)
  axes.set_xlabel("trial")
  axes.set_ylabel("top-1 (%)")
  axes.set_title(title)
  axes.legend(fontsize=8)
  axes.grid(True, alpha=0.3)
  return _png(figure)


def _png(figure) -> bytes:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  plt.close(figure)
  return buffer.getvalue()


def write_results(study: str, project_dir: str, oracle) -> StudyResult:
  """Write trials.csv, results.md, results.csv and the plot atomically."""
  records = finished_records(study, project_dir, oracle)
  files = {"trials_csv": os.path.join(project_dir, TRIALS_CSV),
           "results_md": os.path.join(project_dir, RESULTS_MD),
           "results_csv": os.path.join(project_dir, RESULTS_CSV)}
  columns = _TRIAL_COLUMNS
  if study == RETRAIN_HPARAMS:
    columns = _TRIAL_COLUMNS[:-1] + _HPARAM_COLUMNS + _TRIAL_COLUMNS[-1:]
  search.write_text_atomic(files["trials_csv"], _csv_text(records, columns))

  if study == ABLATION:
    rows = summarize_configurations(records)
    table = ablation_table(rows)
    title = ("Ablation: test error (%) of each configuration, mean ± "
             "sample std over repeats")
    search.write_text_atomic(files["results_csv"],
                             _csv_text(rows, _SUMMARY_COLUMNS))
    files["plot"] = os.path.join(project_dir, COST_PLOT)
    search.write_bytes_atomic(files["plot"], _plot_accuracy_vs_cost(rows))
  else:
    extra = (("epochs",) + tuple(n for n, _, _, _ in RETRAIN_HPARAM_RANGES)
             if study == RETRAIN_HPARAMS else ())
    table = trials_table(records, extra)
    title = f"{study}: one row per trial"
    best = _best_record(records)
    rows = [dict(r, is_best=best is not None
                 and r["trial_id"] == best["trial_id"]) for r in records]
    search.write_text_atomic(files["results_csv"],
                             _csv_text(rows, ("is_best",) + columns))
    files["plot"] = os.path.join(project_dir, TRIAL_PLOT)
    search.write_bytes_atomic(files["plot"], _plot_accuracy_by_trial(
        records, f"{study}: accuracy of each trial"))
  search.write_text_atomic(files["results_md"],
                           f"# {title}\n\n{table}")
  return StudyResult(project_dir, records, files, table)

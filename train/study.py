"""Run a study with keras-tuner: the ablation grid, random search, retraining.

  python -m train.study --study=ablation --preset=cpu_smoke \
      --dataset=folder:../shared/data/cifar10 --project_dir=runs/ablation

--study picks the experiment: ablation (the 14 configurations of the
A-DARTS authors' ablation, searched and retrained), random_search (random
genotypes of the factorized space, retrained with the same budget) or
retrain_hparams (Hyperband over the retraining hyperparameters of
--genotype). --preset gives the budgets
(cpu_smoke, paper or tiny); the budget flags below override them.

PROJECT_DIR receives keras-tuner's state, one run directory per trial,
trials.csv, results.md, results.csv and a plot. The same command on an
existing PROJECT_DIR resumes: finished trials are kept, and an interrupted
trial runs again from its own checkpoints. The resolved flags are written
to PROJECT_DIR/flags.txt, so `--flagfile=PROJECT_DIR/flags.txt` reruns it.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from tf_adarts import retrain
from tf_adarts import search
from tf_adarts import study
from train import distribution_flags

_STUDY = flags.DEFINE_enum(
    "study", None, list(study.STUDIES),
    "The experiment: ablation, random_search or retrain_hparams. Required.")
_PRESET = flags.DEFINE_enum(
    "preset", "cpu_smoke", sorted(study.STUDY_PRESETS),
    "Budgets: paper (the published search and 600-epoch retrain, 3 repeats; "
    "for GPUs), cpu_smoke (minutes per trial on a CPU) or tiny (tests). "
    "Default: cpu_smoke.")
_PROJECT_DIR = flags.DEFINE_string(
    "project_dir", None, "Project directory: keras-tuner's state, the run "
    "directories, the results table and the plot. An existing one is "
    "resumed. Required.")
_DATASET = flags.DEFINE_string(
    "dataset", None, "Images for every search and retrain: a TFDS name "
    "(cifar10), folder:PATH (one subfolder per class under train/ and "
    "test/) or tfrecord:PATTERN. Default: the preset's (cifar10 through "
    "TFDS).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory. Default: TFDS's own.")
_DOWNLOAD = flags.DEFINE_bool(
    "download", None, "Let TFDS download a missing dataset. Default: off.")
_SEED = flags.DEFINE_integer(
    "seed", 0, "First seed: ablation repeat k uses seed + k; random_search "
    "and retrain_hparams seed their sampling and every retrain with it. "
    "Default: 0.")
_REPEATS = flags.DEFINE_integer(
    "repeats", None, "ablation: trials per configuration, one per seed. "
    "Default: the preset's (paper 3, cpu_smoke 1).", lower_bound=1)
_CONFIGURATIONS = flags.DEFINE_list(
    "configurations", None, "ablation: comma-separated configurations to "
    "run, out of " + ", ".join(study.CONFIGURATIONS_BY_NAME) + ". They run "
    "in that order. Default: all 14.")
_GENOTYPE = flags.DEFINE_string(
    "genotype", None, "retrain_hparams: the genotype to tune, a published "
    "name (DARTS_V2), a genotype JSON file or a search run directory. "
    "Required for retrain_hparams.")
_MAX_TRIALS = flags.DEFINE_integer(
    "max_trials", None, "random_search: genotypes to sample (default: the "
    "preset's, cpu_smoke 4, paper 10). retrain_hparams: stop after this "
    "many Hyperband trials (default: run all of them).", lower_bound=1)
_TEST_EXAMPLES = flags.DEFINE_integer(
    "test_examples", None, "Test images evaluated per trial, the first ones "
    "of the split; 0 evaluates the whole split. Image folders list their "
    "files class by class, so a cap there covers only the first classes. "
    "Default: the preset's (whole split).", lower_bound=0)
_VERBOSE = flags.DEFINE_integer(
    "verbose", 0, "1: progress bars in searches and retrains; 0: a log line "
    "every 30 s. Default: 0.")

# Budget flags: (flag, config, field, help).
_BUDGET_FLAGS = (
    ("search_epochs", "search", "epochs", "Search epochs."),
    ("search_batch_size", "search", "batch_size",
     "Search batch size of each stream, in images."),
    ("search_max_train_examples", "search", "max_train_examples",
     "Training images of a search (a class-balanced subset, halved into "
     "the weight and architecture streams)."),
    ("search_channels", "search", "channels",
     "Initial channels of the supernet."),
    ("search_layers", "search", "layers", "Cells of the supernet."),
    ("retrain_epochs", "retrain", "epochs",
     "Retrain epochs (retrain_hparams: Hyperband sets them per trial)."),
    ("retrain_batch_size", "retrain", "batch_size",
     "Retrain batch size, in images."),
    ("retrain_max_train_examples", "retrain", "max_train_examples",
     "Training images of a retrain (a class-balanced subset)."),
    ("retrain_channels", "retrain", "channels",
     "Initial channels of the retrained network."),
    ("retrain_layers", "retrain", "layers", "Cells of the retrained network."),
    ("validation_examples", "retrain", "validation_examples",
     "Training images held out of every retrain and evaluated as the "
     "validation accuracy that keras-tuner ranks trials by; 0 holds out "
     "none (the ablation then records no validation accuracy)."),
)
_HYPERBAND_FLAGS = (
    ("hyperband_max_epochs", "retrain_hparams: the largest epoch budget of "
     "a Hyperband trial. Default: the preset's (paper 600, cpu_smoke 3)."),
    ("hyperband_factor", "retrain_hparams: Hyperband's reduction factor: "
     "each round keeps 1/factor of the trials and trains them factor times "
     "longer. Default: the preset's (3)."),
    ("hyperband_iterations", "retrain_hparams: times the whole Hyperband "
     "schedule runs. Default: 1."),
)


def _define_budget_flags():
  for name, config, field, help_text in _BUDGET_FLAGS:
    preset = study.STUDY_PRESETS["cpu_smoke"]
    default = getattr(getattr(preset, config), field, None)
    flags.DEFINE_integer(
        name, None, f"{help_text} Default: the preset's (cpu_smoke: "
        f"{default}).", lower_bound=0 if name == "validation_examples" else 1)
  for name, help_text in _HYPERBAND_FLAGS:
    flags.DEFINE_integer(name, None, help_text, lower_bound=1)


_define_budget_flags()
FLAGS = flags.FLAGS


def resolve_settings():
  """Return the study settings: the preset with the given flags applied."""
  changes = {"search": {}, "retrain": {}}
  for name, config, field, _ in _BUDGET_FLAGS:
    if FLAGS[name].present:
      changes[config][field] = FLAGS[name].value
  extra = {name: FLAGS[name].value for name, _ in _HYPERBAND_FLAGS}
  return study.make_settings(
      _STUDY.value, _PRESET.value, dataset=_DATASET.value,
      data_dir=_DATA_DIR.value, download=_DOWNLOAD.value,
      search_changes=changes["search"], retrain_changes=changes["retrain"],
      seed=_SEED.value, repeats=_REPEATS.value,
      configurations=_CONFIGURATIONS.value, genotype=_GENOTYPE.value,
      max_trials=_MAX_TRIALS.value, test_examples=_TEST_EXAMPLES.value,
      **extra)


def flagfile_text():
  """Return the flags that rerun this study, as given on the command line."""
  lines = [f"--study={_STUDY.value}", f"--preset={_PRESET.value}",
           f"--project_dir={os.path.abspath(_PROJECT_DIR.value)}"]
  names = ["dataset", "data_dir", "download", "seed", "repeats",
           "configurations", "genotype", "max_trials", "test_examples",
           "verbose"]
  names += [name for name, _, _, _ in _BUDGET_FLAGS]
  names += [name for name, _ in _HYPERBAND_FLAGS]
  for name in names:
    if not FLAGS[name].present:
      continue
    value = FLAGS[name].value
    if isinstance(value, bool):
      lines.append(f"--{name}" if value else f"--no{name}")
    elif isinstance(value, list):
      lines.append(f"--{name}={','.join(value)}")
    else:
      lines.append(f"--{name}={value}")
  lines.extend(distribution_flags.flagfile_lines())
  return "\n".join(lines) + "\n"


# Flags that only some studies read, and those studies.
_STUDY_ONLY_FLAGS = {
    "repeats": (study.ABLATION,),
    "configurations": (study.ABLATION,),
    "genotype": (study.RETRAIN_HPARAMS,),
    "max_trials": (study.RANDOM_SEARCH, study.RETRAIN_HPARAMS),
    "hyperband_max_epochs": (study.RETRAIN_HPARAMS,),
    "hyperband_factor": (study.RETRAIN_HPARAMS,),
    "hyperband_iterations": (study.RETRAIN_HPARAMS,),
}


def _check_study_flags():
  for name, studies in _STUDY_ONLY_FLAGS.items():
    if FLAGS[name].present and _STUDY.value not in studies:
      raise app.UsageError(
          f"--{name} applies to --study={' or '.join(studies)}, not "
          f"--study={_STUDY.value}; leave it out.")
  if _STUDY.value != study.ABLATION:
    for name, config, _, _ in _BUDGET_FLAGS:
      if config == "search" and FLAGS[name].present:
        raise app.UsageError(
            f"--{name} applies to --study=ablation, the only study that "
            "searches; leave it out.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _STUDY.value:
    raise app.UsageError("--study is required: ablation, random_search or "
                         "retrain_hparams.")
  if not _PROJECT_DIR.value:
    raise app.UsageError("--project_dir is required: the project directory.")
  if distribution_flags.STRATEGY.value == "multi_worker":
    raise app.UsageError(
        "--strategy=multi_worker is not supported: one process writes the "
        "keras-tuner project. Use mirrored for several GPUs of one machine.")
  if distribution_flags.SCALE_LR_WITH_BATCH.value:
    raise app.UsageError(
        "--scale_lr_with_batch is not supported by train.study; the "
        "presets' learning rates apply.")
  _check_study_flags()
  try:
    strategy = distribution_flags.strategy_from_flags()
  except (ValueError, RuntimeError) as error:
    raise app.UsageError(str(error)) from None
  try:
    settings = resolve_settings()
  except study.StudyError as error:
    # The message names the value and the valid ones; the flag list that
    # a UsageError prints first would bury it.
    print(f"error: {error}", file=sys.stderr)
    return 2

  project_dir = _PROJECT_DIR.value
  try:
    result = study.run_study(
        settings, project_dir, strategy=strategy, verbose=_VERBOSE.value,
        before_start=lambda: search.write_text_atomic(
            os.path.join(project_dir, "flags.txt"), flagfile_text()))
  except (study.StudyError, search.SearchError, retrain.RetrainError,
          ValueError) as error:
    logging.error("%s", error)
    print(f"error: {error}", file=sys.stderr)
    return 1

  print(result.table)
  print(f"{len(result.records)} finished trials. Files: "
        + ", ".join(result.files.values()))
  return 0


if __name__ == "__main__":
  app.run(main)

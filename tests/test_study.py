"""Studies with keras-tuner: ablation grid, random search, Hyperband, resume.

The grid, the random genotypes and Hyperband's trials are checked without
training: the retrain of those trials is replaced by a stub. One real
two-configuration ablation (factorized and ReLU, tiny budgets, real CIFAR-10
images) is interrupted in its second trial, after that trial's search, and
then rerun. The slow tests share it.
"""

import csv
import gc
import json
import os
import subprocess
import sys

import pytest
from tensorflow.python.framework.func_graph import FuncGraph  # pylint: disable=g-direct-tensorflow-import

from conftest import REPO_ROOT, link_cifar10_subset
from tf_adarts import genotype as genotype_lib
from tf_adarts import retrain as retrain_lib
from tf_adarts import search as search_lib
from tf_adarts import search_space
from tf_adarts import study

_ACTIVATIONS = ("relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu",
                "celu", "selu", "swish")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return link_cifar10_subset(tmp_path_factory.mktemp("cifar_study"),
                             {"train": 20, "test": 4})


# The ablation grid, checked without running it.


def test_ablation_grid_lists_14_configurations():
  names = [c.name for c in study.ABLATION_CONFIGURATIONS]
  assert names == (["factorized"]
                   + [f"fixed_{a}" for a in _ACTIVATIONS]
                   + ["config_a", "factorized_all_relu",
                      "factorized_all_selu", "non_factorized"])


def test_ablation_grid_follows_space_order():
  fixed = [c.space for c in study.ABLATION_CONFIGURATIONS
           if c.space.startswith("fixed:")]
  assert fixed == [f"fixed:{a}"
                   for a in search_space.default_activations().names]


def test_ablation_grid_spaces_and_overrides():
  grid = {c.name: c for c in study.ABLATION_CONFIGURATIONS}
  assert grid["factorized"].space == "factorized"
  assert grid["factorized"].activation_override is None
  assert grid["config_a"].space == "config_a"
  assert grid["non_factorized"].space == "non_factorized"
  for activation in ("relu", "selu"):
    row = grid[f"factorized_all_{activation}"]
    assert row.space == "factorized"
    assert row.activation_override == activation
    assert row.reuses_factorized_search
  searches = [c for c in study.ABLATION_CONFIGURATIONS
              if not c.reuses_factorized_search]
  assert len(searches) == 12


def test_ablation_labels_match_the_table():
  labels = {c.name: c.label for c in study.ABLATION_CONFIGURATIONS}
  assert labels["fixed_relu"] == "ReLU -> ReLU"
  assert labels["fixed_leaky_relu"] == "LeakyReLU -> LeakyReLU"
  assert labels["config_a"] == "Config-A"
  assert labels["factorized_all_selu"] == "factorized -> all SELU"
  assert len(set(labels.values())) == 14


def test_plan_runs_factorized_repeats_first():
  settings = study.make_settings(
      "ablation", "tiny", configurations=["factorized_all_selu", "config_a",
                                          "factorized"], repeats=2, seed=5)
  plan = [(item["configuration"], item["seed"])
          for item in study.ablation_plan(settings)]
  assert plan == [("factorized", 5), ("factorized", 6), ("config_a", 5),
                  ("config_a", 6), ("factorized_all_selu", 5),
                  ("factorized_all_selu", 6)]


def test_plan_of_full_grid_has_14_trials():
  settings = study.make_settings("ablation", "cpu_smoke")
  plan = study.ablation_plan(settings)
  assert len(plan) == 14
  assert [item["configuration"] for item in plan] == [
      c.name for c in study.ABLATION_CONFIGURATIONS]


@pytest.mark.parametrize("arguments, match", [
    ({"study": "nope"}, "nope"),
    ({"study": "ablation", "preset": "nope"}, "nope"),
    ({"study": "ablation", "configurations": ["fixed_relu", "nope"]}, "nope"),
    ({"study": "ablation", "repeats": 0}, "repeats=0"),
    ({"study": "retrain_hparams"}, "needs a genotype"),
    ({"study": "retrain_hparams", "genotype": "no_such_genotype"},
     "no_such_genotype"),
])
def test_invalid_settings_rejected(arguments, match):
  arguments = dict(arguments)
  name = arguments.pop("study")
  preset = arguments.pop("preset", "tiny")
  with pytest.raises(study.StudyError, match=match):
    study.make_settings(name, preset, **arguments)


def test_ranking_studies_need_validation_examples():
  with pytest.raises(study.StudyError, match="validation_examples"):
    study.make_settings("random_search", "tiny",
                        retrain_changes={"validation_examples": 0})


def test_missing_dataset_rejected(tmp_path):
  settings = study.make_settings("ablation", "tiny",
                                 dataset=f"folder:{tmp_path}/missing")
  with pytest.raises(study.StudyError, match="missing"):
    study.run_study(settings, tmp_path / "project")


def test_project_of_other_study_rejected(tmp_path, data_root):
  project = tmp_path / "project"
  (project / "random_search").mkdir(parents=True)
  settings = study.make_settings("ablation", "tiny",
                                 dataset=f"folder:{data_root}")
  with pytest.raises(study.StudyError,
                     match="contains the random_search study"):
    study.check_project(settings, str(project))


def test_project_with_other_budgets_rejected(tmp_path, data_root):
  first = study.make_settings("ablation", "tiny",
                              dataset=f"folder:{data_root}")
  project = tmp_path / "project"
  project.mkdir()
  (project / study.STUDY_FILE).write_text(json.dumps(first.to_json()))
  changed = study.make_settings("ablation", "tiny",
                                dataset=f"folder:{data_root}",
                                search_changes={"epochs": 2})
  with pytest.raises(study.StudyError, match="search.epochs: 1 -> 2"):
    study.check_project(changed, str(project))
  more_repeats = study.make_settings("ablation", "tiny",
                                     dataset=f"folder:{data_root}", repeats=3)
  assert study.check_project(more_repeats, str(project))


# Random genotypes and Hyperband, with the retrain replaced by a stub.


class _StubRetrain:
  """Stands in for study.retrain_and_test; records each call's config."""

  def __init__(self):
    self.configs = []

  def __call__(self, config, run_dir, test_examples, strategy=None,
               verbose=0):
    self.configs.append(config)
    accuracy = 0.05 * len(self.configs)
    return {"params_m": 1.5, "flops_m": 20.0, "validation_top1": accuracy,
            "validation_top5": 0.5, "validation_loss": 2.0,
            "validation_examples": 20, "test_top1": accuracy,
            "test_top5": 0.6, "test_examples": 40, "retrain_seconds": 1.0,
            "retrain_resumed": False}


@pytest.fixture
def stub_retrain(monkeypatch):
  stub = _StubRetrain()
  monkeypatch.setattr(study, "retrain_and_test", stub)
  return stub


def _random_genotypes(project_dir, data_root, seed, trials=4):
  settings = study.make_settings("random_search", "tiny",
                                 dataset=f"folder:{data_root}", seed=seed,
                                 max_trials=trials)
  result = study.run_study(settings, project_dir)
  return [json.dumps(r["genotype"], sort_keys=True) for r in result.records]


def test_random_genotypes_valid_in_factorized_space(tmp_path, data_root,
                                                    stub_retrain):
  genotypes = _random_genotypes(tmp_path / "a", data_root, seed=3)
  assert len(genotypes) == 4
  space = search_space.factorized_space()
  for text in genotypes:
    genotype = genotype_lib.Genotype.from_json(text, space)
    activations = {e.activation for e in genotype.normal + genotype.reduce}
    assert activations <= set(_ACTIVATIONS) | {None}
  retrained = [genotype_lib.load(c.genotype) for c in stub_retrain.configs]
  assert [json.dumps(g.to_json(), sort_keys=True)
          for g in retrained] == genotypes


def test_random_trials_differ_and_repeat_with_seed(tmp_path, data_root,
                                                   stub_retrain):
  first = _random_genotypes(tmp_path / "a", data_root, seed=3)
  again = _random_genotypes(tmp_path / "b", data_root, seed=3)
  other = _random_genotypes(tmp_path / "c", data_root, seed=4)
  assert len(set(first)) == len(first)
  assert again == first
  assert other != first


def test_finished_record_not_retrained(tmp_path, data_root, stub_retrain):
  settings = study.make_settings("random_search", "tiny",
                                 dataset=f"folder:{data_root}", max_trials=2)

  def interrupt_after_record(event, details):
    if event == "trial_finished":
      raise KeyboardInterrupt("interrupted after the first trial's record")

  with pytest.raises(KeyboardInterrupt):
    study.run_study(settings, tmp_path / "project",
                    on_event=interrupt_after_record)
  assert len(stub_retrain.configs) == 1

  result = study.run_study(settings, tmp_path / "project")
  assert len(stub_retrain.configs) == 2
  assert [r["trial_id"] for r in result.records] == ["0", "1"]


def test_genotype_from_default_hyperparameters():
  import keras_tuner  # pylint: disable=g-import-not-at-top
  hp = keras_tuner.HyperParameters()
  genotype = study.genotype_from_hyperparameters(hp)
  genotype.validate(search_space.factorized_space())
  assert [e.input for e in genotype.normal] == [0, 1] * 4
  hp.values["normal/node_4/inputs"] = "1,3"
  hp.values["normal/node_4/edge_1/op"] = "sep_conv_5x5"
  hp.values["normal/node_4/edge_1/activation"] = "selu"
  changed = study.genotype_from_hyperparameters(hp)
  assert changed.normal[4] == genotype_lib.GenotypeEntry("max_pool_3x3",
                                                          None, 1)
  assert changed.normal[5] == genotype_lib.GenotypeEntry("sep_conv_5x5",
                                                          "selu", 3)


def test_hyperband_trials_within_ranges(tmp_path, data_root, stub_retrain):
  settings = study.make_settings("retrain_hparams", "tiny",
                                 dataset=f"folder:{data_root}",
                                 genotype="DARTS_V2")
  result = study.run_study(settings, tmp_path / "project")
  trials, _ = study.hyperband_trial_count(2, 2)
  assert len(result.records) == trials
  assert len(stub_retrain.configs) == trials
  ranges = {name: (low, high)
            for name, low, high, _ in study.RETRAIN_HPARAM_RANGES}
  for config in stub_retrain.configs:
    assert config.genotype == "DARTS_V2"
    assert config.epochs in (1, 2)
    for name, (low, high) in ranges.items():
      assert low <= getattr(config, name) <= high
  with open(result.files["results_csv"], newline="") as stream:
    rows = list(csv.DictReader(stream))
  best = [row for row in rows if row["is_best"] == "True"]
  assert len(best) == 1
  top = max(result.records, key=lambda r: r["validation_top1"])
  assert best[0]["trial_id"] == top["trial_id"]


# One real ablation of two configurations, interrupted and resumed.


class _Interrupt:
  """Raises KeyboardInterrupt once the ReLU trial's search has finished."""

  def __call__(self, event, details):
    if event == "search_finished" and details["configuration"] == "fixed_relu":
      raise KeyboardInterrupt("interrupted after the search of fixed_relu")


def _counting(function, calls):
  def wrapper(config, model_dir, **kwargs):
    result = function(config, model_dir, **kwargs)
    calls.append((os.fspath(model_dir), result.already_finished))
    return result
  return wrapper


def _mtimes(paths):
  return {path: os.stat(path).st_mtime_ns for path in paths}


def _live_func_graphs():
  gc.collect()
  return sum(1 for item in gc.get_objects() if isinstance(item, FuncGraph))


@pytest.fixture(scope="module")
def ablation(tmp_path_factory, data_root):
  project = tmp_path_factory.mktemp("ablation") / "project"
  settings = study.make_settings(
      "ablation", "tiny", dataset=f"folder:{data_root}",
      configurations=["factorized", "fixed_relu"])
  graphs_before = _live_func_graphs()
  with pytest.raises(KeyboardInterrupt):
    study.run_study(settings, project, on_event=_Interrupt())

  factorized = project / "runs" / "factorized" / "seed_0"
  first_files = [factorized / study.RECORD_FILE,
                 factorized / "search" / search_lib.GENOTYPE_FILE,
                 factorized / "retrain" / retrain_lib.RESULT_FILE,
                 factorized / "retrain" / retrain_lib.EVAL_FILE]
  before = _mtimes(first_files)
  relu_record_existed = (project / "runs" / "fixed_relu" / "seed_0"
                         / study.RECORD_FILE).exists()

  searches, retrains = [], []
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(study.search, "run_search",
                  _counting(search_lib.run_search, searches))
    patch.setattr(study.retrain_lib, "run_retrain",
                  _counting(retrain_lib.run_retrain, retrains))
    result = study.run_study(settings, project)
  return {"project": project, "result": result, "before": before,
          "graphs_before": graphs_before, "graphs_after": _live_func_graphs(),
          "after": _mtimes(first_files), "searches": searches,
          "retrains": retrains, "relu_record_existed": relu_record_existed}


def _records(ablation):
  return {r["configuration"]: r for r in ablation["result"].records}


@pytest.mark.slow
def test_rerun_skips_finished_trial(ablation):
  assert not ablation["relu_record_existed"]
  assert ablation["after"] == ablation["before"]
  relu_dir = os.fspath(ablation["project"] / "runs" / "fixed_relu" / "seed_0")
  assert ablation["searches"] == [(os.path.join(relu_dir, "search"), True)]
  assert ablation["retrains"] == [(os.path.join(relu_dir, "retrain"), False)]


@pytest.mark.slow
def test_rerun_completes_every_trial(ablation):
  records = _records(ablation)
  assert sorted(records) == ["factorized", "fixed_relu"]
  with open(ablation["project"] / "ablation" / "oracle.json") as stream:
    oracle = json.load(stream)
  assert oracle["ongoing_trials"] == {}
  assert len(oracle["end_order"]) == 2
  for trial_id in oracle["end_order"]:
    with open(ablation["project"] / "ablation" / f"trial_{trial_id}"
              / "trial.json") as stream:
      trial = json.load(stream)
    assert trial["status"] == "COMPLETED"
    assert trial["metrics"]["metrics"]["test_top1"]


@pytest.mark.slow
def test_trials_release_their_graphs(ablation):
  # A traced graph that outlives its trial keeps hundreds of MiB of the
  # process's memory.
  assert ablation["graphs_after"] == ablation["graphs_before"]


@pytest.mark.slow
def test_trials_search_their_configured_space(ablation):
  records = _records(ablation)
  for name, space in (("factorized", "factorized"),
                      ("fixed_relu", "fixed:relu")):
    record = records[name]
    assert record["search_space"] == space
    with open(os.path.join(record["search_dir"],
                           search_lib.CONFIG_FILE)) as stream:
      assert json.load(stream)["space"] == space
    assert record["search_dir"].endswith(os.path.join(name, "seed_0",
                                                      "search"))
  relu = genotype_lib.Genotype.from_json(records["fixed_relu"]["genotype"])
  activations = {e.activation for e in relu.normal + relu.reduce}
  assert activations <= {"relu", None}
  with open(os.path.join(records["fixed_relu"]["retrain_dir"],
                         retrain_lib.META_FILE)) as stream:
    meta = json.load(stream)
  assert meta["genotype"] == records["fixed_relu"]["genotype"]


@pytest.mark.slow
def test_trial_records_hold_cost_and_accuracy(ablation):
  for record in ablation["result"].records:
    assert record["search_seconds"] > 0
    assert record["search_device"] == record["device"]
    assert record["device"]
    assert record["params_m"] > 0
    assert record["flops_m"] > 0
    assert 0.0 <= record["test_top1"] <= 1.0
    assert record["test_examples"] == 40
    assert record["rss_mib"] > 0
    assert record["retrain_seconds"] > 0
    assert 0.0 <= record["validation_top1"] <= 1.0
    assert record["validation_examples"] == 20


@pytest.mark.slow
def test_results_table_has_one_row_per_configuration(ablation):
  files = ablation["result"].files
  with open(files["results_csv"], newline="") as stream:
    rows = list(csv.DictReader(stream))
  assert [row["configuration"] for row in rows] == ["factorized",
                                                    "fixed_relu"]
  records = _records(ablation)
  for row in rows:
    record = records[row["configuration"]]
    assert row["label"] == record["label"]
    assert row["repeats"] == "1"
    assert float(row["test_error_mean"]) == pytest.approx(
        100.0 * (1.0 - record["test_top1"]))
    assert row["test_error_std"] == ""
    assert float(row["params_m_mean"]) == pytest.approx(record["params_m"])
    assert float(row["flops_m_mean"]) == pytest.approx(record["flops_m"])
    assert float(row["search_seconds_mean"]) == pytest.approx(
        record["search_seconds"])
    assert row["device"] == record["search_device"]
  table = open(files["results_md"]).read()
  assert "| factorized -> factorized |" in table
  assert "| ReLU -> ReLU |" in table
  with open(files["trials_csv"], newline="") as stream:
    assert len(list(csv.DictReader(stream))) == 2
  with open(files["plot"], "rb") as stream:
    assert stream.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_binary_reports_finished_study(ablation, data_root):
  completed = subprocess.run(
      [sys.executable, "-m", "train.study", "--study=ablation",
       "--preset=tiny", f"--dataset=folder:{data_root}",
       "--configurations=fixed_relu,factorized",
       f"--project_dir={ablation['project']}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
      check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "| ReLU -> ReLU |" in completed.stdout
  assert "2 finished trials" in completed.stdout
  assert "Trial 1 of" not in completed.stderr
  flags_text = (ablation["project"] / "flags.txt").read_text()
  assert "--configurations=fixed_relu,factorized" in flags_text

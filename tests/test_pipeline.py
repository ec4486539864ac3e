"""The one-command pipeline: search, retrain, export, predict, and resume.

One tiny pipeline runs through the binary on a folder of real CIFAR-10
images; a second run of the same command resumes it.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, link_cifar10_subset
from tf_adarts import pipeline


def _pipeline_command(work_dir, data_root):
  return [sys.executable, "-m", "train.pipeline", "--preset=tiny",
          f"--dataset=folder:{data_root}", f"--work_dir={work_dir}",
          "--num_predictions=6", "--verbose=0"]


@pytest.fixture(scope="module")
def finished_pipeline(tmp_path_factory):
  data_root = link_cifar10_subset(tmp_path_factory.mktemp("cifar_small"),
                                  {"train": 16, "test": 4})
  work_dir = tmp_path_factory.mktemp("pipeline") / "work"
  completed = subprocess.run(_pipeline_command(work_dir, data_root),
                             cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=900, check=False)
  return work_dir, data_root, completed


@pytest.mark.slow
def test_pipeline_writes_every_stage(finished_pipeline):
  work_dir, _, completed = finished_pipeline
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert (work_dir / "search" / "genotype.json").exists()
  assert (work_dir / "retrain" / "result.json").exists()
  assert (work_dir / "retrain" / "eval.json").exists()
  assert (work_dir / "export" / "adarts" / "1" / "saved_model.pb").exists()
  state = json.loads((work_dir / "pipeline.json").read_text())
  assert state["finished"]
  assert state["export_dir"] == str(work_dir / "export" / "adarts" / "1")


@pytest.mark.slow
def test_pipeline_prints_predictions(finished_pipeline):
  work_dir, _, completed = finished_pipeline
  rows = json.loads((work_dir / "predictions.json").read_text())
  assert len(rows) == 6
  # One image per class first: six different true labels.
  assert len({row["label"] for row in rows}) == 6
  for row in rows:
    assert os.path.basename(row["path"]) in completed.stdout
    assert 0.0 <= row["scores"][0] <= 1.0
    assert row["scores"] == sorted(row["scores"], reverse=True)
  assert "top-1 on these 6 images" in completed.stdout


@pytest.mark.slow
def test_rerun_keeps_one_version(finished_pipeline):
  work_dir, data_root, _ = finished_pipeline
  again = subprocess.run(_pipeline_command(work_dir, data_root),
                         cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600, check=False)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "has finished" in again.stderr
  assert "export done before" in again.stderr
  assert sorted(p.name for p in (work_dir / "export" / "adarts").iterdir()
                if not p.name.startswith(".")) == ["1"]


def test_unknown_preset_rejected():
  with pytest.raises(pipeline.PipelineError, match="nope"):
    pipeline.get_preset("nope")

"""train.describe: the size and cost of a genotype, without data."""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from tf_adarts import genotype as genotype_lib
from train import describe


def test_darts_v2_cifar_json_line():
  completed = subprocess.run(
      [sys.executable, "-m", "train.describe", "--genotype=DARTS_V2",
       "--dataset=cifar10", "--format=json"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-2000:]
  counts = json.loads(completed.stdout.strip().splitlines()[-1])
  assert counts["params"] == 3349342
  assert counts["params_with_aux"] > counts["params"]
  assert counts["init_channels"] == 36
  assert counts["layers"] == 20
  assert counts["flops"] > 0


def test_overrides_change_width_and_depth():
  counts = describe.describe(genotype_lib.DARTS_V2, "cifar10",
                             init_channels=16, layers=8)
  assert counts["init_channels"] == 16
  assert counts["layers"] == 8
  assert counts["params"] < 3349342


def test_run_directory_genotype(tmp_path):
  genotype_lib.PDARTS.save(tmp_path / "genotype.json")
  assert describe.load_genotype(str(tmp_path)) == genotype_lib.PDARTS


def test_folder_without_genotype_rejected(tmp_path):
  with pytest.raises(ValueError, match="without genotype.json"):
    describe.load_genotype(str(tmp_path))


def test_unknown_genotype_name_rejected():
  completed = subprocess.run(
      [sys.executable, "-m", "train.describe", "--genotype=DARTS_V9"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert completed.returncode != 0
  assert "DARTS_V9" in completed.stderr

"""From images to a served model: search, retrain, export, predict.

`run_pipeline(preset, work_dir)` is what `python -m train.pipeline` runs.
The work directory contains one run directory per stage:

  search/            the architecture search (see tf_adarts.search)
  retrain/           the retrain of its genotype (see tf_adarts.retrain),
                     with eval.json from the test split
  export/            BASE of the SavedModel export: export/MODEL_NAME/1,
                     export/models.config
  pipeline.json      the stages finished so far and the export's path
  predictions.json   the exported model's top-k on a few test images

Each stage resumes the way its own binary does, so running the same
command again continues where it stopped: an interrupted search or retrain
resumes from its latest checkpoint, and a finished stage is skipped.
"""

import dataclasses
import json
import os
from typing import Optional

from absl import logging

from tf_adarts import data as data_lib
from tf_adarts import distribute
from tf_adarts import export as export_lib
from tf_adarts import presets
from tf_adarts import retrain
from tf_adarts import search

SEARCH_DIR = "search"
RETRAIN_DIR = "retrain"
EXPORT_DIR = "export"
STATE_FILE = "pipeline.json"
PREDICTIONS_FILE = "predictions.json"


@dataclasses.dataclass(frozen=True)
class PipelinePreset:
  """The search preset and the retrain preset that one pipeline runs."""
  search: str
  retrain: str


PIPELINE_PRESETS = {
    "a_darts_cifar10": PipelinePreset("a_darts_cifar10", "cifar10"),
    "darts_cifar10": PipelinePreset("darts_cifar10", "cifar10"),
    "non_factorized_cifar10": PipelinePreset("non_factorized_cifar10",
                                             "cifar10"),
    "a_pc_darts_imagenet": PipelinePreset("a_pc_darts_imagenet", "imagenet"),
    # Minutes on 2 CPU cores: the cpu_smoke search and the cpu_smoke
    # retrain (about 15 minutes in all on the reference machine).
    "cpu_smoke": PipelinePreset("cpu_smoke", "cpu_smoke"),
    # The smallest pipeline, for tests.
    "tiny": PipelinePreset("tiny", "tiny"),
}


class PipelineError(Exception):
  """A pipeline that cannot run as configured."""


@dataclasses.dataclass
class PipelineResult:
  """The output folders of the stages, and the printed predictions."""
  work_dir: str
  search_dir: str
  retrain_dir: str
  export_dir: str
  test_metrics: dict
  predictions: list


def get_preset(name: str) -> PipelinePreset:
  """Return the pipeline preset called `name`."""
  try:
    return PIPELINE_PRESETS[name]
  except KeyError:
    raise PipelineError(
        f"Unknown pipeline preset {name!r}; use one of "
        f"{', '.join(sorted(PIPELINE_PRESETS))}.") from None


def _read_state(work_dir: str) -> dict:
  path = os.path.join(work_dir, STATE_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_state(work_dir: str, state: dict) -> None:
  search.write_text_atomic(os.path.join(work_dir, STATE_FILE),
                           json.dumps(state, indent=2, sort_keys=True) + "\n")


def _dataset_changes(dataset, data_dir, download, seed, deterministic):
  """Return the settings that the caller gives for search and retrain."""
  changes = {}
  if dataset is not None:
    changes["dataset"] = dataset
  if data_dir is not None:
    changes["data_dir"] = data_dir
  if download is not None:
    changes["download"] = download
  if seed is not None:
    changes["seed"] = seed
  if deterministic is not None:
    changes["deterministic"] = deterministic
  return changes


def sample_test_images(source: data_lib.Source, count: int):
  """Return up to `count` encoded test images, one class after another.

  The images are the first of each class in the split's order, taken in
  turn, so a small sample covers the classes.

  Returns:
    (encoded image bytes, labels, paths) as Python lists.
  """
  split = "test" if "test" in source.splits else source.splits[-1]
  labels = source.split_labels(split)
  per_class = {}
  for index, label in enumerate(labels):
    per_class.setdefault(int(label), []).append(index)
  chosen = []
  for rank in range(count):
    for label in sorted(per_class):
      if rank < len(per_class[label]) and len(chosen) < count:
        chosen.append(per_class[label][rank])
  selected = set(chosen)
  found = {}
  for example in source.split_dataset(split):
    index = int(example["index"])
    if index in selected:
      found[index] = (example["encoded"].numpy(), int(example["label"]),
                      example["path"].numpy().decode())
    if len(found) == len(selected):
      break
  rows = [found[i] for i in chosen]
  return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def predict_encoded(export_dir: str, encoded: list, class_names: list,
                    labels: list, paths: list) -> list:
  """Run the export's `predict_image_bytes` signature on encoded images.

  Returns:
    One dict per image: path, label, label_name, the top-k classes and
    their names and scores.
  """
  outputs = export_lib.ExportedModel(export_dir).predict_bytes(encoded)
  rows = []
  for i, path in enumerate(paths):
    rows.append({
        "path": path,
        "label": labels[i],
        "label_name": class_names[labels[i]],
        "classes": [int(c) for c in outputs["classes"][i]],
        "class_names": [n.decode() for n in outputs["class_names"][i]],
        "scores": [float(s) for s in outputs["scores"][i]],
    })
  return rows


def format_predictions(rows: list) -> str:
  """Return the predictions as a plain-text table, one image per line."""
  lines = [f"{'image':<48} {'true':<14} {'predicted':<14} score"]
  for row in rows:
    path = row["path"]
    if len(path) > 48:
      path = "..." + path[-45:]
    lines.append(f"{path:<48} {row['label_name']:<14} "
                 f"{row['class_names'][0]:<14} {row['scores'][0]:.3f}")
  correct = sum(r["classes"][0] == r["label"] for r in rows)
  lines.append(f"top-1 on these {len(rows)} images: {correct}/{len(rows)}")
  return "\n".join(lines)


def run_pipeline(preset: str, work_dir: str, *,
                 dataset: Optional[str] = None,
                 data_dir: Optional[str] = None,
                 download: Optional[bool] = None,
                 seed: Optional[int] = None,
                 deterministic: Optional[bool] = None,
                 model_name: str = "adarts",
                 num_predictions: int = 10,
                 strategy=None,
                 verbose: int = 1) -> PipelineResult:
  """Search, retrain, export and predict, resuming what has been done.

  Args:
    preset: a key of PIPELINE_PRESETS; it names the search preset and the
      retrain preset.
    work_dir: the work directory; an existing one is resumed.
    dataset, data_dir, download, seed, deterministic: override the presets
      of both the search and the retrain; None keeps the presets' values.
    model_name: the model's name under work_dir/export, as TF-Serving
      serves it.
    num_predictions: test images predicted with the exported model at the
      end.
    strategy: the tf.distribute strategy of the search and the retrain
      (default: the current one).
    verbose: 1 shows progress bars, 0 logs a line every 30 s.

  Returns:
    A PipelineResult.

  Raises:
    PipelineError: on an unknown preset or an invalid setting.
    search.SearchError, retrain.RetrainError: from the stages.
  """
  stages = get_preset(preset)
  if num_predictions < 1:
    raise PipelineError(
        f"num_predictions={num_predictions} is invalid; predict at least 1 "
        "test image.")
  work_dir = os.path.abspath(work_dir)
  os.makedirs(work_dir, exist_ok=True)
  state = _read_state(work_dir)
  changes = _dataset_changes(dataset, data_dir, download, seed,
                             deterministic)

  search_dir = os.path.join(work_dir, SEARCH_DIR)
  logging.info("Pipeline stage 1/4: search (preset %s) in %s.",
               stages.search, search_dir)
  search_config = search.normalize_config(
      presets.get_preset(stages.search).replace(**changes))
  search.run_search(search_config, search_dir, strategy=strategy,
                    verbose=verbose)

  retrain_dir = os.path.join(work_dir, RETRAIN_DIR)
  logging.info("Pipeline stage 2/4: retrain (preset %s) in %s.",
               stages.retrain, retrain_dir)
  retrain_config = retrain.normalize_config(
      retrain.get_preset(stages.retrain).replace(genotype=search_dir,
                                                 **changes))
  retrain.run_retrain(retrain_config, retrain_dir, strategy=strategy,
                      verbose=verbose)
  if not distribute.is_chief(strategy):
    logging.info("Pipeline: this worker's part ends with the retrain; the "
                 "chief evaluates, exports and predicts.")
    return PipelineResult(work_dir, search_dir, retrain_dir, "", {}, [])
  eval_path = os.path.join(retrain_dir, retrain.EVAL_FILE)
  if os.path.exists(eval_path):
    with open(eval_path) as f:
      test_metrics = json.load(f)
  else:
    test_metrics = retrain.evaluate_run(retrain_dir,
                                        data_dir=retrain_config.data_dir)
  logging.info("Test top-1 of the retrained network: %.4f.",
               test_metrics["top1"])

  export_base = os.path.join(work_dir, EXPORT_DIR)
  export_dir = state.get("export_dir")
  if export_dir and os.path.isdir(export_dir):
    logging.info("Pipeline stage 3/4: export done before, at %s.",
                 export_dir)
  else:
    logging.info("Pipeline stage 3/4: export to %s.", export_base)
    export_dir = export_lib.export_run(retrain_dir, export_base, model_name)
    state["export_dir"] = export_dir
    _write_state(work_dir, state)

  logging.info("Pipeline stage 4/4: predict %d test images with %s.",
               num_predictions, export_dir)
  source = data_lib.load_source(retrain_config.dataset,
                                data_dir=retrain_config.data_dir,
                                download=retrain_config.download)
  encoded, labels, paths = sample_test_images(source, num_predictions)
  rows = predict_encoded(export_dir, encoded, list(source.class_names),
                         labels, paths)
  search.write_text_atomic(os.path.join(work_dir, PREDICTIONS_FILE),
                           json.dumps(rows, indent=2) + "\n")
  state["finished"] = True
  _write_state(work_dir, state)
  return PipelineResult(work_dir, search_dir, retrain_dir, export_dir,
                        test_metrics, rows)

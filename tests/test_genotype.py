"""Tests of tf_adarts.genotype: derivation, JSON form, published genotypes."""

import copy
import inspect
import json

import numpy as np
import pytest

from tf_adarts import genotype as genotype_lib
from tf_adarts import search_space

NUM_OPERATORS = 8
NUM_ACTIVATIONS = 9
ZERO_COLUMN = 0
MAX_POOL, AVG_POOL, SKIP = 1, 2, 3
SEP_CONV_3X3, SEP_CONV_5X5, DIL_CONV_3X3 = 4, 5, 6
NONPARAMETRIC = {"max_pool_3x3", "avg_pool_3x3", "skip_connect"}


def uniform_alpha(columns=NUM_OPERATORS):
  return np.zeros((genotype_lib.NUM_EDGES, columns))


def derive_normal(alpha, **kwargs):
  """Derive with `alpha` for both cells and return the normal cell."""
  arguments = {}
  if "beta" in kwargs:
    beta = kwargs.pop("beta")
    arguments.update(beta_normal=beta, beta_reduce=beta)
  if "edge_weights" in kwargs:
    weights = kwargs.pop("edge_weights")
    arguments.update(edge_weights_normal=weights, edge_weights_reduce=weights)
  return genotype_lib.derive_genotype(alpha, alpha, **arguments,
                                      **kwargs).normal


def inputs_of_node(entries, node):
  first = 2 * (node - 2)
  return (entries[first].input, entries[first + 1].input)


def reference_derive_cell(alpha, beta):
  """Derive one factorized cell with plain loops, as the DARTS code does."""
  probabilities = np.exp(alpha) / np.exp(alpha).sum(axis=1, keepdims=True)
  space = search_space.factorized_space()
  entries = []
  row = 0
  for node in range(2, 6):
    rows = range(row, row + node)
    strength = [max(probabilities[r][1:]) for r in rows]
    kept = sorted(range(node), key=lambda i: -strength[i])[:2]
    for i in kept:
      column = 1 + int(np.argmax(probabilities[row + i][1:]))
      op = space.operators.names[column]
      activation = None
      if space.operators.get(op).parametric:
        activation = space.activations.names[int(np.argmax(beta[row + i]))]
      entries.append(genotype_lib.GenotypeEntry(op, activation, i))
    row += node
  return tuple(entries)


# Edges and rows.


def test_edges_follow_darts_order():
  assert genotype_lib.EDGES[:5] == ((0, 2), (1, 2), (0, 3), (1, 3), (2, 3))
  assert len(genotype_lib.EDGES) == 14


def test_edge_index_matches_edges():
  for row, (i, j) in enumerate(genotype_lib.EDGES):
    assert genotype_lib.edge_index(i, j) == row


def test_edge_index_rejects_non_edge():
  with pytest.raises(ValueError, match=r"\(5, 5\)"):
    genotype_lib.edge_index(5, 5)


# Derivation.


def test_derive_matches_loop_reference():
  rng = np.random.default_rng(0)
  for _ in range(20):
    alpha = rng.normal(size=(14, NUM_OPERATORS))
    beta = rng.normal(size=(14, NUM_ACTIVATIONS))
    assert derive_normal(alpha, beta=beta) == reference_derive_cell(alpha, beta)


def test_strongest_none_never_kept():
  alpha = np.random.default_rng(1).normal(size=(14, NUM_OPERATORS))
  alpha[:, ZERO_COLUMN] = 10.0
  genotype = genotype_lib.derive_genotype(alpha, alpha)
  ops = {entry.op for entry in genotype.normal + genotype.reduce}
  assert "none" not in ops


def test_edge_ties_keep_lower_inputs():
  alpha = uniform_alpha()
  entries = derive_normal(alpha)
  for node in range(2, 6):
    assert inputs_of_node(entries, node) == (0, 1)


def test_edge_ties_among_strong_edges():
  alpha = uniform_alpha()
  for i in (2, 4):
    alpha[genotype_lib.edge_index(i, 5), SEP_CONV_3X3] = 3.0
  assert inputs_of_node(derive_normal(alpha), 5) == (2, 4)


def test_operator_ties_pick_lower_column():
  alpha = uniform_alpha()
  alpha[genotype_lib.edge_index(0, 2), SEP_CONV_5X5] = 3.0
  alpha[genotype_lib.edge_index(0, 2), DIL_CONV_3X3] = 3.0
  assert derive_normal(alpha)[0].op == "sep_conv_5x5"


def test_uniform_alpha_picks_first_nonzero():
  entries = derive_normal(uniform_alpha())
  assert {entry.op for entry in entries} == {"max_pool_3x3"}


def test_stronger_edge_comes_first():
  alpha = uniform_alpha()
  alpha[genotype_lib.edge_index(1, 4), SEP_CONV_3X3] = 2.0
  alpha[genotype_lib.edge_index(3, 4), SEP_CONV_3X3] = 4.0
  assert inputs_of_node(derive_normal(alpha), 4) == (3, 1)


def mixed_alpha_and_beta():
  """Return alpha favouring max_pool_3x3 on even rows and sep_conv_3x3 on odd
  rows, and a random beta."""
  rng = np.random.default_rng(2)
  alpha = uniform_alpha()
  alpha[0::2, MAX_POOL] = 3.0
  alpha[1::2, SEP_CONV_3X3] = 3.0
  beta = rng.normal(size=(14, NUM_ACTIVATIONS))
  return alpha, beta


def test_activation_only_on_parametric():
  alpha, beta = mixed_alpha_and_beta()
  for entry in derive_normal(alpha, beta=beta):
    if entry.op in NONPARAMETRIC:
      assert entry.activation is None, entry
    else:
      assert entry.activation is not None, entry


def test_activation_is_beta_argmax():
  alpha, beta = mixed_alpha_and_beta()
  names = search_space.default_activations().names
  entries = derive_normal(alpha, beta=beta)
  for position, entry in enumerate(entries):
    if entry.activation is None:
      continue
    row = genotype_lib.edge_index(entry.input,
                                  genotype_lib.node_of_entry(position))
    assert entry.activation == names[int(np.argmax(beta[row]))], entry


def test_missing_beta_gives_no_activation():
  alpha, _ = mixed_alpha_and_beta()
  activations = {entry.activation for entry in derive_normal(alpha)}
  assert activations == {None}


def test_fixed_space_gives_fixed_activation():
  alpha, _ = mixed_alpha_and_beta()
  entries = derive_normal(alpha, space=search_space.fixed_space("selu"))
  for entry in entries:
    expected = None if entry.op in NONPARAMETRIC else "selu"
    assert entry.activation == expected, entry


def test_fixed_space_rejects_beta():
  alpha, beta = mixed_alpha_and_beta()
  with pytest.raises(ValueError, match="no beta"):
    derive_normal(alpha, beta=beta, space=search_space.fixed_space("relu"))


def test_edge_weights_change_kept_edges():
  alpha = uniform_alpha()
  alpha[genotype_lib.edge_index(0, 3), SEP_CONV_3X3] = 2.0
  alpha[genotype_lib.edge_index(1, 3), SEP_CONV_3X3] = 2.0
  weights = np.zeros(14)
  weights[genotype_lib.edge_index(2, 3)] = 5.0

  assert inputs_of_node(derive_normal(alpha), 3) == (0, 1)
  assert inputs_of_node(derive_normal(alpha, edge_weights=weights), 3) == (2, 0)


def test_edge_weights_softmax_per_node():
  # With uniform alpha every edge has strength 1/8, so a softmax over each
  # node's incoming edges makes the strengths of each node sum to 1/8.
  weights = np.random.default_rng(4).normal(size=14)
  strengths = genotype_lib.edge_strengths(uniform_alpha(), weights)
  for node in range(2, 6):
    rows = [genotype_lib.edge_index(i, node) for i in range(node)]
    assert strengths[rows].sum() == pytest.approx(1 / 8), node


def test_edge_strengths_exclude_none():
  alpha = uniform_alpha()
  alpha[:, ZERO_COLUMN] = 5.0
  alpha[:, SKIP] = 1.0
  expected = np.exp(1.0) / (np.exp(5.0) + np.exp(1.0) + 6)
  strengths = genotype_lib.edge_strengths(alpha)
  assert strengths == pytest.approx(np.full(14, expected))


def test_non_factorized_maps_back_candidate():
  space = search_space.non_factorized_space()
  sep_conv_5x5, selu = 1, 7  # Positions among parametric ops / activations.
  column = 4 + 9 * sep_conv_5x5 + selu
  alpha = uniform_alpha(space.num_alpha_columns)
  alpha[genotype_lib.edge_index(0, 2), column] = 5.0

  entry = derive_normal(alpha, space=space)[0]
  assert entry.op == "sep_conv_5x5"
  assert entry.activation == "selu"
  assert entry.input == 0


def test_non_factorized_pool_has_no_activation():
  space = search_space.non_factorized_space()
  alpha = uniform_alpha(space.num_alpha_columns)
  alpha[genotype_lib.edge_index(1, 2), AVG_POOL] = 5.0
  entry = derive_normal(alpha, space=space)[0]
  assert entry.op == "avg_pool_3x3"
  assert entry.activation is None


def test_derived_concat_is_all_nodes():
  genotype = genotype_lib.derive_genotype(uniform_alpha(), uniform_alpha())
  assert genotype.normal_concat == (2, 3, 4, 5)
  assert genotype.reduce_concat == (2, 3, 4, 5)


def test_derived_genotype_round_trips():
  alpha, beta = mixed_alpha_and_beta()
  genotype = genotype_lib.derive_genotype(alpha, alpha, beta, beta)
  assert genotype_lib.Genotype.from_json(genotype.to_json()) == genotype


@pytest.mark.parametrize("argument, kwargs", [
    ("alpha_normal", {"alpha_normal": np.zeros((14, 7))}),
    ("alpha_reduce", {"alpha_reduce": np.zeros((13, 8))}),
    ("beta_normal", {"beta_normal": np.zeros((14, 8)),
                     "beta_reduce": np.zeros((14, 9))}),
    ("beta_reduce", {"beta_normal": np.zeros((14, 9)),
                     "beta_reduce": np.zeros(14)}),
    ("edge_weights_normal", {"edge_weights_normal": np.zeros((14, 1)),
                             "edge_weights_reduce": np.zeros(14)}),
    ("edge_weights_reduce", {"edge_weights_normal": np.zeros(14),
                             "edge_weights_reduce": np.zeros(15)}),
])
def test_shape_error_names_argument(argument, kwargs):
  arguments = {"alpha_normal": uniform_alpha(), "alpha_reduce": uniform_alpha()}
  arguments.update(kwargs)
  with pytest.raises(ValueError) as info:
    genotype_lib.derive_genotype(**arguments)
  assert argument in str(info.value)
  assert "Expected (" in str(info.value)


def test_non_finite_alpha_rejected():
  alpha = uniform_alpha()
  alpha[3, 2] = np.nan
  with pytest.raises(ValueError, match="alpha_reduce contains NaN"):
    genotype_lib.derive_genotype(uniform_alpha(), alpha)


def test_lone_beta_rejected():
  with pytest.raises(ValueError, match="beta_normal and beta_reduce"):
    genotype_lib.derive_genotype(
        uniform_alpha(), uniform_alpha(),
        beta_normal=np.zeros((14, NUM_ACTIVATIONS)))


def test_derive_signature_is_exact():
  parameters = inspect.signature(genotype_lib.derive_genotype).parameters
  assert list(parameters) == [
      "alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce",
      "edge_weights_normal", "edge_weights_reduce", "space"]
  defaults = {name: p.default for name, p in parameters.items()}
  assert defaults["alpha_normal"] is inspect.Parameter.empty
  assert defaults["alpha_reduce"] is inspect.Parameter.empty
  for name in list(parameters)[2:]:
    assert defaults[name] is None, name
  assert parameters["space"].kind is inspect.Parameter.KEYWORD_ONLY


# JSON form.


def test_to_json_has_documented_form():
  form = genotype_lib.DARTS_V2.to_json()
  assert list(form) == ["normal", "normal_concat", "reduce", "reduce_concat"]
  assert form["normal"][0] == {
      "op": "sep_conv_3x3", "activation": "relu", "input": 0}
  assert form["reduce"][0] == {
      "op": "max_pool_3x3", "activation": None, "input": 0}
  assert form["normal_concat"] == [2, 3, 4, 5]
  assert len(form["reduce"]) == 8


def test_to_json_string_is_parseable():
  text = genotype_lib.PDARTS.to_json_string()
  assert json.loads(text) == genotype_lib.PDARTS.to_json()


@pytest.mark.parametrize("name", sorted(genotype_lib.PUBLISHED))
def test_published_json_round_trip(name):
  genotype = genotype_lib.PUBLISHED[name]
  text = genotype.to_json_string()
  assert genotype_lib.Genotype.from_json(text) == genotype
  assert genotype_lib.Genotype.from_json(json.loads(text)) == genotype


@pytest.mark.parametrize("name", sorted(genotype_lib.PUBLISHED))
def test_published_file_round_trip(name, tmp_path):
  path = tmp_path / f"{name}.json"
  genotype_lib.PUBLISHED[name].save(path)
  assert genotype_lib.load(path) == genotype_lib.PUBLISHED[name]


def test_save_leaves_no_temp_file(tmp_path):
  genotype_lib.DARTS_V1.save(tmp_path / "genotype.json")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["genotype.json"]


def test_save_replaces_existing_file(tmp_path):
  path = tmp_path / "genotype.json"
  genotype_lib.DARTS_V1.save(path)
  genotype_lib.PDARTS.save(path)
  assert genotype_lib.load(path) == genotype_lib.PDARTS


def set_field(form, cell, position, key, value):
  form[cell][position][key] = value
  return form


def drop_key(form, key):
  del form[key]
  return form


def drop_entry_key(form, cell, position, key):
  del form[cell][position][key]
  return form


# Each case: a change to a valid form, the field and a value the error names.
BAD_FORMS = {
    "unknown op": (
        lambda f: set_field(f, "normal", 3, "op", "sep_conv_9x9"),
        '"normal[3].op"', "sep_conv_9x9"),
    "none op": (
        lambda f: set_field(f, "reduce", 5, "op", "none"),
        '"reduce[5].op"', "'none'"),
    "unknown activation": (
        lambda f: set_field(f, "normal", 0, "activation", "gelu"),
        '"normal[0].activation"', "gelu"),
    "activation on pool": (
        lambda f: set_field(f, "reduce", 0, "activation", "relu"),
        '"reduce[0].activation"', "max_pool_3x3"),
    "null activation on conv": (
        lambda f: set_field(f, "normal", 1, "activation", None),
        '"normal[1].activation"', "sep_conv_3x3"),
    "input out of range": (
        lambda f: set_field(f, "normal", 6, "input", 5),
        '"normal[6].input"', "5"),
    "negative input": (
        lambda f: set_field(f, "normal", 0, "input", -1),
        '"normal[0].input"', "-1"),
    "bool input": (
        lambda f: set_field(f, "normal", 0, "input", True),
        '"normal[0].input"', "True"),
    "float input": (
        lambda f: set_field(f, "normal", 0, "input", 1.0),
        '"normal[0].input"', "1.0"),
    "same input twice": (
        lambda f: set_field(f, "normal", 1, "input", 0),
        '"normal[1].input"', "input 0 twice"),
    "seven entries": (
        lambda f: f.update(normal=f["normal"][:7]) or f,
        '"normal"', "7 entries"),
    "missing top-level key": (
        lambda f: drop_key(f, "reduce_concat"),
        '"reduce_concat"', "missing"),
    "unknown top-level key": (
        lambda f: f.update(alpha=[]) or f,
        '"alpha"', "unknown key"),
    "missing entry key": (
        lambda f: drop_entry_key(f, "reduce", 2, "input"),
        '"reduce[2].input"', "missing"),
    "unknown entry key": (
        lambda f: set_field(f, "reduce", 2, "weight", 0.5),
        '"reduce[2].weight"', "unknown key"),
    "concat node out of range": (
        lambda f: f.update(normal_concat=[2, 3, 6]) or f,
        '"normal_concat[2]"', "6"),
    "concat not a list": (
        lambda f: f.update(reduce_concat="2345") or f,
        '"reduce_concat"', "'2345'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FORMS))
def test_json_error_names_field(case):
  change, field, value = BAD_FORMS[case]
  form = change(copy.deepcopy(genotype_lib.DARTS_V2.to_json()))
  with pytest.raises(ValueError) as info:
    genotype_lib.Genotype.from_json(form)
  assert field in str(info.value)
  assert value in str(info.value)


def test_unknown_op_lists_expected():
  form = set_field(genotype_lib.DARTS_V2.to_json(), "normal", 3, "op",
                   "sep_conv_9x9")
  with pytest.raises(ValueError) as info:
    genotype_lib.Genotype.from_json(form)
  assert "Expected one of max_pool_3x3" in str(info.value)
  assert "dil_conv_5x5" in str(info.value)


def test_invalid_json_text_rejected():
  with pytest.raises(ValueError, match="not valid JSON"):
    genotype_lib.Genotype.from_json('{"normal": [')


def test_load_error_names_path(tmp_path):
  path = tmp_path / "bad.json"
  form = set_field(genotype_lib.DARTS_V2.to_json(), "normal", 0, "op", "none")
  path.write_text(json.dumps(form))
  with pytest.raises(ValueError) as info:
    genotype_lib.load(path)
  assert str(path) in str(info.value)
  assert '"normal[0].op"' in str(info.value)


def test_fixed_space_json_loads():
  form = genotype_lib.DARTS_V2.with_activation("selu").to_json()
  space = search_space.fixed_space("selu")
  loaded = genotype_lib.Genotype.from_json(form, space)
  assert loaded.normal[0].activation == "selu"
  assert genotype_lib.Genotype.from_json(form) == loaded


def test_fixed_space_rejects_other_activation():
  form = genotype_lib.DARTS_V2.to_json()
  with pytest.raises(ValueError) as info:
    genotype_lib.Genotype.from_json(form, search_space.fixed_space("selu"))
  assert '"normal[0].activation"' in str(info.value)
  assert "'relu'" in str(info.value)


def test_space_without_operator_rejects_it():
  space = search_space.factorized_space().without_operators("dil_conv_3x3")
  with pytest.raises(ValueError, match=r'"normal\[7\].op"'):
    genotype_lib.DARTS_V2.validate(space)


# Published genotypes.


@pytest.mark.parametrize("name", sorted(genotype_lib.PUBLISHED))
def test_published_genotype_is_valid(name):
  genotype_lib.PUBLISHED[name].validate()


def test_published_genotypes_are_distinct():
  genotypes = list(genotype_lib.PUBLISHED.values())
  assert len(set(genotypes)) == len(genotypes)


def test_published_use_relu_only():
  for name, genotype in genotype_lib.PUBLISHED.items():
    activations = {e.activation for e in genotype.normal + genotype.reduce}
    assert activations <= {"relu", None}, name


def test_published_names_are_listed():
  assert sorted(genotype_lib.PUBLISHED) == [
      "DARTS_V1", "DARTS_V2", "PC_DARTS_cifar", "PC_DARTS_image", "PDARTS"]
  assert genotype_lib.PUBLISHED["PDARTS"] is genotype_lib.PDARTS


def test_darts_v2_cell_from_source():
  # Spot check of one cell against the DARTS code's (op, input) list.
  pairs = [(e.op, e.input) for e in genotype_lib.DARTS_V2.normal]
  assert pairs == [
      ("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0),
      ("sep_conv_3x3", 1), ("sep_conv_3x3", 1), ("skip_connect", 0),
      ("skip_connect", 0), ("dil_conv_3x3", 2)]


def test_with_activation_keeps_pools_bare():
  changed = genotype_lib.DARTS_V1.with_activation("selu")
  for entry in changed.normal + changed.reduce:
    expected = None if entry.op in NONPARAMETRIC else "selu"
    assert entry.activation == expected, entry


def test_with_activation_completes_derived():
  alpha, _ = mixed_alpha_and_beta()
  genotype = genotype_lib.derive_genotype(alpha, alpha)
  genotype.with_activation("relu").validate()


def test_genotype_without_beta_invalid():
  alpha, _ = mixed_alpha_and_beta()
  genotype = genotype_lib.derive_genotype(alpha, alpha)
  with pytest.raises(ValueError, match=r'"normal\[1\].activation": null'):
    genotype.validate()


# get_genotype.


def test_get_genotype_by_name():
  assert genotype_lib.get_genotype("PC_DARTS_cifar") is (
      genotype_lib.PC_DARTS_cifar)


def test_get_genotype_by_path(tmp_path):
  path = tmp_path / "genotype.json"
  genotype_lib.PDARTS.save(path)
  assert genotype_lib.get_genotype(str(path)) == genotype_lib.PDARTS


def test_get_genotype_by_json_string():
  text = genotype_lib.DARTS_V1.to_json_string()
  assert genotype_lib.get_genotype(text) == genotype_lib.DARTS_V1


def test_get_genotype_names_are_case_sensitive():
  with pytest.raises(ValueError, match="Known names: DARTS_V1"):
    genotype_lib.get_genotype("darts_v1")


def test_unknown_genotype_lists_known_names():
  with pytest.raises(ValueError) as info:
    genotype_lib.get_genotype("NASNet")
  for name in genotype_lib.PUBLISHED:
    assert name in str(info.value), name

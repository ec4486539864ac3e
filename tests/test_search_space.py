"""Search spaces: the groups, their order and immutability."""

import pytest

from tf_adarts import activations
from tf_adarts import search_space

DARTS_OPERATORS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
                   "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
                   "dil_conv_5x5")
ACTIVATIONS = ("relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "celu",
               "selu", "swish")


def test_operators_in_darts_order():
  space = search_space.factorized_space()
  assert space.operators.names == DARTS_OPERATORS


def test_parametric_flags():
  space = search_space.factorized_space()
  assert space.parametric_operators == DARTS_OPERATORS[4:]
  assert space.nonparametric_operators == DARTS_OPERATORS[:4]


def test_activation_order():
  assert search_space.factorized_space().activations.names == ACTIVATIONS


def test_factorized_columns():
  space = search_space.factorized_space()
  assert space.num_alpha_columns == 8
  assert space.num_beta_columns == 9
  assert space.has_beta


def test_non_factorized_candidate_order():
  space = search_space.non_factorized_space()
  pairs = space.alpha_candidates
  assert len(pairs) == 40
  assert not space.has_beta
  for p, op in enumerate(DARTS_OPERATORS[4:]):
    for a, act in enumerate(ACTIVATIONS):
      assert pairs[4 + 9 * p + a] == (op, act)
  assert pairs[:4] == tuple((op, None) for op in DARTS_OPERATORS[:4])


def test_fixed_space_has_no_beta():
  space = search_space.get_space("fixed:selu")
  assert space.num_beta_columns == 0
  assert space.alpha_candidates[4] == ("sep_conv_3x3", "selu")
  assert space.alpha_candidates[1] == ("max_pool_3x3", None)


def test_zero_column_is_none():
  assert search_space.factorized_space().zero_column == 0
  assert search_space.non_factorized_space().zero_column == 0


def test_registering_activation_returns_new_space():
  default = search_space.factorized_space()
  extended = default.with_activation(
      "softplus", activations.elementwise(lambda x: x))
  assert extended.activations.names == ACTIVATIONS + ("softplus",)
  assert default.activations.names == ACTIVATIONS
  assert search_space.factorized_space().activations.names == ACTIVATIONS


def test_registering_operator_returns_new_space():
  default = search_space.non_factorized_space()
  extended = default.with_operator(
      "sep_conv_7x7", default.operators.get("sep_conv_3x3").factory,
      parametric=True)
  assert extended.num_alpha_columns == 4 + 5 * 9
  assert default.num_alpha_columns == 40


def test_duplicate_name_rejected():
  space = search_space.factorized_space()
  with pytest.raises(ValueError, match="duplicate"):
    space.with_activation("relu", activations.elementwise(lambda x: x))


def test_unknown_space_name_rejected():
  with pytest.raises(ValueError, match="'darts'"):
    search_space.get_space("darts")


def test_unknown_fixed_activation_rejected():
  with pytest.raises(KeyError, match="'gelu'"):
    search_space.get_space("fixed:gelu")


def test_space_name_round_trip():
  for name in ("factorized", "non_factorized", "fixed:relu"):
    assert search_space.get_space(name).name == name

"""Search spaces as data: ordered groups of named candidates.

A search space is a product of two groups: the regular operators (weighted by
alpha) and the activations (weighted by beta). Its kind says how they are
combined on an edge:

- `factorized`: the method. One softmax over the operators and one over the
  activations; the activation mixture feeds every parametric operator.
- `non_factorized`: the baseline with one softmax over the combined
  candidates: the non-parametric operators, then every parametric operator
  with every activation (index = n_nonparametric + n_activations * p + a).
- `fixed`: one fixed activation before every parametric operator, no beta.

Spaces and groups are immutable. Registering a candidate returns a new
space; the default groups are never changed.
"""

import dataclasses
from typing import Callable, Optional

from tf_adarts import activations as activations_lib
from tf_adarts import operations as operations_lib

FACTORIZED = "factorized"
NON_FACTORIZED = "non_factorized"
FIXED = "fixed"
KINDS = (FACTORIZED, NON_FACTORIZED, FIXED)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One named candidate of a group.

  Attributes:
    name: the candidate's name, as it appears in genotypes.
    factory: builds the candidate's edge-batched layer. Operators take
      (channels, stride, num_edges, affine, pool_batch_norm, name);
      activations take (channels, num_edges, name).
    parametric: for operators, whether the searched activation is applied
      to the operator's input.
    zero: for operators, whether it outputs zeros (`none`) and can be
      skipped.
  """
  name: str
  factory: Callable
  parametric: bool = False
  zero: bool = False


@dataclasses.dataclass(frozen=True)
class CandidateGroup:
  """An ordered, immutable group of candidates with unique names."""
  name: str
  candidates: tuple

  def __post_init__(self):
    names = [c.name for c in self.candidates]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise ValueError(
          f"Group {self.name!r} has duplicate candidate names {duplicates}; "
          "give each candidate a unique name.")

  @property
  def names(self) -> tuple:
    return tuple(c.name for c in self.candidates)

  def __len__(self):
    return len(self.candidates)

  def __iter__(self):
    return iter(self.candidates)

  def __getitem__(self, index):
    return self.candidates[index]

  def index(self, name: str) -> int:
    """Return the position of the candidate called `name`."""
    try:
      return self.names.index(name)
    except ValueError:
      raise KeyError(
          f"{name!r} is not in group {self.name!r}; known: "
          f"{', '.join(self.names)}.") from None

  def get(self, name: str) -> Candidate:
    return self.candidates[self.index(name)]

  def with_candidate(self, candidate: Candidate) -> "CandidateGroup":
    """Return a new group with `candidate` appended."""
    return CandidateGroup(self.name, self.candidates + (candidate,))

  def without(self, *names: str) -> "CandidateGroup":
    """Return a new group without the named candidates."""
    for name in names:
      self.index(name)
    kept = tuple(c for c in self.candidates if c.name not in names)
    return CandidateGroup(self.name, kept)


def default_operators() -> CandidateGroup:
  """The eight DARTS operators, in the DARTS order."""
  return CandidateGroup("operators", tuple(
      Candidate(name, factory, parametric, zero)
      for name, factory, parametric, zero in operations_lib.OPERATOR_FACTORIES))


def default_activations() -> CandidateGroup:
  """The nine activations: relu, relu6, leaky_relu, prelu, rrelu, elu, celu,
  selu, swish."""
  return CandidateGroup("activations", tuple(
      Candidate(name, factory)
      for name, factory in activations_lib.ACTIVATION_FACTORIES))


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """A search space: a kind and its operator and activation groups.

  Attributes:
    kind: `factorized`, `non_factorized` or `fixed`.
    operators: the regular-operator group.
    activations: the activation group. In a fixed space, the group still
      lists every activation, and `fixed_activation` names the one used.
    fixed_activation: the activation of a fixed space, else None.
  """
  kind: str = FACTORIZED
  operators: CandidateGroup = dataclasses.field(
      default_factory=default_operators)
  activations: CandidateGroup = dataclasses.field(
      default_factory=default_activations)
  fixed_activation: Optional[str] = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(
          f"Unknown search space kind {self.kind!r}; use one of "
          f"{', '.join(KINDS)}.")
    if self.kind == FIXED:
      if self.fixed_activation is None:
        raise ValueError(
            "A fixed space needs fixed_activation, one of "
            f"{', '.join(self.activations.names)}.")
      self.activations.index(self.fixed_activation)
    elif self.fixed_activation is not None:
      raise ValueError(
          f"fixed_activation={self.fixed_activation!r} is only valid for the "
          f"{FIXED!r} kind, not {self.kind!r}.")
    zeros = [c.name for c in self.operators if c.zero]
    if len(zeros) > 1:
      raise ValueError(f"At most one zero operator is allowed, got {zeros}.")

  @property
  def name(self) -> str:
    """The space's name as `get_space` reads it: e.g. "fixed:relu"."""
    if self.kind == FIXED:
      return f"{FIXED}:{self.fixed_activation}"
    return self.kind

  @property
  def has_beta(self) -> bool:
    """Whether the space has activation weights (beta)."""
    return self.kind == FACTORIZED

  @property
  def parametric_operators(self) -> tuple:
    return tuple(c.name for c in self.operators if c.parametric)

  @property
  def nonparametric_operators(self) -> tuple:
    return tuple(c.name for c in self.operators if not c.parametric)

  @property
  def alpha_candidates(self) -> tuple:
    """The (operator, activation or None) pair of each alpha column.

    In the factorized and fixed spaces the columns are the operators (the
    activation is None, or the fixed activation for parametric operators);
    in the non-factorized space they are the combined candidates.
    """
    if self.kind == NON_FACTORIZED:
      pairs = [(name, None) for name in self.nonparametric_operators]
      for op in self.parametric_operators:
        pairs.extend((op, act) for act in self.activations.names)
      return tuple(pairs)

    activation = self.fixed_activation if self.kind == FIXED else None
    return tuple((c.name, activation if c.parametric else None)
                 for c in self.operators)

  @property
  def num_alpha_columns(self) -> int:
    return len(self.alpha_candidates)

  @property
  def num_beta_columns(self) -> int:
    return len(self.activations) if self.has_beta else 0

  @property
  def zero_column(self) -> Optional[int]:
    """The alpha column of the zero operator (`none`), if any."""
    for column, (op, _) in enumerate(self.alpha_candidates):
      if self.operators.get(op).zero:
        return column
    return None

  def with_activation(self, name: str, factory: Callable) -> "SearchSpace":
    """Return a new space with one more activation candidate."""
    return dataclasses.replace(
        self, activations=self.activations.with_candidate(
            Candidate(name, factory)))

  def with_operator(self, name: str, factory: Callable,
                    parametric: bool) -> "SearchSpace":
    """Return a new space with one more regular operator."""
    return dataclasses.replace(
        self, operators=self.operators.with_candidate(
            Candidate(name, factory, parametric)))

  def without_activations(self, *names: str) -> "SearchSpace":
    """Return a new space without the named activations."""
    return dataclasses.replace(
        self, activations=self.activations.without(*names))

  def without_operators(self, *names: str) -> "SearchSpace":
    """Return a new space without the named operators."""
    return dataclasses.replace(self, operators=self.operators.without(*names))


def factorized_space() -> SearchSpace:
  return SearchSpace(FACTORIZED)


def non_factorized_space() -> SearchSpace:
  return SearchSpace(NON_FACTORIZED)


def fixed_space(activation: str) -> SearchSpace:
  return SearchSpace(FIXED, fixed_activation=activation)


def get_space(name: str) -> SearchSpace:
  """Return a default space by name.

  Args:
    name: "factorized", "non_factorized", or "fixed:ACTIVATION" (for
      instance "fixed:relu").
  """
  if name == FACTORIZED:
    return factorized_space()
  if name == NON_FACTORIZED:
    return non_factorized_space()
  if name.startswith(FIXED + ":"):
    return fixed_space(name.split(":", 1)[1])
  raise ValueError(
      f"Unknown search space {name!r}; use 'factorized', 'non_factorized' or "
      f"'fixed:ACTIVATION' with ACTIVATION one of "
      f"{', '.join(default_activations().names)}.")

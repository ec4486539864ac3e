"""Genotypes: the discrete cells that a search derives and retraining builds.

A genotype describes a normal cell and a reduction cell. Each cell has four
intermediate nodes (2..5), and each node keeps two incoming edges, so a cell
lists 8 entries in node order: (operator, activation or None, input node).
Non-parametric operators carry no activation. The cell output concatenates
the nodes listed in its concat, [2, 3, 4, 5] for every derived genotype.

This module defines the typed genotype and its JSON form with validation. It
also derives a genotype from architecture weights (the DARTS rule, with the
PC-DARTS edge normalization as an option) and provides the genotypes
published by DARTS, PC-DARTS and P-DARTS.
"""

import dataclasses
import json
import numbers
import os
import tempfile
from typing import Optional

import numpy as np

from tf_adarts import search_space

NUM_INPUT_NODES = 2
NUM_INTERMEDIATE_NODES = 4
INTERMEDIATE_NODES = tuple(
    range(NUM_INPUT_NODES, NUM_INPUT_NODES + NUM_INTERMEDIATE_NODES))
EDGES_PER_NODE_KEPT = 2
ENTRIES_PER_CELL = EDGES_PER_NODE_KEPT * NUM_INTERMEDIATE_NODES
DEFAULT_CONCAT = INTERMEDIATE_NODES

# The 14 edges (i, j) of a cell in the DARTS row order of alpha and beta:
# node 2 from inputs 0, 1, then node 3 from 0, 1, 2, and so on to node 5.
EDGES = tuple((i, j) for j in INTERMEDIATE_NODES for i in range(j))
NUM_EDGES = len(EDGES)

CELL_TYPES = ("normal", "reduce")
_TOP_LEVEL_KEYS = ("normal", "normal_concat", "reduce", "reduce_concat")
_ENTRY_KEYS = ("op", "activation", "input")


def edge_index(i: int, j: int) -> int:
  """Return the row of edge (i, j) in alpha, beta and the edge weights.

  Args:
    i: the source node, 0 <= i < j.
    j: the intermediate node that the edge feeds, 2..5.

  Raises:
    ValueError: when (i, j) is not an edge of the cell.
  """
  if j not in INTERMEDIATE_NODES or not 0 <= i < j:
    raise ValueError(
        f"({i}, {j}) is not an edge of the cell. Expected j in 2..5 and "
        "0 <= i < j.")
  return _first_row_of_node(j) + i


def _first_row_of_node(node: int) -> int:
  # The nodes before `node` own 2 + 3 + ... + (node - 1) rows.
  return sum(range(NUM_INPUT_NODES, node))


def node_of_entry(position: int) -> int:
  """Return the intermediate node fed by the cell entry at `position` (0..7)."""
  if not 0 <= position < ENTRIES_PER_CELL:
    raise ValueError(
        f"Entry position {position} is out of range. Expected 0.."
        f"{ENTRIES_PER_CELL - 1}.")
  return NUM_INPUT_NODES + position // EDGES_PER_NODE_KEPT


@dataclasses.dataclass(frozen=True)
class GenotypeEntry:
  """One kept edge of a cell.

  Attributes:
    op: the regular operator, e.g. "sep_conv_3x3". Never the zero operator.
    activation: the activation applied before a parametric operator, or None
      on a non-parametric operator.
    input: the source node of the edge, 0..node-1.
  """
  op: str
  activation: Optional[str]
  input: int

  def to_json(self) -> dict:
    """Return the entry as a JSON-serialisable dict."""
    return {"op": self.op, "activation": self.activation, "input": self.input}


@dataclasses.dataclass(frozen=True)
class Genotype:
  """A normal and a reduction cell, each 8 entries in node order.

  Entries 2k and 2k + 1 of a cell feed intermediate node k + 2. Lists given
  to the constructor are stored as tuples, so genotypes are hashable.
  Construction does not check the genotype against a search space; call
  `validate` for that (`from_json` and `load` always do).

  Attributes:
    normal: the 8 entries of the normal cell.
    normal_concat: the nodes that the normal cell's output concatenates.
    reduce: the 8 entries of the reduction cell.
    reduce_concat: the nodes that the reduction cell's output concatenates.
  """
  normal: tuple
  normal_concat: tuple
  reduce: tuple
  reduce_concat: tuple

  def __post_init__(self):
    for name in _TOP_LEVEL_KEYS:
      object.__setattr__(self, name, tuple(getattr(self, name)))

  @classmethod
  def from_pairs(cls, normal, reduce, activation: Optional[str] = "relu",
                 space: Optional[search_space.SearchSpace] = None,
                 concat=DEFAULT_CONCAT) -> "Genotype":
    """Build a genotype from DARTS-style (operator, input node) pairs.

    Args:
      normal: 8 (operator, input) pairs of the normal cell.
      reduce: 8 (operator, input) pairs of the reduction cell.
      activation: the activation given to every parametric operator.
      space: the space that defines which operators are parametric; defaults
        to the factorized space.
      concat: the concatenated nodes of both cells.
    """
    space = space or search_space.factorized_space()

    def to_entries(pairs):
      return tuple(
          GenotypeEntry(op, _activation_for(space, op, activation), input_node)
          for op, input_node in pairs)

    return cls(to_entries(normal), tuple(concat), to_entries(reduce),
               tuple(concat))

  def with_activation(self, activation: str,
                      space: Optional[search_space.SearchSpace] = None
                      ) -> "Genotype":
    """Return a copy with `activation` on every parametric operator.

    The ablations that retrain a searched cell with one activation everywhere
    (e.g. "factorized -> all SELU") use this. It also completes a genotype
    derived without beta. Non-parametric operators keep None.

    Args:
      activation: the activation name to set.
      space: the space that defines which operators are parametric; defaults
        to the factorized space.
    """
    space = space or search_space.factorized_space()

    def replace(entries):
      return tuple(
          dataclasses.replace(
              entry, activation=_activation_for(space, entry.op, activation))
          for entry in entries)

    return dataclasses.replace(
        self, normal=replace(self.normal), reduce=replace(self.reduce))

  def to_json(self) -> dict:
    """Return the JSON-serialisable dict form.

    The form is {"normal": [8 entries], "normal_concat": [2, 3, 4, 5],
    "reduce": [8 entries], "reduce_concat": [2, 3, 4, 5]}, each entry
    {"op": ..., "activation": ... or None, "input": ...}.
    """
    return {
        "normal": [entry.to_json() for entry in self.normal],
        "normal_concat": list(self.normal_concat),
        "reduce": [entry.to_json() for entry in self.reduce],
        "reduce_concat": list(self.reduce_concat),
    }

  def to_json_string(self, indent: Optional[int] = 2) -> str:
    """Return the JSON form as a string."""
    return json.dumps(self.to_json(), indent=indent)

  def save(self, path) -> None:
    """Write the JSON form to `path` atomically.

    The text goes to a temporary file in the destination folder first, which
    then replaces `path`, so a reader never sees a partly written file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(
        dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
      with os.fdopen(handle, "w", encoding="utf-8") as temp_file:
        temp_file.write(self.to_json_string() + "\n")
      # mkstemp creates the file readable by its owner only.
      os.chmod(temp_path, 0o644)
      os.replace(temp_path, path)
    except BaseException:
      if os.path.exists(temp_path):
        os.remove(temp_path)
      raise

  @classmethod
  def from_json(cls, obj_or_str,
                space: Optional[search_space.SearchSpace] = None
                ) -> "Genotype":
    """Parse and validate a genotype from its JSON form.

    Args:
      obj_or_str: the dict form, or a string containing it.
      space: the space whose operator and activation groups the genotype must
        use; defaults to the factorized space.

    Raises:
      ValueError: on invalid JSON or an invalid genotype. The message names
        the field (e.g. "normal[3].op"), the value and what is expected.
    """
    obj = _decode_json(obj_or_str)
    _check_keys("", obj, _TOP_LEVEL_KEYS, "a JSON object")

    genotype = cls(
        normal=_parse_cell("normal", obj["normal"]),
        normal_concat=_parse_concat("normal_concat", obj["normal_concat"]),
        reduce=_parse_cell("reduce", obj["reduce"]),
        reduce_concat=_parse_concat("reduce_concat", obj["reduce_concat"]),
    )
    genotype.validate(space)
    return genotype

  @classmethod
  def load(cls, path, space: Optional[search_space.SearchSpace] = None
           ) -> "Genotype":
    """Read and validate a genotype JSON file (see `from_json`)."""
    with open(path, encoding="utf-8") as json_file:
      text = json_file.read()
    try:
      return cls.from_json(text, space)
    except ValueError as error:
      raise ValueError(f"{os.fspath(path)}: {error}") from None

  def validate(self, space: Optional[search_space.SearchSpace] = None) -> None:
    """Raise ValueError unless the genotype is valid in `space`.

    Each cell must satisfy these checks:
    - it has 8 entries;
    - each operator is in the operator group and is not the zero operator;
    - parametric operators, and only they, carry an activation, which is in
      the activation group, or is the fixed activation in a fixed space;
    - each input node is in 0..node-1, and the two inputs of a node differ;
    - the concat is a non-empty list of distinct intermediate nodes 2..5.

    Args:
      space: defaults to the factorized space.
    """
    space = space or search_space.factorized_space()
    for cell in CELL_TYPES:
      _validate_cell(cell, getattr(self, cell), space)
      _validate_concat(f"{cell}_concat", getattr(self, f"{cell}_concat"))


def load(path, space: Optional[search_space.SearchSpace] = None) -> Genotype:
  """Read and validate a genotype JSON file; see `Genotype.from_json`."""
  return Genotype.load(path, space)


def _activation_for(space, op: str, activation: Optional[str]):
  return activation if space.operators.get(op).parametric else None


# JSON parsing: structure and types. The checks against a space are below.


def _field_error(field: str, problem: str) -> ValueError:
  return ValueError(f'genotype field "{field}": {problem}')


def _decode_json(obj_or_str):
  if isinstance(obj_or_str, (str, bytes, bytearray)):
    try:
      obj_or_str = json.loads(obj_or_str)
    except json.JSONDecodeError as error:
      raise ValueError(f"Genotype text is not valid JSON: {error}.") from None
  return obj_or_str


def _check_keys(field: str, obj, keys: tuple, kind: str) -> None:
  """Raise unless `obj` is a dict with exactly `keys`."""
  prefix = f"{field}." if field else ""
  if not isinstance(obj, dict):
    where = f'genotype field "{field}"' if field else "genotype"
    raise ValueError(
        f"{where}: got {type(obj).__name__} {obj!r}. Expected {kind} with "
        f"keys {', '.join(keys)}.")

  for key in keys:
    if key not in obj:
      raise _field_error(
          prefix + key, f"missing. Expected keys {', '.join(keys)}.")
  for key in obj:
    if key not in keys:
      raise _field_error(
          prefix + str(key),
          f"unknown key {key!r}. Expected only {', '.join(keys)}.")


def _parse_cell(cell: str, value) -> tuple:
  if not isinstance(value, list):
    raise _field_error(
        cell, f"got {type(value).__name__} {value!r}. Expected a list of "
        f"{ENTRIES_PER_CELL} entries.")
  _check_entry_count(cell, len(value))
  return tuple(_parse_entry(f"{cell}[{position}]", item)
               for position, item in enumerate(value))


def _parse_entry(field: str, item) -> GenotypeEntry:
  _check_keys(field, item, _ENTRY_KEYS, "an entry object")

  op, activation, input_node = item["op"], item["activation"], item["input"]
  if not isinstance(op, str):
    raise _field_error(
        f"{field}.op", f"got {op!r}. Expected an operator name (a string).")
  if activation is not None and not isinstance(activation, str):
    raise _field_error(
        f"{field}.activation",
        f"got {activation!r}. Expected an activation name (a string) or null.")
  if not _is_integer(input_node):
    raise _field_error(
        f"{field}.input",
        f"got {input_node!r}. Expected an integer node index.")
  return GenotypeEntry(op, activation, int(input_node))


def _parse_concat(field: str, value) -> tuple:
  if not isinstance(value, list):
    raise _field_error(
        field, f"got {type(value).__name__} {value!r}. Expected a list of "
        "intermediate node indices, e.g. [2, 3, 4, 5].")
  for position, node in enumerate(value):
    if not _is_integer(node):
      raise _field_error(
          f"{field}[{position}]",
          f"got {node!r}. Expected an integer node index in 2..5.")
  return tuple(int(node) for node in value)


def _is_integer(value) -> bool:
  # bool is an int subclass, but true/false is never a node index.
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# Validation against a search space.


def _check_entry_count(cell: str, count: int) -> None:
  if count != ENTRIES_PER_CELL:
    raise _field_error(
        cell, f"{count} entries. Expected {ENTRIES_PER_CELL}, two per "
        "intermediate node 2..5 in node order.")


def _validate_cell(cell: str, entries: tuple, space) -> None:
  _check_entry_count(cell, len(entries))
  for position, entry in enumerate(entries):
    field = f"{cell}[{position}]"
    _validate_op(f"{field}.op", entry.op, space)
    _validate_activation(f"{field}.activation", entry, space)
    _validate_input(f"{field}.input", entry.input, node_of_entry(position))

  for first in range(0, ENTRIES_PER_CELL, EDGES_PER_NODE_KEPT):
    a, b = entries[first], entries[first + 1]
    if a.input == b.input:
      raise _field_error(
          f"{cell}[{first + 1}].input",
          f"node {node_of_entry(first)} takes input {b.input} twice (entries "
          f"{cell}[{first}] and {cell}[{first + 1}]). Expected two distinct "
          "input nodes.")


def _nonzero_operators(space) -> tuple:
  return tuple(c.name for c in space.operators if not c.zero)


def _validate_op(field: str, op: str, space) -> None:
  allowed = ", ".join(_nonzero_operators(space))
  if op not in space.operators.names:
    raise _field_error(
        field, f"unknown operator {op!r}. Expected one of {allowed}.")
  if space.operators.get(op).zero:
    raise _field_error(
        field, f"{op!r} is the zero operator, which never appears in a "
        f"genotype. Expected one of {allowed}.")


def _validate_activation(field: str, entry: GenotypeEntry, space) -> None:
  activation = entry.activation
  parametric = space.operators.get(entry.op).parametric
  if not parametric:
    if activation is not None:
      raise _field_error(
          field, f"activation {activation!r} on non-parametric operator "
          f"{entry.op!r}. Expected null, because only "
          f"{', '.join(space.parametric_operators)} take an activation.")
    return

  if space.kind == search_space.FIXED:
    allowed = (space.fixed_activation,)
  else:
    allowed = space.activations.names
  if activation is None:
    raise _field_error(
        field, f"null on parametric operator {entry.op!r}. Expected one of "
        f"{', '.join(allowed)}.")
  if activation not in allowed:
    raise _field_error(
        field, f"activation {activation!r} is not in space {space.name!r}. "
        f"Expected one of {', '.join(allowed)}.")


def _validate_input(field: str, input_node: int, node: int) -> None:
  if not _is_integer(input_node):
    raise _field_error(
        field, f"got {input_node!r}. Expected an integer node index.")
  if not 0 <= input_node < node:
    raise _field_error(
        field, f"input {input_node} is out of range for node {node}. "
        f"Expected an integer in 0..{node - 1}.")


def _validate_concat(field: str, concat: tuple) -> None:
  if not concat:
    raise _field_error(
        field, "empty. Expected intermediate node indices, e.g. [2, 3, 4, 5].")
  for position, node in enumerate(concat):
    if not _is_integer(node) or node not in INTERMEDIATE_NODES:
      raise _field_error(
          f"{field}[{position}]",
          f"got {node!r}. Expected an intermediate node index in 2..5.")
  if len(set(concat)) != len(concat):
    raise _field_error(
        field, f"{list(concat)} lists a node twice. Expected distinct nodes.")


# Derivation from architecture weights.


def derive_genotype(alpha_normal, alpha_reduce, beta_normal=None,
                    beta_reduce=None, edge_weights_normal=None,
                    edge_weights_reduce=None, *, space=None) -> Genotype:
  """Derive the discrete genotype from raw architecture weights (DARTS rule).

  For each intermediate node j, the strength of edge (i, j) is the largest
  softmax(alpha) probability over the non-zero columns, times the softmax of
  the edge weights over node j's incoming edges when edge weights are given
  (PC-DARTS edge normalization). The two strongest edges are kept, stronger
  first. A kept edge takes the operator of its strongest non-zero column.
  A parametric operator takes the argmax of softmax(beta) in the factorized
  space, the fixed activation in a fixed space and the combined candidate's
  own activation in the non-factorized space. Ties go to the lower index,
  for edges and for columns alike.

  Args:
    alpha_normal: raw alpha of the normal cell, shape
      (14, space.num_alpha_columns), columns as in `space.alpha_candidates`.
    alpha_reduce: raw alpha of the reduction cell, same shape.
    beta_normal: raw beta of the normal cell, shape (14, number of
      activations); factorized space only. Give both betas or neither.
    beta_reduce: raw beta of the reduction cell, same shape.
    edge_weights_normal: raw edge-normalization weights, shape (14,).
      Give both edge weights or neither.
    edge_weights_reduce: same, for the reduction cell.
    space: the search space; defaults to the factorized space.

  Returns:
    The genotype, with concat [2, 3, 4, 5] for both cells.

  Raises:
    ValueError: when a shape is wrong (the message names the argument),
      a value is not finite, only one of a pair is given, or beta is given
      for a space without beta.
  """
  space = space or search_space.factorized_space()
  alphas = {
      "normal": _as_weights("alpha_normal", alpha_normal,
                            (NUM_EDGES, space.num_alpha_columns)),
      "reduce": _as_weights("alpha_reduce", alpha_reduce,
                            (NUM_EDGES, space.num_alpha_columns)),
  }
  if not space.has_beta and (beta_normal is not None
                             or beta_reduce is not None):
    raise ValueError(
        f"beta was given, but space {space.name!r} has no beta. Pass "
        "beta_normal=None and beta_reduce=None, or use the factorized space.")
  betas = _optional_pair("beta", beta_normal, beta_reduce,
                         (NUM_EDGES, len(space.activations)))
  edge_weights = _optional_pair("edge_weights", edge_weights_normal,
                                edge_weights_reduce, (NUM_EDGES,))

  cells = {
      cell: _derive_cell(alphas[cell], betas[cell], edge_weights[cell], space)
      for cell in CELL_TYPES
  }
  # NOTE: with beta None in the factorized space, parametric operators carry
  # activation None, which `validate` and `from_json` reject.
  return Genotype(cells["normal"], DEFAULT_CONCAT, cells["reduce"],
                  DEFAULT_CONCAT)


def _as_weights(name: str, value, shape: tuple) -> np.ndarray:
  """Convert `value` to a float64 array of `shape`, naming `name` on error."""
  array = np.asarray(value, dtype=np.float64)
  if array.shape != shape:
    raise ValueError(
        f"{name} has shape {array.shape}. Expected {shape}: "
        f"{_describe_shape(shape)}.")
  if not np.all(np.isfinite(array)):
    raise ValueError(
        f"{name} contains NaN or infinite values, so no genotype can be "
        "derived from it. Check the search for divergence.")
  return array


def _describe_shape(shape: tuple) -> str:
  if len(shape) == 1:
    return f"one weight per edge of the cell ({NUM_EDGES} edges)"
  return f"{NUM_EDGES} edges by {shape[1]} columns"


def _optional_pair(prefix: str, normal, reduce, shape: tuple) -> dict:
  if (normal is None) != (reduce is None):
    raise ValueError(
        f"Only one of {prefix}_normal and {prefix}_reduce was given. Pass "
        "both or neither.")
  if normal is None:
    return {"normal": None, "reduce": None}
  return {
      "normal": _as_weights(f"{prefix}_normal", normal, shape),
      "reduce": _as_weights(f"{prefix}_reduce", reduce, shape),
  }


def _softmax(logits: np.ndarray) -> np.ndarray:
  shifted = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
  return shifted / np.sum(shifted, axis=-1, keepdims=True)


def _nonzero_probabilities(alpha: np.ndarray, space) -> np.ndarray:
  """Return softmax(alpha) per row with the zero column set to -inf."""
  probabilities = _softmax(alpha)
  if space.zero_column is not None:
    probabilities[:, space.zero_column] = -np.inf
  return probabilities


def edge_strengths(alpha, edge_weights=None, *, space=None) -> np.ndarray:
  """Compute the strength of each of the 14 edges, as derivation ranks them.

  The strength of edge (i, j) is the largest softmax(alpha) probability over
  the non-zero columns. With edge weights, it is multiplied by the softmax
  of the edge weights over node j's incoming edges.

  Args:
    alpha: raw alpha of one cell, shape (14, space.num_alpha_columns).
    edge_weights: raw edge-normalization weights of the cell, shape (14,).
    space: the search space; defaults to the factorized space.

  Returns:
    A float64 array of shape (14,), rows in `EDGES` order.
  """
  space = space or search_space.factorized_space()
  alpha = _as_weights("alpha", alpha, (NUM_EDGES, space.num_alpha_columns))
  if edge_weights is not None:
    edge_weights = _as_weights("edge_weights", edge_weights, (NUM_EDGES,))
  return _edge_strengths(_nonzero_probabilities(alpha, space), edge_weights)


def _edge_strengths(probabilities, edge_weights) -> np.ndarray:
  strengths = np.max(probabilities, axis=1)
  if edge_weights is None:
    return strengths

  for node in INTERMEDIATE_NODES:
    rows = _rows_of_node(node)
    strengths[rows] *= _softmax(edge_weights[rows])
  return strengths


def _rows_of_node(node: int) -> slice:
  return slice(_first_row_of_node(node), _first_row_of_node(node) + node)


def _derive_cell(alpha, beta, edge_weights, space) -> tuple:
  probabilities = _nonzero_probabilities(alpha, space)
  strengths = _edge_strengths(probabilities, edge_weights)

  entries = []
  for node in INTERMEDIATE_NODES:
    # A stable sort keeps the lower input first among equal strengths.
    node_strengths = strengths[_rows_of_node(node)]
    kept = np.argsort(-node_strengths, kind="stable")[:EDGES_PER_NODE_KEPT]
    for input_node in kept:
      row = edge_index(int(input_node), node)
      entries.append(_entry_for_edge(
          probabilities[row], None if beta is None else beta[row],
          int(input_node), space))
  return tuple(entries)


def _entry_for_edge(probabilities, beta_row, input_node: int,
                    space) -> GenotypeEntry:
  # np.argmax returns the first maximum, so ties go to the lower column.
  op, activation = space.alpha_candidates[int(np.argmax(probabilities))]
  if space.has_beta and space.operators.get(op).parametric:
    activation = None
    if beta_row is not None:
      activation = space.activations.names[int(np.argmax(_softmax(beta_row)))]
  return GenotypeEntry(op, activation, input_node)


# Published genotypes, as (operator, input) lists in the genotypes.py files of
# the public code. DARTS_V1 and DARTS_V2 (DARTS first and second order),
# PC_DARTS_cifar and PC_DARTS_image come from yuhuixu1993/PC-DARTS, PDARTS from
# chenxin061/pdarts. Those networks apply ReLU before every parametric
# operator, so every parametric entry here has activation "relu".

DARTS_V1 = Genotype.from_pairs(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0),
            ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0), ("skip_connect", 2)],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1),
            ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2),
            ("skip_connect", 2), ("avg_pool_3x3", 0)],
)

DARTS_V2 = Genotype.from_pairs(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0),
            ("skip_connect", 0), ("dil_conv_3x3", 2)],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1),
            ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2),
            ("skip_connect", 2), ("max_pool_3x3", 1)],
)

PC_DARTS_cifar = Genotype.from_pairs(
    normal=[("sep_conv_3x3", 1), ("skip_connect", 0),
            ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
            ("sep_conv_5x5", 0), ("sep_conv_3x3", 1),
            ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
    reduce=[("sep_conv_5x5", 1), ("max_pool_3x3", 0),
            ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 0), ("sep_conv_3x3", 3),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
)

PC_DARTS_image = Genotype.from_pairs(
    normal=[("skip_connect", 1), ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 0), ("skip_connect", 1),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 3),
            ("sep_conv_3x3", 1), ("dil_conv_5x5", 4)],
    reduce=[("sep_conv_3x3", 0), ("skip_connect", 1),
            ("dil_conv_5x5", 2), ("max_pool_3x3", 1),
            ("sep_conv_3x3", 2), ("sep_conv_3x3", 1),
            ("sep_conv_5x5", 0), ("sep_conv_3x3", 3)],
)

PDARTS = Genotype.from_pairs(
    normal=[("skip_connect", 0), ("dil_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 3),
            ("sep_conv_3x3", 0), ("dil_conv_5x5", 4)],
    reduce=[("avg_pool_3x3", 0), ("sep_conv_5x5", 1),
            ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
            ("max_pool_3x3", 0), ("dil_conv_3x3", 1),
            ("dil_conv_3x3", 1), ("dil_conv_5x5", 3)],
)

PUBLISHED = {
    "DARTS_V1": DARTS_V1,
    "DARTS_V2": DARTS_V2,
    "PC_DARTS_cifar": PC_DARTS_cifar,
    "PC_DARTS_image": PC_DARTS_image,
    "PDARTS": PDARTS,
}


def get_genotype(name_or_path_or_json,
                 space: Optional[search_space.SearchSpace] = None) -> Genotype:
  """Return a published genotype by name, or read one from JSON.

  Args:
    name_or_path_or_json: a name in `PUBLISHED` (case-sensitive), the path
      of a genotype JSON file, a JSON string, a dict in the JSON form, or a
      Genotype (returned as is).
    space: the space that a genotype read from JSON is validated against;
      defaults to the factorized space.

  Raises:
    ValueError: when the argument is neither a known name nor an existing
      file nor JSON text, or when the JSON is an invalid genotype.
  """
  value = name_or_path_or_json
  if isinstance(value, Genotype):
    return value
  if isinstance(value, dict):
    return Genotype.from_json(value, space)

  text = os.fspath(value)
  if text in PUBLISHED:
    return PUBLISHED[text]
  if text.lstrip().startswith("{"):
    return Genotype.from_json(text, space)
  if os.path.isfile(text):
    return Genotype.load(text, space)
  raise ValueError(
      f"Unknown genotype {text!r}: not a published genotype name and no file "
      f"exists at that path. Known names: {', '.join(PUBLISHED)}.")

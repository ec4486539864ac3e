"""Pictures of a search: architecture-weight heatmaps and cell drawings.

Both return PNG bytes, drawn with matplotlib's Agg backend (no display), so
they can go to TensorBoard (`tf.summary.image` after decoding) or to a file.
"""

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from tf_adarts import genotype as genotype_lib  # pylint: disable=g-import-not-at-top


def _png(figure) -> bytes:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  plt.close(figure)
  return buffer.getvalue()


def heatmap_png(weights, row_labels, column_labels, title) -> bytes:
  """Draw a matrix of softmaxed weights (rows: edges) as a labelled heatmap.

  Args:
    weights: [rows, columns] array with values in [0, 1].
    row_labels: one label per row, e.g. "0->2".
    column_labels: one label per column, e.g. operator names.
    title: the figure title.
  """
  weights = np.asarray(weights, dtype=np.float32)
  height = 1.0 + 0.3 * weights.shape[0]
  width = 2.0 + 0.45 * weights.shape[1]
  figure, axes = plt.subplots(figsize=(width, height))
  image = axes.imshow(weights, cmap="viridis", vmin=0.0,
                      vmax=max(float(weights.max()), 1e-6), aspect="auto")
  axes.set_xticks(range(len(column_labels)))
  axes.set_xticklabels(column_labels, rotation=60, ha="right", fontsize=7)
  axes.set_yticks(range(len(row_labels)))
  axes.set_yticklabels(row_labels, fontsize=7)
  axes.set_title(title, fontsize=9)
  figure.colorbar(image, ax=axes, fraction=0.04)
  return _png(figure)


def edge_labels():
  """Labels of the 14 edge rows, "i->j", in DARTS order."""
  return [f"{i}->{j}" for i, j in genotype_lib.EDGES]


def cell_png(entries, concat, title) -> bytes:
  """Draw one cell of a genotype as a graph.

  Nodes c_{k-2} and c_{k-1} are the cell inputs, 0..3 the intermediate
  nodes (2..5 in genotype numbering) and c_{k} the concatenated output.
  Each kept edge is labelled with its operator and, for parametric
  operators, the activation.
  """
  # Inputs on the left, intermediate nodes on a descending staircase, the
  # output on the right: edges rarely cross a node that way.
  positions = {0: (0.0, 3.2), 1: (0.0, 0.8)}
  for step, node in enumerate(genotype_lib.INTERMEDIATE_NODES):
    positions[node] = (2.2 + 1.6 * step, 3.6 - 1.0 * step)
  output = max(genotype_lib.INTERMEDIATE_NODES) + 1
  positions[output] = (positions[output - 1][0] + 1.8, 1.6)
  names = {0: "c_{k-2}", 1: "c_{k-1}", output: "c_{k}"}
  for node in genotype_lib.INTERMEDIATE_NODES:
    names[node] = str(node - 2)

  figure, axes = plt.subplots(figsize=(10, 4.5))
  for position, entry in enumerate(entries):
    target = genotype_lib.node_of_entry(position)
    _draw_edge(axes, positions[entry.input], positions[target],
               entry.op if entry.activation is None
               else f"{entry.op}\n{entry.activation}")
  for node in concat:
    _draw_edge(axes, positions[node], positions[output], "")

  for node, (x, y) in positions.items():
    color = "#9ecae1" if node in (0, 1) else (
        "#fdd0a2" if node == output else "#e5e5e5")
    axes.text(x, y, names[node], ha="center", va="center", fontsize=9,
              bbox=dict(boxstyle="round", facecolor=color))
  axes.set_xlim(-0.6, positions[output][0] + 0.6)
  axes.set_ylim(0.0, 4.2)
  axes.axis("off")
  axes.set_title(title, fontsize=10)
  return _png(figure)


def _draw_edge(axes, start, end, label):
  axes.annotate("", xy=end, xytext=start,
                arrowprops=dict(arrowstyle="->", color="gray",
                                shrinkA=12, shrinkB=12,
                                connectionstyle="arc3,rad=0.08"))
  if label:
    # Near the target, where the edges into one node are apart.
    where = (start[0] + 0.62 * (end[0] - start[0]),
             start[1] + 0.62 * (end[1] - start[1]))
    axes.text(where[0], where[1], label, ha="center", va="center",
              fontsize=6, color="#08519c",
              bbox=dict(boxstyle="square,pad=0.1", facecolor="white",
                        edgecolor="none", alpha=0.8))

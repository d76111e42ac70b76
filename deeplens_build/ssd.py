"""An SSD detector's decoding and non-maximum suppression in standard ONNX (public API, for framework plugins).

MXNet's ``MultiBoxDetection`` and Caffe's ``DetectionOutput`` have no ONNX operator, and the priors feeding them
(``MultiBoxPrior``, ``PriorBox``) depend on shapes alone. A plugin computes the priors once at build time with
the framework itself, describes the layer's settings in :class:`Decoding`, and :func:`append` replaces the head's
raw outputs with the detections, built from ONNX operators every runtime has (``TopK``, ``NonMaxSuppression``,
``Gather``...), valid from opset 11 on. Rows are ``[label, score, xmin, ymin, xmax, ymax]`` (corners from 0 to 1),
most confident first, padded to a fixed count with rows of -1: the layout ``awscam``'s ``parseResult('ssd')``
reads. Batch 1 only, as on a camera.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np
    import onnx


@dataclass(frozen=True)
class Decoding:
    """One detection layer's settings, in the terms both frameworks share.

    :param priors: ``[N, 4]`` anchor corners (xmin, ymin, xmax, ymax), from 0 to 1.
    :param variances: ``[N, 4]`` (or ``[1, 4]``) scales of the encoded offsets.
    :param foreground: indices of the classes reported, in the class axis of the probabilities (all but the
        background).
    :param labels: the label each of ``foreground`` is reported as.
    :param per_anchor: MXNet's rule: an anchor keeps only its most probable foreground class, ``top_k`` anchors
        are kept over all classes, then suppression runs within a class. False is Caffe's: every class scores
        every anchor, ``top_k`` per class, suppression per class, then ``keep_top_k`` over all.
    :param class_agnostic: suppression across classes (MXNet's ``force_suppress``).
    :param rows: the output's fixed row count (``N`` for MXNet; ``keep_top_k`` for Caffe).
    :param image_id: Caffe's 7-column rows, ``[image, label, score, box]``, shaped ``[1, 1, rows, 7]``.
    :param probs_layout: ``"classes_first"``: ``[1, C, N]`` (MXNet); ``"anchors_first"``: ``[1, N*C]`` (Caffe).
    """

    priors: np.ndarray
    variances: np.ndarray
    foreground: tuple[int, ...]
    labels: tuple[int, ...]
    score_threshold: float
    iou_threshold: float
    clip: bool
    per_anchor: bool
    class_agnostic: bool
    top_k: int | None
    keep_top_k: int | None
    rows: int
    image_id: bool
    probs_layout: Literal["classes_first", "anchors_first"]


def append(model: onnx.ModelProto, *, probs: str, loc: str, decoding: Decoding, output: str) -> None:
    """Make ``output`` the graph's only output: the detections decoded from the class probabilities ``probs``
    (after softmax) and the box offsets ``loc`` (``[1, N*4]``), both values of ``model``'s graph."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    count, classes = len(decoding.priors), len(decoding.foreground)
    counter = iter(range(10**9))

    def name(hint: str) -> str:
        return f"{output}/{hint}_{next(counter)}"

    def const(value, hint: str = "const") -> str:
        tensor = numpy_helper.from_array(np.asarray(value), name(hint))
        graph.initializer.append(tensor)
        return tensor.name

    def node(op: str, inputs: list[str], hint: str | None = None, outputs: int = 1, **attrs) -> list[str]:
        names = [name(hint or op.lower()) for _ in range(outputs)]
        graph.node.append(helper.make_node(op, inputs, names, name=names[0], **attrs))
        return names

    def one(op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        return node(op, inputs, hint, **attrs)[0]

    i64 = np.int64
    priors = decoding.priors.astype(np.float32)
    variances = np.broadcast_to(decoding.variances.astype(np.float32), priors.shape)
    size = priors[:, 2:] - priors[:, :2]
    # decoding as both frameworks do it (centre-size code): centre += offset * variance * size; size *= exp(...)
    offsets = one("Reshape", [loc, const(np.array([count, 4], i64))], "offsets")
    shift = one("Slice", [offsets, const(np.array([0], i64)), const(np.array([2], i64)), const(np.array([1], i64))])
    scale = one("Slice", [offsets, const(np.array([2], i64)), const(np.array([4], i64)), const(np.array([1], i64))])
    centre = one("Add", [one("Mul", [shift, const(variances[:, :2] * size, "anchor_scale")]),
                         const((priors[:, :2] + priors[:, 2:]) / 2, "anchor_centre")])
    half = one("Mul", [one("Exp", [one("Mul", [scale, const(variances[:, 2:], "variance")])]),
                       const(size / 2, "anchor_half")])
    boxes = one("Concat", [one("Sub", [centre, half]), one("Add", [centre, half])], "boxes", axis=1)
    if decoding.clip:
        boxes = one("Clip", [boxes, const(np.float32(0)), const(np.float32(1))], "clipped")

    if decoding.probs_layout == "anchors_first":
        per_anchor = one("Reshape", [probs, const(np.array([count, -1], i64))])
        scores = one("Transpose", [per_anchor], perm=[1, 0])
    else:
        scores = one("Reshape", [probs, const(np.array([-1, count], i64))])
    scores = one("Gather", [scores, const(np.array(decoding.foreground, i64), "foreground")], "scores", axis=0)
    labels = const(np.array(decoding.labels, i64), "labels")

    if decoding.per_anchor:
        best = one("ArgMax", [scores], "best", axis=0, keepdims=1)
        score = one("Reshape", [one("GatherElements", [scores, best], axis=0), const(np.array([-1], i64))])
        k = min(decoding.top_k or count, count)
        top, order = node("TopK", [score, const(np.array([k], i64))], "candidates", outputs=2)
        boxes = one("Gather", [boxes, order], "candidate_boxes", axis=0)
        label = one("Gather", [one("Reshape", [best, const(np.array([-1], i64))]), order], "candidate_label")
        top_row = one("Reshape", [top, const(np.array([1, k], i64))])
        if decoding.class_agnostic:
            scores, class_of = top_row, one("Reshape", [label, const(np.array([1, k], i64))])
        else:  # a class's row holds its own anchors' scores and -1 (below any threshold) elsewhere
            mine = one("Equal", [one("Reshape", [label, const(np.array([1, k], i64))]),
                                 const(np.arange(classes, dtype=i64).reshape(-1, 1), "class_ids")])
            scores = one("Where", [mine, top_row, const(np.float32(-1))], "class_scores")
            class_of = one("Expand", [const(np.arange(classes, dtype=i64).reshape(-1, 1)),
                                      const(np.array([classes, k], i64))])
        per_class = k
    else:
        per_class = min(decoding.top_k or count, count) if (decoding.top_k or 0) > 0 else count
        class_of = one("Expand", [const(np.arange(classes, dtype=i64).reshape(-1, 1)),
                                  const(np.array([classes, count], i64))])

    # per class (or the one agnostic row): its top candidates, suppressed within the row as NMS's batch entries
    groups = 1 if decoding.per_anchor and decoding.class_agnostic else classes
    ranked, picked = node("TopK", [scores, const(np.array([per_class], i64))], "ranked", outputs=2, axis=1)
    group_boxes = one("Gather", [boxes, picked], "group_boxes", axis=0)  # [groups, k, 4]
    group_labels = one("GatherElements", [class_of, picked], axis=1)
    selected = one("NonMaxSuppression", [group_boxes, one("Reshape", [ranked, const(np.array([groups, 1, per_class],
                                                                                               i64))]),
                                         const(np.array([per_class], i64)),
                                         const(np.array([decoding.iou_threshold], np.float32)),
                                         const(np.array([decoding.score_threshold], np.float32))], "selected")
    where = one("Gather", [selected, const(np.array([0, 2], i64))], axis=1)  # (group, rank)
    score = one("GatherND", [ranked, where], "score")
    box = one("GatherND", [group_boxes, where], "box")
    label = one("Gather", [labels, one("GatherND", [group_labels, where])], "label")

    found = one("Shape", [score])
    if decoding.keep_top_k:
        keep = const(np.array([decoding.keep_top_k], i64))
        found = one("Where", [one("Less", [found, keep]), found, keep], "kept")
    score, order = node("TopK", [score, found], "final", outputs=2)
    columns = [one("Cast", [one("Gather", [label, order])], to=TensorProto.FLOAT),
               score, one("Gather", [box, order], axis=0)]
    width = 6
    if decoding.image_id:  # batch 1: image 0 on every row
        columns.insert(0, one("Mul", [score, const(np.float32(0))], "image"))
        width = 7
    rows = one("Concat", [one("Reshape", [c, const(np.array([-1, 1], i64))]) if c is not columns[-1] else c
                          for c in columns], "rows", axis=1)
    missing = one("Sub", [const(np.array([decoding.rows], i64)), found])
    pads = one("Concat", [const(np.array([0, 0], i64)), missing, const(np.array([0], i64))], axis=0)
    padded = one("Pad", [rows, pads, const(np.float32(-1))], "padded")
    shape = [1, 1, decoding.rows, width] if decoding.image_id else [1, decoding.rows, width]
    graph.node.append(helper.make_node("Reshape", [padded, const(np.array(shape, i64))], [output], name=output))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, shape))
    _prune(graph)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers no output needs (the raw heads' other consumers, the priors' layers)."""
    needed = {o.name for o in graph.output}
    kept = []
    for n in reversed(graph.node):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(i for i in n.input if i)
            for attr in n.attribute:  # subgraphs (If, Loop) read outer values too
                for sub in [attr.g, *attr.graphs]:
                    needed.update(i for s in sub.node for i in s.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    inputs = [v for v in graph.input if v.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)

"""Tiny stand-ins for insightface's ``buffalo_l`` models, built with the ``onnx`` helper API.

The real models cannot be downloaded in the test environment, so these files reproduce only
what insightface 2.1 looks at when it routes and runs a plain folder of ``.onnx`` files:

``det_10g.onnx`` (routed to SCRFD because it has 9 outputs)
    Input ``input.1`` ``[1, 3, '?', '?']``.  Outputs, in SCRFD's order: scores for strides
    8/16/32, then box distances for 8/16/32, then keypoint offsets for 8/16/32; unbatched,
    shapes ``[cells*2, 1]``, ``[cells*2, 4]``, ``[cells*2, 10]`` with two anchors per cell
    (row-major cells, the two anchors of a cell next to each other).

    What it "detects": a saturated red square on a dark background, seen in the blob's first
    channel.  insightface builds the blob with ``swapRB=True``, so the first blob channel is
    the *last* channel of the array handed to ``FaceAnalysis.get``: red for a BGR array, blue
    for an RGB one.  That is what makes the colour-order toggle observable.

    Per stride ``s`` the response ``r = c0 - (c1 + c2) / 2`` (about 2 on pure red, 0 on
    black, white or grey) is averaged over a ``4s`` window and a ``6s`` window centred on
    the anchor point; ``d = 1.8 * (inner - outer)`` equals the contrast between the window
    and the ring around it, is 2.0 for a red square of side exactly ``4s`` centred on the
    anchor, and stays at or below 1.1 at edges and corners of bigger squares and at
    other strides.  Score = ``sigmoid(6 * (d - 1.4))``, kept only where ``d`` is a local
    maximum (3x3 max-pool), and the second anchor scores 0.9 times the first.  Boxes are
    ``4s`` squares centred on the anchor, so one aligned square of side 32, 64 or 128 px
    gives exactly one box equal to the square (the duplicate anchor is removed by NMS).
    Keypoints are the ArcFace alignment template scaled into that box, so the aligned
    112 px crop is the square itself.

    A dimmer red square (e.g. R=200) is detected with a lower score, which lets tests build
    images where the detector order and the size order differ.

``w600k_r50.onnx`` (routed to ArcFaceONNX: square 112 px input)
    Input ``input.1`` ``[1, 3, 112, 112]``, output ``[1, 512]``: 7x7 average pooling,
    flatten, then a fixed seeded random projection.  Different crops give different
    embeddings, the same crop the same one.  No node name starts with ``Sub``/``Mul``,
    so insightface uses mean/std 127.5 as for the real PyTorch-exported model.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DET_FILE = "det_10g.onnx"
REC_FILE = "w600k_r50.onnx"

STRIDES = (8, 16, 32)
BOX_CELLS = 4  # box side in stride units: 32, 64 and 128 px squares are "faces"
SCORE_GAIN = 6.0
SCORE_THRESHOLD = 1.4
SECOND_ANCHOR_FACTOR = 0.9
REC_POOL = 7
REC_SEED = 1234
OPSET = 17

# ArcFace's 112 px alignment template, relative to the crop centre, in units of 112/BOX_CELLS
# px, i.e. in stride units of a box of BOX_CELLS strides.
_ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
KPS_OFFSETS = ((_ARCFACE_TEMPLATE - 56.0) / (112.0 / BOX_CELLS)).astype(np.float32)  # [5, 2]


def _const(name: str, array) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(np.asarray(array), name))


def build_detector() -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    inits = [
        numpy_helper.from_array(np.array([1.0, -0.5, -0.5], dtype=np.float32).reshape(1, 3, 1, 1), "redness_w"),
        numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "shape_col"),
        numpy_helper.from_array(np.array([1.8], dtype=np.float32), "ring_gain"),
        numpy_helper.from_array(np.array([SCORE_THRESHOLD], dtype=np.float32), "threshold"),
        numpy_helper.from_array(np.array([SCORE_GAIN], dtype=np.float32), "gain"),
        numpy_helper.from_array(np.array([SECOND_ANCHOR_FACTOR], dtype=np.float32), "anchor2"),
        numpy_helper.from_array(np.array([0.0], dtype=np.float32), "zero"),
        numpy_helper.from_array(np.full((1, 4), BOX_CELLS / 2, dtype=np.float32), "box_dist"),
        numpy_helper.from_array(KPS_OFFSETS.reshape(1, 10), "kps_offsets"),
    ]
    nodes.append(helper.make_node("Conv", ["input.1", "redness_w"], ["redness"], name="redness"))

    score_outs, box_outs, kps_outs = [], [], []
    for s in STRIDES:
        k_in, k_out = BOX_CELLS * s, (BOX_CELLS + 2) * s
        nodes.append(helper.make_node(
            "AveragePool", ["redness"], [f"inner{s}"], name=f"inner{s}",
            kernel_shape=[k_in, k_in], strides=[s, s], pads=[k_in // 2, k_in // 2, k_in // 2 - s, k_in // 2 - s],
            count_include_pad=1,
        ))
        nodes.append(helper.make_node(
            "AveragePool", ["redness"], [f"outer{s}"], name=f"outer{s}",
            kernel_shape=[k_out, k_out], strides=[s, s], pads=[k_out // 2, k_out // 2, k_out // 2 - s, k_out // 2 - s],
            count_include_pad=1,
        ))
        nodes += [
            helper.make_node("Sub", [f"inner{s}", f"outer{s}"], [f"contrast{s}"], name=f"contrast{s}"),
            helper.make_node("Mul", [f"contrast{s}", "ring_gain"], [f"d{s}"], name=f"d{s}"),
            helper.make_node("MaxPool", [f"d{s}"], [f"dmax{s}"], name=f"dmax{s}",
                             kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
            helper.make_node("Equal", [f"d{s}", f"dmax{s}"], [f"peak_b{s}"], name=f"peak_b{s}"),
            helper.make_node("Cast", [f"peak_b{s}"], [f"peak{s}"], name=f"peak{s}", to=TensorProto.FLOAT),
            helper.make_node("Sub", [f"d{s}", "threshold"], [f"margin{s}"], name=f"margin{s}"),
            helper.make_node("Mul", [f"margin{s}", "gain"], [f"logit{s}"], name=f"logit{s}"),
            helper.make_node("Sigmoid", [f"logit{s}"], [f"sig{s}"], name=f"sig{s}"),
            helper.make_node("Mul", [f"sig{s}", f"peak{s}"], [f"cell_score{s}"], name=f"cell_score{s}"),
            helper.make_node("Reshape", [f"cell_score{s}", "shape_col"], [f"col{s}"], name=f"col{s}"),
            helper.make_node("Mul", [f"col{s}", "anchor2"], [f"col2_{s}"], name=f"col2_{s}"),
            helper.make_node("Concat", [f"col{s}", f"col2_{s}"], [f"pair{s}"], name=f"pair{s}", axis=1),
            helper.make_node("Reshape", [f"pair{s}", "shape_col"], [f"score_{s}"], name=f"score_{s}"),
            helper.make_node("Mul", [f"score_{s}", "zero"], [f"zeros{s}"], name=f"zeros{s}"),
            helper.make_node("Add", [f"zeros{s}", "box_dist"], [f"bbox_{s}"], name=f"bbox_{s}"),
            helper.make_node("Add", [f"zeros{s}", "kps_offsets"], [f"kps_{s}"], name=f"kps_{s}"),
        ]
        n = f"anchors_{s}"
        score_outs.append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, [n, 1]))
        box_outs.append(helper.make_tensor_value_info(f"bbox_{s}", TensorProto.FLOAT, [n, 4]))
        kps_outs.append(helper.make_tensor_value_info(f"kps_{s}", TensorProto.FLOAT, [n, 10]))

    graph = helper.make_graph(
        nodes, "scrfd_standin",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
        score_outs + box_outs + kps_outs,
        initializer=inits,
    )
    return _finish(graph)


def build_recognizer(seed: int = REC_SEED) -> onnx.ModelProto:
    side = 112 // REC_POOL
    features = 3 * side * side
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((features, 512)) / np.sqrt(features)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], name="pool",
                         kernel_shape=[REC_POOL, REC_POOL], strides=[REC_POOL, REC_POOL]),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "projection"], ["embedding"], name="project"),
    ]
    graph = helper.make_graph(
        nodes, "arcface_standin",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 512])],
        initializer=[numpy_helper.from_array(weight, "projection")],
    )
    return _finish(graph)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cid-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_buffalo_l(folder: str, *, detector: bool = True, recognizer: bool = True) -> str:
    """Write the stand-ins into ``folder`` (e.g. ``<tmp>/insightface/models/buffalo_l``); return it."""
    os.makedirs(folder, exist_ok=True)
    if detector:
        onnx.save(build_detector(), os.path.join(folder, DET_FILE))
    if recognizer:
        onnx.save(build_recognizer(), os.path.join(folder, REC_FILE))
    return folder


def red_square_image(size: int = 640, squares=((192, 192, 128, 255),), color: str = "red") -> np.ndarray:
    """An RGB uint8 ``size`` x ``size`` black image with squares ``(cx, cy, side, level)``.

    ``color`` "red" puts ``level`` in the R channel, "blue" in the B channel.  Centre the
    squares on multiples of the stride that matches their side (side 4*s, centre k*s).
    """
    img = np.zeros((size, size, 3), dtype=np.uint8)
    channel = {"red": 0, "blue": 2}[color]
    for cx, cy, side, level in squares:
        half = side // 2
        img[cy - half:cy + half, cx - half:cx + half, channel] = level
    return img

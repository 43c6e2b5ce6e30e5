"""Post-training static quantization: FP32 ONNX + calibration data -> QDQ ONNX.

The output is an ordinary QDQ model (the format ORT's ``quantize_static``
writes), so it takes the same road through ``passes/lower_qdq.py`` and
``runtime/golden.run_qdq`` as a model the user quantized elsewhere, and the
user can open it in any ONNX tool.

    1. fold BatchNormalization into Conv/Gemm            (compiler/fold_batchnorm.py)
    2. plan: which float tensors carry a quantize/dequantize pair
    3. calibrate: run the FP32 model (ORT) over the data, observe those tensors
    4. rewrite: Q/DQ on activations, per-channel int8 weights, int32 biases

The plan quantizes every tensor an integer kernel reads or writes: graph
inputs, the inputs of Conv/Gemm/MatMul, residual-Add operands (in a
transformer at the stream's 16 bits, with an 8-bit copy for any other reader:
``_fork_narrow_reads``), pooling and
Concat operands, and each kernel's output *after* its bias, ReLU and Clip (so
those fold into the requantize clamp).  Max-pool and shape views keep their
operand's parameters and get no pair of their own.  Shape arithmetic never gets
a pair: no tensor that is not float, and no tensor computed from shapes (``Shape``,
``Size``, shape and index operands, ``ConstantOfShape``, ``Range``; see
``shape_tensors``), whatever op reads it.

Weights are symmetric per output channel at ``QuantConfig.weight_bits``
(stored in int8); biases are int32 at scale s_x * s_w[c] (HAWQ-V3 §3.2).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compiler import calibration, rounding
from compiler.canonicalize import canonicalize
from compiler.fold_batchnorm import fold_batchnorm, output_axis
from passes.integer_nonlinear import FAMILIES
from passes.lower_qdq import MASKED
from runtime import golden_nonlinear as gnl
from runtime.errors import UserError
from runtime.io import read_tensors
from runtime.progress import log
from runtime.types import QuantParams

WEIGHT_BITS = (8, 4, 2)
Rounding = Literal["nearest", "optq"]
OBSERVERS = {"minmax": calibration.MinMaxObserver, "percentile": calibration.PercentileObserver,
             "mse": calibration.MSEObserver, "mean-minmax": calibration.MeanMinMaxObserver}
# "auto": per tensor, the exact range where a MatMul, Softmax, LayerNorm or GELU reads it, MSE elsewhere
# (see _exact_range_tensors); or, per model, every 8-bit range from "mean-minmax" where that leaves the
# outputs measurably closer to FP32 on the calibration samples (_choose_ranges)
OBSERVER_CHOICES = ("auto", *OBSERVERS)

FIDELITY = 0.99         # the default target: mean output cosine to FP32 on the trial samples
HEADROOM = 4.0          # a widened tensor's grid spans 4x its calibration range: 14 of its 16 bits still resolve
SPARE = 0.5             # of the error the target allows beyond all-16-bit's, the 8-bit tensors may take half
SMALL = 64              # tensors of at most 1/64 of the largest activation's elements are widened, cost or not
LOSS_STEP = 0.01        # narrowing losses are compared in steps of 1% of the error allowed

LINEAR = ("Conv", "Gemm", "MatMul")
VIEWS = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Slice", "Pad")
NONLINEAR_OPS = {"Softmax": "softmax", "Gelu": "gelu", "LayerNormalization": "layernorm"}
POOLS = ("GlobalAveragePool", "ReduceMean", "AveragePool")
ACTIVATIONS = ("Relu", "Clip")
# elementwise float functions of one tensor: a chain of them (constants beside) on one 8-bit
# tensor is one table lookup in the lowering, with no quantize inside the chain
ELEMENTWISE_UNARY = ("Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Exp", "Log", "Softplus", "Softsign",
                     "Elu", "Selu", "Celu", "LeakyRelu", "Mish", "Neg", "Abs", "Sqrt", "Reciprocal", "Sin", "Cos",
                     "Relu", "Clip", "Gelu", "Cast")
ELEMENTWISE_BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min")


@dataclass(frozen=True)
class QuantConfig:
    """What ``quantize`` produces.  ``activations``: "u8" (asymmetric; x86 VNNI multiplies
    u8 x s8) or "s8" (symmetric; Arm sdot, dp4a).  Weights are symmetric s8, per output channel
    (``per_channel``, the default) or one scale per tensor."""
    activations: str = "u8"
    weight_bits: int = 8
    observer: str = "auto"
    batch: int = 32                 # calibration batch when the model's batch axis is symbolic
    nonlinear: str = "auto"         # softmax / GELU: "shift" (I-ViT), "poly" (I-BERT), "auto" (lower error)
    residual_bits: int = 16         # a transformer's residual stream (the sums LayerNorm reads): s16 or 8-bit
    softmax_bits: int = 8           # Shiftmax output (attention probabilities): u8 or u16
    activation_bits: int = 8        # 4: a layer's ReLU output on the u4 grid [0, 15] (still one per byte)
    layer_bits: Mapping[str, int] = field(default_factory=dict)     # node name -> weight bits (a BitPlan)
    pin_ends: bool = True           # below 8 bits, the first and last weighted layers stay at 8 (HAWQ)
    per_channel: bool = True        # weights: one scale per output channel, or one per tensor
    rounding: Rounding = "optq"     # weights: OPTQ on the calibration inputs (compiler/rounding.py), or nearest
    fidelity: float | None = FIDELITY   # output cosine to FP32 the activations are widened to 16 bits for (_widen)

    def __post_init__(self):
        for bits in (self.weight_bits, *self.layer_bits.values()):
            if bits not in WEIGHT_BITS:
                raise UserError(f"--bits {bits}: weights can be quantized to 8, 4 or 2 bits; choose one of those")
        if self.fidelity is not None and not 0 < self.fidelity < 1:
            raise UserError(f"--fidelity {self.fidelity}: a cosine between 0 and 1 (e.g. 0.99), or off")
        if self.rounding not in get_args(Rounding):
            raise UserError(f"--rounding {self.rounding}: choose one of {', '.join(get_args(Rounding))}")
        if self.observer not in OBSERVER_CHOICES:
            raise UserError(f"unknown observer {self.observer!r}; choose one of: {', '.join(OBSERVER_CHOICES)}")
        check_nonlinear(self.nonlinear)
        if self.activations not in ("u8", "s8"):
            raise UserError(f"unknown activation scheme {self.activations!r}; choose u8 or s8")
        if self.residual_bits not in (8, 16):
            raise UserError(f"--residual-bits {self.residual_bits}: the residual stream is kept in 8 or 16 bits")
        if self.softmax_bits not in (8, 16):
            raise UserError(f"--softmax-bits {self.softmax_bits}: softmax outputs 8 or 16 bits")
        if self.activation_bits not in (8, 4) or (self.activation_bits == 4 and self.activations != "u8"):
            raise UserError(f"--act-bits {self.activation_bits}: activations are 8-bit, or 4-bit (u4) after ReLU "
                            "with unsigned activations")


def check_nonlinear(family: str) -> None:
    if family not in (*FAMILIES, "auto"):
        raise UserError(f"--nonlinear {family}: choose {', '.join(FAMILIES)} or auto")


class CalibrationDataReader(Protocol):
    """ORT's calibration interface: ``get_next()`` returns one feed dict, then None."""

    def get_next(self) -> dict[str, np.ndarray] | None: ...


@dataclass(frozen=True)
class NonlinearChoice:
    """One softmax / GELU node: the variant used, and each variant's error against the float op
    on the calibration activations (dequantized output vs float of the dequantized input)."""
    node: str
    op: str                         # "softmax" | "gelu"
    chosen: str
    max_err: dict[str, float]
    mean_err: dict[str, float]


@dataclass(frozen=True)
class RangeChoice:
    """``observer="auto"``'s choice for the whole model: "pooled" (per tensor exact or MSE over every
    value seen) or "mean-minmax" (the mean of each sample's range), and each one's output error on the
    calibration samples (1 - cosine to the FP32 outputs, ORT running the QDQ model as fake-quant)."""
    chosen: str
    error: dict[str, float]
    samples: int


@dataclass(frozen=True)
class Widening:
    """The 8-bit activations raised to 16 bits to meet ``QuantConfig.fidelity``, and the output error
    (1 - cosine to FP32 on the calibration trial samples) with none, all and these widened."""
    target: float
    tensors: tuple[str, ...]
    candidates: int
    error: dict[str, float]
    samples: int


@dataclass(frozen=True)
class QuantReport:
    samples: int
    tensors: int                    # activation tensors with a Q/DQ pair
    bn_folded: int
    config: QuantConfig
    nonlinear: tuple[NonlinearChoice, ...] = ()
    residual: int = 0               # residual-stream tensors, at config.residual_bits
    softmax: int = 0                # softmax outputs, at config.softmax_bits
    narrow: int = 0                 # ReLU outputs at config.activation_bits = 4
    ranges: RangeChoice | None = None
    widened: Widening | None = None

    def variants(self) -> dict[str, list[str]]:
        """Per op kind, the chosen variant of each node in graph order (what the lowering takes)."""
        out: dict[str, list[str]] = {}
        for c in self.nonlinear:
            out.setdefault(c.op, []).append(c.chosen)
        return out


def load_calibration(path: str | os.PathLike, specs) -> dict[str, np.ndarray]:
    """Calibration samples from an ``.npz`` keyed by input name, or a plain ``.npy`` for a
    single-input model (``specs``: the model's inputs), as ``lowbit run`` reads its inputs."""
    arrays = read_tensors(path, specs)
    for k, a in arrays.items():
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise UserError(f"{path}: calibration array {k!r} holds {a.size - int(np.isfinite(a).sum())} NaN or Inf "
                            "value(s); calibration data must be finite: drop or fix those samples")
    return arrays


def quantize(model: onnx.ModelProto, calib: Mapping[str, np.ndarray] | CalibrationDataReader,
             config: QuantConfig = QuantConfig(), *, where: str = "model",
             calib_where: str = "calibration data",
             shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[onnx.ModelProto, QuantReport]:
    """Quantize an FP32 model.  ``calib`` is a dict of stacked samples (any count, batched
    here) or an ORT-style reader.  ``shapes``: canonicalize at these static input shapes first
    (``compiler/canonicalize.py``; needed for graphs that compute shapes at run time).
    ``where`` and ``calib_where`` name the model and the data in error messages."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise UserError(f"{where}: opset {opset} has no per-channel DequantizeLinear; re-export with opset >= 13")
    folded, plan, n_bn = prepare(model, shapes)
    _check_finite_weights(folded, plan, where)
    unknown = sorted(set(config.layer_bits) - set(plan.layers))
    if unknown:
        raise UserError(f"{where}: bit plan names {', '.join(unknown)}, which are not weighted layers of the "
                        f"model (those are: {', '.join(plan.layers)})")
    batches = iter(calib.get_next, None) if hasattr(calib, "get_next") else \
        _batches(folded, calib, config.batch, where, calib_where)
    cal = _calibrate(folded, plan, batches, config, where, calib_where)
    weights = _quantize_weights(folded, plan, config, cal.grams)
    params, ranges = _choose_ranges(folded, plan, config, cal, weights)
    params, widened = _widen(folded, plan, config, cal, weights, params)
    choices = _choose_nonlinear(folded, plan, params, cal.seen, config.nonlinear)
    qdq = _rewrite(folded, plan, params, config, weights)
    narrow = sum(activation_bits(t, plan, config) < 8 for t in plan.act)
    return qdq, QuantReport(cal.samples, len(plan.act), n_bn, config, tuple(choices), len(plan.residual),
                            len(plan.softmax), narrow, ranges, widened)


def prepare(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None):
    """The model as the quantizer sees it (canonical ops, BatchNorm folded) and its plan.
    Returns (folded model, plan, BatchNorms folded)."""
    model = canonicalize(model, shapes)
    folded = fold_batchnorm(model)
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node) - \
        sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    plan = _plan(folded)
    if plan.forks:
        folded = _fork_narrow_reads(folded, plan.forks)
        plan = _plan(folded, set(plan.forks.values()))
    return folded, plan, n_bn


STREAM_READERS = ("Add", "LayerNormalization")      # read a residual stream tensor at the stream's width


def _fork_narrow_reads(m: onnx.ModelProto, forks: dict[str, str]) -> onnx.ModelProto:
    """A residual-stream tensor that other ops also read (BERT's LayerNorm output, which the next
    sum and the Q, K, V projections read) gets an 8-bit copy for them: ``t -> Identity -> t_narrow``,
    quantized on its own 8-bit grid (in the QDQ model a requantize of the stream's 16-bit integers).
    The sum keeps 16 bits; each matmul keeps its 8-bit operand and its VNNI/AMX kernel."""
    g = m.graph
    nodes = []
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in forks and n.op_type not in STREAM_READERS:
                n.input[k] = forks[i]
        nodes.append(n)
        nodes += [helper.make_node("Identity", [o], [forks[o]], name=forks[o]) for o in n.output if o in forks]
    del g.node[:]
    g.node.extend(nodes)
    return m


# ---- 2. plan ---------------------------------------------------------------------------

@dataclass
class _Plan:
    act: list[str]                          # tensors that get Q -> DQ, in graph order
    root: dict[str, str]                    # quantized tensor -> tensor whose parameters it carries
    weights: dict[str, int]                 # initializer -> output-channel axis
    biases: dict[str, tuple[str, str]]      # initializer -> (activation input, weight initializer)
    layers: dict[str, str]                  # weighted node name -> its weight initializer, in graph order
    consts: list[str]                       # other initializers read by integer ops: per-tensor int8
    residual: set[str]                      # a transformer's residual sums: the stream LayerNorm reads
    softmax: set[str]                       # softmax outputs (attention probabilities)
    rectified: set[str]                     # outputs of a layer's ReLU (or Clip from >= 0): u4 candidates
    forks: dict[str, str] = field(default_factory=dict)    # a stream tensor others read -> its 8-bit copy
    ends: set[str] = field(default_factory=set)             # graph outputs no op reads: on a 16-bit grid


FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
# inputs that an op reads as a shape, an index, an axis list or a count, never as data
SHAPE_OPERANDS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Squeeze": (1,),
                  "Unsqueeze": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2), "Gather": (1,),
                  "GatherElements": (1,), "GatherND": (1,), "ScatterElements": (1,), "ScatterND": (1,),
                  "Pad": (1, 3), "Resize": (1, 2, 3), "Upsample": (1,), "Split": (1,), "TopK": (1,),
                  "OneHot": (0, 1), "CenterCropPad": (1,), "Trilu": (1,), "CumSum": (1,),
                  "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,),
                  "ReduceProd": (1,), "ReduceL1": (1,), "ReduceL2": (1,), "ReduceSumSquare": (1,),
                  "ReduceLogSum": (1,), "ReduceLogSumExp": (1,)}
SHAPE_SOURCES = ("Shape", "Size", "ConstantOfShape", "Range", "NonZero", "ArgMax", "ArgMin")


def shape_tensors(m: onnx.ModelProto) -> set[str]:
    """The graph's shape arithmetic: every tensor that is not float (int64/int32 shapes and
    indices, bools), every shape or index operand (``SHAPE_OPERANDS``), the outputs of
    ``SHAPE_SOURCES``, and every tensor computed from those and constants alone (a shape cast to
    float and divided: the 1/sqrt(d) some exporters compute from ``Shape``).  None of them
    carries a quantize/dequantize pair: they are no activations, and TVM's importer turns
    them into shape expressions that a QuantizeLinear cannot read."""
    g = m.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(m).graph
    except Exception:                                               # noqa: BLE001 - types are a hint here
        inferred = g
    elem = {t.name: t.data_type for t in g.initializer}
    for vi in (*inferred.value_info, *inferred.input, *inferred.output, *g.input, *g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            elem.setdefault(vi.name, vi.type.tensor_type.elem_type)
    shape = {t for t, e in elem.items() if e not in FLOAT_TYPES}
    const = {t.name for t in g.initializer}
    for n in g.node:
        shape.update(n.input[i] for i in SHAPE_OPERANDS.get(n.op_type, ()) if i < len(n.input) and n.input[i])
    for n in g.node:                        # graph order is topological
        operands = set(SHAPE_OPERANDS.get(n.op_type, ()))
        data = [i for k, i in enumerate(n.input) if i and k not in operands]
        if n.op_type in SHAPE_SOURCES or (data and all(i in shape or i in const for i in data)
                                          and any(i in shape for i in data)):
            shape.update(o for o in n.output if o)
        elif all(i in const for i in n.input if i) and n.op_type not in ("RandomNormal", "RandomUniform",
                                                                          "Multinomial"):
            # Constant, or a node of constants only: an embedding Gather of a constant table by
            # token ids read at run time is an activation, not a constant
            const.update(o for o in n.output if o)
    return shape


def _plan(m: onnx.ModelProto, narrow: set[str] = frozenset()) -> _Plan:
    """``narrow``: the outputs of ``_fork_narrow_reads``'s Identity nodes (each an activation of its own)."""
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    graph_inputs = {i.name for i in g.input}
    plan = _Plan([], {}, {}, {}, {}, [], set(), set(), set())
    transformer = any(n.op_type == "LayerNormalization" for n in g.node)
    shapes = shape_tensors(m)

    def need(t: str) -> None:
        if t not in plan.root and t not in shapes:
            plan.act.append(t)
            plan.root[t] = t

    def single_next(t: str, ops) -> onnx.NodeProto | None:
        users = consumers.get(t, [])
        if len(users) == 1 and users[0].op_type in ops and t not in outputs:
            return users[0]
        return None

    def chain_end(n: onnx.NodeProto, fold: str = "") -> str:
        """The tensor after what folds into the layer's requantize: ``fold`` "bias" (a MatMul's
        Add) or "scale" (attention's positive scalar Mul/Div), then ReLU/Clip."""
        t = n.output[0]
        if fold == "bias" and (add := single_next(t, ("Add",))) is not None:
            other = add.input[1] if add.input[0] == t else add.input[0]
            w = inits[n.input[1]]
            if other in inits and inits[other].size == w.shape[-1] and inits[other].ndim <= 2:
                plan.biases[other] = (n.input[0], n.input[1])
                skip.add(id(add))
                t = add.output[0]
        if fold == "scale" and (mul := single_next(t, ("Mul", "Div"))) is not None:
            other = mul.input[1] if mul.input[0] == t else mul.input[0]
            if other in inits and inits[other].size == 1 and float(inits[other].reshape(-1)[0]) > 0 \
                    and (mul.op_type == "Mul" or mul.input[1] == other):
                skip.add(id(mul))       # attention's 1/sqrt(d): folded into the requantize ratio
                t = mul.output[0]
        if (act := single_next(t, ACTIVATIONS)) is not None and all(i in inits for i in act.input[1:] if i):
            skip.add(id(act))
            t = act.output[0]
            if act.op_type == "Relu" or (len(act.input) > 1 and act.input[1] and float(inits[act.input[1]]) >= 0):
                plan.rectified.add(t)
        return t

    producer = {o: n for n in g.node for o in n.output}
    constant = set(inits)
    for n in g.node:                        # Constant nodes, and what is computed from constants alone
        if all(i in constant for i in n.input if i) and n.op_type not in ("RandomNormal", "RandomUniform"):
            constant.update(n.output)

    def on_stream(t: str) -> None:
        """``t`` at the stream's width; a reader other than the stream's gets an 8-bit copy."""
        plan.residual.add(t)
        if any(c.op_type not in STREAM_READERS and c.output[0] not in narrow for c in consumers[t]):
            plan.forks[t] = t + "_narrow"

    def root(t: str) -> str:
        """The tensor a chain of elementwise functions of one tensor (and constants) starts from:
        x for x * sigmoid(x), x * x * x, Softplus, GELU spelled out."""
        n = producer.get(t)
        if n is None or t in plan.root or not (n.op_type in ELEMENTWISE_UNARY or n.op_type in ELEMENTWISE_BINARY):
            return t
        roots = {root(i) for i in n.input if i and i not in constant and i not in shapes}
        return roots.pop() if len(roots) == 1 else t

    for i in g.input:
        if i.name not in inits and i.type.tensor_type.elem_type == TensorProto.FLOAT:
            need(i.name)
    skip: set[int] = set()
    for n in g.node:
        if id(n) in skip or not n.output or n.output[0] in shapes:     # shape arithmetic stays as it is
            continue
        op = n.op_type
        if op == "Identity" and n.output[0] in narrow:
            need(n.input[0])
            need(n.output[0])
        elif op in LINEAR and (axis := _weight_axis(n, inits)) is not None:
            need(n.input[0])
            plan.weights[n.input[1]] = axis
            plan.layers[layer_name(n)] = n.input[1]
            if op != "MatMul" and len(n.input) > 2 and n.input[2]:
                plan.biases[n.input[2]] = (n.input[0], n.input[1])
            need(chain_end(n, "bias" if op == "MatMul" else ""))
        elif op == "MatMul" and not any(i in inits for i in n.input):       # attention: both operands run
            need(n.input[0])
            need(n.input[1])
            need(chain_end(n, "scale"))
        elif op == "Add" and not any(i in constant for i in n.input) and root(n.input[0]) != root(n.input[1]):
            need(n.input[0])
            need(n.input[1])
            need(out := chain_end(n))
            if transformer:
                # the stream's width for the sum and for each of its operands: a term that only joins it (an
                # attention projection's or an MLP's output) halves the error the stream takes in (DeiT-tiny's
                # cosine to FP32 0.9986 -> 0.9990); an operand that a matmul also reads (BERT's LayerNorm
                # output, ViT's embeddings) keeps 16 bits for the sum and gives the matmul an 8-bit copy
                for t in n.input[:2]:
                    if t not in outputs and t not in graph_inputs:
                        on_stream(t)
                plan.residual.add(out)
        elif op in ELEMENTWISE_BINARY and not any(i in constant or i in shapes for i in n.input) \
                and root(n.input[0]) != root(n.input[1]):
            # two activations (SE's gate x * sigmoid(s), LayerScale, a mask): each operand on a grid, the
            # product an integer multiply and a requantize; an op of one tensor's functions is a table
            need(n.input[0])
            need(n.input[1])
            need(n.output[0])
        elif op == "Add" and sum(i in inits for i in n.input) == 1 \
                and max(inits[i].size for i in n.input if i in inits) > 1:    # x + constant (position embedding)
            act_in, const_in = (n.input[0], n.input[1]) if n.input[1] in inits else (n.input[1], n.input[0])
            need(act_in)
            plan.consts.append(const_in)
            need(n.output[0])
        elif op in NONLINEAR_OPS:
            need(n.input[0])
            need(n.output[0])
            if op == "Softmax":
                plan.softmax.add(n.output[0])
        elif op in POOLS or op == "Concat":
            for i in n.input[:1] if op in POOLS else n.input:
                if i in inits:
                    plan.consts.append(i)
                else:
                    need(i)
            need(n.output[0])
        elif op in VIEWS and n.input[0] in plan.root and all(i in inits for i in n.input[1:] if i):
            plan.root[n.output[0]] = plan.root[n.input[0]]
    if transformer:
        # The stream's first term, x + position embedding, takes x at the stream's width too.  x is the
        # class token concatenated with the patch embeddings: one 8-bit grid for both spends its steps on
        # the patches' range (ViT-tiny: +-3.2, a step of 0.025) and rounds the class token (+-0.06,
        # initialized at std 0.02 as ViT's are), the one row the classifier reads, to a few steps: that
        # quantize alone took ViT-tiny's cosine to FP32 from 0.9993 to 0.9892.
        for n in g.node:
            if n.op_type == "Add" and n.output[0] in plan.residual and \
                    sum(i in inits for i in n.input) == 1 and (x := next(i for i in n.input if i not in inits)) \
                    in plan.root and x not in graph_inputs:
                on_stream(x)
    for o in g.output:
        if o.name not in plan.act and o.name not in shapes:     # the output dequantize must follow a quantize
            plan.act.append(o.name)
            plan.root[o.name] = o.name
    # The model's results (the logits) on a 16-bit grid.  One 8-bit grid for every input cannot
    # follow a result whose scale varies between inputs: RegNetY-400MF's logits have a standard
    # deviation from 0.25 to 2.75 over the corpus crops, and at the 8-bit step of 0.75 the quiet
    # inputs' logits round mostly to zero (the output quantize alone: cosine to FP32 0.805).  The
    # accumulator has the precision; only the last requantize narrows it, and it costs one int16
    # store per output value.
    plan.ends = {o.name for o in g.output if plan.root.get(o.name) == o.name and not consumers.get(o.name)}
    return plan


def layer_name(n: onnx.NodeProto) -> str:
    """How a weighted layer is named in bit plans: its node name, else its output."""
    return n.name or n.output[0]


def _weight_axis(n: onnx.NodeProto, inits: dict) -> int | None:
    """Output-channel axis of the layer's weight initializer, or None if the layer stays float."""
    if len(n.input) < 2 or n.input[1] not in inits:
        return None
    return output_axis(n, inits[n.input[1]].ndim)


# ---- 3. calibrate ----------------------------------------------------------------------

def _batches(m: onnx.ModelProto, calib: Mapping[str, np.ndarray], batch: int, where: str,
             calib_where: str) -> Iterator[dict]:
    """Check the calibration arrays against the model's inputs and cut them into batches
    the model accepts: any size when its batch axis is symbolic, else its fixed size
    (the last batch wraps around to the first samples)."""
    inits = {t.name for t in m.graph.initializer}
    specs = [i for i in m.graph.input if i.name not in inits]
    names = {s.name for s in specs}
    extra = sorted(set(calib) - names)
    missing = sorted(names - set(calib))
    if missing or extra:
        raise UserError(f"{calib_where}: arrays {sorted(calib)} but {where} takes inputs {sorted(names)}; "
                        "name each .npz array after the model input it feeds")
    n = None
    fixed = None
    for s in specs:
        x = calib[s.name]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in s.type.tensor_type.shape.dim]
        expect = "(" + ", ".join(str(d) if d else "N" for d in dims) + ")"
        if x.ndim != len(dims) or any(d and d != x.shape[i] for i, d in enumerate(dims) if i > 0):
            raise UserError(f"{calib_where}: array {s.name!r} has shape {tuple(x.shape)} but {where} input "
                            f"{s.name!r} is {expect}; give samples stacked along the batch axis")
        want = np.dtype(helper.tensor_dtype_to_np_dtype(s.type.tensor_type.elem_type))
        kind = np.floating if np.issubdtype(want, np.floating) else np.integer
        if not np.issubdtype(x.dtype, kind):     # token ids and masks are integers, and pass through as they are
            raise UserError(f"{calib_where}: array {s.name!r} is {x.dtype}; {where} input {s.name!r} takes {want}")
        if n is not None and len(x) != n:
            raise UserError(f"{calib_where}: arrays hold different sample counts ({n} and {len(x)})")
        n, fixed = len(x), dims[0] or fixed
    if not n:
        raise UserError(f"{calib_where}: no samples")
    step = fixed or batch
    for start in range(0, n, step):
        idx = np.arange(start, start + step) % n if fixed else np.arange(start, min(start + step, n))
        yield {s.name: calib[s.name][idx].astype(helper.tensor_dtype_to_np_dtype(s.type.tensor_type.elem_type))
               for s in specs}


def _check_finite_weights(m: onnx.ModelProto, plan: _Plan, where: str) -> None:
    """A NaN or Inf weight has no scale (max|w| is NaN or Inf): its whole channel, and every
    bias quantized at that scale, would become garbage.  (FP32 compiles keep such constants as
    ORT does: -inf attention masks are legitimate there.)"""
    quantized = set(plan.weights) | set(plan.biases) | set(plan.consts)
    layer_of = {w: layer for layer, w in plan.layers.items()}
    for t in m.graph.initializer:
        if t.name not in quantized:
            continue
        a = numpy_helper.to_array(t)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            of = f" (weights of node {layer_of[t.name]!r})" if t.name in layer_of else ""
            raise UserError(f"{where}: initializer {t.name!r}{of} holds {a.size - int(np.isfinite(a).sum())} NaN or "
                            "Inf value(s); quantizing needs finite weights, a NaN or Inf has no scale: fix the model")


TRIAL_SAMPLES = 32         # calibration samples kept to weigh choices by the outputs' error (_choose_ranges, _widen)
RANGE_SAMPLES = 16         # of those, the ones that weigh the candidate ranges


@dataclass
class _Calibration:
    params: dict[str, QuantParams]
    samples: int
    seen: dict[str, np.ndarray]             # the first batch's inputs of softmax / GELU / LayerNorm
    alternative: dict[str, QuantParams]     # "mean-minmax" ranges of the 8-bit tensors, under "auto"
    trial: list[tuple[dict, dict]]          # (feeds, FP32 outputs) of the first TRIAL_SAMPLES samples
    grams: dict[str, rounding.GramObserver] = field(default_factory=dict)   # weight -> its layer's X^T X
    extent: dict[str, tuple[float, float]] = field(default_factory=dict)    # every value's min and max
    size: dict[str, int] = field(default_factory=dict)                      # elements per sample


def _gram_observers(m: onnx.ModelProto, plan: _Plan) -> dict[str, tuple[str, rounding.GramObserver]]:
    """weight -> (the layer's input tensor, an observer of its X^T X) for OPTQ rounding, for the
    layers whose input rows it knows: 2-D convolutions with explicit padding, Gemm and MatMul, with
    at most rounding.MAX_COLUMNS inputs per output."""
    inits = {t.name: t for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type not in LINEAR or len(n.input) < 2 or n.input[1] not in plan.weights:
            continue
        shape = tuple(inits[n.input[1]].dims)
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        conv = n.op_type == "Conv"
        k = int(np.prod(shape[1:])) if conv else shape[1] if n.op_type == "Gemm" and a.get("transB", 0) else shape[0]
        if k > rounding.MAX_COLUMNS or conv and (len(shape) != 4 or a.get("auto_pad", b"NOTSET") != b"NOTSET"):
            continue
        out[n.input[1]] = (n.input[0], rounding.GramObserver(k, a.get("group", 1), shape[2:], a.get("strides", (1, 1)),
                                                             a.get("pads", (0, 0, 0, 0)), a.get("dilations", (1, 1)))
                           if conv else rounding.GramObserver(k))
    return out


def _calibrate(m: onnx.ModelProto, plan: _Plan, batches, config: QuantConfig, where: str,
               calib_where: str = "calibration data") -> _Calibration:
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    inputs = {i.name for i in m.graph.input}
    have = {o.name for o in probe.graph.output}
    grams = _gram_observers(m, plan) if config.rounding == "optq" else {}
    for t in [*plan.act, *(x for x, _ in grams.values())]:
        if t not in inputs and t not in have:
            probe.graph.output.append(helper.make_empty_tensor_value_info(t))
            have.add(t)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # keep every tensor observable
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:                                        # noqa: BLE001 - ORT raises its own types
        raise UserError(f"{where}: ONNX Runtime cannot run the FP32 model for calibration: "
                        f"{str(exc).splitlines()[0]}") from None
    names = [o.name for o in sess.get_outputs()]
    wide = (plan.residual if config.residual_bits == 16 else set()) | plan.ends
    sixteen = wide | (plan.softmax if config.softmax_bits == 16 else set())

    exact = _exact_range_tensors(m) if config.observer == "auto" else set()

    def observer(t):
        kind = config.observer if config.observer != "auto" else "minmax" if t in exact else "mse"
        if kind != "mse":
            return OBSERVERS[kind]()
        if t in sixteen:
            # a 16-bit grid's step is 1/256 of an 8-bit one: clipping its tails would buy nothing and
            # cost the largest values (the residual stream's outliers); the MSE search is for 8 bits
            return OBSERVERS["minmax"]()
        return OBSERVERS["mse"](bits=activation_bits(t, plan, config), scheme=config.activations)

    observers = {t: observer(t) for t in plan.act}
    # "auto" also weighs the mean of per-sample ranges for every 8-bit tensor but the inputs' (_choose_ranges)
    alternative = {t: calibration.MeanMinMaxObserver() for t in plan.act
                   if config.observer == "auto" and t not in inputs and t not in sixteen}
    outputs = [o.name for o in m.graph.output]
    trial: list[tuple[dict, dict]] = []
    samples = 0
    nonlinear_inputs = {n.input[0] for n in m.graph.node if n.op_type in NONLINEAR_OPS}
    seen: dict[str, np.ndarray] = {}            # the first batch's inputs of softmax / GELU / LayerNorm
    size: dict[str, int] = {}                   # elements per sample
    for feeds in batches:
        count = len(next(iter(feeds.values())))
        try:
            values = dict(zip(names, sess.run(None, feeds), strict=True))
        except Exception as exc:                                    # noqa: BLE001
            raise UserError(f"{where}: calibration batch failed to run: {str(exc).splitlines()[0]}") from None
        values.update(feeds)
        if samples < TRIAL_SAMPLES:
            trial.append(({k: np.array(v) for k, v in feeds.items()}, {o: values[o] for o in outputs}))
        for t, obs in observers.items():
            try:
                v = values[t]
                if t not in feeds and v.dtype.kind == "f" and (masked := v <= MASKED).any() and not masked.all():
                    # attention scores a padding mask sent to -inf or float32's lowest: they quantize to the
                    # grid's minimum whatever the range (passes/lower_qdq.py: the mask is a select)
                    v = v[~masked]
                obs.update(v, count)
                size.setdefault(t, v.size // count if v.ndim and v.shape[0] == count else v.size)
                if t in alternative:
                    alternative[t].update(v, count)
            except calibration.NonFinite:
                if t in feeds:
                    raise UserError(f"{calib_where}: array {t!r} holds NaN or Inf values; calibration data must be "
                                    "finite: drop or fix those samples") from None
                raise UserError(f"{where}: tensor {t!r} is NaN or Inf on the calibration data (the FP32 model "
                                "overflows or divides by zero there); quantizing needs finite ranges: check the model "
                                "and the calibration data") from None
            if t in nonlinear_inputs and t not in seen:
                seen[t] = values[t]
        for x, gram in grams.values():
            gram.update(values[x])
        samples += count
    if not samples:
        raise UserError("calibration data is empty")
    zeros = []

    def params_of(t, obs):
        lo, hi = obs.range()
        if lo == hi == 0:
            # only zeros seen: the scale would be the MIN_SCALE floor, so any real input saturates and
            # the biases quantized at s_x * s_w overflow int32
            if obs is observers[t]:
                zeros.append(t)
            lo, hi = calibration.ZERO_RANGE_FALLBACK
        if t in plan.ends and lo >= 0:      # nonnegative results (probabilities, a ReLU's) spend no bit on a sign
            return calibration.activation_params(lo, hi, scheme="u16")
        if t in wide:
            return calibration.activation_params(lo, hi, scheme="s16")
        if t in plan.softmax and config.softmax_bits == 16:       # probabilities: [0, 1] on a 2^-16 grid
            return calibration.activation_params(lo, hi, scheme="u16")
        return calibration.activation_params(lo, hi, scheme=config.activations, bits=activation_bits(t, plan, config))

    params = {t: params_of(t, obs) for t, obs in observers.items()}
    alt = {t: q for t, obs in alternative.items() if (q := params_of(t, obs)) != params[t]}
    if zeros:
        log.warning("%s: %d tensor(s) were zero on every calibration sample (%s%s); their range is taken as "
                    "[%g, %g]: calibrate on data that exercises them", calib_where, len(zeros), ", ".join(zeros[:5]),
                    ", ..." if len(zeros) > 5 else "", *calibration.ZERO_RANGE_FALLBACK)
    extent = {t: calibration.MinMaxObserver.range(obs) for t, obs in observers.items()}
    return _Calibration(params, samples, seen, alt, trial, {w: g for w, (_, g) in grams.items()}, extent, size)


def _count(trial: list[tuple[dict, dict]]) -> int:
    return sum(len(next(iter(feeds.values()))) for feeds, _ in trial)


def _first(trial: list[tuple[dict, dict]], samples: int) -> list[tuple[dict, dict]]:
    """The trial batches that hold the first ``samples`` samples."""
    out = []
    while len(out) < len(trial) and _count(out) < samples:
        out.append(trial[len(out)])
    return out


RANGE_MARGIN = 0.9      # the alternative ranges must cut the output error by 10% to be taken


def _choose_ranges(m: onnx.ModelProto, plan: _Plan, config: QuantConfig, cal: _Calibration,
                   weights: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> tuple[dict[str, QuantParams],
                                                                                  RangeChoice | None]:
    """Under ``observer="auto"``, one choice per model between the pooled ranges (exact or MSE per tensor,
    over every value seen) and the mean over samples of each sample's range, for every 8-bit tensor.
    Neither wins everywhere (lowbit's QDQ as fake-quant in ORT, cosine to FP32 on 32 photo crops):
    RegNetY-400MF 0.913 pooled, 0.979 mean-minmax, as one of its crops runs its last stage 100x louder
    than the rest; EfficientNet-B0 0.929 pooled, 0.889 mean-minmax.  Each candidate's QDQ model runs as
    fake-quant (ORT, graph optimizations off: float arithmetic on the quantized grids) on the first
    RANGE_SAMPLES calibration samples; the error is the mean of 1 - cosine to the FP32 outputs.  The
    alternative is taken only where its error is below RANGE_MARGIN times the pooled one, so float
    rounding differences between machines cannot flip a near tie."""
    if not cal.alternative or not cal.trial:
        return cal.params, None
    candidates = {"pooled": cal.params, "mean-minmax": cal.params | cal.alternative}
    error = {}
    trial = _first(cal.trial, RANGE_SAMPLES)
    for name, params in candidates.items():
        if (e := _fake_quant_error(m, plan, params, config, weights, trial)) is None:
            return cal.params, None
        error[name] = e
    chosen = "mean-minmax" if error["mean-minmax"] < RANGE_MARGIN * error["pooled"] else "pooled"
    samples = _count(trial)
    log.info("calibration ranges: %s (output 1 - cosine on %d calibration samples: pooled %.2e, mean-minmax %.2e)",
             chosen, samples, error["pooled"], error["mean-minmax"])
    return candidates[chosen], RangeChoice(chosen, error, samples)


def ort_loadable(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """A QDQ model as ONNX Runtime takes it: lowbit quantizes some tensors to int16 (the graph's
    outputs, a transformer's stream, widened activations), which ONNX's QuantizeLinear types from
    opset 21 on.  Below 21 the Q/DQ nodes become ORT's com.microsoft QuantizeLinear /
    DequantizeLinear (int8/uint8/int16/uint16, per tensor or per axis: the same arithmetic) and the
    model keeps its opset: raising it would change what other ops mean (ReduceMean's axes is an
    attribute up to opset 17 and an input from 18, so a TorchScript export's ReduceMean would not load)."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 21)
    if opset >= 21:
        return out
    for n in out.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in ("", "ai.onnx"):
            n.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return out


def _fake_quant_error(m: onnx.ModelProto, plan: _Plan, params: dict[str, QuantParams], config: QuantConfig,
                      weights: Mapping[str, tuple[np.ndarray, np.ndarray]],
                      trial: list[tuple[dict, dict]]) -> float | None:
    """Mean over samples of 1 - cosine between the QDQ model's outputs (ORT, as fake-quant) and the FP32
    ones; None where ORT cannot run the QDQ model (the choice then keeps the pooled ranges)."""
    try:
        return _GridTrial(m, plan, params, config, weights, []).error({}, trial)
    except Exception as exc:                                        # noqa: BLE001 - ORT raises its own types
        log.debug("fake-quant trial skipped: %s", str(exc).splitlines()[0])
        return None


def _output_error(names: list[str], got: list[np.ndarray], want: dict) -> list[float]:
    """Per sample, 1 - cosine between the outputs (all of them, concatenated) and the FP32 ones."""
    a = np.concatenate([x.reshape(len(x), -1) for x in got], axis=1).astype(np.float64)
    b = np.concatenate([want[o].reshape(len(want[o]), -1) for o in names], axis=1).astype(np.float64)
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (1 - (a * b).sum(axis=1) / np.maximum(norm, 1e-30)).tolist()


class _GridTrial:
    """One ORT session of the QDQ model (fake-quant, graph optimizations off) in which the grids of
    ``tensors`` are inputs, so that any choice of 8- or 16-bit grid for each of them is scored
    without building a model per choice (``_widen`` scores hundreds)."""

    def __init__(self, m: onnx.ModelProto, plan: _Plan, params: dict[str, QuantParams], config: QuantConfig,
                 weights: Mapping[str, tuple[np.ndarray, np.ndarray]], tensors: list[str]):
        import onnxruntime as ort

        model = onnx.ModelProto()
        model.CopyFrom(m)
        qdq = ort_loadable(_rewrite(model, plan, params, config, weights, frozenset(tensors)))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.sess = ort.InferenceSession(qdq.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs()]
        self.params, self.tensors = params, tensors

    def error(self, grids: Mapping[str, QuantParams], batches: list[tuple[dict, dict]]) -> float:
        """Mean 1 - cosine to FP32 over the samples of ``batches`` (some of the trial's), each tensor
        on ``grids``'s grid where it names one, else on its own."""
        feeds = {}
        for t in self.tensors:
            p = grids.get(t, self.params[t])
            bits = 16 if p.dtype.endswith("16") else 8
            lo, hi = (0, (1 << bits) - 1) if p.dtype.startswith("u") else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
            feeds |= {t + "_lo": np.array((lo - p.zero_point) * p.scale, np.float32),
                      t + "_hi": np.array((hi - p.zero_point) * p.scale, np.float32),
                      t + "_scale": np.array(p.scale, np.float32),
                      t + "_zero_point": np.array(p.zero_point, np.uint16 if p.dtype.startswith("u") else np.int16)}
        errors: list[float] = []
        for x, want in batches:
            errors += _output_error(self.names, self.sess.run(None, x | feeds), want)
        return float(np.mean(errors))


def _wide_params(extent: tuple[float, float], scheme: str) -> QuantParams:
    lo, hi = extent
    return calibration.activation_params(lo * HEADROOM, hi * HEADROOM, scheme="u16" if scheme == "u8" else "s16")


def _widen(m: onnx.ModelProto, plan: _Plan, config: QuantConfig, cal: _Calibration,
           weights: Mapping[str, tuple[np.ndarray, np.ndarray]],
           params: dict[str, QuantParams]) -> tuple[dict[str, QuantParams], Widening | None]:
    """Activations at 16 bits where 8 cost the fidelity target, and only there.

    A randomly initialized CNN amplifies small perturbations, and its 8-bit activation errors add up
    over many tensors: EfficientNet-B0's logit cosine to FP32 is 0.929 with every activation at 8 bits
    and 0.997 with every one at 16 (lowbit's QDQ as fake-quant in ORT, 32 photo crops).  Ranking the
    tensors by what widening one alone buys fails, as the gains do not add (MobileNetV2: the 48 tensors
    that buy most alone reach 0.988, all 65 0.993).  So this starts from every candidate at 16 bits
    and narrows back: each tensor's loss when it alone returns to 8 bits, measured on the first quarter
    of the trial samples, then the longest prefix of the cheapest that keeps the error on the second
    half within the target (binary search).  The 8-bit tensors left may take SPARE of the error the
    target allows beyond all-16-bit's; where all-16-bit misses the target too, the weights limit the
    model and nothing is widened.  Tensors of at most 1/SMALL of the largest activation's elements (a
    squeeze-excitation's pooled vectors and gates, a classifier's input) go to 16 bits whatever the
    trial says: they cost nothing, and their 8-bit grids are what an input louder than the calibration
    set's saturates first (EfficientNet-B0: one evaluation crop drives its SE vectors to 4.5x their
    calibration maximum, and its cosine was 0.105 with those at 8 bits, 0.966 at 16).

    A widened tensor's grid covers HEADROOM times its calibration extent (min, max): no clipping, as a
    clipped 16-bit grid forfeits what it buys (EfficientNet-B0, every activation at 16 bits: 0.967 on
    the calibration ranges, 0.997 with 4x), and inputs louder than the calibration set's are common.
    Losses are compared in steps of LOSS_STEP of the error allowed (ties in graph order), so float
    differences between machines cannot reorder near ties."""
    if config.fidelity is None or not cal.trial:
        return params, None
    candidates = [t for t in plan.act if params[t].dtype in ("uint8", "int8") and t in cal.extent
                  and activation_bits(t, plan, config) == 8]
    if not candidates:
        return params, None
    try:
        trial = _GridTrial(m, plan, params, config, weights, candidates)
    except Exception as exc:                                        # noqa: BLE001 - ORT raises its own types
        # the user asked for a fidelity target: say that it was not pursued, and why
        log.warning("the %.3f fidelity target was not pursued (ONNX Runtime could not run the fake-quant trial: %s); "
                    "activations stay at 8 bits", config.fidelity, str(exc).splitlines()[0])
        return params, None
    # ranked on some samples and checked on others, so that picking the tensors does not fit the samples
    # that judge the pick (EfficientNet-B0, both on the same 16: 0.993 there, 0.963 on other crops)
    rank, check = cal.trial[:max(1, len(cal.trial) // 4)], cal.trial[len(cal.trial) // 2:] or cal.trial
    samples = _count(check)
    wide = {t: _wide_params(cal.extent[t], config.activations) for t in candidates}
    largest = max(cal.size.get(t, 0) for t in candidates)
    small = {t: wide[t] for t in candidates if cal.size.get(t, largest) * SMALL <= largest}
    error = {"8-bit": trial.error({}, check), "16-bit": trial.error(wide, check)}
    order = [t for t in candidates if t not in small]

    def narrowed(k: int) -> dict[str, QuantParams]:
        """The small tensors and the large ones but the first ``k`` of ``order`` at 16 bits."""
        return small | {t: wide[t] for t in order[k:]}

    allowed = error["16-bit"] + SPARE * (1 - config.fidelity - error["16-bit"])
    lo = hi = len(order)                    # narrowing the first lo keeps the target
    if error["16-bit"] >= 1 - config.fidelity:
        if error["8-bit"] > 1 - config.fidelity:
            log.info("activations: 8 bits but for %d small tensors; at 16 bits they would all still miss the %.3f "
                     "fidelity target (output 1 - cosine on %d calibration samples: 8-bit %.2e, 16-bit %.2e): the "
                     "weights limit it", len(small), config.fidelity, samples, error["8-bit"], error["16-bit"])
    elif trial.error(narrowed(hi), check) > allowed:
        base = trial.error(wide, rank)
        step = LOSS_STEP * allowed
        loss = {t: round((trial.error({u: p for u, p in wide.items() if u != t}, rank) - base) / step)
                for t in order}
        order.sort(key=lambda t: loss[t])   # stable: graph order among equal steps
        lo = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if trial.error(narrowed(mid), check) <= allowed:
                lo = mid
            else:
                hi = mid
    chosen = narrowed(lo)
    error["chosen"] = trial.error(chosen, check)
    widened = tuple(t for t in candidates if t in chosen)
    log.info("activations: %d of %d at 16 bits for a %.3f fidelity target (output 1 - cosine on %d calibration "
             "samples: 8-bit %.2e, all 16-bit %.2e, chosen %.2e)", len(widened), len(candidates), config.fidelity,
             samples, error["8-bit"], error["16-bit"], error["chosen"])
    return params | chosen, Widening(config.fidelity, widened, len(candidates), error, samples)


EXACT_RANGE_READERS = ("MatMul", "Gemm", "Softmax", "LayerNormalization", "Gelu")


def _exact_range_tensors(m: onnx.ModelProto) -> set[str]:
    """Tensors a MatMul, Gemm, Softmax, LayerNorm or GELU reads, directly or through views and
    concatenation, and the graph's inputs.

    The "auto" observer keeps these at their exact range and clips the rest at the MSE-optimal one.
    A CNN's features are bell-shaped per tensor, where clipping the rare tails buys a finer grid for
    the bulk; a transformer's large values are few channels that carry the signal, and clipping them
    costs more than it buys.  Measured on the corpus (cosine to FP32, TorchScript exports; minmax /
    mse everywhere / auto): EfficientNet-B0 0.921 / 0.931 / 0.932, RegNetY-400MF 0.850 / 0.855 / see
    the report, ShuffleNetV2 0.9775 / 0.9798, MobileNetV3 0.950 / 0.959, DeiT-tiny 0.9987 / 0.9986;
    DeiT's LayerNorm outputs alone clipped: fake-quant 0.99885 -> 0.99868; DistilBERT's GELU inputs clipped
    0.9990 -> 0.9985."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in m.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def exact(t: str, depth: int = 0) -> bool:
        for n in readers.get(t, []):
            if n.op_type in EXACT_RANGE_READERS and n.input[0] == t or n.op_type == "MatMul":
                return True
            passes_on = n.op_type == "Concat" or (n.op_type in VIEWS and n.input[0] == t)
            if passes_on and depth < 8 and exact(n.output[0], depth + 1):
                return True
        return False

    # the graph's inputs too: the input quantize is the boundary the user feeds, never clipped
    return {t for t in readers if exact(t)} | {i.name for i in m.graph.input}


def activation_bits(t: str, plan: _Plan, config: QuantConfig) -> int:
    """4 for a ReLU output under ``activation_bits=4`` (u4: nonnegative, so no bit is spent on
    a sign), else 8.  A transformer's residual stream keeps its own width (``residual_bits``)."""
    root = plan.root.get(t, t)
    return 4 if config.activation_bits == 4 and root in plan.rectified and root not in plan.residual else 8


def _choose_nonlinear(m: onnx.ModelProto, plan: _Plan, params, seen, mode: str) -> list[NonlinearChoice]:
    """Measure each softmax / GELU / LayerNorm node's integer variants against the float op on the
    calibration activations (quantized with the node's input parameters), and pick per node."""
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = []
    for n in m.graph.node:
        kind = NONLINEAR_OPS.get(n.op_type)
        if kind is None:
            continue
        if n.input[0] not in seen:
            # not observed (a view of a quantized tensor: Swin's windows reshaped around the mask add):
            # the default variant, so that the choices still line up one per node with what the
            # lowering and the golden interpreter read in order
            default = "i-layernorm" if kind == "layernorm" else "poly" if mode == "auto" else mode
            out.append(NonlinearChoice(n.name or n.output[0], kind, default, {}, {}))
            continue
        p = params[plan.root[n.input[0]]]
        info = np.iinfo(p.dtype)
        with np.errstate(over="ignore"):    # a masked score (float32's lowest) saturates, as QuantizeLinear's does
            q = np.clip(np.round(seen[n.input[0]] / np.float32(p.scale)) + p.zero_point, info.min, info.max)
        x = (q - p.zero_point).astype(np.int64)
        real = x * np.float64(np.float32(p.scale))
        errs = {}
        if kind == "layernorm":
            gamma = inits[n.input[1]].astype(np.float64)
            beta = inits[n.input[2]].astype(np.float64) if len(n.input) > 2 else np.zeros_like(gamma)
            eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
            y, sc = gnl.layer_norm(x, float(np.float32(p.scale)), gamma, beta, eps)
            mu, var = real.mean(-1, keepdims=True), real.var(-1, keepdims=True)
            errs["i-layernorm"] = np.abs(y * sc - ((real - mu) / np.sqrt(var + eps) * gamma + beta))
        else:
            if kind == "softmax":
                ref = np.exp(real - real.max(-1, keepdims=True))
                ref /= ref.sum(-1, keepdims=True)
            else:
                ref = _gelu(real, tanh=any(a.name == "approximate" and a.s == b"tanh" for a in n.attribute))
            for variant in ("shift", "poly"):
                y, sc = (gnl.softmax if kind == "softmax" else gnl.gelu)(variant, x, float(np.float32(p.scale)))
                errs[variant] = np.abs(y * sc - ref)
        mean = {k: float(v.mean()) for k, v in errs.items()}
        chosen = next(iter(errs)) if kind == "layernorm" else \
            min(mean, key=mean.get) if mode == "auto" else mode
        out.append(NonlinearChoice(n.name or n.output[0], kind, chosen, {k: float(v.max()) for k, v in errs.items()},
                                   mean))
    return out


def _gelu(x: np.ndarray, tanh: bool) -> np.ndarray:
    if tanh:
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


# ---- 4. rewrite ------------------------------------------------------------------------

def _quantize_weights(m: onnx.ModelProto, plan: _Plan, config: QuantConfig,
                      grams: Mapping[str, rounding.GramObserver]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """weight -> (integers, scales): symmetric at the layer's bits, per output channel unless
    ``config.per_channel`` is off; rounded by OPTQ where calibration observed the layer's inputs
    (``config.rounding``), else to nearest."""
    inits = {t.name: t for t in m.graph.initializer}
    ends = set(list(plan.layers)[:1] + list(plan.layers)[-1:]) if config.pin_ends else set()
    bits_of = {w: config.layer_bits.get(layer, 8 if layer in ends else config.weight_bits)
               for layer, w in plan.layers.items()}
    out = {}
    for w_name, axis in plan.weights.items():
        w = numpy_helper.to_array(inits[w_name])
        q, scale = calibration.weight_params(w, axis=axis if config.per_channel else None, bits=bits_of[w_name])
        if w_name in grams and grams[w_name].rows:
            q = rounding.round_layer(w, scale, axis, grams[w_name], bits_of[w_name])
        out[w_name] = (q, scale)
    return out


def _rewrite(m: onnx.ModelProto, plan: _Plan, params: dict[str, QuantParams], config: QuantConfig,
             weights: Mapping[str, tuple[np.ndarray, np.ndarray]], fed: frozenset[str] = frozenset()):
    """The QDQ model.  ``fed``: tensors whose grid is a graph input instead (``_GridTrial``): a Clip to
    [t_lo, t_hi], then a 16-bit QuantizeLinear at t_scale and t_zero, which is any 8- or 16-bit grid."""
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    new_inits: list[onnx.TensorProto] = []
    dq_consts: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(value, name))
        return name

    weight_scales = {}

    def per_axis(axis: int) -> dict:
        return {"axis": axis} if config.per_channel else {}

    for w_name, axis in plan.weights.items():
        q, scale = weights[w_name]
        weight_scales[w_name] = scale
        dq_consts.append(helper.make_node(
            "DequantizeLinear", [const(w_name + "_quantized", q), const(w_name + "_scale", scale),
                                 const(w_name + "_zero_point", np.zeros(scale.shape, np.int8))],
            [w_name], name=w_name + "_DequantizeLinear", **per_axis(axis)))
    for b_name, (x_name, w_name) in plan.biases.items():
        s_x = np.float32(params[plan.root[x_name]].scale)
        scale = (s_x * weight_scales[w_name]).astype(np.float32)
        b = inits[b_name].astype(np.float64).reshape(-1)
        q = np.clip(np.round(b / scale.astype(np.float64)), -(2**31 - 1), 2**31 - 1).astype(np.int32)
        dq_consts.append(helper.make_node(
            "DequantizeLinear", [const(b_name + "_quantized", q.reshape(inits[b_name].shape)),
                                 const(b_name + "_scale", scale), const(b_name + "_zero_point",
                                                                        np.zeros(scale.shape, np.int32))],
            [b_name], name=b_name + "_DequantizeLinear", **per_axis(inits[b_name].ndim - 1)))

    for c_name in dict.fromkeys(plan.consts):
        value = inits[c_name].astype(np.float32)
        scale = np.float32(max(float(np.abs(value).max()) / 127, calibration.MIN_SCALE))
        q = np.clip(np.round(value / scale), -127, 127).astype(np.int8)
        dq_consts.append(helper.make_node(
            "DequantizeLinear", [const(c_name + "_quantized", q), const(c_name + "_scale", np.array(scale)),
                                 const(c_name + "_zero_point", np.array(0, np.int8))],
            [c_name], name=c_name + "_DequantizeLinear"))

    def fed_qdq(t: str, src: str, dst: str) -> list[onnx.NodeProto]:
        names = [t + "_lo", t + "_hi", t + "_scale", t + "_zero_point"]
        zero_type = TensorProto.UINT16 if params[t].dtype.startswith("u") else TensorProto.INT16
        for name, kind in zip(names, [TensorProto.FLOAT] * 3 + [zero_type], strict=True):
            g.input.append(helper.make_tensor_value_info(name, kind, []))
        return [helper.make_node("Clip", [src, *names[:2]], [t + "_clipped"], name=t + "_Clip"),
                helper.make_node("QuantizeLinear", [t + "_clipped", *names[2:]], [t + "_quantized"],
                                 name=t + "_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [t + "_quantized", *names[2:]], [dst],
                                 name=t + "_DequantizeLinear")]

    def qdq(t: str, src: str, dst: str) -> list[onnx.NodeProto]:
        if t in fed:
            return fed_qdq(t, src, dst)
        p = params[t]
        zero = np.array(p.zero_point, np.dtype(p.dtype))
        s, z = const(t + "_scale", np.array(p.scale, np.float32)), const(t + "_zero_point", zero)
        clip = []
        if (bits := activation_bits(t, plan, config)) < 8:
            # QuantizeLinear saturates at its type's 255; the narrower grid's top is a real-valued
            # Clip just before it, which the lowering folds into the requantize's clamp
            grid = np.array([-p.zero_point, (1 << bits) - 1 - p.zero_point], np.float32) * np.float32(p.scale)
            clip = [helper.make_node("Clip", [src, const(t + "_bottom", grid[0]), const(t + "_top", grid[1])],
                                     [t + "_clipped"], name=t + "_Clip")]
            src = t + "_clipped"
        return clip + [
            helper.make_node("QuantizeLinear", [src, s, z], [t + "_quantized"], name=t + "_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [t + "_quantized", s, z], [dst], name=t + "_DequantizeLinear")]

    quantized = set(plan.act)
    graph_inputs = {i.name for i in g.input}
    nodes: list[onnx.NodeProto] = list(dq_consts)
    rename = {}
    for t in plan.act:
        if t in graph_inputs:                   # consumers read the dequantized copy
            rename[t] = t + "_dequantized"
            nodes += qdq(t, t, rename[t])
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
        outs = [o for o in n.output if o in quantized]
        for o in outs:                          # the producer writes the float value under a new name
            n.output[list(n.output).index(o)] = o + "_float"
        nodes.append(n)
        for o in outs:
            nodes += qdq(o, o + "_float", o)
    weights = set(plan.weights) | set(plan.biases) | set(plan.consts)
    keep = [t for t in g.initializer if t.name not in weights]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]                         # stale: the float tensors moved to new names
    return m


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "QGemm", "ConvInteger", "MatMulInteger")


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


def boundary_params(model: onnx.ModelProto) -> dict[str, QuantParams]:
    """The per-tensor parameters of each graph input's QuantizeLinear and each graph output's
    DequantizeLinear: what a caller feeding or reading integers directly needs."""
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    ends = {i.name for i in g.input} | {o.name for o in g.output}
    out = {}
    for n in g.node:
        tensor = n.input[0] if n.op_type == "QuantizeLinear" else n.output[0] \
            if n.op_type == "DequantizeLinear" else None
        if tensor not in ends or n.input[1] not in inits or inits[n.input[1]].size != 1:
            continue
        zero = inits.get(n.input[2]) if len(n.input) > 2 else None
        zero = np.zeros((), np.uint8) if zero is None else zero
        out[tensor] = QuantParams(float(inits[n.input[1]].reshape(-1)[0]), int(zero.reshape(-1)[0]), str(zero.dtype))
    return out

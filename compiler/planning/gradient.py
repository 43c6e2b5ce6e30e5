"""The loss of an ONNX classifier and its gradient in chosen weights, by TVM Relax's ``Gradient``
pass: the Hessian sensitivity's first derivative (compiler/planning/sensitivity.py), with no training
framework.

The model is imported with its initializers as function parameters.  ``AppendLoss`` adds the
mean cross-entropy, nll_loss(log_softmax(logits), targets); ``DecomposeOpsForTraining`` splits
LayerNorm into differentiable ops; ``Gradient`` builds the adjoint in the planned weights.
TVM 0.27 registers no gradient for GELU, squeeze and strided_slice; the rules below add them
(only where TVM has none, so a later TVM's own rules win).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

from codegen.cpu_schedule import CPUDefault
from codegen.llvm import host_target
from runtime.errors import UserError


def _gelu_grad(orig_var, orig_call, output_grad, ctx):
    """y = x Phi(x)  =>  dy/dx = Phi(x) + x phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2,
    phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    from tvm import relax

    x = orig_call.args[0]
    dtype = str(x.ty.dtype)

    def c(v):
        return relax.const(v, dtype)

    cdf = c(0.5) * (c(1.0) + relax.op.erf(x * c(1 / math.sqrt(2))))
    pdf = relax.op.exp(c(-0.5) * x * x) * c(1 / math.sqrt(2 * math.pi))
    return [output_grad * (cdf + x * pdf)]


def _squeeze_grad(orig_var, orig_call, output_grad, ctx):
    """A squeeze only drops unit axes: the gradient takes the input's shape back."""
    from tvm import relax

    return [relax.op.reshape(output_grad, orig_call.args[0].ty.shape)]


def _strided_slice_grad(orig_var, orig_call, output_grad, ctx):
    """Unit-stride slices: the gradient is the output gradient zero-padded back to the input."""
    from tvm import relax

    x, axes, begin, end = orig_call.args[:4]
    strides = orig_call.args[4] if len(orig_call.args) > 4 else None
    dims = [int(d) for d in x.ty.shape.values]
    pad = [[0, 0] for _ in dims]
    values = [[int(v.value) for v in t.fields] for t in (axes, begin, end)]
    steps = [int(v.value) for v in strides.fields] if strides is not None else [1] * len(values[0])
    if any(s != 1 for s in steps):
        raise NotImplementedError("strided_slice with a step other than 1")
    for axis, b, e in zip(*values, strict=True):
        n = dims[axis]
        b = min(max(b + n if b < 0 else b, 0), n)
        e = min(max(e + n if e < 0 else e, 0), n)
        pad[axis] = [b, n - e]
    return [relax.op.nn.pad(output_grad, [p for pair in pad for p in pair]),
            *(relax.op.grad.no_grad(a) for a in orig_call.args[1:])]


def _build(mod):
    """Legalized, and each op scheduled by lowbit's CPU rules (codegen/cpu_schedule.py)."""
    target = tvm.target.Target(host_target())
    with target:
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), dl.ApplyDefaultSchedule(CPUDefault())])(mod)
    return tvm.compile(mod, target=target)


RULES = {"relax.nn.gelu": _gelu_grad, "relax.squeeze": _squeeze_grad, "relax.strided_slice": _strided_slice_grad}


def _register_missing_rules() -> None:
    import tvm

    for name, rule in RULES.items():
        if tvm.ir.Op.get(name).get_attr("FPrimalGradient") is None:
            tvm.ir.register_op_attr(name, "FPrimalGradient", rule)


class LossGradient:
    """Mean cross-entropy of ``model`` over ``feeds`` against ``targets``, and its gradient in
    ``weights`` (initializer names), evaluated at any values of those weights.  ``model`` must
    have static shapes whose batch divides the sample count (the caller canonicalizes it)."""

    def __init__(self, model: onnx.ModelProto, weights: Sequence[str], feeds: Mapping[str, np.ndarray],
                 targets: np.ndarray, where: str = "model"):
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx
        from tvm.relax.training import AppendLoss
        from tvm.relax.training.loss import CrossEntropyLoss

        _register_missing_rules()
        # plain parameter names: the importer rewrites names like "onnx::Conv_52" its own way
        alias = {w: f"lowbit_weight_{i}" for i, w in enumerate(weights)}
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for t in m.graph.initializer:
            t.name = alias.get(t.name, t.name)
        for node in m.graph.node:
            node.input[:] = [alias.get(i, i) for i in node.input]
        inits = {t.name for t in m.graph.initializer}
        self._inputs = [i.name for i in m.graph.input if i.name not in inits]
        self.batch = next(i for i in m.graph.input if i.name not in inits).type.tensor_type.shape.dim[0].dim_value
        mod = from_onnx(m, keep_params_in_input=True)
        main = mod["main"]
        params = main.params[len(self._inputs):]
        self._params = [tvm.runtime.tensor(v.numpy()) for v in main.attrs["params"]]
        self._slot = {str(p.name): i for i, p in enumerate(params)}
        loss = CrossEntropyLoss(reduction="mean")(main.ret_ty, relax.TensorType((self.batch,), "int64"))
        mod = relax.transform.DecomposeOpsForTraining("main_loss")(AppendLoss("main", loss)(mod))
        by_name = {str(p.name): p for p in mod["main_loss"].params}
        try:
            mod = relax.transform.Gradient("main_loss", require_grads=[by_name[alias[w]] for w in weights])(mod)
        except Exception as exc:                                # noqa: BLE001 - TVM raises InternalError
            raise UserError(f"{where}: TVM cannot differentiate the model ({str(exc).splitlines()[-1]}); "
                            "use --sensitivity perturb") from None
        self._fn = relax.VirtualMachine(_build(mod), tvm.cpu())["main_loss_adjoint"]
        self._alias, self.weights = alias, list(weights)
        self._feeds, self._targets = feeds, np.asarray(targets, np.int64)
        if len(self._targets) % self.batch:
            raise RuntimeError(f"{len(self._targets)} samples do not split into batches of {self.batch}")

    def __call__(self, weights: Mapping[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        """(loss, {weight: gradient}) with ``weights`` replacing those initializers' values."""
        import tvm

        params = list(self._params)
        for w, value in weights.items():
            params[self._slot[self._alias[w]]] = tvm.runtime.tensor(np.ascontiguousarray(value, np.float32))
        total, grads = 0.0, [0.0] * len(self.weights)
        chunks = len(self._targets) // self.batch
        for i in range(0, len(self._targets), self.batch):
            xs = [tvm.runtime.tensor(np.ascontiguousarray(self._feeds[k][i:i + self.batch], np.float32))
                  for k in self._inputs]
            loss, adjoints = self._fn(*xs, *params, tvm.runtime.tensor(self._targets[i:i + self.batch]))
            total += float(loss.numpy())
            grads = [g + a.numpy() for g, a in zip(grads, adjoints, strict=True)]
        return total / chunks, {w: g / chunks for w, g in zip(self.weights, grads, strict=True)}

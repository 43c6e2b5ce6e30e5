"""The golden reference: integer-only semantics in plain numpy.

Written independently of the Relax builders in ``passes/`` (it shares only the
offline parameters, e.g. a ``Dyadic`` multiplier), so that a compiled kernel
and this reference check each other bit for bit.
"""

from __future__ import annotations

import numpy as np


def requantize(x: np.ndarray, m: np.ndarray, e: np.ndarray, qmin: int, qmax: int,
               axis: int = -1, dtype=np.int8) -> np.ndarray:
    """round_half_up(x * m / 2^e), clamped to [qmin, qmax].

    Floor division by 2^e of ``x*m + 2^e/2`` is rounding half toward +inf; done
    with Python integers per distinct (m, e) so no intermediate can overflow.
    """
    x = np.asarray(x, np.int64)
    m = np.atleast_1d(np.asarray(m, np.int64))
    e = np.atleast_1d(np.asarray(e, np.int64))
    out = np.empty(x.shape, np.int64)
    if m.size == 1:
        chans = [(slice(None), int(m[0]), int(e[0]))]
    else:
        ax = axis % x.ndim
        chans = [(tuple([slice(None)] * ax + [c]), int(m[c]), int(e[c])) for c in range(m.size)]
    for index, mc, ec in chans:
        num = x[index].astype(object) * mc + ((1 << ec) >> 1)
        out[index] = (num // (1 << ec)).astype(np.int64)
    return np.clip(out, qmin, qmax).astype(dtype)

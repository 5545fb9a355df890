"""Message passing as one cuEquivariance ``segmented_polynomial``.

The interaction's tensor product is written as a segmented tensor product
``weights[u], x[iu], sh[j] -> out[ku]`` with one path per NequIP path and
the plan's own Clebsch-Gordan blocks as coefficients (so the numbers and the
parameter layout are those of the pure-JAX backend). Gather on senders and
scatter onto receivers are the polynomial's ``indices``: on a GPU the whole
message passing, and each of its derivatives, is one ``uniform_1d`` kernel.
"""

from __future__ import annotations

import functools

import e3nn_jax as e3nn
import jax
import numpy as np


@functools.lru_cache(maxsize=None)
def _polynomial(coupling_key, irreps_in: str, irreps_tp: str, irreps_sh: str, channels: int):
    import cuequivariance as cue

    coupling = [np.frombuffer(b, np.float64).reshape(s) for b, s in coupling_key]
    irreps_sh = e3nn.Irreps(irreps_sh)
    d = cue.SegmentedTensorProduct.from_subscripts("u,iu,j,ku+ijk")
    for _, ir in e3nn.Irreps(irreps_in):
        d.add_segment(1, (ir.dim, channels))
    for _, ir in irreps_sh:
        d.add_segment(2, (ir.dim,))
    paths = iter(e3nn.Irreps(irreps_tp))
    for i_in, block in enumerate(coupling):  # block: (sh.dim, 2l_in+1, K), paths side by side
        start = 0
        while start < block.shape[2]:
            _, ir_out = next(paths)
            cols = block[:, :, start:start + ir_out.dim]
            # a path couples to exactly one irrep of the harmonics
            (i_sh,) = [i for i, s in enumerate(irreps_sh.slices()) if np.any(cols[s])]
            coefficients = np.transpose(cols[irreps_sh.slices()[i_sh]], (1, 0, 2))  # (i, j, k)
            d.add_path(None, i_in, i_sh, None, c=coefficients, dims={"u": channels})
            start += ir_out.dim
    # one scalar coefficient per path: every operand is a list of (C,) segments
    return cue.SegmentedPolynomial.eval_last_operand(d).flatten_coefficient_modes()


def polynomial(plan):
    """The plan's tensor product as a ``cue.SegmentedPolynomial`` (cached)."""
    key = tuple((np.ascontiguousarray(b, np.float64).tobytes(), b.shape) for b in plan.coupling)
    per_channel = e3nn.Irreps([(1, ir) for _, ir in plan.irreps_in])
    return _polynomial(key, str(per_channel), str(plan.irreps_tp), str(plan.irreps_sh), plan.channels)


def message_passing(plan, x, sh, weights, senders, receivers, n_node: int) -> jax.Array:
    """See :func:`equijax.kernels.message_passing`."""
    import cuequivariance_jax as cuex

    from equijax.kernels import has_gpu_kernels

    n_edge, _, C = weights.shape
    dim_out = plan.irreps_tp.dim
    [out] = cuex.segmented_polynomial(
        polynomial(plan),
        [weights.reshape(n_edge, -1).astype(x.dtype), x.reshape(x.shape[0], -1), sh.astype(x.dtype)],
        [jax.ShapeDtypeStruct((n_node, dim_out * C), x.dtype)],
        indices=[None, senders, None, receivers],
        method="uniform_1d" if has_gpu_kernels() else "naive",
        name="equijax_message_passing",
    )
    return out.reshape(n_node, dim_out, C)

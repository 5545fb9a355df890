"""The pure-JAX message passing: gather, broadcast products, ``segment_sum``."""

from __future__ import annotations

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_jvp
def couple(a: jax.Array, x: jax.Array) -> jax.Array:
    """``out[e, k, c] = Σ_j a[e, j, k] x[e, j, c]``: coupling blocks applied to every channel.

    Args:
        a: (n_edge, m, K) harmonics times Clebsch-Gordan, per edge.
        x: (n_edge, m, C) one input irrep's components, per channel.

    Returns:
        (n_edge, K, C).

    The value is a sum of m broadcast products, which XLA fuses into one
    loop (on CPU faster than a batched matmul of these small blocks).
    Derivatives are batched matmuls (``einsum``) instead: their transposes,
    which reverse mode runs, are then matmuls too rather than one reduction
    per component ``j`` re-reading the cotangent (docs: results/performance).
    The function is bilinear, so its JVP is exact to every order.
    """
    return sum(a[:, j, :, None] * x[:, j, None, :] for j in range(a.shape[1]))


@couple.defjvp
def _couple_jvp(primals, tangents):
    a, x = primals
    da, dx = tangents
    return couple(a, x), jnp.einsum("ejk,ejc->ekc", da, x) + jnp.einsum("ejk,ejc->ekc", a, dx)


def weighted_tensor_product_sh(plan, x: jax.Array, sh: jax.Array, weights: jax.Array) -> jax.Array:
    """Channel-wise tensor product with the edge harmonics, weighted per path.

    Args:
        x: (n_edge, dim, C) features on the edges, one copy of each input
            irrep per channel (channels last: the fastest axis).
        sh: (n_edge, sh.dim) spherical harmonics.
        weights: (n_edge, n_paths, C) radial weights.

    Returns:
        (n_edge, irreps_tp.dim, C). The harmonics meet the Clebsch-Gordan
        blocks once per edge, not once per channel; each input irrep's block
        is applied to all channels by :func:`couple`, and the radial weights
        are spread over the components of their path by one ``take`` (a
        concatenation of per-path broadcasts doubled the forward time on CPU).
    """
    per_channel = e3nn.Irreps([(1, ir) for _, ir in plan.irreps_in])
    outs = []
    for s, block in zip(per_channel.slices(), plan.coupling):
        n_sh, m, k = block.shape
        if k == 0:
            continue
        a = (sh @ block.reshape(n_sh, m * k).astype(sh.dtype)).reshape(-1, m, k)
        outs.append(couple(a, x[:, s, :]))
    out = jnp.concatenate(outs, axis=1)
    path_of_component = np.repeat(np.arange(plan.n_paths), [ir.dim for _, ir in plan.irreps_tp])
    return out * jnp.take(weights, path_of_component, axis=1).astype(out.dtype)


def message_passing(plan, x, sh, weights, senders, receivers, n_node: int) -> jax.Array:
    """See :func:`equijax.kernels.message_passing`."""
    messages = weighted_tensor_product_sh(plan, x[senders], sh, weights)
    return jax.ops.segment_sum(messages, receivers, num_segments=n_node)

"""The pure-JAX message passing: gather, broadcast products, ``segment_sum``."""

from __future__ import annotations

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp


def weighted_tensor_product_sh(plan, x: jax.Array, sh: jax.Array, weights: jax.Array) -> jax.Array:
    """Channel-wise tensor product with the edge harmonics, weighted per path.

    Args:
        x: (n_edge, dim, C) features on the edges, one copy of each input
            irrep per channel (channels last: the fastest axis).
        sh: (n_edge, sh.dim) spherical harmonics.
        weights: (n_edge, n_paths, C) radial weights.

    Returns:
        (n_edge, irreps_tp.dim, C). The harmonics meet the Clebsch-Gordan
        blocks once per edge, not once per channel, and everything after is
        written as broadcast products that XLA fuses into one loop (a batched
        matmul of 2l+1 by K blocks is far slower on CPU).
    """
    per_channel = e3nn.Irreps([(1, ir) for _, ir in plan.irreps_in])
    outs = []
    for s, block in zip(per_channel.slices(), plan.coupling):
        n_sh, m, k = block.shape
        if k == 0:
            continue
        a = (sh @ block.reshape(n_sh, m * k).astype(sh.dtype)).reshape(-1, m, k)
        xi = x[:, s, :]
        outs.append(sum(a[:, j, :, None] * xi[:, j, None, :] for j in range(m)))
    out = jnp.concatenate(outs, axis=1)
    dims = [ir.dim for _, ir in plan.irreps_tp]
    w = jnp.concatenate(
        [jnp.broadcast_to(weights[:, p, None, :], (weights.shape[0], d, weights.shape[2])) for p, d in enumerate(dims)],
        axis=1,
    )
    return out * w.astype(out.dtype)


def message_passing(plan, x, sh, weights, senders, receivers, n_node: int) -> jax.Array:
    """See :func:`equijax.kernels.message_passing`."""
    messages = weighted_tensor_product_sh(plan, x[senders], sh, weights)
    return jax.ops.segment_sum(messages, receivers, num_segments=n_node)

"""Message-passing kernels: the heavy part of a NequIP interaction.

One function, :func:`message_passing`, computes for every node ``i``

    out[i] = Σ_{edges e = (j -> i)} TP(x[j], sh[e]) ⊙ w[e]

(node features gathered on senders, coupled channel-wise with the edge
harmonics, weighted per path and channel, summed onto receivers) with one
of several backends that give the same numbers:

* ``"jax"``: pure JAX (gather, broadcast products, ``segment_sum``); the
  reference, and the fastest on CPU.
* ``"cuequivariance"``: NVIDIA's ``cuequivariance-jax`` ``segmented_polynomial``,
  one fused CUDA kernel (``uniform_1d``) for gather, product and scatter on
  GPU, whose derivatives of every order are again such kernels. Without a
  GPU it runs the library's pure-JAX fallback (``naive``), so it is tested
  on CPU.

Layouts: node features ``(n_node, dim, C)`` and messages ``(…, dim, C)`` hold
one copy of each irrep per channel with channels last, which is
cuEquivariance's ``ir_mul`` layout, so no transposition is needed between
backends. Parameters do not depend on the backend.
"""

from __future__ import annotations

import functools
import importlib.util

import jax

BACKENDS = ("jax", "cuequivariance")


@functools.lru_cache(maxsize=None)
def available(backend: str) -> bool:
    """Whether ``backend`` can run here (its package is installed)."""
    if backend == "jax":
        return True
    if backend == "cuequivariance":
        return importlib.util.find_spec("cuequivariance_jax") is not None
    return False


def has_gpu_kernels() -> bool:
    """cuEquivariance's CUDA kernels are installed and JAX runs on a GPU."""
    return (jax.default_backend() == "gpu" and available("cuequivariance")
            and importlib.util.find_spec("cuequivariance_ops_jax") is not None)


def resolve(backend: str) -> str:
    """``"auto"`` -> the fastest backend on this platform; others are checked.

    Auto picks ``cuequivariance`` on a GPU with its CUDA kernels installed
    (``pip install 'equijax[cuda13]'`` or ``[cuda12]``) and ``jax`` everywhere else.
    """
    if backend == "auto":
        return "cuequivariance" if has_gpu_kernels() else "jax"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    if not available(backend):
        raise ValueError(f"backend {backend!r} needs the package cuequivariance-jax "
                         "(pip install 'equijax[cuda13]' or [cuda12] on GPU machines, 'cuequivariance-jax' elsewhere)")
    return backend


def message_passing(plan, x, sh, weights, senders, receivers, n_node: int, backend: str = "jax") -> jax.Array:
    """Weighted channel-wise tensor product on edges, summed onto receivers.

    Args:
        plan: the interaction's :class:`equijax.layers.ConvPlan`.
        x: (n_node, dim, C) node features, one copy of each input irrep per channel.
        sh: (n_edge, sh.dim) spherical harmonics of the edges.
        weights: (n_edge, n_paths, C) radial weights, zero on padding edges.
        senders: (n_edge,) int node indices.
        receivers: (n_edge,) int node indices.
        n_node: number of (padded) nodes.
        backend: ``"jax"`` or ``"cuequivariance"`` (resolved, not ``"auto"``).

    Returns:
        (n_node, irreps_tp.dim, C), not yet normalised by the neighbour count.
    """
    if backend == "jax":
        from equijax.kernels import segment

        return segment.message_passing(plan, x, sh, weights, senders, receivers, n_node)
    if backend == "cuequivariance":
        from equijax.kernels import cue

        return cue.message_passing(plan, x, sh, weights, senders, receivers, n_node)
    raise ValueError(f"unknown backend {backend!r}")

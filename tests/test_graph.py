"""Graph building: neighbours, padding, buckets, and clear errors on bad input."""

import numpy as np
import pytest
from ase import Atoms
from ase.neighborlist import neighbor_list

import equijax
from equijax import graph as G
from structures import copper, methanol, varied_stream


def test_neighbours_match_ase_including_images():
    atoms = copper()
    g = G.build_graph([atoms], cutoff=3.5)
    n_real = int(g.edges["mask"].sum())
    i, j, d = neighbor_list("ijd", atoms, 3.5)
    assert n_real == len(i)
    vec = np.asarray(G.edge_vectors(g))[:n_real]
    np.testing.assert_allclose(np.sort(np.linalg.norm(vec, axis=1)), np.sort(d), atol=1e-5)


def test_padding_layout_and_masks():
    g = G.build_graph([methanol(), methanol(1)], cutoff=3.5)
    n_node = g.nodes["mask"].shape[0]
    assert int(g.n_node.sum()) == n_node and int(g.n_edge.sum()) == g.senders.shape[0]
    assert list(np.asarray(g.globals["mask"])[:3]) == [True, True, False]
    pad = ~np.asarray(g.edges["mask"])
    assert np.all(np.asarray(g.senders)[pad] == 12) and np.all(np.asarray(g.receivers)[pad] == 12)
    assert np.all(np.asarray(g.nodes["atomic_numbers"])[12:] == 0)


def test_buckets_are_few():
    sizes = {G.bucket(n) for n in range(129, 257)}
    assert sizes == {192, 256}
    assert all(G.bucket(n) >= n for n in range(1, 5000))
    assert max(G.bucket(n) / n for n in range(8, 5000)) <= 1.5


@pytest.mark.parametrize(
    "atoms, message",
    [
        (Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.01]]), "overlap"),
        (Atoms("HO", positions=[[0, 0, np.nan], [0, 0, 1.0]]), "NaN"),
        (Atoms("HO", positions=[[0, 0, np.inf], [0, 0, 1.0]]), "infinite"),
        (Atoms(), "empty"),
        (Atoms("HU", positions=[[0, 0, 0], [0, 0, 1.5]]), "unknown"),
        (Atoms("H2", positions=[[0, 0, 0], [0, 0, 1.0]], cell=np.zeros((3, 3)), pbc=True), "degenerate"),
    ],
)
def test_bad_input_gets_a_clear_error(atoms, message):
    with pytest.raises(ValueError, match=message):
        G.build_graph([atoms], cutoff=3.0, species=(1, 6, 8))


def test_capacity_overflow_is_an_error():
    with pytest.raises(ValueError, match="capacity"):
        G.build_graph([methanol()], cutoff=3.5, pad_to=(8, 8, 2))


def test_labels_are_padded():
    atoms = methanol()
    s = G.from_ase(atoms)._replace(labels={"energy": np.array(-1.0), "forces": np.ones((6, 3))})
    g = G.build_graph([s, s], cutoff=3.0)
    assert np.asarray(g.globals["energy"]).tolist()[:3] == [-1.0, -1.0, 0.0]
    assert np.asarray(g.nodes["forces"])[:12].sum() == 36 and np.asarray(g.nodes["forces"])[12:].sum() == 0


def test_a_loop_of_build_graph_and_jit_over_a_varied_stream_compiles_a_few_times():
    """The functional API's default padding (the joint ladder) bounds compilations: the 40 varied
    structures of 3-60 atoms compile at most 6 programs, where rounding each count alone gives many more."""
    import jax
    import jax.numpy as jnp

    from equijax import testing

    cutoff = 4.5
    # a stand-in for a model: one program per padded shape, like any jitted energy
    energy = jax.jit(lambda g: jnp.sum(jnp.where(g.edges["mask"], jnp.linalg.norm(G.edge_vectors(g), axis=-1), 0)))
    stream = varied_stream()
    with testing.count_compilations(energy) as compiled:
        for atoms in stream:
            energy(G.build_graph([atoms], cutoff))
    assert compiled() <= 6, compiled()
    assert len({G.padded_sizes(G.build_graph([a], cutoff, pad_to="bucket")) for a in stream}) > 6  # it can fail


"""Shapes and padding of build_graph's padding policies over a varied stream (docs: explanation/padding).

The stream is the 40 structures of 3-60 atoms of tests/structures.py::varied_stream (molecules, batches of
them side by side, rattled Cu cells) at a 4.5 Å cutoff, each built alone, as a loop of build_graph + jit
would. For each policy: distinct padded shapes (= compilations of a jitted function) and padded / real
nodes and edges over the stream::

    python experiments/padding_policies.py --out experiments/results/padding_policies.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "padding_policies.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from structures import varied_stream

    from equijax import graph as G
    from equijax.runtime import machine_info

    real = []
    for atoms in varied_stream():
        s = G.from_ase(atoms)
        real.append((len(atoms), len(G.neighbours(s, 4.5)[0]), 1))
    out = {"machine": machine_info(), "structures": len(real), "cutoff_A": 4.5, "policies": {}}
    for name, sizes in (("joint ladder (default)", G.joint_sizes), ("bucket", G.pad_sizes),
                        ("tight", lambda n, e, g: (n + 1, e + 1, g + 1))):
        padded = [sizes(*r) for r in real]
        row = {"shapes": len(set(padded)),
               "padded_over_real_nodes": sum(p[0] for p in padded) / sum(r[0] + 1 for r in real),
               "padded_over_real_edges": sum(p[1] for p in padded) / sum(r[1] + 1 for r in real)}
        out["policies"][name] = row
        print(f"{name:24s} {row['shapes']:3d} shapes; padded/real nodes {row['padded_over_real_nodes']:.2f}, "
              f"edges {row['padded_over_real_edges']:.2f}")
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

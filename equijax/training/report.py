"""What a training run writes, and only the lead process writes it.

In a run of several processes every process computes the same replicated
state; process 0 alone writes ``checkpoint.npz``, ``model.npz``,
``metrics.jsonl``, ``result.json`` and ``learning_curve.png`` (atomically
where a kill could leave half a file), and the others' :class:`Report`
writes nothing, so no process ever reads back a file another one wrote.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from equijax import checkpoint
from equijax.runtime import host
from equijax.training.setup import CHECKPOINT_NAME, MODEL_NAME, Run


class Window:
    """Throughput over the training steps between two validations (the first window includes compilation)."""

    def __init__(self):
        self.start, self.steps, self.structures, self.atoms, self.wait_s = time.time(), 0, 0, 0, 0.0
        self.padding = np.zeros(4)  # real nodes, padded nodes, real edges, padded edges

    def add(self, dataset, step_shards, waited: float) -> None:
        self.steps += 1
        self.structures += sum(len(p) for p in step_shards)
        self.atoms += int(sum(dataset.n_atoms[np.asarray(p, np.int64)].sum() for p in step_shards))
        self.padding += dataset.padding(step_shards)
        self.wait_s += waited

    def speed(self) -> dict:
        seconds = time.time() - self.start
        real_n, pad_n, real_e, pad_e = self.padding
        return {"structures_per_s": self.structures / seconds, "atoms_per_s": self.atoms / seconds,
                "ms_per_step": 1e3 * seconds / max(self.steps, 1), "node_fill": real_n / pad_n,
                "edge_fill": real_e / pad_e, "data_wait_fraction": self.wait_s / seconds}


class Report:
    """The run folder's files, written by the lead process (``lead=False``: a no-op writer).

    Opening it prepares the folder: a new run drops an old ``metrics.jsonl``;
    a resumed one keeps its lines up to the checkpoint's step (later ones
    are computed again); ``*.tmp`` files left by a kill during a write go.
    """

    def __init__(self, run: Run, step: int, resumed: bool, lead: bool, write=print):
        self.run, self.lead, self.write = run, lead, write
        self.metrics_path = run.output / "metrics.jsonl"
        if not lead:
            return
        if not resumed and self.metrics_path.exists():
            self.metrics_path.unlink()
        elif self.metrics_path.exists():  # lines written after the checkpoint will be written again
            kept = [l for l in self.metrics_path.read_text().splitlines(True) if json.loads(l)["step"] <= step]
            self.metrics_path.write_text("".join(kept))
        for stale in run.output.glob("*.tmp"):  # left by a kill in the middle of a write
            stale.unlink()

    def checkpoint(self, state, plateaus, best) -> None:
        """The latest state, plateau counters and best parameters: everything an exact resume needs."""
        if self.lead:  # the state is replicated, so process 0 holds all of it
            checkpoint.save(self.run.output / CHECKPOINT_NAME, config=self.run.saved_config,
                            params=host(state.params), ema_params=host(state.ema_params),
                            opt_state=host(jax.tree_util.tree_leaves(state.opt_state)), step=host(state.step),
                            plateau=[p.state_dict() for p in plateaus] if self.run.committee
                            else plateaus[0].state_dict(), best_params=best, run_config=self.run.config)

    def model(self, params, step: int, valid) -> None:
        """The model file: the best EMA parameters (a committee's stacked) and their validation metrics."""
        if self.lead:
            checkpoint.save_model(self.run.output / MODEL_NAME, self.run.saved_config, params, step=step,
                                  valid=valid, run_config=self.run.config)

    def validation(self, record: dict, v: dict) -> None:
        """One metrics line, and the printed summary of a validation."""
        if not self.lead:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        speed = record["throughput"]
        self.write(f"step {record['step']:6d}  valid{' (mean of members)' if self.run.committee else ''}: "
                   f"E MAE {v['energy_mae']:.2f} meV/atom, F MAE {v['forces_mae']:.1f} meV/Å"
                   + (f", Hv MAE {v['hessian_mae'] / 1000:.3f} eV/Å²" if "hessian_mae" in v else "")
                   + (f", Hv in modes MAE {v['frequency_mae']:.1f} cm⁻¹" if "frequency_mae" in v else "")
                   + (f", H⁺δF MAE {v['displacement_mae']:.1f} mÅ" if "displacement_mae" in v else "")
                   + "; "
                   f"{speed['structures_per_s']:.0f} structures/s, {speed['atoms_per_s']:.0f} atoms/s, "
                   f"padding: {100 * speed['node_fill']:.0f}% of node and {100 * speed['edge_fill']:.0f}% "
                   f"of edge slots real, waited for data {100 * speed['data_wait_fraction']:.1f}% of the time")

    def finish(self, result: dict) -> None:
        """``result.json`` and the learning curve."""
        if not self.lead:
            return
        from equijax import plots

        plots.learning_curve(self.metrics_path, self.run.output / "learning_curve.png")
        with open(self.run.output / "result.json", "w") as f:
            json.dump(result, f, indent=1)

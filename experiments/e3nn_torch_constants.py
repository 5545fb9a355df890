"""e3nn (PyTorch)'s activation constants, for models imported from PyTorch (equijax.layers.E3NN_TORCH_CONSTANTS).

e3nn scales every activation f by 1 / sqrt(mean f(z)^2), with z a fixed sample of a million normal numbers
(``e3nn.math.normalize2mom``): a Monte-Carlo value, which a model trained with e3nn has learned around. Run in
an environment with torch and e3nn (e.g. the one of ``experiments/sevennet_reference.py``):

    python experiments/e3nn_torch_constants.py   # prints the table, and writes experiments/results/e3nn_torch_constants.json
"""

import json
import platform
from pathlib import Path

import torch
from e3nn.math import normalize2mom

FUNCTIONS = {"silu": torch.nn.functional.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def main():
    import e3nn

    constants = {name: float(normalize2mom(f).cst) for name, f in FUNCTIONS.items()}
    try:  # the CPU model, as in every results file (the constants do not depend on it)
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    out = {"e3nn": e3nn.__version__, "torch": torch.__version__, "cpu": cpu, "constants": constants}
    path = Path(__file__).parent / "results" / "e3nn_torch_constants.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    for name, c in constants.items():
        print(f"{name:8s} {c!r}")


if __name__ == "__main__":
    main()

"""``equijax train``, ``config``, ``export`` and ``convert``: runs and their files."""

from __future__ import annotations

import argparse
from pathlib import Path


def _train(args):
    from equijax import config as config_lib, training
    from equijax.cli.common import enable_float64

    config = config_lib.load(args.config, list(args.overrides) + ([f"train.init={args.init}"] if args.init else []))
    output = Path(args.output or config["output"] or "runs/default")
    if _float64(config, output, resume=not args.restart):
        enable_float64()  # before any array exists: a float64 run computes and saves in float64
    if args.distributed:
        training.init_distributed()  # JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID, or SLURM, ...
    result = training.fit(config, output, resume=not args.restart, progress=not args.no_progress,
                          accept_changes=args.accept_changes)
    import jax

    if jax.process_index() != 0:  # process 0 reports for the run
        return
    print()
    print(f"trained {result['steps']} steps in {result['train_time_s']:.0f} s; model file {output}/model.npz")
    if "test" in result:
        t = result["test"]
        print(f"test set ({result['n_test']} frames, best EMA parameters):")
        print(f"  energy MAE {t['energy_mae']:8.2f} meV/atom   RMSE {t['energy_rmse']:8.2f}")
        print(f"  force  MAE {t['forces_mae']:8.1f} meV/Å      RMSE {t['forces_rmse']:8.1f}")
        if "stress_mae" in t:
            print(f"  stress MAE {t['stress_mae']:8.3f} meV/Å³     RMSE {t['stress_rmse']:8.3f}")
        if "dipole_mae" in t:
            print(f"  dipole MAE {t['dipole_mae']:8.1f} me·Å       RMSE {t['dipole_rmse']:8.1f}")
        if "hessian_mae" in t:
            print(f"  H·v    MAE {t['hessian_mae'] / 1000:8.3f} eV/Å²     RMSE {t['hessian_rmse'] / 1000:8.3f}")
        if "frequency_mae" in t:
            print(f"  H·v in normal modes MAE {t['frequency_mae']:6.1f} cm⁻¹  RMSE {t['frequency_rmse']:6.1f}")
        if "displacement_mae" in t:
            print(f"  H⁺δF (minimum shift) MAE {t['displacement_mae']:6.1f} mÅ  RMSE {t['displacement_rmse']:6.1f}")
        if "dipole_derivative_mae" in t:
            print(f"  dμ/dx·v MAE {t['dipole_derivative_mae']:7.1f} me          "
                  f"RMSE {t['dipole_derivative_rmse']:7.1f}")
        print(f"  (predicting zero forces: MAE {t['zero_force_mae']:.1f} meV/Å, "
              f"{t['zero_force_mae'] / t['forces_mae']:.1f}× worse)")


def _float64(config: dict, output: Path, resume: bool) -> bool:
    """Whether the run's model is float64: the model section's, a fine-tuned file's, or the checkpoint's."""
    from equijax import checkpoint, config as config_lib

    if resume and (output / "checkpoint.npz").exists():
        return checkpoint.stored_dtype(output / "checkpoint.npz") == "float64"
    if config["train"]["init"]:
        return checkpoint.stored_dtype(config_lib.data_paths(config["train"]["init"])[0]) == "float64"
    return config["model"]["dtype"] == "float64"


def _config(args):
    import yaml

    from equijax import config as config_lib

    if args.config is None and not args.overrides:
        print("Every key of a run config (YAML sections data, model, train), with its default, [unit] and type.\n"
              "Set them in a YAML file or as overrides: equijax train my.yaml model.l_max=2 train.seed=1")
        print(config_lib.describe())
        return
    config = config_lib.load(args.config, args.overrides)
    print("# valid; the complete config with defaults filled in")
    print(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), end="")


def _export(args):
    from equijax import checkpoint

    path = checkpoint.export_model(args.checkpoint, args.model)
    print(f"model file {path} ({path.stat().st_size / 1e6:.2f} MB): config and EMA parameters")


def _convert(args):
    from equijax import checkpoint

    path = checkpoint.convert_pickle(args.old, args.new, trust_pickle=args.trust_pickle)
    print(f"converted {args.old} -> {path}")


def register(sub, epilog: str) -> None:
    """Add this module's commands to the ``equijax`` parser."""
    t = sub.add_parser("train", help="train a potential from a YAML config",
                       description="Train a NequIP potential. With no CONFIG the shipped default "
                                   "(equijax/configs/default.yaml) trains on the bundled GFN2-xTB data. "
                                   "Overrides (section.key=value) may stand anywhere; every key, its type, "
                                   "default and unit: `equijax config`. Writes OUTPUT/model.npz (the model "
                                   "file), checkpoint.npz, metrics.jsonl, learning_curve.png, result.json. A run "
                                   "resumes from OUTPUT/checkpoint.npz if it exists, and stops if the config "
                                   "differs from the checkpoint's.",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", nargs="?", help="YAML config (default: the shipped default.yaml)")
    t.add_argument("--output", help="run folder (default: the config's output, else runs/default)")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    t.add_argument("--accept-changes", action="store_true",
                   help="resume even though the config differs from the checkpoint's (the new values apply)")
    t.add_argument("--init", metavar="MODEL",
                   help="fine-tune: start from this model file (same as train.init=MODEL), e.g. "
                        "equijax train equijax/configs/hessian_finetune.yaml --init runs/dipole/model.npz")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    t.add_argument("--distributed", action="store_true",
                   help="one of several processes (hosts, or processes of one host) training together: "
                        "reads JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and "
                        "JAX_PROCESS_ID, or detects SLURM/Open MPI; every process needs the same --output "
                        "(process 0 writes the files); if one process dies the others stop with one line "
                        "within EQUIJAX_HEARTBEAT_TIMEOUT seconds (default 60), and the command resumes")
    t.set_defaults(func=_train)
    c = sub.add_parser("config", help="every config key with its type, default and unit; or check a config",
                       description="With no arguments: the schema of run configs. With a CONFIG and/or "
                                   "overrides: validate them and print the complete config.")
    c.add_argument("config", nargs="?", help="YAML config to check")
    c.set_defaults(func=_config)


def register_files(sub, epilog: str) -> None:
    """Add ``export`` and ``convert`` (model files) to the ``equijax`` parser."""
    x = sub.add_parser("export", help="write the small model file (config + EMA parameters) of a checkpoint")
    x.add_argument("checkpoint", help="checkpoint.npz of a run")
    x.add_argument("model", help="model file to write, e.g. model.npz")
    x.set_defaults(func=_export)
    cv = sub.add_parser("convert", help="convert an equijax 0.1 pickle checkpoint (trusted files only)",
                        description="One-off conversion of a pickle checkpoint of equijax 0.1 to the current "
                                    "format. Unpickling can run arbitrary code, so this needs --trust-pickle: "
                                    "use it only for files you made yourself or otherwise trust.")
    cv.add_argument("old", help="the .pkl file")
    cv.add_argument("new", help="the .npz file to write")
    cv.add_argument("--trust-pickle", action="store_true", help="I trust this file: unpickle it")
    cv.set_defaults(func=_convert)

"""The ``equijax`` command line.

    equijax train [CONFIG.yaml] [key=value ...]   train a potential (default config ships with the package)
    equijax config [CONFIG.yaml] [key=value ...]  every config key with its type, default and unit
    equijax evaluate MODEL DATA [DATA ...]        metrics table and parity plots
    equijax vibrate MODEL STRUCTURE               frequencies, modes, IR, thermochemistry
    equijax phonons MODEL CRYSTAL                 phonons at Γ and along a band path
    equijax md MODEL STRUCTURE                    molecular dynamics, jitted on the device
    equijax import SOURCE OUT.npz                 a pretrained SevenNet model as an equijax model file
    equijax models                                the pretrained models that can be imported here
    equijax export CHECKPOINT MODEL               the small model file of a training checkpoint
    equijax convert OLD.pkl NEW.npz --trust-pickle   one-off conversion of an equijax 0.1 pickle

Every error is one line on stderr and a non-zero exit (``--debug`` shows the
traceback). MODEL is a model file (``model.npz``) or a checkpoint; neither is
ever unpickled.
"""

from __future__ import annotations

import argparse
import os
import sys

from equijax.cli import analysis, evaluate, imports, md, train

EPILOG = """examples:
  equijax train                                   # default: ethanol + aspirin (GFN2-xTB), a few CPU minutes
  equijax train train.max_steps=200 output=runs/quick
  equijax train my.yaml model.l_max=2 model.channels=32 train.batch_size=32
  equijax train train.max_steps=200 --output runs/quick train.seed=1   # overrides go anywhere
  equijax config                                  # every key, type, default and unit
  equijax evaluate runs/default/model.npz equijax/data/aspirin_test.xyz
  equijax vibrate runs/default/model.npz experiments/workloads/aspirin.xyz --relax
  equijax md runs/default/model.npz equijax/data/aspirin_test.xyz --steps 2000 --replicas 8

units: energies eV, forces eV/Å, stress eV/Å³; MAEs are printed in meV/atom and meV/Å.
compiled programs are kept in $XDG_CACHE_HOME/equijax/xla (else ~/.cache/equijax/xla), so a
second run starts in seconds; EQUIJAX_CACHE_DIR=DIR moves the cache, EQUIJAX_CACHE_DIR=off disables it.
on a GPU: pip install 'equijax[cuda13]' (or [cuda12]) for the fused kernels (model.backend=auto).
"""


class UsageError(Exception):
    """A command line that does not parse."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="equijax", description="E(3)-equivariant interatomic potentials in JAX.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for register in (train.register, evaluate.register, analysis.register, md.register, imports.register,
                     train.register_files):
        register(sub, EPILOG)
    return p


def _parse(argv):
    """Parse, letting ``key=value`` overrides stand anywhere after ``train``/``config``."""
    args, extra = parser().parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see equijax {args.command} --help)")
    if args.command in ("train", "config"):
        if args.config and "=" in args.config and not args.config.startswith("-"):
            overrides.insert(0, args.config)  # `equijax train a=1`: no config file, an override
            args.config = None
        args.overrides = overrides
    elif overrides:
        raise UsageError(f"unrecognized arguments: {' '.join(overrides)} (see equijax {args.command} --help)")
    return args


#: commands that run models: the console script restarts once for huge pages before them
COMPUTE_COMMANDS = ("train", "evaluate", "vibrate", "phonons", "md")


def main(argv=None):
    """Run the command line; every error is one line on stderr and exit code 2 (1: internal).

    As the console script (``argv`` None), a command that runs models first
    restarts the process with transparent huge pages for XLA's buffers
    (:mod:`equijax.hugepages`); called from Python with ``argv``, it never does.
    """
    console = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = _parse(argv)
        if console and args.command in COMPUTE_COMMANDS:
            from equijax import hugepages

            hugepages.restart(argv, debug)  # returns only when not needed (already on, opted out, not Linux)
        if args.command not in (None, "config"):
            from equijax import compile_cache

            compile_cache.enable()  # the second run of any command skips compilation
        args.func(args)
    except KeyboardInterrupt:
        print("equijax: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001: the CLI's contract is one line, never a traceback
        if debug:
            raise
        user_error = isinstance(err, (UsageError, ValueError, FileNotFoundError, IsADirectoryError,
                                      PermissionError, RuntimeError, TypeError, MemoryError))
        message = " ".join(str(err).split()) or type(err).__name__
        distributed = _distributed()
        if distributed and distributed.lost_peer(err):
            message = ("another process of this distributed run stopped, so this one stops too; the last "
                       f"checkpoint is intact: run the same command again to resume ({message[:200]})")
        elif not user_error:
            message = f"{type(err).__name__}: {message} (an internal error: please report it; --debug shows more)"
        print(f"equijax: error: {message}", file=sys.stderr)
        code = 2 if user_error else 1
        if distributed and distributed.jax.process_count() > 1:
            # JAX's exit handler would wait at a shutdown barrier for processes that may be gone, then abort
            # with a C++ trace; this process has nothing left to do
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(code)
        sys.exit(code)


def _distributed():
    """:mod:`equijax.runtime.distributed` if this process imported JAX (else no run can be distributed)."""
    if "jax" not in sys.modules:
        return None
    from equijax.runtime import distributed

    return distributed


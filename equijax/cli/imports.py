"""``equijax import`` and ``equijax models``: pretrained models people already have, as equijax model files."""

from __future__ import annotations


def _import(args):
    from equijax import imports
    from equijax.cli.common import enable_float64

    if args.dtype == "float64":
        enable_float64()
    path, config, metadata = imports.convert(args.source, args.output, args.dtype)
    print(f"{metadata['source']['name']} -> {path}: {len(config.species)} elements, {config.n_layers} layers, "
          f"cutoff {config.cutoff} Å, {args.dtype}")
    print(imports.LICENCE)


def _models(args):
    import jax
    import numpy as np

    from equijax import imports

    cards = imports.available()
    if not cards:
        print("no importable models installed here (pip install sevenn --no-deps brings SevenNet's, without torch)")
        return
    print(f"{'name':18s} {'elements':>8s} {'parameters':>10s} {'layers':>6s} {'l_max':>5s} {'cutoff':>6s}  "
          f"{'licence':18s} data (level of theory)")
    for card in cards:
        try:
            config, params, _ = imports.load(card.path, "float32")
        except ValueError as err:  # an installed model this reader cannot convert yet: say why, list the rest
            print(f"{card.name:18s} {'':>8s} {'':>10s} {'':>6s} {'':>5s} {'':>6s}  {card.licence:18s} {card.data} "
                  f"({card.theory}); not importable yet: {err}")
            continue
        own = {k: v for k, v in params.items() if k != "charges"}  # the charge head is equijax's, untrained
        size = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(own))
        print(f"{card.name:18s} {len(config.species):8d} {size:10,d} {config.n_layers:6d} {config.l_max:5d} "
              f"{config.cutoff:5.1f}Å  {card.licence:18s} {card.data} ({card.theory})")
    print("convert one with: equijax import NAME OUT.npz")


def register(sub, epilog: str) -> None:
    """Add this module's commands to the ``equijax`` parser."""
    i = sub.add_parser("import", help="convert a pretrained model (SevenNet) into an equijax model file",
                       description="Convert a SevenNet checkpoint into an ordinary equijax model file, which every "
                                   "command, equijax.load and the calculator then read. SOURCE is a pretrained "
                                   "name found in the installed sevenn package (see equijax models) or the path "
                                   "of a SevenNet checkpoint (.pth). The file is read without torch and without "
                                   "running anything in it: only tensors, containers and numbers are accepted.",
                       epilog=epilog)
    i.add_argument("source", metavar="SOURCE", help="7net-0, 7net-0_22may2024, 7net-l3i5, or a .pth path")
    i.add_argument("output", metavar="OUT.npz", help="the equijax model file to write")
    i.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="precision of the equijax model (default float64; SevenNet itself runs float32)")
    i.set_defaults(func=_import)
    m = sub.add_parser("models", help="list the pretrained models that can be imported here",
                       description="List the pretrained models that the packages installed here hold, with what "
                                   "each was trained on, its size and its licence.", epilog=epilog)
    m.set_defaults(func=_models)

"""Command-line helpers shared by the top-level scripts."""
from __future__ import annotations

import argparse
from typing import Sequence


def given_options(parser: argparse.ArgumentParser, args: argparse.Namespace, dests: Sequence[str]) -> list[str]:
    """The options among ``dests`` (argparse destinations) whose value differs from the parser's
    default, each as its first option string (e.g. ``--label-values`` for ``label_values``): what
    a command line set, for refusing options that the rest of it would silently drop."""
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    unknown = [d for d in dests if d not in flags]
    if unknown:
        raise ValueError(f"no option of this parser has the destination(s) {unknown}")
    return [flags[d] for d in dests if getattr(args, d) != parser.get_default(d)]


def add_tree_smoothness(parser: argparse.ArgumentParser) -> None:
    """``--tree_smoothness W``: the weight of the minimum cut of a tree model's labels
    (:func:`inference.trees.cut_trees`), for a command that takes ``--tree_model``."""
    from inference.trees import TREE_SMOOTHNESS  # only the commands that take a tree model load it

    parser.add_argument("--tree_smoothness", type=float, default=TREE_SMOOTHNESS, metavar="W",
                        help="with --tree_model: weight of the boundary between the trees in the minimum cut of its "
                             "labels (inference.trees.cut_trees; default %(default)g; 0: voxel by voxel)")


def refuse_smoothness_alone(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` when ``--tree_smoothness`` is set without ``--tree_model``."""
    if given_options(parser, args, ("tree_smoothness",)) and not args.tree_model:
        parser.error("--tree_smoothness cuts a tree model's labels; give --tree_model")

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

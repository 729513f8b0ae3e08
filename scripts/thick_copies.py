"""A dataset folder with thick-slice copies of the training cases added (slice-thickness augmentation).

    python scripts/thick_copies.py --root_path data --dataset phantom --list_dir list \
        --weights checkpoint/salience/phantom/bank_fit.pth --factors 2 3 \
        --out_root data/thick --out_list_dir list_thick

Offline salience is computed on a scan's own grid, so a model trained on 1.6 mm slices meets
different coronal and sagittal maps on a 3-5 mm scan (``bench/thick_slices.py`` measures
it). This writes ``<out_root>/<dataset>``: the source cases as symbolic links (nothing
copied), and for every training case and factor f a copy ``<case>x<f>`` with f times thicker
slices (``preprocessing.thickness.thicken``: image averaged over each group of f slices, label
and liver kept where at least half the group is labelled), its three-plane salience computed
on the thick grid by ``--generator`` / ``--weights``, and its 2-D training slices (those
holding liver). The lists in ``<out_list_dir>/<dataset>``: the training cases and slices
plus the copies'; validation and test unchanged. Train on it with ``main.py --root_path
<out_root> --list_dir <out_list_dir>``.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from networks.salience import GENERATORS, make_generator, salience_3d  # noqa: E402
from preprocessing.thickness import thicken  # noqa: E402
from scripts.mix_datasets import case_links, link_dataset_files  # noqa: E402
from utils.h5io import (  # noqa: E402
    DatasetPaths,
    read_list,
    read_volume,
    slice_name,
    write_list,
    write_salience,
    write_slice,
    write_volume,
)
from utils.logging_setup import setup_logging  # noqa: E402

log = logging.getLogger("thick_copies")


def thick_name(case: str, factor: int) -> str:
    """``case0003``, 2 -> ``case0003x2``."""
    return f"{case}x{factor}"


def build_thick_copies(src: DatasetPaths, out: DatasetPaths, factors: Sequence[int], generator: str,
                       weights: Optional[Path], device: str = "cpu") -> list[str]:
    """Write ``out`` (links to ``src`` plus the thick copies of its training cases) and its lists.

    Returns the training slice names. Raises ValueError for a factor < 2 or an ``out`` that
    already holds a list, FileNotFoundError for a missing source file.
    """
    factors = [int(f) for f in factors]
    if not factors or min(factors) < 2:
        raise ValueError(f"--factors must be integers >= 2, got {factors}")
    if out.list_file("vol_train").exists():
        raise ValueError(f"{out.list_file('vol_train')}: exists; write the copies to a new --out_list_dir")
    gen = make_generator(generator, weights)  # a bad weights file fails before anything is written
    splits = {s: read_list(src.list_file(s)) for s in ("vol_train", "vol_val", "vol_test")}
    slices = read_list(src.list_file("slice_train"))
    links = case_links(src, out, [c for names in splits.values() for c in names])
    links += [(src.slice(n), out.slice(n)) for n in slices]
    link_dataset_files(links, out)
    train_cases, train_slices = list(splits["vol_train"]), list(slices)
    for case in tqdm(splits["vol_train"], desc="thick copies", unit="case", dynamic_ncols=True):
        vol = read_volume(src.volume(case))
        for f in factors:
            name = thick_name(case, f)
            thick = thicken(vol, f)
            sal = salience_3d(thick.image, gen, device=device)
            write_volume(out.volume(name), thick)
            write_salience(out.salience(name), sal, generator=gen.name, weights_sha256=gen.weights_sha256)
            keep = range(thick.image.shape[2]) if thick.liver is None else \
                [z for z in range(thick.image.shape[2]) if thick.liver[:, :, z].any()]
            for z in keep:
                write_slice(out.slice(slice_name(name, z)), thick.image[:, :, z], thick.label[:, :, z],
                            sal[:, :, :, z])
                train_slices.append(slice_name(name, z))
            train_cases.append(name)
    write_list(out.list_file("vol_train"), train_cases)
    write_list(out.list_file("slice_train"), train_slices)
    for split in ("vol_val", "vol_test"):
        shutil.copyfile(src.list_file(split), out.list_file(split))
    log.info("%s: %d training cases + %d thick copies (x%s), %d + %d slices", out.root, len(splits["vol_train"]),
             len(train_cases) - len(splits["vol_train"]), ", x".join(str(f) for f in factors), len(slices),
             len(train_slices) - len(slices))
    return train_slices


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root_path", type=Path, required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--list_dir", type=Path, required=True, help="holds <dataset>/vol_*.txt and slice_train.txt")
    p.add_argument("--generator", default="bank", choices=GENERATORS)
    p.add_argument("--weights", type=Path, default=None, help="the generator's weights (the head the source maps were made with)")
    p.add_argument("--factors", type=int, nargs="+", default=[2, 3], help="slices averaged into one (default 2 3)")
    p.add_argument("--out_root", type=Path, required=True)
    p.add_argument("--out_list_dir", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    setup_logging()
    try:
        build_thick_copies(DatasetPaths.of(args.root_path, args.dataset, args.list_dir),
                           DatasetPaths.of(args.out_root, args.dataset, args.out_list_dir),
                           args.factors, args.generator, args.weights, args.device)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

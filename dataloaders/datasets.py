"""Training and validation datasets over the project's HDF5 layout (docs/DESIGN.md section 2).

Every item is a dict of tensors:
    ``input``  (C, H, W) or (C, h, w, d) float32: dataloaders.inputs.model_input(image, S, mode)
    ``image``  (1, ...) the raw image G in [0, 1] (for the TensorBoard grid)
    ``label``  (1, ...) float32 in [0, 1]: {0, 1} where no resizing happened, a soft target
               where a slice was resized (dataloaders.transforms: one geometry for all planes);
               (K, ...) with ``classes`` (K values of the stored class map, e.g. (1, 2): portal
               vein, hepatic veins): channel k is 1 where the class map holds ``classes[k]``
C is 3 for ``--salience offline`` ((1 + S_i) * G) and 1 for ``none`` / ``e2e``.

- :class:`SliceDataSet`: the seed's 2-D training set, one ``slice_data/<case>_sliceNNNN.h5``
  per item (``image``, ``label``, and ``salience`` (3, H, W) when present; a slice file
  without salience, as in the authors' release, takes its salience from
  ``vol_salience/<case>.h5`` at index NNNN).
- :class:`VolumeDataSet`: whole cases from ``vol_data`` (+ ``vol_salience``), for validation
  and as the source of 3-D patches.
- :class:`PatchDataSet`: random 3-D patches; a fixed fraction (default a third, as nnU-Net
  oversamples foreground) centred on a random vessel voxel.

Random augmentation draws from ``numpy.random.default_rng((seed, epoch, index))``: the
same item gets the same augmentation in every run, whatever the number of workers or
processes. The key of an item is either an index (epoch from ``set_epoch``) or an
``(epoch, index)`` pair: the trainer's sampler yields pairs, so the epoch reaches
persistent loader workers with the indices (workers never see ``set_epoch`` calls).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from dataloaders.inputs import (BIAS_SMOOTH_MM, ELASTIC_SMOOTH_MM, check_bias_aug, check_blur_aug, check_context,
                                check_elastic_aug, check_rotate_aug, check_scale_aug, context_indices, input_channels,
                                model_input)
from dataloaders.transforms import (elastic_field, elastic_planes, gaussian_blur, intensity_domain, intensity_jitter,
                                    pad_or_crop, resize_2d, rot_flip, rotate_planes, shade_planes, smooth_field,
                                    spacing_size)
from utils.h5io import HU_WINDOW, DatasetPaths, parse_slice_name, read_list, read_salience, read_volume

log = logging.getLogger("datasets")

Key = Union[int, tuple[int, int]]  # an index, or (epoch, index)
_RUN_SALIENCE = "run salience_generation.py --dataset {dataset} first"


def _no_salience(path: Path, dataset: str) -> ValueError:
    return ValueError(f"{path}: no salience map for --salience offline; {_RUN_SALIENCE.format(dataset=dataset)}")


def read_case_salience(paths: DatasetPaths, case: str, image_shape: Sequence[int]) -> np.ndarray:
    """The (3, H, W, D) salience of ``case``; ValueError naming both files if it does not fit the image."""
    sal = read_salience(paths.salience(case))
    if sal.shape[1:] != tuple(image_shape):
        raise ValueError(f"{paths.salience(case)}: salience shape {sal.shape} does not match "
                         f"image {tuple(image_shape)} of {paths.volume(case)}")
    return sal


def case_spacing(paths: DatasetPaths, case: str) -> tuple[float, float, float]:
    """(row, col, slice) mm of ``case`` from the attrs of its ``vol_data`` file (slice files carry none)."""
    return _case_geometry(paths, case)[0]


def _case_geometry(paths: DatasetPaths, case: str) -> tuple[tuple[float, float, float], tuple[int, ...]]:
    """(spacing (row, col, slice) mm, image shape) of ``case`` from its ``vol_data`` file, no array read."""
    path = paths.volume(case)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: volume file not found; --target_spacing reads each case's spacing from it")
    try:
        with h5py.File(path, "r") as f:
            spacing = f.attrs.get("spacing")
            shape = tuple(f["image"].shape) if "image" in f else ()
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from None
    if spacing is None or len(spacing) != 3:
        raise ValueError(f"{path}: no 'spacing' attribute (3 floats, mm), needed by --target_spacing")
    return tuple(float(s) for s in spacing), shape


def label_target(raw: np.ndarray, classes: Optional[Sequence[int]]) -> np.ndarray:
    """Training target float32 of a stored label: ``raw > 0`` (same shape) for a binary model;
    with ``classes`` (values of the stored class map) one channel per class, (K, *raw.shape)."""
    if classes is None:
        return (raw > 0).astype(np.float32)
    return np.stack([raw == c for c in classes]).astype(np.float32)


class _Augmenting(Dataset):
    """A training set's items, augmented from (seed, epoch, index): ``augment`` switches the
    random quarter turns and flips (``--augment``) only; the zoom (``scale_aug``), the blur
    (``blur_aug``), ``jitter`` and ``domain`` are each switched by their own value, so
    ``--augment 0 --scale_aug 0.15`` (the liver model's: no flips, zooms) zooms."""

    def __init__(self, salience_mode: str, augment: bool, jitter: bool, seed: int, domain: bool = False,
                 blur_aug: float = 0.0, classes: Optional[Sequence[int]] = None) -> None:
        input_channels(salience_mode)
        self.classes = None if classes is None else tuple(int(c) for c in classes)
        if self.classes is not None and (not self.classes or min(self.classes) < 1):
            raise ValueError(f"classes must be class-map values >= 1, got {classes}")
        self.salience_mode = salience_mode
        self.augment = augment
        self.jitter = jitter
        self.domain = domain
        self.blur = check_blur_aug(blur_aug)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _key(self, key: Key) -> tuple[int, int]:
        """(epoch, index) of an item key (an index uses the epoch of ``set_epoch``)."""
        if isinstance(key, (tuple, list)):
            return int(key[0]), int(key[1])
        return self.epoch, int(key)

    def _rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, int(epoch), int(index)))

    def _augment(self, image: np.ndarray, label: np.ndarray, sal: Optional[np.ndarray], rng: np.random.Generator,
                 nb: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """(image, label, salience, neighbours) augmented; ``nb`` (2K, H, W), the context slices of a
        2-D item, turns, flips and changes intensity with the image (one draw for all planes)."""
        # the seed applied rot/flip to half of the samples
        if self.augment and rng.random() < 0.5:
            if nb is None:
                image, label, sal = rot_flip(image, label, sal, rng)
            else:  # the neighbours ride in the label's leading axis: the same turn and flip
                k = label.shape[0]
                image, both, sal = rot_flip(image, np.concatenate([label, nb]), sal, rng)
                label, nb = both[:k], both[k:]
        if nb is None:
            return self._intensity(image, rng), label, sal, None
        # (H, W, C): the intensity draws are shared and the blur stays in-plane
        planes = self._intensity(np.concatenate([image[..., None], np.moveaxis(nb, 0, -1)], axis=-1), rng)
        return planes[..., 0], label, sal, np.ascontiguousarray(np.moveaxis(planes[..., 1:], -1, 0))

    def _intensity(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.jitter:
            image = intensity_jitter(image, rng)
        if self.blur:
            image = gaussian_blur(image, rng, self.blur)
        if self.domain:
            image = intensity_domain(image, rng)
        return image

    def _target(self, raw: np.ndarray) -> np.ndarray:
        """The item's target with its channel axis, (K, ...) (K = 1 for a binary model): every step
        after this (resize, pad or crop, rot/flip, the cache) handles one layout."""
        target = label_target(raw, self.classes)
        return target if self.classes is not None else target[None]

    def _item(self, image: np.ndarray, label: np.ndarray, sal: Optional[np.ndarray],
              nb: Optional[np.ndarray] = None) -> dict:
        x = model_input(image, sal if self.salience_mode == "offline" else None, self.salience_mode, nb)
        return {
            "input": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32)),
        }


class SliceDataSet(_Augmenting):
    """2-D slices listed in ``<list_dir>/<dataset>/<list_name>.txt`` (the seed's training set).

    Geometry (image, salience and label together, dataloaders.transforms.resize_planes; the
    label becomes a soft target wherever it is resized), then augmentation:

    - ``target_spacing`` None: resize to ``img_size`` (H', W') unless equal to the stored size
      (the seed's pixel resize). Output ``input`` (C, H', W'), ``label`` (1, H', W').
    - ``target_spacing`` t (mm): resample the plane to t mm per pixel in-plane (the case's
      spacing comes from ``vol_data/<case>.h5``), then zero-pad (centred) or crop (random
      offset) to ``img_size``; with ``img_size`` None the whole resampled plane is returned.

    ``cache=True`` reads every slice once, here in the constructor, into memory that loader
    workers forked later share, instead of decoding gzip HDF5 for every item (25-35 ms a
    slice on a CPU core). Where the augmentation commutes with the geometry (pixel resize,
    a square slice, a square ``img_size``, no intensity augmentation: flips and quarter turns
    commute with a bilinear resize then) the slice is kept already resized, as the
    un-augmented item (input, image and soft label float16: 0.6 MB at 256 x 256), and only
    rot/flip runs per item; otherwise (e.g. ``target_spacing``, whose crop is random) image,
    label and salience are kept at the stored size as float16 (2.3 MB per 512 x 512 slice
    with offline salience). float16 rounds the values (relative error <= 2^-11), so losses
    differ slightly from an uncached run; the augmentation draws are the same.

    ``context`` K > 0: each item's input also holds the images of the K slices above and below
    (``dataloaders.inputs.context_indices``), read from ``vol_data/<case>.h5`` (with ``cache``,
    every case's volume image is kept in memory as float16, once); they take the slice's
    geometry and augmentation.
    """

    def __init__(self, paths: DatasetPaths, salience_mode: str, img_size: Optional[Sequence[int]] = None,
                 list_name: str = "slice_train", augment: bool = True, jitter: bool = False, seed: int = 0,
                 target_spacing: Optional[float] = None, cache: bool = False, domain: bool = False,
                 scale_aug: float = 0.0, blur_aug: float = 0.0, classes: Optional[Sequence[int]] = None,
                 context: int = 0, rotate_aug: float = 0.0, elastic_aug: float = 0.0, bias_aug: float = 0.0) -> None:
        super().__init__(salience_mode, augment, jitter, seed, domain, blur_aug, classes)
        self.paths = paths
        self.context = check_context(context, salience_mode)
        self.img_size = None if img_size is None else (int(img_size[0]), int(img_size[1]))
        self.scale_aug = check_scale_aug(scale_aug)
        if self.scale_aug and self.img_size is None:
            raise ValueError("--scale_aug needs an img_size to pad or crop the zoomed plane to")
        self.rotate_aug = check_rotate_aug(rotate_aug)
        self.target_spacing = None if target_spacing is None else float(target_spacing)
        if self.target_spacing is not None and not self.target_spacing > 0:
            raise ValueError(f"--target_spacing must be a positive number of mm, got {target_spacing}")
        self.elastic_aug = check_elastic_aug(elastic_aug)
        self.bias_aug = check_bias_aug(bias_aug)
        for flag, value in (("--elastic_aug", self.elastic_aug), ("--bias_aug", self.bias_aug)):
            if value and self.target_spacing is None:
                raise ValueError(f"{flag} needs --target_spacing: its field's smoothness is in mm")
        self.names = read_list(paths.list_file(list_name))
        if not self.names:
            raise ValueError(f"{paths.list_file(list_name)}: list is empty")
        first = paths.slice(self.names[0])
        if not first.is_file():
            raise FileNotFoundError(f"{first}: slice file not found (listed in {paths.list_file(list_name)}; "
                                    f"run preprocess.py)")
        if salience_mode == "offline":
            self._salience_path(self.names[0], first)  # fail now, not in a worker
        # in-plane spacing per case, read once (and here, so a missing file fails now)
        self.spacings: dict[str, tuple[float, float, float]] = {}
        if self.target_spacing is not None:
            for name in self.names:
                case = self._case(name)
                if case not in self.spacings:
                    self.spacings[case] = case_spacing(paths, case)
        if self.context:
            for case in dict.fromkeys(self._case(n) for n in self.names):
                if not paths.volume(case).is_file():
                    raise FileNotFoundError(f"{paths.volume(case)}: volume file not found; --context_slices reads "
                                            f"the neighbouring slices of {case}'s training slices from it")
        self._volumes: Optional[dict[str, np.ndarray]] = None  # case -> (H, W, D) float16, with cache and context
        # entries: ("resized", input, image, label) or ("stored", image, label, salience)
        self._cache: Optional[list[tuple[str, np.ndarray, np.ndarray, Optional[np.ndarray]]]] = None
        if cache:
            self._fill_cache()

    def _fill_cache(self) -> None:
        # (--elastic_aug and --bias_aug need a target spacing, so they never reach the square cache)
        square = (self.target_spacing is None and self.img_size is not None and self.img_size[0] == self.img_size[1]
                  and not self.jitter and not self.domain and not self.scale_aug and not self.rotate_aug
                  and not self.blur and not self.context)
        if self.context:
            self._volumes = {}
            for case in tqdm(list(dict.fromkeys(self._case(n) for n in self.names)), desc="caching context volumes",
                             unit="case", leave=False):
                self._volumes[case] = self._volume_image(case).astype(np.float16)
        cached = []
        for i in tqdm(range(len(self.names)), desc="caching training slices", unit="slice", leave=False):
            image, label, sal = self._read(i)
            if square and image.shape[0] == image.shape[1]:
                # the un-augmented item from the arrays just read (no second read of the file)
                item_rng = self._rng(0, i)
                image, label, sal, _ = self._geometry(self.names[i], image, self._target(label), sal, item_rng)
                item = self._item(image, label, sal)
                cached.append(("resized", item["input"].numpy().astype(np.float16),
                               item["image"][0].numpy().astype(np.float16), item["label"].numpy().astype(np.float16)))
            else:
                cached.append(("stored", image.astype(np.float16), label.astype(np.uint8),
                               None if sal is None else sal.astype(np.float16)))
        self._cache = cached
        nbytes = sum(a.nbytes for item in cached for a in item[1:] if a is not None)
        nbytes += sum(v.nbytes for v in (self._volumes or {}).values())
        log.info("cached %d training slices in memory (%.2f GB)", len(cached), nbytes / 1e9)

    def _cached_item(self, index: int, rng: np.random.Generator) -> dict:
        """An item from a "resized" cache entry: rot/flip (the draws of ``_augment``) at the training size."""
        _, x, image, label = self._cache[index]
        x, image, label = x.astype(np.float32), image.astype(np.float32), label.astype(np.float32)
        if self.augment and rng.random() < 0.5:
            # offline input channels are G (1 + S_i): rot_flip swaps channels 1 and 2 as it does S_c, S_s
            image, label, x3 = rot_flip(image, label, x if x.shape[0] == 3 else None, rng)
            x = x3 if x3 is not None else image[None]
        return {"input": torch.from_numpy(np.ascontiguousarray(x)), "image": torch.from_numpy(image)[None],
                "label": torch.from_numpy(np.ascontiguousarray(label))}

    def __len__(self) -> int:
        return len(self.names)

    def mm_per_pixel(self) -> Optional[float]:
        """In-plane mm per pixel the model sees: ``target_spacing``, else the median over cases of
        row spacing x H / img_size H (native spacing when ``img_size`` is None); None when a
        case's volume file or spacing is missing (recorded in checkpoints for test.py's warning)."""
        if self.target_spacing is not None:
            return self.target_spacing
        values = []
        for case in dict.fromkeys(self._case(n) for n in self.names):
            try:
                spacing, shape = _case_geometry(self.paths, case)
            except (FileNotFoundError, ValueError):
                return None
            scale = 1.0 if self.img_size is None or not shape else shape[0] / self.img_size[0]
            values.append(spacing[0] * scale)
        return float(np.median(values)) if values else None

    def _case(self, name: str) -> str:
        try:
            return parse_slice_name(name)[0]
        except ValueError:
            raise ValueError(f"{self.paths.slice(name)}: slice name must be <case>_slice<NNNN>") from None

    def _salience_path(self, name: str, slice_path: Path) -> Optional[Path]:
        """None if the slice file holds its salience, else the volume salience file to read from."""
        with h5py.File(slice_path, "r") as f:
            if "salience" in f:
                return None
        try:
            vol = self.paths.salience(parse_slice_name(name)[0])
        except ValueError:
            vol = None
        if vol is None or not vol.is_file():
            raise _no_salience(slice_path, self.paths.root.name)
        return vol

    def _volume_image(self, case: str, slices: Optional[Callable[[int], list[int]]] = None) -> np.ndarray:
        """``vol_data/<case>.h5``'s image, float32: (H, W, D), or with ``slices`` (the volume's depth
        -> slice indices) those slices, (len, H, W); ValueError naming the file when unreadable."""
        path = self.paths.volume(case)
        try:
            with h5py.File(path, "r") as f:
                img = f["image"]
                if slices is None:
                    return img[()].astype(np.float32)
                return np.stack([img[:, :, j] for j in slices(img.shape[2])]).astype(np.float32)
        except (OSError, KeyError) as e:
            raise ValueError(f"{path}: unreadable volume file ({e})") from None

    def _neighbours(self, name: str, shape: Sequence[int]) -> Optional[np.ndarray]:
        """The context slices (2K, H, W) float32 of slice ``name`` (None without context)."""
        if not self.context:
            return None
        case, z = parse_slice_name(name)
        path = self.paths.volume(case)

        def indices(depth: int) -> list[int]:
            if not 0 <= z < depth:
                raise ValueError(f"{self.paths.slice(name)}: slice {z}, but {path} has {depth} slices (made again "
                                 f"since? run preprocess.py)")
            return context_indices(z, depth, self.context)

        if self._volumes is not None:
            vol = self._volumes[case]
            nb = np.stack([vol[:, :, j] for j in indices(vol.shape[2])]).astype(np.float32)
        else:
            nb = self._volume_image(case, indices)
        if nb.shape[1:] != tuple(shape):
            raise ValueError(f"{path}: slices are {nb.shape[1:]}, but {self.paths.slice(name)} is {tuple(shape)}")
        return nb

    def _geometry(self, name: str, image: np.ndarray, label: np.ndarray, sal: Optional[np.ndarray],
                  rng: np.random.Generator, nb: Optional[np.ndarray] = None
                  ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """Resize / resample + pad-or-crop image (H, W), label (K, H, W), salience (3, H, W) and the
        context slices ``nb`` (2K, H, W) together.

        With ``scale_aug`` s (training), the plane is first zoomed by a log-uniform factor in
        [1 / (1 + s), 1 + s] (its mm per pixel divided by it), then padded or cropped to
        ``img_size``: vessels of one calibre are seen at several widths in pixels.
        Then ``rotate_aug`` turns it, and ``elastic_aug`` E bends it by a smooth random field
        (:func:`elastic_field`, smoothness ``ELASTIC_SMOOTH_MM``) whose largest row or column
        displacement is U(0, E) mm: one training patient's organs are seen in other shapes.
        Last, ``bias_aug`` B adds a smooth shading (:func:`smooth_field`, smoothness
        ``BIAS_SMOOTH_MM``) of at most U(0, B) HU to the image and the context slices
        (:func:`shade_planes`; not to the salience): an organ's regions are seen unevenly enhanced.
        """
        size = self.img_size
        if self.target_spacing is not None:
            size = spacing_size(image.shape, self.spacings[self._case(name)], self.target_spacing)
        zoom = 1.0
        if self.scale_aug:
            zoom = float(np.exp(rng.uniform(-np.log1p(self.scale_aug), np.log1p(self.scale_aug))))
            size = (max(1, int(round(size[0] * zoom))), max(1, int(round(size[1] * zoom))))
        n_sal = 0 if sal is None else sal.shape[0]
        planes = np.concatenate([image[None]] + [a for a in (sal, nb) if a is not None])
        if size is not None:
            planes, label = resize_2d(planes, label, size)
        if self.rotate_aug:
            planes, label = rotate_planes(planes, label, float(rng.uniform(-self.rotate_aug, self.rotate_aug)))
        # mm -> pixels of this plane, which the zoom made target_spacing / zoom mm wide
        mm_px = None if self.target_spacing is None else self.target_spacing / zoom
        if self.elastic_aug:
            field = elastic_field(planes.shape[1:], rng.uniform(0, self.elastic_aug) / mm_px,
                                  ELASTIC_SMOOTH_MM / mm_px, rng)
            planes, label = elastic_planes(planes, label, field)
        if self.bias_aug:
            shading = smooth_field(planes.shape[1:], 1, rng.uniform(0, self.bias_aug) / (HU_WINDOW[1] - HU_WINDOW[0]),
                                   BIAS_SMOOTH_MM / mm_px, rng)[0]
            images = [0] + list(range(1 + n_sal, planes.shape[0]))  # the image and its context, not the salience
            planes[images] = shade_planes(planes[images], shading)
        if self.img_size is not None and tuple(planes.shape[1:]) != self.img_size:
            n = planes.shape[0]
            both, _ = pad_or_crop(np.concatenate([planes, label]), self.img_size, rng)
            planes, label = both[:n], both[n:]
        return (planes[0], label, None if sal is None else planes[1:1 + n_sal],
                None if nb is None else planes[1 + n_sal:])

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """image (H, W) float32, label (H, W), salience (3, H, W) float32 or None, from disk."""
        name = self.names[index]
        path = self.paths.slice(name)
        try:
            with h5py.File(path, "r") as f:
                image = f["image"][()].astype(np.float32)
                if self.classes is not None and "classes" not in f:
                    raise ValueError(f"{path}: no class map (preprocess.py --vessel_classes makes one)")
                label = f["classes" if self.classes is not None else "label"][()]
                sal = f["salience"][()].astype(np.float32) if "salience" in f else None
        except (OSError, KeyError) as e:
            raise ValueError(f"{path}: unreadable slice file ({e})") from None
        if image.ndim != 2 or label.shape != image.shape:
            raise ValueError(f"{path}: image/label must be (H, W) of one shape, got {image.shape} / {label.shape}")
        if self.salience_mode != "offline":
            sal = None  # not an input: do not resize or augment it
        elif sal is None:
            vol = self._salience_path(name, path)
            z = parse_slice_name(name)[1]
            with h5py.File(vol, "r") as f:
                sal = f["salience"][:, :, :, z].astype(np.float32)
        return image, label, sal

    def __getitem__(self, key: Key) -> dict:
        epoch, index = self._key(key)
        if self._cache is not None and self._cache[index][0] == "resized":
            return self._cached_item(index, self._rng(epoch, index))
        if self._cache is not None:
            _, image, label, sal = self._cache[index]
            image, sal = image.astype(np.float32), None if sal is None else sal.astype(np.float32)
        else:
            image, label, sal = self._read(index)
        item_rng = self._rng(epoch, index)
        name = self.names[index]
        image, label, sal, nb = self._geometry(name, image, self._target(label), sal, item_rng,
                                               self._neighbours(name, image.shape))
        image, label, sal, nb = self._augment(image, label, sal, item_rng, nb)
        return self._item(image, label, sal, nb)


@dataclass
class CaseData:
    """One case: image (H, W, D) float32, label (H, W, D) uint8, salience (3, H, W, D) or None;
    ``label`` is the class map (0 background, 1, 2, ...) when the dataset was read with ``classes``."""

    name: str
    image: np.ndarray
    label: np.ndarray
    salience: Optional[np.ndarray]
    spacing: tuple[float, float, float]
    liver: Optional[np.ndarray] = None


class VolumeDataSet(Dataset):
    """Cases of ``vol_<split>`` with their salience (read when ``salience_mode`` is offline).

    Volumes are read once and kept in memory (``cache``), so loader workers forked later
    share them instead of re-reading compressed HDF5 for every patch. ``lazy=True`` reads
    each case on first use instead of in the constructor (validation cases: training starts
    without waiting for them). Items are :class:`CaseData`.
    """

    def __init__(self, paths: DatasetPaths, split: str, salience_mode: str, cache: bool = True,
                 lazy: bool = False, classes: bool = False) -> None:
        input_channels(salience_mode)
        self.classes = classes
        self.paths = paths
        self.salience_mode = salience_mode
        self.names = read_list(paths.list_file(f"vol_{split}"))
        if not self.names:
            raise ValueError(f"{paths.list_file(f'vol_{split}')}: list is empty (preprocess.py gives fewer than 3 "
                             f"patients, or a --split with a 0, no {split} case): list a case there")
        for name in self.names:
            if not paths.volume(name).is_file():
                raise FileNotFoundError(f"{paths.volume(name)}: volume file not found (run preprocess.py)")
            if salience_mode == "offline" and not paths.salience(name).is_file():
                raise _no_salience(paths.salience(name), paths.root.name)
        self._cache: dict[int, CaseData] = {}
        self.cache = cache
        if cache and not lazy:
            for i in range(len(self.names)):
                self._cache[i] = self._read(i)

    def __len__(self) -> int:
        return len(self.names)

    def _read(self, index: int) -> CaseData:
        name = self.names[index]
        vol = read_volume(self.paths.volume(name))
        sal = read_case_salience(self.paths, name, vol.image.shape) if self.salience_mode == "offline" else None
        label = vol.label
        if self.classes:
            if vol.classes is None:
                raise ValueError(f"{self.paths.volume(name)}: no class map (preprocess.py --vessel_classes makes one)")
            label = vol.classes
        return CaseData(name, vol.image, label, sal, vol.spacing, vol.liver)

    def __getitem__(self, index: int) -> CaseData:
        if not self.cache:
            return self._read(index)
        if index not in self._cache:
            self._cache[index] = self._read(index)
        return self._cache[index]


class PatchDataSet(_Augmenting):
    """Random 3-D patches (h, w, d) from a :class:`VolumeDataSet`.

    ``samples_per_epoch`` items per epoch; item i is centred on a random vessel voxel when
    floor((i + 1) f) > floor(i f) (exactly a fraction f = ``fg_fraction`` of the items, as
    nnU-Net oversamples foreground), on a uniformly random voxel otherwise. Volumes smaller
    than the patch are zero-padded. Output ``input`` (C, h, w, d), ``label`` (1, h, w, d).
    """

    def __init__(self, volumes: VolumeDataSet, patch_size: Sequence[int], samples_per_epoch: int,
                 fg_fraction: float = 1 / 3, augment: bool = True, jitter: bool = False, seed: int = 0,
                 max_fg_points: int = 20000, domain: bool = False, blur_aug: float = 0.0,
                 classes: Optional[Sequence[int]] = None) -> None:
        super().__init__(volumes.salience_mode, augment, jitter, seed, domain, blur_aug, classes)
        if classes is not None and not volumes.classes:
            raise ValueError("patches with classes need a VolumeDataSet read with classes=True")
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (h, w, d), got {patch_size}")
        if not 0 <= fg_fraction <= 1:
            raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
        self.volumes = volumes
        self.patch_size = tuple(int(p) for p in patch_size)
        self.samples_per_epoch = int(samples_per_epoch)
        self.fg_fraction = float(fg_fraction)
        # vessel voxel coordinates per case, subsampled: a sample of a few thousand centres is
        # as good as all of them and keeps memory flat for large volumes
        rng = np.random.default_rng(seed)
        self.fg_points = []
        for i in range(len(volumes)):
            pts = np.argwhere(volumes[i].label > 0)
            if len(pts) > max_fg_points:
                pts = pts[rng.choice(len(pts), max_fg_points, replace=False)]
            self.fg_points.append(pts)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def is_foreground_item(self, index: int) -> bool:
        f = self.fg_fraction
        return int(np.floor((index + 1) * f + 1e-9)) > int(np.floor(index * f + 1e-9))

    def _crop(self, arr: np.ndarray, start: Sequence[int]) -> np.ndarray:
        lead = arr.ndim - 3
        sl = tuple(slice(None) for _ in range(lead)) + tuple(slice(s, s + p) for s, p in zip(start, self.patch_size))
        out = arr[sl]
        pad = [(0, 0)] * lead + [(0, p - n) for p, n in zip(self.patch_size, out.shape[lead:])]
        return np.pad(out, pad) if any(b for _, b in pad) else np.array(out)

    def __getitem__(self, key: Key) -> dict:
        epoch, index = self._key(key)
        rng = self._rng(epoch, index)
        ci = int(rng.integers(len(self.volumes)))
        case = self.volumes[ci]
        shape = case.image.shape
        pts = self.fg_points[ci]
        if self.is_foreground_item(index) and len(pts):
            centre = pts[int(rng.integers(len(pts)))]
        else:
            centre = np.array([rng.integers(s) for s in shape])
        start = [int(np.clip(c - p // 2, 0, max(0, s - p))) for c, p, s in zip(centre, self.patch_size, shape)]
        image, label = self._crop(case.image, start), self._target(self._crop(case.label, start))
        sal = self._crop(case.salience, start) if case.salience is not None else None
        image, label, sal, _ = self._augment(image, label, sal, rng)
        return self._item(image, label, sal)

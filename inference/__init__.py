"""Inference: from a model to vessel probabilities and masks.

- :mod:`inference.core`: ``predict_volume`` (a volume through any model, 2-D slice by slice or
  3-D sliding windows, with the training's resize rule) and ``vessel_mask`` (the one
  thresholding rule). Re-exported here.
- :mod:`inference.predictor`: :class:`~inference.predictor.Predictor`, a model with every
  setting it needs (from a checkpoint alone, or a live model in training's validation):
  HU window, offline salience from the embedded generator, resize rule, threshold.
- :mod:`inference.scans`: new scans read with their exact geometry (DICOM folder, zip, NIfTI).
- :mod:`prediction.segment`: predict.py's work: a scan in, masks, statistics, meshes and
  figures out, keyed by what made them.
"""
from inference.core import (
    THRESHOLD,
    binarize,
    flip_sets,
    inference_model,
    model_grid,
    predict_volume,
    remove_small_components,
    sliding_window_volume,
    stitch_device,
    vessel_mask,
)

__all__ = ["THRESHOLD", "binarize", "flip_sets", "inference_model", "model_grid", "predict_volume",
           "remove_small_components", "sliding_window_volume", "stitch_device", "vessel_mask"]

"""predict.py's stage: a new scan in; a vessel mask in its geometry, statistics, a mesh and
figures out (:mod:`prediction.segment`), through :class:`inference.predictor.Predictor`."""

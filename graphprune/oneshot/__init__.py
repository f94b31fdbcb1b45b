"""One-shot pruning without training: calibration statistics (a layer's inputs, input norms),
least-squares reconstruction and SparseGPT, and norm recalibration."""

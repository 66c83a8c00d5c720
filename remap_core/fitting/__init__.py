"""Fitting the descriptor's data-initialised layers, shared by `remap eval` and `remap train`:
`klw` (KL-divergence region weights; fit_region_weights) and `whiten` (PCA and learned
whitening; fit_whitening, set_model_whitening)."""

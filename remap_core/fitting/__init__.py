"""Fitting the descriptor's data-initialised layers: KL-divergence region weights (KLW) and PCA / learned whitening."""

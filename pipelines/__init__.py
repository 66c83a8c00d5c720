"""Apache Beam pipelines of remap. Thin: the work lives in plain functions they call."""

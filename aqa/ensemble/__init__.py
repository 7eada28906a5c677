"""The learnable ensemble: fusion, fit/apply over prediction files, plots."""

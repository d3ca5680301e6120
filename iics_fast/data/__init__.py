"""Data: dataset loaders (front: ``iics_fast.datasets``)."""

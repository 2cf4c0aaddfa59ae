"""Zarr v3 case store: one atomic, byte-deterministic, OME-Zarr 0.5 group per case (see ``zarr_store``)."""

"""Preprocessing stage: RAS reorientation, nonzero crop, normalization and resampling (nnU-Net v2 order).

``ops`` holds the pure array operations (``preprocess_arrays`` for one case, ``invert_to_raw`` back to the
raw grid); ``geometry`` the exact grid bookkeeping they share. Import those modules directly.
"""

"""Dataset fingerprint -> versioned preprocessing plan (nnU-Net's idea): pure functions over arrays and tables."""

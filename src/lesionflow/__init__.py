"""lesionflow: reproducible 3D lesion segmentation with synthetic lesion data."""

__version__ = "0.1.0"

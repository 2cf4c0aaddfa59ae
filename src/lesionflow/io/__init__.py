"""Reading and writing volumes: the only package that imports nibabel, SimpleITK or pydicom."""

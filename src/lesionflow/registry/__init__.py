"""Model registration in MLflow and lineage read back from it (model version -> run -> data and code).

Import the submodules directly (``lesionflow.registry.publish``...): they import MLflow lazily, so importing
this package stays cheap for commands that never touch the registry.
"""

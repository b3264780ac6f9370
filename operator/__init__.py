"""The dreambooth-operator: a kopf controller for DreamboothJob resources.

Installed as the import package `dreambooth_operator` (this folder is not importable
as `operator`, which would shadow the standard library).
"""

"""Trained models out of bso: loading a run's checkpoint, exporting to NIR (:mod:`bso.export.nir`)."""

from bso.export.load import find_checkpoint, load_trained
from bso.export.nir import to_nir
from bso.export.nir_compare import simulate
from bso.export.nir_support import NIRExportError, check_exportable

__all__ = [
    "NIRExportError",
    "check_exportable",
    "find_checkpoint",
    "load_trained",
    "simulate",
    "to_nir",
]

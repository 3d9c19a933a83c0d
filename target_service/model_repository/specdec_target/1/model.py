"""Triton's entry point for the specdec target model: a thin shell over ``target_service.triton_model``.

Triton imports this file inside its Python backend stub, where ``triton_python_backend_utils`` exists;
the logic sits in the installed ``target_service`` package so it can be unit-tested without Triton.
"""

import logging

import triton_python_backend_utils as pb_utils

from specdec.gc_freeze import freeze_startup_objects
from target_service.triton_model import TargetModel


class TritonPythonModel:
    def initialize(self, args):
        self._model = TargetModel(pb_utils)
        self._model.initialize(args)
        freeze_startup_objects(logging.getLogger("target_service"))  # this stub process is ours alone

    def execute(self, requests):
        return self._model.execute(requests)

    def finalize(self):
        self._model.finalize()

"""Test setup: import the package from this source tree (no install needed)."""

import os
import sys

_PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _PYTHON_DIR not in sys.path:
    sys.path.insert(0, _PYTHON_DIR)


def pytest_report_header(config):
    try:
        import distill_kernels as dk

        return [f"distill_kernels {dk.__version__}, library {dk.library_path()} ({dk.version()})"]
    except Exception as e:  # the tests themselves will report the error
        return [f"distill_kernels library not loaded: {e}"]

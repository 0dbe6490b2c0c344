"""Importing TensorFlow without its C++ start-up banner on stderr: the scripts do it first, and so
does library code that imports TensorFlow late (after the checks that need none)."""
import importlib
import os


def import_tensorflow():
    """Import TensorFlow with its banner kept off stderr.

    TF 2.21 prints its oneDNN notice through absl before logging is configured, so no environment
    variable silences it; stderr (fd 2) is pointed at /dev/null for the import alone. A failing
    import still raises, and its message is printed after stderr is back.
    """
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        importlib.import_module('tensorflow')
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)

"""Run pytest on the test file given as the first argument, for Bazel's py_test targets.

Bazel runs this script with the runfiles copy of the repository root as the
working directory, so the arguments are paths relative to that root. Bazel
owns the runfiles tree, so this runner keeps pytest's cache and Python's
bytecode files out of it.
"""

import os
import sys

import pytest


def _set_default_shared_dir() -> None:
    """Set TF_ADARTS_SHARED to ../shared beside the source checkout if the caller did not set it.

    The runfiles entries are symlinks into the source tree, so resolving this
    file's path leads back to <checkout>/tests/pytest_main.py.
    """
    if os.environ.get("TF_ADARTS_SHARED"):
        return
    checkout = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    shared = os.path.join(os.path.dirname(checkout), "shared")
    if os.path.isdir(shared):
        os.environ["TF_ADARTS_SHARED"] = shared


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: pytest_main.py TEST_FILE [PYTEST_ARGS...]", file=sys.stderr)
        return 2

    sys.dont_write_bytecode = True
    _set_default_shared_dir()
    return int(pytest.main(["-p", "no:cacheprovider", *argv]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

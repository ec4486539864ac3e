"""Repository rule that registers the project's virtual environment as the Python toolchain."""

_TOOLCHAIN_BUILD = """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
"""

def _venv_python_impl(rctx):
    python = rctx.os.environ.get("BAZEL_VENV_PYTHON", "")
    if not python:
        workspace_root = rctx.path(Label("@//:WORKSPACE")).dirname
        python = "%s/.venv/bin/python3" % workspace_root
    if not rctx.path(python).exists:
        fail(("Python interpreter not found at %s. Create the virtual environment with " +
              "`python3 -m venv .venv && .venv/bin/pip install -r requirements.txt`, " +
              "or set BAZEL_VENV_PYTHON to the absolute path of another interpreter.") % python)

    rctx.file("WORKSPACE", 'workspace(name = "%s")\n' % rctx.name)
    rctx.file("BUILD", _TOOLCHAIN_BUILD.format(python = python))

venv_python = repository_rule(
    implementation = _venv_python_impl,
    doc = "Registers a py_runtime whose interpreter is .venv/bin/python3 in the workspace, or $BAZEL_VENV_PYTHON.",
    environ = ["BAZEL_VENV_PYTHON"],
    # Re-run on every fetch, because the interpreter lives outside Bazel's view.
    local = True,
)

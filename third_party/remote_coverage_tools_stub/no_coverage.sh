#!/bin/sh
# Bazel needs these coverage targets to analyze any py_test, but the real
# remote_coverage_tools repository is a download, so offline they only fail.
echo "bazel coverage is not available offline: remote_coverage_tools is a local stub" >&2
exit 1

#!/usr/bin/env bash
# Build the CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer and run the op tests and
# op fuzzers against that build. Any sanitizer report aborts the process and fails the run; the
# reports are printed at the end.
# Usage: .ci/sanitize.sh [pytest args...]   (run inside a venv that has torch, pytest, hypothesis)
#   VQEXT_SANITIZE_BUILD_DIR=DIR keeps the object files in DIR, so a rerun after an edit
#   recompiles only what changed (default: a temporary directory, a full build: ~15 CPU-minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

san=$(mktemp -d)
report() {
  local status=$?
  if compgen -G "$san/sanitizer.*" >/dev/null; then
    echo "sanitize: SANITIZER REPORTS:" >&2
    cat "$san"/sanitizer.* >&2
    status=1
  fi
  rm -rf "$san"
  [ "$status" = 0 ] && echo "sanitize: no sanitizer reports" || echo "sanitize: FAILED" >&2
  exit "$status"
}
trap report EXIT
cp -a vqext tests pyproject.toml "$san/"
rm -f "$san"/vqext/_C*.so
build_dir=${VQEXT_SANITIZE_BUILD_DIR:-$san/build}
mkdir -p "$build_dir"
# A separate build tree so the sanitized objects never mix with the normal build.
VQEXT_CUDA=0 VQEXT_SANITIZE=1 python setup.py -q build_ext --build-temp "$build_dir" --build-lib "$san/lib" >"$san/build.log" 2>&1 \
  || { cat "$san/build.log"; echo "sanitize: build failed" >&2; exit 1; }
cp "$san"/lib/vqext/_C*.so "$san/vqext/"
cp vqext/_build_info.py "$san/vqext/" 2>/dev/null || true

export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# Python and torch are not instrumented: leaks and allocator mismatches inside them are not ours.
# Reports go to files (pytest captures stderr, and an aborted process would lose them).
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0:log_path=$san/sanitizer"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:log_path=$san/sanitizer"
export VQEXT_REQUIRE_SANITIZED=1 HYPOTHESIS_PROFILE=sanitize
tests=(tests/test_nearest_code.py tests/test_apply_rope.py tests/test_rope_attention.py tests/test_fuzz_ops.py tests/test_decode.py)
existing=()
for t in "${tests[@]}"; do [ -f "$t" ] && existing+=("$t"); done
cd "$san"  # so `import vqext` finds the sanitized copy first
python -c "import vqext, vqext._native as n; assert n.native_available(), n.load_error(); print('sanitize: loaded', vqext.__file__)"
python -m pytest -q -p no:cacheprovider -m "not slow" "${existing[@]}" "$@"

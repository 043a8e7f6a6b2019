#!/usr/bin/env bash
# One-command GPU check (issue #18). On a machine with an NVIDIA GPU: builds the extension with CUDA for that GPU,
# runs every CUDA test (`pytest -m cuda`: the tests CPU CI skips), compute-sanitizer's memcheck over a slice of
# them (when the toolkit has it), then the GPU benchmark (AlexNet Table 4 rows 2
# and 5, batch 1 / 32 / 256; fp32 exact, fp32 with TF32, bf16; whole layer against cuDNN, interleaved, the
# device synchronised by the timer), and writes OUT/gpu_check.md and OUT/gpu_check.json. Without a GPU it says
# so and exits 0 (nothing to check).
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT defaults to gpu_check/
#
# Exit status: 0 when every CUDA test passed (or there is no GPU), 1 otherwise; the benchmark runs either way.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no GPU here (torch.cuda.is_available() is False): nothing to check; run this on a machine" \
    "with an NVIDIA GPU and a CUDA build of torch"
  exit 0
fi
mkdir -p "$out"
start=$SECONDS
arch=$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
gpu=$(python -c 'import torch; print(torch.cuda.get_device_name())')
echo "gpu_check: $gpu (compute capability $arch): building the CUDA extension"
TORCH_CUDA_ARCH_LIST="$arch" SSL_LIGHTNING_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  pip install -q --no-build-isolation -e . >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
python -c 'from ssl_lightning._ext import has_cuda_kernels; assert has_cuda_kernels(), "no CUDA kernels in the build"'

echo "gpu_check: CUDA tests (pytest -m cuda)"
tests=0
python -m pytest -q -m cuda -rfEs --junitxml "$out/tests.xml" 2>&1 | tee "$out/tests.log" || tests=1

# The memory checker over a slice of the CUDA op tests (several tiles, both output modes, the backward): an
# out-of-bounds read or write in a kernel fails the check. Slow (each launch is instrumented): capped at 3 minutes.
sanitizer="not run (no compute-sanitizer)"
cs=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$cs" ]; then
  echo "gpu_check: compute-sanitizer --tool memcheck on the CUDA op tests"
  set +e
  timeout 180 "$cs" --tool memcheck --error-exitcode 9 python -m pytest -q -x -p no:cacheprovider \
    tests/test_cuda_conv.py -k "several_tiles or backward_op or removed_filters or bad_inputs" >"$out/sanitizer.log" 2>&1
  rc=$?
  set -e
  case $rc in
    0) sanitizer="clean" ;;
    124) sanitizer="timed out after 180 s (no report before that)" ;;
    *) sanitizer="FAILED (exit $rc, see sanitizer.log)"; tests=1 ;;
  esac
  echo "gpu_check: compute-sanitizer: $sanitizer"
fi

echo "gpu_check: benchmark (AlexNet rows 2 and 5 vs cuDNN)"
# kernel (SSL_LIGHTNING_CUDA_GEMM), dtype, batches, TF32: fp32 exact runs the CUDA-core kernel, fp32 + TF32 and
# bf16 the tensor-core one; at batch 32 also the older lowered-panel + cuBLAS path and bf16 on CUDA cores, side
# by side with the same cuDNN baseline, to show what each kernel brings.
runs=("auto float32 1,32,256" "auto float32 1,32,256 --tf32" "auto bfloat16 1,32,256" "lowered float32 32"
  "simt bfloat16 32")
for i in "${!runs[@]}"; do
  read -r gemm dtype batches tf32 <<<"${runs[$i]} "
  # shellcheck disable=SC2086
  SSL_LIGHTNING_CUDA_GEMM="$gemm" python benchmarks/bench_compact_conv.py --device cuda --suite AlexNet \
    --batch ${batches//,/ } --rounds 5 --stat min --dtype "$dtype" $tf32 --markdown "$out/bench_$i.md" \
    --json "$out/bench_$i.json" || echo "bench run $i failed"
done

python - "$out" "$gpu" "$((SECONDS - start))" "$tests" "$sanitizer" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, gpu, seconds, failed, sanitizer = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
suite = ET.parse(out / "tests.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
bench = [json.loads(p.read_text()) for p in sorted(out.glob("bench_*.json"))]
(out / "gpu_check.json").write_text(
    json.dumps({"gpu": gpu, "seconds": seconds, "tests": counts, "compute_sanitizer": sanitizer, "bench": bench}, indent=1)
)
md = [f"# GPU check: {gpu}", "", f"{seconds} s. CUDA tests (`pytest -m cuda`): {counts['tests']} run, "
      f"{counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped. "
      f"compute-sanitizer memcheck: {sanitizer}.", ""]
md += [p.read_text() for p in sorted(out.glob("bench_*.md"))]
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
print(f"gpu_check: wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'} ({seconds} s); tests "
      + ("FAILED" if failed else "passed"))
EOF
exit "$tests"

"""The performance model: seconds per engine iteration from (decode batch, KV tokens, prefill
tokens, SM clock), as the throttLL'eM paper's offline stage builds it.

* `table` — the profile-table CSV format (the measured H100 table's layout, plus extras);
* `profiler` — sweeps a setup's twin into a table (a real GPU is profiled by the GPU lab,
  `throttllem._gpulab`, into the same table layout);
* `train` — fits the gradient-boosted model, exports ONNX, writes its card (needs the
  ``train`` extra: scikit-learn, skl2onnx, onnx);
* `runtime` — `PerfRuntime`: the ONNX model (ONNX Runtime) and its precompiled grid, a
  `throttllem._core.perf.PerfModel`;
* `cli` — `throttllem profile`, `throttllem train perf`, `throttllem perf score`.

Nothing is imported here eagerly, so that `table` stays importable on a bare GPU machine.
"""

"""The GPU lab: measuring a real card with PyTorch, a tool beside the performance model.

* `decoder` — a Llama-3-8B-shaped random-weight decoder, and the bucket sweep that profiles
  it into a `throttllem._perf.table` table (`throttllem profile --target gpu`);
* `loop` — a real decode loop: the engine twin's scheduler (`EngineTwin`) driving real
  forward passes through its public methods, the pass plans, and the forecast-drift
  arithmetic (pure numpy, tested on CPU);
* `passes` — `TorchPassRunner`: the loop's forward passes on a GPU (FlashAttention-2 varlen,
  split-KV decode, CUDA graphs);
* `sampler` — a thread reading the SM clock and the energy counter through
  `throttllem._gpu.nvml.NvmlBackend`, so passes never wait for NVML, and `PassEnergyMeter`,
  each pass's share of the energy counter (the GPU engine's, `throttllem._engines.gpu`).

The lab never changes a GPU setting (NVML is only read). Nothing is imported here eagerly:
torch is imported where a pass really runs.
"""

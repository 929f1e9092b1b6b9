"""One way to open an ONNX Runtime session, for every model this package serves or checks.

The models (performance, length) answer inline in a service's event loop or in a tight
search loop, a few hundred to a few thousand points per call: one intra-op and one inter-op
thread, sequential execution, so that a service's cores are not oversubscribed by ONNX
Runtime's own thread pools and timings do not depend on the machine's core count. CPU
provider only; warnings and below are not logged (ONNX Runtime's initializer notices would
otherwise fill a service's log at every load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from throttllem._errors import ModelError


def onnx_session(model: bytes | str | Path, what: str) -> Any:
    """An ONNX Runtime inference session on `model` (serialized bytes or a file); raises
    ModelError naming `what` when it cannot be loaded."""
    import onnxruntime as ort  # noqa: PLC0415 (keeps `import throttllem` light)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                    sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
        raise ModelError(f"{what} is corrupt or not a loadable ONNX model: {e}") from e

"""The length-predictor service: how many tokens will each request generate?

- consumes `request.arrived` (durable; several replicas share the consumer, so the service
  scales out) and publishes `request.predicted` (durable) with the median, an upper quantile,
  the model version and the request itself;
- answers request/reply on `tllm.v1.rpc.predict` (queue group `length-predictor`) for
  gateways that need the prediction inline;
- loads the ONNX model once and batches whatever arrives together (MicroBatcher);
- oracle mode (trace replay only: the Azure traces carry no prompt text) predicts the true
  length with injected error, and says so in every prediction (`oracle=true`, version
  `oracle-…`);
- feedback: on `request.completed` it compares prediction and truth, publishes rolling error
  on its heartbeat and warns once when error drifts past the model card's figure.

A request the predictor cannot serve (oracle mode without a true length) is rejected alone:
logged (`length.request_rejected`, or `rpc.rejected` for an RPC), counted, answered with a
final `request.deferred` (durable) or an `rpc.error` reply, and never retried; the other
requests of its micro-batch are predicted as usual. Any other failure of an RPC still gets an
`rpc.error` reply (`rpc.failed` in the log, counter `rpc_errors`; `Bus.serve_deferred`) and
never stops the service.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import anyio
import anyio.abc
import structlog

from throttllem import _metrics as m
from throttllem._batching import MicroBatcher
from throttllem._bus import Bus, Reply
from throttllem._core.feedback import LengthFeedback
from throttllem._errors import RequestRejectedError
from throttllem._events import (
    ARRIVAL_CODEC,
    REQUEST_CODEC,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestEvent,
    RequestPredicted,
)
from throttllem._runtime import Clock
from throttllem._subjects import (
    LENGTH_PREDICTOR_DURABLE,
    PREDICT_RPC,
    REQUEST_ARRIVED,
    REQUEST_COMPLETED,
    REQUEST_DEFERRED,
    REQUEST_PREDICTED,
)

log = structlog.get_logger("throttllem.length_predictor")

QUEUE_GROUP = "length-predictor"


def parse_oracle(value: str) -> float | str:
    """`--oracle 0.15` (relative error) or `--oracle measured` (the real model's errors)."""
    from throttllem._length.oracle import parse_length_error  # noqa: PLC0415

    return parse_length_error(value, option="--oracle")


class LengthPredictorService:
    name = "length-predictor"

    def __init__(self, *, model_dir: Path | None = None, oracle: float | str | None = None,
                 seed: int = 0, generator: str | None = None) -> None:
        from throttllem._length.oracle import OraclePredictor  # noqa: PLC0415
        from throttllem._length.runtime import LengthModel, read_metrics  # noqa: PLC0415

        self._model: LengthModel | None = None
        self._oracle: OraclePredictor | None = None
        expected_mae: float | None = None
        if oracle is None:
            self._model = LengthModel.load(model_dir, generator=generator)
            self.model_version = self._model.model_version
            self.quantile = self._model.quantiles[-1]
            mae = read_metrics(self._model.path.parent).get("test", {}).get("mae")
            expected_mae = float(mae) if isinstance(mae, int | float) else None
        else:
            self._oracle = OraclePredictor(oracle, seed=seed)  # type: ignore[arg-type]
            label = "measured" if oracle == "measured" else f"{100 * float(oracle):g}pct"
            self.model_version = f"oracle-{label}"
            self.quantile = 0.9
        self.feedback = LengthFeedback(expected_mae_tokens=expected_mae)
        # Inline, not in a worker thread: a batch costs 0.05-0.15 ms (1 prompt; the higher figure
        # when caches are cold, as between requests at 1000 req/s) to about 1.3 ms (64), less
        # than a thread hop costs under load (measured: benchmarks/bench_length_service.py).
        self.batcher: MicroBatcher[RequestArrived, RequestPredicted] = MicroBatcher(
            self.predict_batch, max_size=64, in_thread=False)
        self._drift_warned = False
        self.metrics = m.ServiceMetrics(self.name)
        self._predictions = self.metrics.counter(m.LENGTH_PREDICTIONS).labels(self.model_version)
        self._predicted_tokens = self.metrics.histogram(m.LENGTH_PREDICTED_TOKENS)
        self._rejected = self.metrics.counter(m.LENGTH_REJECTED)
        self._feedback = self.metrics.counter(m.LENGTH_FEEDBACK)
        self.metrics.gauge_functions([
            (m.LENGTH_MAE, lambda: self.feedback.stats().mae_tokens),
            (m.LENGTH_COVERAGE, lambda: self.feedback.stats().upper_coverage)])

    def _observe_prediction(self, prediction: RequestPredicted) -> None:
        self._predictions.inc()
        self._predicted_tokens.observe(prediction.predicted_tokens)

    # ---- the model call (inline in the event loop, one batch at a time)

    def predict_batch(self, requests: list[RequestArrived]
                      ) -> list[RequestPredicted | Exception]:
        """One prediction per request, or the RequestRejectedError of a request that this
        predictor cannot serve (only that request fails, not its batch)."""
        rejected: dict[int, Exception] = {}
        if self._oracle is not None:
            rejected = {i: RequestRejectedError(
                f"oracle mode needs the request's true length (trace replay only); "
                f"request {r.id!r} has none")
                for i, r in enumerate(requests) if r.true_output_tokens is None}
            ok = [r for i, r in enumerate(requests) if i not in rejected]
            median, upper = self._oracle.predict(
                [r.true_output_tokens or 0 for r in ok], keys=[r.id for r in ok])
        else:
            assert self._model is not None
            ok = requests
            median, upper = self._model.predict(
                [r.prompt_text or "" for r in ok],
                prompt_tokens=[r.prompt_tokens for r in ok],
                max_tokens=[r.max_tokens for r in ok])
        quantile, version, oracle = self.quantile, self.model_version, self._oracle is not None
        predictions: list[RequestPredicted | Exception] = [
            RequestPredicted(id=r.id, predicted_tokens=m, upper_tokens=u, quantile=quantile,
                             model_version=version, oracle=oracle, decided_s=r.arrival_s,
                             request=r)
            for r, m, u in zip(ok, median.tolist(), upper.tolist(), strict=True)
        ]
        if not rejected:
            return predictions
        rest = iter(predictions)
        return [rejected[i] if i in rejected else next(rest) for i in range(len(requests))]

    # ---- handlers

    async def _predict(self, request: RequestArrived) -> RequestPredicted:
        prediction = await self.batcher.submit(request)
        self.feedback.predicted(request.id, prediction.predicted_tokens,
                                prediction.upper_tokens)
        self._observe_prediction(prediction)
        return prediction

    async def _on_arrived(self, bus: Bus, event: RequestEvent) -> None:
        if not isinstance(event, RequestArrived):
            return
        try:
            prediction = await self._predict(event)
        except RequestRejectedError as e:
            # Final: retrying cannot help, so it is recorded and acked, never nak'ed; any
            # other failure propagates and the bus naks it for redelivery.
            bus.counters["requests_rejected"] += 1
            self._rejected.inc()
            log.warning("length.request_rejected", id=event.id, error=str(e))
            await bus.publish_durable(REQUEST_DEFERRED, RequestDeferred(
                id=event.id, decided_s=event.arrival_s, reason=f"length-predictor: {e}",
                final=True), msg_id=f"predict-rejected-{event.id}")
            return
        await bus.publish_durable(REQUEST_PREDICTED, prediction, msg_id=f"predicted-{event.id}")

    def _accept_rpc(self, request: RequestArrived, reply: Reply) -> None:
        """`Bus.serve_deferred`'s callback (awaited one message at a time): queue the request
        for the next batch without suspending, so that requests that arrive together are
        batched together; the batcher's worker sends the reply (`_rpc_done`)."""
        self.batcher.submit_nowait(request, partial(self._rpc_done, reply))

    async def _rpc_done(self, reply: Reply, result: RequestPredicted | Exception) -> None:
        if isinstance(result, Exception):
            self._rejected.inc()
        else:
            self.feedback.predicted(result.id, result.predicted_tokens, result.upper_tokens)
            self._observe_prediction(result)
        await reply(result)

    async def _on_completed(self, event: RequestEvent) -> None:
        if not isinstance(event, RequestCompleted):
            return
        if self.feedback.completed(event.id, event.generated_tokens):
            self._feedback.inc()
        stats = self.feedback.stats()
        if stats.drifting and not self._drift_warned:
            log.warning("length.drift", mae_tokens=stats.mae_tokens,
                        expected_mae_tokens=self.feedback.expected_mae_tokens, count=stats.count,
                        model_version=self.model_version)
        self._drift_warned = stats.drifting

    def health_metrics(self) -> dict[str, float]:
        stats = self.feedback.stats()
        return {"feedback_count": float(stats.count), "mae_tokens": stats.mae_tokens,
                "within25": stats.within25, "upper_coverage": stats.upper_coverage,
                "drifting": float(stats.drifting),
                "mean_batch": self.batcher.items / self.batcher.batches
                if self.batcher.batches else 0.0,
                "max_batch": float(self.batcher.max_batch)}

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await bus.ensure_request_stream()
        async with anyio.create_task_group() as tg:
            await tg.start(self.batcher.run)
            await bus.subscribe(REQUEST_COMPLETED, REQUEST_CODEC, self._on_completed)

            # No task per request: the callback queues it for the next batch and returns.
            await bus.serve_deferred(PREDICT_RPC, ARRIVAL_CODEC, self._accept_rpc,
                                     queue=QUEUE_GROUP, what="length prediction")
            await tg.start(partial(
                bus.consume, durable=LENGTH_PREDICTOR_DURABLE, subject=REQUEST_ARRIVED,
                deliver_new_only=True,
                codec=REQUEST_CODEC, handler=partial(self._on_arrived, bus), concurrent=True))
            log.info("length_predictor.started", model_version=self.model_version,
                     oracle=self._oracle is not None)
            task_status.started()

"""The OpenAI-compatible gateway: the front door that puts every request through the
controller's admission and onto the engine instance it chose (`throttllem run gateway`).

Layering: imports only the wire (events, subjects, bus, errors) and the runtime; its pure
logic lives in `protocol` (requests, headers, errors, server-sent events, latencies),
`tokenizer` and `instances`; `service` is the shell.
"""

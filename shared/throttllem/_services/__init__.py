"""Thin service shells: each wires NATS subjects to functional-core calls. Start one with
`throttllem run <name>`; `throttllem demo` starts them all as separate processes."""

"""The vLLM adapter: a scheduler that publishes every engine step as `engine.iteration`
(`scheduler`, loaded inside vLLM with `--scheduler-cls`), and a tiny locally made model for
serving without a download (`tiny_model`). Importing this package never imports vLLM."""

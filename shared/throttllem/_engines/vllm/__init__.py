"""The vLLM adapter: a stat-logger plugin that publishes every engine step as
`engine.iteration`, and a tiny locally made model for serving without a download. Importing
this package never imports vLLM."""

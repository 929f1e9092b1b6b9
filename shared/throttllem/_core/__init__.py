"""The functional core: pure, typed functions that the services, the demo and the evaluator
all call. Nothing here reads the clock, touches the bus or the GPU."""

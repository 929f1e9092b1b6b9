"""GPU backends: NVML on real hardware, the twin in simulation, and a dry-run that logs."""

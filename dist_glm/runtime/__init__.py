"""The process a rank runs in: rank discovery and process-group init (`environment`), every collective
(`collectives`), the DeepSpeed config (`deepspeed_config`), the checks before the first collective
(`preflight`), DeepSpeed's native ops (`ops`), the environment report (`doctor`), and stopping cleanly
on a scheduler's signal (`preemption`, `supervise`)."""

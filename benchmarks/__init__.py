"""Measurement harnesses beside the library (not installed with it): the side-by-side training benchmark
against HF Trainer, TRL and LLaMA-Factory (`run`, `workloads`, `peers`, `peer_train`, `measure`, `report`),
the data-pipeline benchmark (`data`), the memory benchmark (`memory`) and the planner's measurements
(`plan_measure`)."""

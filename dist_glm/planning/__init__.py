"""The memory planner: a recipe's per-rank memory under each ZeRO stage and offload choice, computed from
the model's config.json on the meta device (`trace`) and rendered with a recommendation (`planner`)."""

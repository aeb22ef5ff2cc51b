"""Adapters for existing trainers: `oar_kernels.integrations.trl.OARGRPOTrainer` and the
verl plugin `oar_kernels.integrations.verl` (advantage estimator `oar_grpo`)."""

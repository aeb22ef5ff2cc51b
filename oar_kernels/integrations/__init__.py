"""Adapters for existing trainers: `oar_kernels.integrations.trl.OARGRPOTrainer`."""

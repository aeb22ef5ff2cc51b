"""The reference GRPO loop: an embedded task and model, rollouts, OAR advantages, the fused
loss, checkpoints, pictures. `oar-kernels train|demo|viz`, or `grpo.loop.train(config)`.

task.py (problems, tokenizer, reward) · model.py (policy, cached warm start) · rollout.py
(HF generate / vLLM) · config.py (TrainConfig) · loop.py (the trainer) · viz.py · demo.py
"""

"""Policy, reward and reference models: loading by path or Hub id, LoRA, tiny test models, the offline default."""

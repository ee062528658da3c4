"""Training SIMoE on ``transformers.Trainer``: its options (arguments), the trainer (trainer), atomic
checkpoints (checkpoints) and the compact console line (console)."""

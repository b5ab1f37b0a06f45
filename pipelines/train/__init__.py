"""Training: the Ray Train driver (TorchTrainer), the per-worker loop, plain PyTorch steps and MLflow tracking."""

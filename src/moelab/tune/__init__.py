"""Fine-tuning methods on top of a pre-trained moelab model (ESFT, LoRA, ...)."""

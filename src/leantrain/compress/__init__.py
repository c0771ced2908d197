"""Model compression: distillation (separable convs, pruning and quantization to come)."""

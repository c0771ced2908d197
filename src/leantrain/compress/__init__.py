"""Model compression: depthwise-separable surgery, pruning and int8 quantization.

(Knowledge distillation is a loss: it lives in `leantrain.losses.distillation`.)
"""

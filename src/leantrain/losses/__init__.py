"""Training losses: the task losses the trainer infers (`tasks`), and knowledge distillation.

A custom loss is called as `loss_fn(outputs, labels, inputs, *extras)` inside the plan's
autocast: `outputs` are the model's logits (read from a tensor, tuple, dict or ModelOutput;
what the model returned, as it is, when it has none: a CLIP output, a 0-d loss),
`inputs` what the model was called with (a tensor or the batch's dict), extras further
per-sample tensors the batch carries (e.g. cached teacher logits).
"""

from . import tasks

__all__ = ["tasks"]

"""The run layer: `plan.build` decides a run once (a `Run`), `trainer` is the loop over it.

`step` holds the pieces of one training step (batch to device, forward and loss, evaluation),
`state` what a checkpoint holds, `summary` the end-of-run figures, `logs` the metric files.
"""

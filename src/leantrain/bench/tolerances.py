"""The bench's numerical check: how far a trial's first losses may drift from the baseline's.

Apart from the search so that the CLI can show the defaults without importing torch.
"""

LOSSLESS_TOL = 1e-3  # relative loss difference allowed for float reordering over ten steps
LOSSY_TOL = 0.05  # lossy techniques (bf16, fp16, TF32): the default of --loss-tol

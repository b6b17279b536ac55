"""Where do the two backends diverge? ``python -m llm.parity --config FILE``.

The parity app, the one place besides ``parity_tests/`` that loads both frameworks (on purpose,
and only when called):

* ``metrics``    -- error measures (relative, max-abs, KL) and the float32 ``Tolerances``
* ``report``     -- one forward + backward in each backend from the same canonical weights, the
  per-layer comparison, and the command line
* ``trajectory`` -- both training engines for N AdamW steps on identical batches
"""

from llm.parity.metrics import GRAD_FLOOR, Tolerances, configure_numerics, max_abs_err, mean_kl, rel_err
from llm.parity.report import BackendResult, compare, flax_pass, main, make_batch, run_parity, torch_pass
from llm.parity.trajectory import trajectory_parity

__all__ = ["GRAD_FLOOR", "BackendResult", "Tolerances", "compare", "configure_numerics", "flax_pass", "main",
           "make_batch", "max_abs_err", "mean_kl", "rel_err", "run_parity", "torch_pass", "trajectory_parity"]

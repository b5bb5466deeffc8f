r"""The loop shared by the closed-form EM fits of :mod:`diffem.priors.em`.

As in scikit-learn's ``BaseMixture.fit``, one loop alternates the model's ``_e_step`` (the
summed log-evidence of the observations under the current parameters and, when an M-step
follows, the expected sufficient statistics) and ``_m_step`` (new parameters from the
statistics). Iteration :math:`k` records the mean log-evidence :math:`\frac1n \sum_i \log
p_k(y_i)` of the parameters after :math:`k` M-steps; the loop stops after ``n_iter`` M-steps, or
earlier when the mean log-evidence rises by less than ``tol``.
"""

from __future__ import annotations

import warnings
from typing import Any

from sklearn.exceptions import ConvergenceWarning

from diffem.priors._common import ObservationSet

__all__ = ["ExpectationMaximization"]


class ExpectationMaximization:
    """One EM run on the observations ``obs``; subclasses hold the parameters (float64).

    Subclasses implement :meth:`_e_step`, :meth:`_m_step` and :meth:`_prior`.
    """

    def __init__(self, obs: ObservationSet, ridge: float) -> None:
        self.obs = obs
        self.ridge = ridge

    def _e_step(self, statistics: bool) -> tuple[float, Any]:
        """Summed log-evidence of the observations under the current parameters and, if
        ``statistics``, the expected sufficient statistics of the M-step (else ``None``)."""
        raise NotImplementedError

    def _m_step(self, statistics: Any) -> None:
        """Updates the parameters from the expected sufficient statistics."""
        raise NotImplementedError

    def _prior(self, dtype: Any) -> Any:
        """The prior of the current parameters, with parameters in ``dtype``."""
        raise NotImplementedError

    def fit(self, n_iter: int, tol: float, dtype: Any) -> Any:
        """Runs at most ``n_iter`` EM iterations and returns the prior, with ``history_`` (the
        mean log-evidence after each iteration, ``n_iter_ + 1`` values), ``n_iter_`` (M-steps
        taken), ``converged_`` (stopped by ``tol``) and ``lower_bound_`` (the mean
        log-evidence of the returned prior, ``history_[-1]``). Warns ``ConvergenceWarning``
        if ``tol > 0`` and the rise never fell below it."""
        n = len(self.obs)
        history: list[float] = []
        converged = False
        for iteration in range(n_iter + 1):
            total, statistics = self._e_step(statistics=iteration < n_iter)
            history.append(total / n)
            if iteration == n_iter:
                break
            if iteration > 0 and tol > 0 and history[-1] - history[-2] < tol:
                converged = True
                break
            self._m_step(statistics)
        if tol > 0 and n_iter > 0 and not converged:
            warnings.warn(
                f"EM did not converge in n_iter={n_iter} iterations (the last rise of the mean "
                f"log-evidence was above tol={tol:g}); raise n_iter or tol.",
                ConvergenceWarning,
                stacklevel=3,
            )
        prior = self._prior(dtype)
        prior.history_ = history
        prior.n_iter_ = len(history) - 1
        prior.converged_ = converged
        prior.lower_bound_ = history[-1]
        return prior

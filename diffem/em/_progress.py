"""Progress bars of :meth:`DiffusionPriorEM.fit <diffem.em.DiffusionPriorEM.fit>`: one over
the EM iterations (``verbose >= 1``) and one over the epochs of each M-step (``verbose >= 2``,
a skorch callback)."""

from __future__ import annotations

import math
from typing import Any

from skorch.callbacks import Callback

__all__ = ["EpochProgress", "em_progress", "postfix"]


class EpochProgress(Callback):
    """A skorch callback showing a tqdm bar over the epochs of one M-step."""

    def __init__(self, desc: str = "M-step") -> None:
        self.desc = desc

    def on_train_begin(self, net: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.bar_ = tqdm(total=int(net.max_epochs), desc=self.desc, leave=False)

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        bar = getattr(self, "bar_", None)
        if bar is not None:
            loss = net.history[-1].get("train_loss", float("nan"))
            bar.set_postfix(loss=f"{loss:.4g}")
            bar.update(1)

    def on_train_end(self, net: Any, **kwargs: Any) -> None:
        bar = getattr(self, "bar_", None)
        if bar is not None:
            bar.close()
        self.bar_ = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["bar_"] = None  # a progress bar is not picklable (and not state)
        return state


def em_progress(total: int, start: int, verbose: int) -> Any:
    """A tqdm bar over the EM iterations ``start..total``, or ``None`` (silent or nothing
    left to run)."""
    if not verbose or total <= start:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="DiffusionPriorEM", unit="iter")


def postfix(record: dict[str, Any]) -> dict[str, str]:
    """The EM bar's postfix from one ``history_`` record: loss, evidence, step times."""
    out = {"loss": f"{record.get('train_loss', math.nan):.4g}"}
    if "log_evidence" in record:
        out["evidence"] = f"{record['log_evidence']:.4g}"
    out["E"] = f"{record.get('e_step_seconds', 0.0):.1f}s"
    out["M"] = f"{record.get('m_step_seconds', 0.0):.1f}s"
    return out

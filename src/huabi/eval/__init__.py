"""Evaluation: FID, KID, Inception Score and CLIP score (``huabi.eval.api``), model comparisons
(``huabi.eval.compare``) and huabi-mini's faithfulness study (``huabi.eval.faithfulness``).

The names below load on first use, so ``import huabi.eval`` stays light.
"""

_API = ("EvalOptions", "MetricReport", "Session", "fid", "kid", "inception_score", "clip_score")

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from huabi.eval import api

        return getattr(api, name)
    raise AttributeError(f"module 'huabi.eval' has no attribute {name!r}")

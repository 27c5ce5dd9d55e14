"""Distributed LightGBM on Ray: ``LightGBMEstimator`` and ``LightGBMScalingConfig``.

Example:
    >>> from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig
    >>> est = LightGBMEstimator(scaling_config=LightGBMScalingConfig(num_workers=2))
    >>> # booster = est.fit(train_connector, input_cols=["age", "income"], label_col="y")
"""

from neve.lightgbm._estimator import LightGBMEstimator, LightGBMScalingConfig

__all__ = ["LightGBMEstimator", "LightGBMScalingConfig"]

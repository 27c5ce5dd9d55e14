"""Distributed XGBoost on Ray: ``XGBEstimator`` and ``XGBScalingConfig``.

Example:
    >>> from neve.xgboost import XGBEstimator, XGBScalingConfig
    >>> est = XGBEstimator(params={"max_depth": 6}, scaling_config=XGBScalingConfig(num_workers=2))
    >>> # booster = est.fit(train_connector, input_cols=["age", "income"], label_col="y")
"""

from neve.xgboost._estimator import XGBEstimator, XGBScalingConfig

__all__ = ["XGBEstimator", "XGBScalingConfig"]

"""neve: distributed XGBoost, LightGBM and PyTorch training on the data where it lives.

Snowflake ML's distributed-training API, open and self-hosted on Ray::

    from neve.data import DataConnector, ShardedDataConnector
    from neve.xgboost import XGBEstimator, XGBScalingConfig
    from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig
    from neve.pytorch import PyTorchDistributor, PyTorchScalingConfig, WorkerResourceConfig
"""

import logging

__version__ = "0.1.0"
__all__ = ["__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())

"""EveryDream2-compatible training data: folder scan, captions, aspect buckets, epoch plans,
data transforms and the loader. See docs/data.md."""

from data.batch import Batch
from data.buckets import bucket_name, bucket_step, make_buckets, nearest_bucket
from data.dataset import TrainDataset, load_dataset
from data.errors import DataRootChangedError, DataTransformError
from data.images import decode_image
from data.loader import make_loader
from data.plan import BatchPlan, PlanItem
from data.scan import ImageRecord
from data.settings import DataSettings
from data.transforms import DataTransforms

__all__ = [
    "Batch",
    "BatchPlan",
    "DataRootChangedError",
    "DataSettings",
    "DataTransformError",
    "DataTransforms",
    "ImageRecord",
    "PlanItem",
    "TrainDataset",
    "bucket_name",
    "bucket_step",
    "decode_image",
    "load_dataset",
    "make_buckets",
    "make_loader",
    "nearest_bucket",
]

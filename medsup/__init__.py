"""medsup: CT segmentation with a deeply-supervised 3D U-Net (MONAI blocks, Ignite engines, MLflow)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medsup")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"

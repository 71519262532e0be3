"""lpcv-depth core: the Track 3 contract, stage plumbing (manifests, logging, errors) and shared I/O."""

from lpcv_depth.contract import TRACK3, Contract, TensorSpec
from lpcv_depth.errors import LpcvError

__all__ = ["TRACK3", "Contract", "TensorSpec", "LpcvError"]
__version__ = "0.1.0"

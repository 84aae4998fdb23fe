"""On-premises synthetic ECG appliance: a class-conditional normalizing flow served over gRPC."""

from appliance.classes import AAMI_CLASSES
from appliance.errors import ApplianceError

__version__ = "0.1.0"

__all__ = ["AAMI_CLASSES", "ApplianceError", "__version__"]

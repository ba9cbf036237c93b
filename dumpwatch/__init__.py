"""dumpwatch: sorts DICOM files received by storescp into a friendly, safe tree."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

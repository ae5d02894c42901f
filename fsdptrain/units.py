# TEMPORARY shim until branch est lands
from .config import parse_size  # noqa

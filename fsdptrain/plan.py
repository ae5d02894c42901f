# TEMPORARY shim until branch est lands
from .parallelize import resolve_precision, check_device_support, checkpoint_modes, describe_modes  # noqa

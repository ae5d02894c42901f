"""Distributed set-up: the process group, elastic restarts, the device mesh, the resolved run plan, and
stop requests agreed across ranks."""

"""On-device measurement agent for autoseg (numpy + onnxruntime only, Python >= 3.8).

The host uploads this package to the device and talks to ``python3 -m edge_agent serve``
over JSON lines (see ``edge_agent.protocol``). Nothing here may import torch or autoseg.
"""

# Bump rule: increment whenever the protocol (edge_agent/protocol.py) or the measurement
# method (edge_agent/bench.py) changes in any way. The host uploads the agent into a
# directory named after this string, so a bump forces a fresh upload on every device.
__version__ = "4"

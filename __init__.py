"""ComfyUI entry point: this repository is a ComfyUI custom-node pack (see comfyui_nodes/).

ComfyUI imports this file when the repository sits in ComfyUI/custom_nodes/. The folder is put on
sys.path so the nodes import the bundled core package ``smfsr``. Outside ComfyUI it does nothing.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    pass
else:
    from .comfyui_nodes.extension import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = None

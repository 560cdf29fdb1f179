"""ComfyUI entry point: this repository is a ComfyUI custom-node pack (see comfyui_nodes/).

ComfyUI imports this file when the repository sits in ComfyUI/custom_nodes/ (under a module name
made from its path). The folder is put on sys.path so the nodes import the bundled core package
``smfsr``. Outside ComfyUI it does nothing, with one exception: Python started in the clone's parent
folder finds this folder first when it imports ``smfsr`` (a clone named ``smfsr``); then the core
package inside it takes this module's place, so ``from smfsr.pipeline import ...`` works there too.
"""

import importlib.util
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))

if __name__ == "smfsr":  # imported as the core package from the parent folder: become it
    _core = os.path.join(_here, "smfsr")
    _spec = importlib.util.spec_from_file_location("smfsr", os.path.join(_core, "__init__.py"),
                                                   submodule_search_locations=[_core])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["smfsr"] = _module  # the import system returns what sys.modules holds after this file ran
    _spec.loader.exec_module(_module)
else:
    if _here not in sys.path:
        sys.path.insert(0, _here)
    try:
        import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
    except ImportError:
        pass
    else:
        from .comfyui_nodes.extension import comfy_entrypoint  # noqa: F401

    WEB_DIRECTORY = None

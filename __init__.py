"""ComfyUI entry point: this repository is a ComfyUI custom-node pack (see comfyui_nodes/).

ComfyUI imports this file when the repository sits in ComfyUI/custom_nodes/ (under a module name
made from its path). The bundled core package ``smfsr`` is registered by its own path, and the
repository's folder is not put on sys.path: its other folders (bench, tests, scripts, models)
would shadow another pack's modules of the same name. Outside ComfyUI it does nothing, with one
exception: Python started in the clone's parent folder finds this folder first when it imports
``smfsr`` (a clone named ``smfsr``); then the core package inside it takes this module's place, so
``from smfsr.pipeline import ...`` works there too.
"""

import importlib.util
import logging
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))


def _load_core():
    """The core package ``smfsr`` from this repository, as the top-level module ``smfsr``."""
    core = os.path.join(_here, "smfsr")
    spec = importlib.util.spec_from_file_location("smfsr", os.path.join(core, "__init__.py"),
                                                  submodule_search_locations=[core])
    module = importlib.util.module_from_spec(spec)
    sys.modules["smfsr"] = module  # the import system returns what sys.modules holds after this file ran
    spec.loader.exec_module(module)
    return module


if __name__ == "smfsr":  # imported as the core package from the parent folder: become it
    _load_core()
else:
    try:
        import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
    except ImportError:
        pass
    else:
        _core = sys.modules.get("smfsr")
        if _core is None or os.path.dirname(os.path.dirname(os.path.abspath(_core.__file__))) != _here:
            _load_core()
        from smfsr.stack import import_problem

        _problem = import_problem()
        if _problem:  # one line on ComfyUI's console instead of a traceback; the pack offers no nodes
            logging.error("SMFSR: the nodes are not loaded: %s", _problem)
        else:
            from .comfyui_nodes.extension import comfy_entrypoint  # noqa: F401

    WEB_DIRECTORY = None

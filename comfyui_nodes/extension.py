"""The ComfyUI extension object (V3): registers the model folder and lists the nodes."""

from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .model import register_model_folder


class SMFSRExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .nodes import NODES

        return NODES


async def comfy_entrypoint() -> SMFSRExtension:
    register_model_folder()
    return SMFSRExtension()

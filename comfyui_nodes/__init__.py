"""SMFSR's ComfyUI node pack (V3 schema): ``extension`` (the entry point ComfyUI calls), ``nodes``
(the node classes), ``model`` (model folder, loading, memory manager) and ``convert`` (ComfyUI
types <-> the core's). Only ``convert`` imports without ComfyUI."""

"""The AUTOMATIC1111 / Forge extension: ``upscaler`` (imported by scripts/smfsr.py inside the web UI)
and ``logic`` (the decisions, importable without A1111)."""

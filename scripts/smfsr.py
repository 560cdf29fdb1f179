# A1111/Forge import every file in scripts/: this one loads the SMFSR upscaler, which registers
# itself by subclassing modules.upscaler.Upscaler. When SMFSR's dependencies do not import with the
# web UI's torch, the console says why in one line, and the web UI starts without the upscaler.
from smfsr.stack import import_problem

problem = import_problem()
if problem:
    print(f"SMFSR: the upscaler is not loaded: {problem}", flush=True)
else:
    import a1111_extension.upscaler  # noqa: F401

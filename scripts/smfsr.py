# A1111/Forge import every file in scripts/: this one only loads the SMFSR upscaler, which registers
# itself by subclassing modules.upscaler.Upscaler.
import a1111_extension.upscaler  # noqa: F401

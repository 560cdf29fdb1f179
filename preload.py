"""A1111/Forge: command-line flags, read before the web UI parses its arguments."""


def preload(parser):
    parser.add_argument("--smfsr-models-path", type=str, default=None,
                        help="Folder with SMFSR models (.safetensors bundles or official folders); default models/SMFSR")

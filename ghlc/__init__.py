"""ghlc: make any PyTorch model train with Global-guided Hebbian Learning."""

from .config import GHLConfig
from .errors import ConfigError, GHLError, PassError, RuntimeGHLError, TraceError

__version__ = "0.1.0"

from . import passes, runtime  # noqa: E402
from .amp import GradScaler  # noqa: E402
from .artifact import load, save  # noqa: E402
from .build import build, compile, prepare  # noqa: E402
from .cudagraph import cuda_graph_step  # noqa: E402
from .export import export_onnx  # noqa: E402
from .graph import LayerGraph  # noqa: E402
from .trace import trace  # noqa: E402

__all__ = [
    "ConfigError", "GHLConfig", "GHLError", "GradScaler", "LayerGraph", "PassError",
    "RuntimeGHLError", "TraceError", "build", "compile", "cuda_graph_step", "export_onnx", "load",
    "passes", "prepare", "runtime", "save", "trace",
]

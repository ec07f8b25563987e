"""ghlc: make any PyTorch model train with Global-guided Hebbian Learning."""

from . import distributed, passes, runtime
from .amp import GradScaler
from .artifact import load, save
from .build import build, compile, prepare
from .config import GHLConfig
from .cudagraph import cuda_graph_step
from .errors import ConfigError, GHLError, PassError, RuntimeGHLError, TraceError
from .export import export_onnx
from .graph import LayerGraph
from .runtime.clip import clip_grad_norm_
from .trace import trace
from .version import __version__

__all__ = [
    "ConfigError",
    "GHLConfig",
    "GHLError",
    "GradScaler",
    "LayerGraph",
    "PassError",
    "RuntimeGHLError",
    "TraceError",
    "build",
    "clip_grad_norm_",
    "compile",
    "cuda_graph_step",
    "distributed",
    "export_onnx",
    "load",
    "__version__",
    "passes",
    "prepare",
    "runtime",
    "save",
    "trace",
]

"""CPU inference engines for the backbones (OpenVINO, ONNX Runtime) with torch as the fallback."""
from .export import export_name, export_onnx
from .runners import (ENGINE_CHOICES, EngineRunner, EngineSpec, TorchRunner, cosine_per_image, make_runner,
                      plan_engine)

__all__ = ["ENGINE_CHOICES", "EngineRunner", "EngineSpec", "TorchRunner", "cosine_per_image", "export_name",
           "export_onnx", "make_runner", "plan_engine"]

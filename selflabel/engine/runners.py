"""Forward passes through torch or a CPU inference engine (OpenVINO, ONNX Runtime), one interface.

A runner maps a normalised batch [B, 3, H, W] to a `BackboneOutput`. Engine runners export the
backbone once per input size (selflabel/engine/export.py), compile it, and check each new input size
against torch on the first real images they see: per-image cosine similarity of all three outputs
>= 0.999 in fp32 (>= 0.99 in bf16, whose rounding alone costs ~0.998 on dense maps; below that, a bf16
engine still passes when it is no further from torch fp32 than torch's own bf16 run, the fallback, on the
same images: upscaled 32-px frames cost both ~0.986 on dense maps, see `parity_failure`); a passed check
is recorded beside the export (per engine version and precision), so it runs once per machine. Anything that
goes wrong (engine not installed, export, compilation, the check) logs one line and the runner
continues with torch, so an engine can make a run faster, never break it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_json
from ..backbones import Backbone, BackboneOutput, normalize_pixels
from ..devices import engine_threads
from .export import OUTPUTS, export_onnx

log = logging.getLogger(__name__)

ENGINE_CHOICES = ("auto", "openvino", "onnxruntime", "torch")
ENGINE_ENV = "SELFLABEL_ENGINE"  # the engine when the caller passes None (until the config has backbone.engine)
PARITY_FP32 = 0.999
PARITY_BF16 = 0.99
PARITY_IMAGES = 4  # images of the first batch per input size compared against torch
PARITY_FLOOR = 0.95  # below this per-image cosine an engine is broken, whatever torch's reduced precision gives
PARITY_SLACK = 1.25  # a reduced-precision engine may deviate from fp32 up to this times the fallback's deviation


def parity_failure(name: str, cos: float, need: float, fallback_cos: float | None = None) -> str | None:
    """Why an engine output fails its check against torch fp32, or None when it passes.

    `cos`: the engine's smallest per-image cosine to torch fp32; `fallback_cos`: the same for torch at the
    engine's precision (what would run instead). Falling back to a path no closer to fp32 than the engine
    only costs speed, so below `need` the engine passes when its deviation 1 - cos is at most
    PARITY_SLACK x the fallback's and it stays above PARITY_FLOOR."""
    if cos >= need:
        return None
    if fallback_cos is not None and cos >= PARITY_FLOOR and 1.0 - cos <= PARITY_SLACK * (1.0 - fallback_cos):
        return None
    why = f"{name} differs from torch fp32: cosine {cos:.4f} < {need}"
    if fallback_cos is not None:
        why += f" and further from it than torch's own run at this precision ({fallback_cos:.4f})"
    return why


@dataclass(frozen=True)
class EngineSpec:
    """What computes the features: an engine name and the precision it runs at (part of cache keys)."""

    engine: str  # torch | openvino | onnxruntime
    precision: str  # fp32 | bf16 | fp16

    @property
    def tag(self) -> str:
        return f"{self.engine}-{self.precision}"


def engine_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def plan_engine(requested: str | None, device: torch.device, precision: str) -> EngineSpec:
    """The engine and precision a run will use (`requested` None: $SELFLABEL_ENGINE, else 'auto'). 'auto': OpenVINO on a CPU when installed (measured
    fastest, README 'Speed'), else ONNX Runtime, else torch; torch on a GPU. ONNX Runtime's CPU
    provider has no bf16 kernels, so it always runs fp32."""
    requested = requested or os.environ.get(ENGINE_ENV) or "auto"
    if requested not in ENGINE_CHOICES:
        raise ValueError(f"engine '{requested}' is not one of {', '.join(ENGINE_CHOICES)}")
    if device.type != "cpu" or requested == "torch":
        return EngineSpec("torch", precision)
    order = ("openvino", "onnxruntime") if requested == "auto" else (requested,)
    found = [name for name in order if engine_installed(name)]
    if found and engine_installed("onnx"):  # torch.onnx.export needs the onnx package
        return EngineSpec(found[0], "fp32" if found[0] == "onnxruntime" else precision)
    missing = " ".join(([] if found else [order[0]]) + ([] if engine_installed("onnx") else ["onnx"]))
    _log_once(f"inference engine not installed (pip install {missing}): running the backbone in torch")
    return EngineSpec("torch", precision)


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.warning(message)


def cosine_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each image's flattened output (rows of a and b)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-30)


class TorchRunner:
    """The backbone in torch, under autocast when `precision` is bf16/fp16."""

    def __init__(self, backbone: Backbone, device: torch.device, precision: str) -> None:
        self.backbone = backbone.to(device).eval()
        self.device = device
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.spec = EngineSpec("torch", precision)

    @property
    def active(self) -> EngineSpec:
        """What runs (always torch here; an `EngineRunner` may change after a fallback)."""
        return self.spec

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> BackboneOutput:
        x = x.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.backbone(x)
        return BackboneOutput(out.global_feat.float(), out.dense.float(), out.saliency.float())


    def pixels(self, x: torch.Tensor) -> BackboneOutput:
        """uint8 [B, 3, H, W] pixels -> outputs (normalised here with the backbone's mean and std)."""
        return self(normalize_pixels(x, self.backbone.mean, self.backbone.std))


class EngineRunner:
    """An exported backbone in OpenVINO or ONNX Runtime, with torch as the fallback (see module docstring)."""

    def __init__(self, backbone: Backbone, spec: EngineSpec, cache_root: str | Path, threads: int | None = None) -> None:
        self.backbone = backbone.to("cpu").eval()
        self.spec = spec
        self.cache_root = Path(cache_root)
        self.threads = threads or engine_threads()
        self._compiled: dict[tuple[int, int, bool], Any] = {}  # (H, W, takes uint8 pixels)
        self._fallback: TorchRunner | None = None
        self._torch_fp32 = TorchRunner(self.backbone, torch.device("cpu"), "fp32")

    @property
    def active(self) -> EngineSpec:
        """What actually runs now (torch after a fallback)."""
        return self._fallback.spec if self._fallback is not None else self.spec

    def fall_back(self, why: str) -> None:
        if self._fallback is None:
            log.warning("engine %s failed for %s (%s): using torch instead", self.spec.engine, self.backbone.name, why)
            self._fallback = TorchRunner(self.backbone, torch.device("cpu"), self.spec.precision)

    def _compile(self, path: Path, pixels: bool = False):
        if self.spec.engine == "openvino":
            import openvino as ov

            core = ov.Core()
            core.set_property({"CACHE_DIR": str(path.parent / "openvino-cache")})  # compiled blobs: faster next time
            hint = {"bf16": "bf16", "fp16": "f16"}.get(self.spec.precision, "f32")
            streams = openvino_streams(self.threads)
            model = pixel_input(core.read_model(str(path)), self.backbone.mean, self.backbone.std) if pixels else str(path)
            compiled = core.compile_model(model, "CPU", {
                "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": self.threads,
                **({"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams} if streams > 1 else
                   {"PERFORMANCE_HINT": "LATENCY"})})
            outputs = [compiled.output(name) for name in OUTPUTS]
            if streams == 1:
                request = compiled.create_infer_request()

                def run(x: np.ndarray) -> list[np.ndarray]:
                    res = request.infer({0: x})
                    return [np.array(res[o], copy=True) for o in outputs]
                return run
            requests = [compiled.create_infer_request() for _ in range(streams)]

            def run_streams(x: np.ndarray) -> list[np.ndarray]:
                # one request per part, started together and read back here in order: no Python callback
                # ever runs on an engine thread
                parts = [np.ascontiguousarray(p) for p in np.array_split(x, min(streams, len(x)))]
                for req, part in zip(requests, parts):
                    req.start_async({0: part})
                got = []
                for req in requests[: len(parts)]:
                    req.wait()
                    got.append([np.array(req.get_tensor(o).data, copy=True) for o in outputs])
                return [np.concatenate([g[j] for g in got]) for j in range(len(outputs))]
            return run_streams
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda x: session.run(list(OUTPUTS), {"x": x})

    def _check_file(self, path: Path, pixels: bool = False) -> Path:
        """Where a passed parity check of this export, engine version, precision and input kind is recorded."""
        version = importlib.metadata.version(self.spec.engine)
        kind = "-u8" if pixels else ""
        return path.with_name(f"{path.stem}.{self.spec.engine}-{version}-{self.spec.precision}{kind}.checked.json")

    def _prepare(self, hw: tuple[int, int], x: torch.Tensor, pixels: bool = False) -> bool:
        """Export, compile and check the engine for inputs of size `hw` on the real batch `x` (uint8
        pixels with `pixels`). A passed check is recorded beside the export, so later runs on this machine
        skip the torch reference."""
        try:
            path = export_onnx(self.backbone, hw[0], hw[1], self.cache_root)
            run = self._compile(path, pixels)
            checked = self._check_file(path, pixels)
            sample = x[:PARITY_IMAGES].contiguous()
            got = None if checked.is_file() else run(sample.numpy())
        except Exception as exc:  # engine-specific errors of every kind: the fallback is the point
            self.fall_back(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip())
            return False
        if got is not None:
            normalized = self._normalized(sample) if pixels else sample
            ref = _arrays(self._torch_fp32(normalized))
            need = PARITY_FP32 if self.spec.precision == "fp32" else PARITY_BF16
            for name, g, r in zip(OUTPUTS, got, ref):
                if g.shape != r.shape:
                    self.fall_back(f"{name} shape {g.shape} differs from torch's {r.shape}")
                    return False
            cosines = _min_cosines(got, ref)
            fallback = None
            if self.spec.precision != "fp32" and min(cosines.values()) < need:  # only then: one more small forward
                fallback = _min_cosines(_arrays(TorchRunner(self.backbone, torch.device("cpu"), self.spec.precision)(normalized)), ref)
            for name, cos in cosines.items():
                why = parity_failure(name, cos, need, None if fallback is None else fallback[name])
                if why is not None:
                    self.fall_back(f"{why} at {hw[0]}x{hw[1]}")
                    return False
            with contextlib.suppress(OSError):  # unrecorded only means checking again next time
                atomic_write_json(checked, {"min_cosine": cosines, "images": len(sample), "threshold": need,
                                            **({"fallback_min_cosine": fallback} if fallback else {})})
        self._compiled[(*hw, pixels)] = run
        return True

    def __call__(self, x: torch.Tensor) -> BackboneOutput:
        x = x.to("cpu").float().contiguous()
        hw = (int(x.shape[2]), int(x.shape[3]))
        if self._fallback is None and (*hw, False) not in self._compiled:
            self._prepare(hw, x)
        if self._fallback is not None:
            return self._fallback(x)
        try:
            g, d, s = self._compiled[(*hw, False)](x.numpy())
        except Exception as exc:
            self.fall_back(f"{type(exc).__name__}: {exc}")
            return self._fallback(x)
        return BackboneOutput(torch.from_numpy(g), torch.from_numpy(d), torch.from_numpy(s))

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_pixels(x, self.backbone.mean, self.backbone.std)

    def pixels(self, x: torch.Tensor) -> BackboneOutput:
        """uint8 [B, 3, H, W] pixels -> outputs. OpenVINO takes them as they are and normalises inside the
        graph (its preprocessing folds into the first layer: no float batch built here, a quarter of the
        bytes copied in); ONNX Runtime and torch get the batch normalised here."""
        if self.spec.engine != "openvino" or self._fallback is not None:
            return self(self._normalized(x))
        x = x.to("cpu").contiguous()
        hw = (int(x.shape[2]), int(x.shape[3]))
        if (*hw, True) not in self._compiled:
            self._prepare(hw, x, pixels=True)
        if self._fallback is not None:
            return self._fallback(self._normalized(x))
        try:
            g, d, s = self._compiled[(*hw, True)](x.numpy())
        except Exception as exc:
            self.fall_back(f"{type(exc).__name__}: {exc}")
            return self._fallback(self._normalized(x))
        return BackboneOutput(torch.from_numpy(g), torch.from_numpy(d), torch.from_numpy(s))


def _arrays(out: BackboneOutput) -> tuple[np.ndarray, ...]:
    """A runner's three outputs as arrays, in the order of `OUTPUTS`."""
    return out.global_feat.numpy(), out.dense.numpy(), out.saliency.numpy()


def _min_cosines(got, ref) -> dict[str, float]:
    """Output name -> the smallest per-image cosine of `got` to `ref` (both in the order of `OUTPUTS`)."""
    return {name: float(cosine_per_image(g, r).min()) for name, g, r in zip(OUTPUTS, got, ref)}


def pixel_input(model, mean, std):
    """The OpenVINO model taking uint8 NCHW pixels: (x / 255 - mean) / std as its own first step."""
    from openvino import Layout, Type
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    ppp.input(0).tensor().set_element_type(Type.u8).set_layout(Layout("NCHW"))
    ppp.input(0).model().set_layout(Layout("NCHW"))
    ppp.input(0).preprocess().convert_element_type(Type.f32).mean([255.0 * m for m in mean]).scale(
        [255.0 * s for s in std])
    return ppp.build()


STREAMS_ENV = "SELFLABEL_OPENVINO_STREAMS"


def openvino_streams(threads: int) -> int:
    """OpenVINO CPU streams for a batch: one thread per stream, the batch split among them
    ($SELFLABEL_OPENVINO_STREAMS overrides; 1 = one latency-mode request with every thread). On 2 cores
    two one-thread streams ran mobilenet_v2's pipeline 0-12 % faster than one two-thread request (five
    A/B runs): a stream whose core is busy decoding delays only its own part of the batch, where a
    two-thread request waits for its slower thread at every layer (benchmarks/features.py)."""
    env = os.environ.get(STREAMS_ENV)
    if env:
        return max(1, int(env))
    return max(1, min(threads, 4))


def make_runner(backbone: Backbone, device: torch.device, spec: EngineSpec, cache_root: str | Path,
                threads: int | None = None) -> TorchRunner | EngineRunner:
    """The runner for `spec` (`plan_engine`'s answer)."""
    if spec.engine == "torch":
        return TorchRunner(backbone, device, spec.precision)
    return EngineRunner(backbone, spec, cache_root, threads)

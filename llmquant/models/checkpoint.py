"""A float checkpoint read lazily from its safetensors shards.

The model is built on the meta device (no memory); a decoder block, the embedding or the lm_head
is read from the shards only when it is needed and released afterwards, so quantizing never holds
the whole model: peak memory is one block plus the calibration activations, whatever the depth.
Every header is checked against the config before any work: a missing shard or tensor, a
truncated file or a shape the config does not describe is a one-line error, not a traceback hours in.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import UserError, require_finite
from ..memory import weights_from_the_system
from .adapters import ArchAdapter, adapter_for
from .loader import read_config, resolve_model

# safetensors' dtype names -> torch dtypes of float checkpoints
FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def shard_index(path: Path) -> dict[str, Path]:
    """tensor name -> shard, from model.safetensors.index.json or the single model file; every shard the
    index names must exist inside the checkpoint."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise UserError(f"{index}: not a valid safetensors index (no weight_map of names to files)") from None
        for name in sorted(set(weight_map.values())):
            shard = path / name
            if shard.resolve().parent != path.resolve():
                raise UserError(f"{index}: shard '{name}' lies outside the checkpoint")
            if not shard.is_file():
                raise UserError(f"{index}: shard '{name}' is missing")
        return {tensor: path / name for tensor, name in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        pickled = sorted(p.name for p in [*path.glob("*.bin"), *path.glob("*.pt*")])
        hint = (f" (found {pickled[0]}: pickled weights are not loaded, convert them to safetensors)" if pickled
                else " and no model.safetensors.index.json" if files else "")
        raise UserError(f"{path}: {'several' if files else 'no'} .safetensors files{hint}")
    return {name: files[0] for name in _keys(files[0])}


def _keys(shard: Path) -> list[str]:
    try:
        with safe_open(shard, "pt") as f:
            return list(f.keys())
    except Exception as err:  # safetensors validates the header against the file size
        raise UserError(f"{shard}: not a valid safetensors file ({err})") from None


class Checkpoint:
    """A local float checkpoint: config, tokenizer, shard headers, and the model skeleton on meta."""

    def __init__(self, name: str | Path, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        weights_from_the_system()
        self.path = resolve_model(name)
        raw = read_config(self.path)
        if "quantization_config" in raw:
            raise UserError(f"{self.path} is already quantized ({raw['quantization_config'].get('quant_method')}); "
                            f"give a float checkpoint")
        self.index = shard_index(self.path)
        self.headers = self._read_headers()
        try:
            self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
            self.dtype = self._model_dtype()
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype,
                                                         trust_remote_code=trust_remote_code)
        except Exception as err:  # whatever transformers or torch make of a bad config, it is the config's fault
            raise UserError(f"{self.path}/config.json does not describe a model that can be built: "
                            f"{_reason(err)}") from None
        self.adapter: ArchAdapter = adapter_for(raw["model_type"], model)
        if not len(self.adapter.blocks(model)):
            raise UserError(f"{self.path}/config.json describes a model without decoder blocks")
        model.tie_weights()  # from_config leaves tied tensors apart on the meta device
        self.model = model.eval()
        self._tied = "lm_head.weight" in model.state_dict() and "lm_head.weight" not in self.state_shapes()
        self._dtypes = {name: p.dtype for name, p in model.named_parameters()}  # what release() restores
        self.config.dtype = self.dtype
        self._check_shapes()

    def _read_headers(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, safetensors dtype), from the headers alone; a name the index gives a shard must be
        in that shard."""
        headers, held = {}, {}
        for shard in sorted(set(self.index.values())):
            try:
                with safe_open(shard, "pt") as f:
                    held[shard] = set(f.keys())
                    for name in held[shard]:
                        t = f.get_slice(name)
                        headers[name] = (tuple(t.get_shape()), t.get_dtype())
            except Exception as err:
                raise UserError(f"{shard}: not a valid safetensors file ({err})") from None
        for name, shard in self.index.items():
            if name not in held[shard]:
                raise UserError(f"{shard}: the index names tensor '{name}', but the shard does not hold it")
        return headers

    def _model_dtype(self) -> torch.dtype:
        """What from_pretrained(dtype='auto') computes in: the config's dtype, else the stored one."""
        dtype = getattr(self.config, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
        stored = [FLOAT_DTYPES[d] for _, d in self.headers.values() if d in FLOAT_DTYPES]
        return stored[0] if stored else torch.float32

    def _check_shapes(self) -> None:
        for module_name, tensor in self.state_shapes().items():
            name = self.adapter.to_disk(module_name)
            if name not in self.headers:
                raise UserError(f"{self.path}: checkpoint lacks tensor '{name}'")
            shape, dtype = self.headers[name]
            if shape != tuple(tensor.shape):
                raise UserError(f"{self.index[name]}: '{name}' has shape {list(shape)}, but config.json describes "
                                f"{list(tensor.shape)}")
            if dtype not in FLOAT_DTYPES:
                raise UserError(f"{self.index[name]}: '{name}' is {dtype}; a float checkpoint stores BF16, F16 or "
                                f"F32")

    def state_shapes(self) -> dict[str, torch.Tensor]:
        """The skeleton's tensors (meta) by name, the second name of a tied tensor left out."""
        seen, out = set(), {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            out[name] = tensor
        return out

    @property
    def tied(self) -> bool:
        """The output embedding is the input one (stored once)."""
        return self._tied

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor (by its name in the model, or on disk) from its shard, in the model's dtype (or
        `dtype`); checked to be finite."""
        name = self.adapter.to_disk(name)
        shard = self.index[name]
        with safe_open(shard, "pt") as f:  # closed at once: a mapping kept open would keep its pages resident
            tensor = f.get_tensor(name).to(self.dtype)
        require_finite(tensor, shard, name)
        return tensor if dtype is None else tensor.to(dtype)

    def materialize(self, module: nn.Module, prefix: str, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
        """Read `module`'s parameters (full names start with `prefix`) from the shards onto `device`, and the
        buffers the checkpoint stores (DeepSeek's router bias)."""
        for name, param in list(module.named_parameters(recurse=True)):
            if param.is_meta:
                value = self.read(prefix + name, dtype).to(device)
                _set(module, name, nn.Parameter(value, requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=True)):
            if self.adapter.to_disk(prefix + name) in self.index:
                owner, _, leaf = name.rpartition(".")
                stored = self.read(prefix + name, buffer.dtype if buffer.is_floating_point() else None)
                (module.get_submodule(owner) if owner else module).register_buffer(leaf, stored.to(device))
        return module

    def release(self, module: nn.Module) -> None:
        """Drop `module`'s parameters back onto the meta device, in the dtype the skeleton had: its memory is
        free again. Tied embeddings are tied again (materializing one gave it a parameter of its own), so the
        skeleton's tensors stay those the checkpoint stores, whatever a pass did with them."""
        prefix = "" if module is self.model else prefix_of(self.model, module)
        for name, param in list(module.named_parameters(recurse=True)):
            dtype = self._dtypes.get(prefix + name, param.dtype)  # a pass may have computed in another dtype
            _set(module, name, nn.Parameter(torch.empty_like(param, device="meta", dtype=dtype), requires_grad=False))
        if self._tied:
            self.model.tie_weights()

    def tokenizer(self, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the tokenizer of {self.path}: {str(err).splitlines()[0]}") from None


def _reason(err: Exception) -> str:
    """The informative line of an error: validators put a heading line first, the reason last."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[-1] if lines[0].endswith(":") else lines[0]


def prefix_of(model: nn.Module, module: nn.Module) -> str:
    """`module`'s full name in `model`, with the trailing dot its parameters' names take."""
    return next(name for name, m in model.named_modules() if m is module) + "."


def _set(module: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, param)
